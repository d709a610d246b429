"""The pieces of a timm ViT forward pass, callable on token subsets.

Reducers compose these instead of copying timm's code, so every timm block feature keeps working: q/k-norm,
attention scale-norm, LayerScale, drop-path, qkv bias, fused SDPA. The one generalisation over timm is that a block
may compute outputs for a subset of its input tokens (queries) while keys and values span all of them -- what
Patch Slimming, ViT-Slim token pruning and Evo-ViT's slow path need.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn


class UnsupportedBackbone(ValueError):
    """The backbone lacks the standard timm ViT layout a reducer relies on."""


def check_standard_vit(vit: nn.Module, reducer: str) -> None:
    """Fail early, naming the fix, when a reducer is applied to a model whose blocks it cannot patch faithfully.

    Prefix tokens (CLS, distillation token, registers) and the pooling (CLS token, average, attention pooling) are
    not checked here: every reducer protects all ``vit.num_prefix_tokens`` prefix tokens and pools through
    :func:`classify`. Methods that cannot work without a CLS token say so with :func:`require_cls_token`.
    """
    if not isinstance(vit, VisionTransformer):
        raise UnsupportedBackbone(f"reducer={reducer} needs a timm VisionTransformer, got {type(vit).__name__}")
    for i, blk in enumerate(vit.blocks):
        if type(blk) is not Block or type(blk.attn) is not Attention:
            raise UnsupportedBackbone(
                f"reducer={reducer}: block {i} is {type(blk).__name__}/{type(blk.attn).__name__}; only timm's "
                "pre-norm Block with standard Attention is supported (choose a ViT/DeiT/DeiT-III backbone)"
            )
        if blk.attn.gate is not None:
            raise UnsupportedBackbone(f"reducer={reducer}: gated attention (block {i}) is not supported")


def require_cls_token(vit: VisionTransformer, reducer: str, why: str) -> None:
    """One-line rejection of a backbone without a CLS token, for the methods whose algorithm is defined by it."""
    if not vit.has_class_token:
        raise UnsupportedBackbone(
            f"reducer={reducer} needs a CLS token ({why}); backbone {vit.default_cfg.get('architecture', '')!r} "
            f"pools with global_pool={vit.global_pool!r} -- choose a CLS-token backbone"
        )


def embed(vit: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """Images -> the token sequence entering block 0 (patches, CLS, position embedding, pre-norm)."""
    x = vit.patch_embed(images)
    x = vit._pos_embed(x)
    x = vit.patch_drop(x)
    return vit.norm_pre(x)


def classify(vit: VisionTransformer, tokens: torch.Tensor, size: torch.Tensor | None = None) -> torch.Tensor:
    """Final norm, pooling and head, exactly as timm's forward does after the blocks.

    ``size`` (B, N, 1) is how many patches each token stands for after merging (ToMe, EViT's fused token): average
    pooling then weights tokens by it and attention pooling adds ``log(size)`` to its logits -- ToMe's proportional
    attention -- so the pooled feature equals pooling over the patches the tokens represent. CLS-token pooling
    (distilled models: CLS and distillation token) does not look at the other tokens.
    """
    x = vit.norm(tokens)
    if size is None or (vit.attn_pool is None and vit.global_pool in ("token", "")):
        return vit.forward_head(x)
    if not vit.pool_include_prefix:
        x, size = x[:, vit.num_prefix_tokens :], size[:, vit.num_prefix_tokens :]
    # Sizes are patch counts: summed in fp32 (bf16 is not exact above 256), the pooled feature cast back.
    size = size.float()
    if vit.attn_pool is not None:
        bias = size.log().transpose(1, 2).unsqueeze(1).to(x.dtype)  # (B, 1, 1, N): every head
        pooled = vit.attn_pool(x, attn_mask=bias)
    else:
        mean = ((x.float() * size).sum(dim=1) / size.sum(dim=1)).to(x.dtype)
        peak = x.masked_fill(size == 0, -torch.inf).amax(dim=1)  # a zero-size row is padding (ATS), never a max
        pooled = {"avg": mean, "max": peak, "avgmax": 0.5 * (peak + mean)}[vit.global_pool]
    return vit.head(vit.head_drop(vit.fc_norm(pooled)))


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` of ``x`` (B, N, ...): ``index`` is (n,) shared by the batch, or (B, n) per image."""
    if index.dim() == 1:
        return x.index_select(1, index)
    # Per image: one index_select over the flattened batch, 2-6x faster on CPU than torch.gather with an index
    # expanded over the channels (measured for ToMe and ATS, which gather in every block).
    b, n = x.shape[:2]
    rows = (index + torch.arange(b, device=index.device).unsqueeze(1) * n).flatten()
    return x.reshape(b * n, *x.shape[2:]).index_select(0, rows).view(b, index.shape[1], *x.shape[2:])


def split_heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, n, _ = t.shape
    return t.view(b, n, num_heads, -1).transpose(1, 2)


def project_qkv(
    attn: Attention, x_q: torch.Tensor, x_kv: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q from ``x_q``, k and v from ``x_kv`` (default ``x_q``); each (B, H, n, head_dim), before q/k-norm.

    With distinct query rows the qkv Linear is split so that queries are only computed where needed.
    """
    if x_kv is None or x_kv is x_q:
        q, k, v = split_heads(attn.qkv(x_q), 3 * attn.num_heads).chunk(3, dim=1)
        return q, k, v
    w, b = attn.qkv.weight, attn.qkv.bias
    d = attn.attn_dim
    q = F.linear(x_q, w[:d], None if b is None else b[:d])
    kv = F.linear(x_kv, w[d:], None if b is None else b[d:])
    k, v = split_heads(kv, 2 * attn.num_heads).chunk(2, dim=1)
    return split_heads(q, attn.num_heads), k, v


def attend(
    attn: Attention,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """q/k-norm, scaled dot-product attention (fused), scale-norm and output projection -> (B, n_q, C)."""
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=attn_mask,
        dropout_p=attn.attn_drop.p if attn.training else 0.0,
        scale=attn.scale if scale is None else scale,
    )
    return merge_heads(attn, out)


def merge_heads(attn: Attention, out: torch.Tensor) -> torch.Tensor:
    """Per-head attention outputs (B, H, n, head_dim) -> scale-norm and output projection -> (B, n, C)."""
    b, h, n, d = out.shape
    out = attn.norm(out.transpose(1, 2).reshape(b, n, h * d))
    return attn.proj_drop(attn.proj(out))


def attention_logits(attn: Attention, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q/k-norm, then the scaled dot products (B, H, n_q, n_kv): the pre-softmax attention map."""
    return attn.q_norm(q) @ attn.k_norm(k).transpose(-2, -1) * attn.scale


def cls_attention(attn: Attention, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Softmax attention of the CLS query (row 0) over all keys, per head: (B, H, n_kv). O(n*C), no full map."""
    return attention_logits(attn, q[:, :, :1], k).softmax(dim=-1).squeeze(2)


def received_attention(
    attn: Attention, q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean softmax attention each key receives over all queries, per head: (B, H, n_kv).

    The substitute for the CLS attention row on models without a CLS token (average or attention pooling): the
    importance score of Learned Token Pruning (Kim et al., KDD 2022), also used by Zero-TPrune (CVPR 2024). It sums
    to 1 over the keys like a CLS row, so thresholds and fusion weights keep their meaning. Needs the full map.
    ``valid`` (B, n) marks the real rows of a padded batch (ATS): padded keys leave every softmax and padded queries
    the mean, so an image scores the same alone or padded.
    """
    logits = attention_logits(attn, q, k)
    if valid is None:
        return logits.softmax(dim=-1).mean(dim=2)
    logits = logits.masked_fill(~valid[:, None, None, :], -torch.inf)
    queries = valid[:, None, :, None].to(logits.dtype)
    return (logits.softmax(dim=-1) * queries).sum(dim=2) / queries.sum(dim=2)


def scoring_attention(
    attn: Attention, q: torch.Tensor, k: torch.Tensor, has_cls: bool, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """The attention row token-scoring methods rank keys by, per head (B, H, n_kv): the CLS query's row (row 0) when
    the model has a CLS token -- never a register's or the distillation token's -- else :func:`received_attention`
    (``valid``: see there; padded keys of a CLS row are the caller's to drop)."""
    return cls_attention(attn, q, k) if has_cls else received_attention(attn, q, k, valid)


def attention_residual(blk: Block, x_q: torch.Tensor, x_kv: torch.Tensor) -> torch.Tensor:
    """The attention branch of a block for query rows ``x_q`` over ``x_kv`` (both un-normalised), LayerScale and
    drop-path included."""
    h_kv = blk.norm1(x_kv)
    h_q = h_kv if x_q is x_kv else blk.norm1(x_q)
    return blk.drop_path1(blk.ls1(attend(blk.attn, *project_qkv(blk.attn, h_q, h_kv))))


def mlp_residual(blk: Block, x: torch.Tensor) -> torch.Tensor:
    return blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


def block_forward(blk: Block, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """A timm block where only rows ``keep`` produce outputs (keys/values over all of ``x``).

    ``keep=None`` is the plain block. The result has ``len(keep)`` tokens: pruned tokens are gone.
    """
    x_q = x if keep is None else gather_tokens(x, keep)
    y = x_q + attention_residual(blk, x_q, x)
    return y + mlp_residual(blk, y)
