"""FLOPs and parameter accounting.

Every figure is in multiply-accumulates (MACs), the unit all four papers call "FLOPs". Two independent numbers are
produced for each model:

* ``analytic_gmacs``: from the per-block token counts and widths a reducer reports (:class:`BlockCost`). Like the
  papers, it counts the linear layers and the two attention matmuls and ignores LayerNorm, softmax, GELU, biases,
  sorting and gathering.
* ``counted_gmacs``: ``torch.utils.flop_counter`` on a real forward pass, halved (it counts 2 FLOPs per MAC). torch
  counts the CPU fused-attention kernel as 0, so we register the standard formula for it where missing.

Tests hold the two within 2% of each other and of the papers' numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils import flop_counter


@dataclass(frozen=True)
class BlockCost:
    """What one transformer block computes, in the terms the cost model needs.

    ``n_q`` tokens get an output (queries, output projection, MLP); keys and values span ``n_kv`` tokens. Widths are
    totals over heads, so a ViT-Slim block with uneven heads is described by its summed q/k and v widths. Methods
    that reduce *between* attention and MLP (ToMe, Top-K, EViT, ATS) set ``n_mlp``: the tokens the MLP sees.
    """

    n_q: int
    n_kv: int
    embed_dim: int
    qk_dim: int
    v_dim: int
    mlp_hidden: int
    extra_macs: int = 0  # reducer-specific work attached to this block (a TSM after it, a class-attention row)
    n_mlp: int | None = None  # None: the MLP runs on the n_q attention outputs

    @classmethod
    def dense(cls, n_tokens: int, embed_dim: int, mlp_hidden: int, extra_macs: int = 0) -> BlockCost:
        return cls(n_tokens, n_tokens, embed_dim, embed_dim, embed_dim, mlp_hidden, extra_macs)

    def macs(self) -> int:
        d = self.embed_dim
        qkv = self.n_q * d * self.qk_dim + self.n_kv * d * (self.qk_dim + self.v_dim)
        attention = self.n_q * self.n_kv * (self.qk_dim + self.v_dim)
        proj = self.n_q * self.v_dim * d
        mlp = 2 * (self.n_q if self.n_mlp is None else self.n_mlp) * d * self.mlp_hidden
        return qkv + attention + proj + mlp + self.extra_macs


@dataclass
class ModelCost:
    """Analytic cost of a whole ViT: stem + blocks + head."""

    blocks: list[BlockCost]
    stem_macs: int
    head_macs: int
    extra_macs: int = 0
    tokens_per_block: list[int] = field(default_factory=list)

    @property
    def macs(self) -> int:
        return self.stem_macs + sum(b.macs() for b in self.blocks) + self.head_macs + self.extra_macs

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9


def stem_macs(vit: nn.Module) -> int:
    """Patch-embedding convolution: one MAC per pixel of each patch, per channel, per output dim."""
    proj = vit.patch_embed.proj
    n_patches = vit.patch_embed.num_patches
    k = proj.kernel_size[0] * proj.kernel_size[1] * proj.in_channels
    return n_patches * k * proj.out_channels


def _linear_macs(layer: nn.Module) -> int:
    return layer.in_features * layer.out_features if isinstance(layer, nn.Linear) else 0


def head_macs(vit: nn.Module, n_out: int | None = None) -> int:
    """Pooling and classifier: the linear head(s) -- a distilled DeiT runs two -- and, for attention pooling
    (SigLIP's MAP head), its latent queries attending over the ``n_out`` tokens that leave the last block (prefix
    tokens included; default: every token, as in the unreduced model)."""
    macs = _linear_macs(vit.head) + _linear_macs(getattr(vit, "head_dist", None))
    pool = vit.attn_pool
    if pool is not None:
        n = num_tokens(vit) if n_out is None else n_out
        n -= 0 if vit.pool_include_prefix else vit.num_prefix_tokens
        latents = pool.latent.shape[1]
        per_latent = _linear_macs(pool.q) + _linear_macs(pool.proj)
        if pool.mlp is not None:
            per_latent += _linear_macs(pool.mlp.fc1) + _linear_macs(pool.mlp.fc2)
        attention = 2 * latents * n * pool.q.out_features  # q.k and attention.v
        macs += latents * per_latent + n * _linear_macs(pool.kv) + attention
    return macs


def dense_block_costs(vit: nn.Module, n_tokens: int | None = None) -> list[BlockCost]:
    """Costs of an unreduced timm VisionTransformer: every block sees all tokens."""
    n = n_tokens if n_tokens is not None else num_tokens(vit)
    return [BlockCost.dense(n, vit.embed_dim, blk.mlp.fc1.out_features) for blk in vit.blocks]


def num_tokens(vit: nn.Module) -> int:
    """Sequence length entering the first block (patches + prefix tokens)."""
    return vit.patch_embed.num_patches + vit.num_prefix_tokens


def dense_macs(vit: nn.Module) -> int:
    """One forward of an unreduced timm ViT: what a frozen teacher costs."""
    return stem_macs(vit) + sum(b.macs() for b in dense_block_costs(vit)) + head_macs(vit)


def train_cost(model: nn.Module, teacher: nn.Module | None) -> dict[str, float]:
    """GMACs per image of one training step of reducer ``model``: ``train_forward`` (its
    :meth:`~tokred.reducers.base.TokenReducer.train_forward_macs`), ``teacher`` (one forward: frozen, no backward) and
    ``train_gmacs`` = 3 x train_forward + teacher (a backward costs about two forwards)."""
    forward = model.train_forward_macs() / 1e9
    frozen = 0.0 if teacher is None else dense_macs(teacher) / 1e9
    return {"train_forward": forward, "teacher": frozen, "train_gmacs": 3 * forward + frozen}


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _cpu_flash_attention_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def cpu_attention_formulas() -> dict:
    """FLOP formulas ``FlopCounterMode`` lacks: the CPU fused-attention kernel, which it counts as 0 (up to at least
    torch 2.14), so every attention on a CPU would be missing from the count.

    Handed over as ``custom_mapping``, FlopCounterMode's public way to add formulas, as *our own raw* formula
    (torch wraps it once; its ``sdpa_flop`` is already wrapped, and handing that over crashed torch 2.14). Not through
    ``register_flop_formula``: on torch 2.4 that stores the formula under keys the counter never looks up.
    """
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op in flop_counter.flop_registry:
        return {}
    return {op: _cpu_flash_attention_flop}


@torch.no_grad()
def counted_gmacs(model: nn.Module, img_size: int, in_chans: int = 3, batch_size: int = 1) -> float:
    """GMACs per image of one eval-mode forward pass, measured by torch's dispatch-level FLOP counter."""
    was_training = model.training
    # A view of a trainable parameter made under no_grad (SigLIP's pooling latent, expanded over the batch) requires
    # grad without a grad_fn, which the counter's module tracker cannot hook: count with gradients switched off.
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.eval().requires_grad_(False)
    try:
        param = next(model.parameters())
        x = torch.randn(batch_size, in_chans, img_size, img_size, device=param.device, dtype=param.dtype)
        counter = flop_counter.FlopCounterMode(display=False, custom_mapping=cpu_attention_formulas())
        with counter:
            model(x)
        return counter.get_total_flops() / 2 / batch_size / 1e9
    finally:
        model.train(was_training)
        for p in trainable:
            p.requires_grad_(True)


def bisect_budget(
    gmacs_at: Callable[[float], float],
    target: float,
    lo: float,
    hi: float,
    tol: float = 1e-3,
    iters: int = 60,
    ceiling: bool = False,
) -> float:
    """The knob value in [lo, hi] whose cost is closest to ``target`` GMACs; ``gmacs_at`` must be monotone.

    ``ceiling``: the closest whose cost is at or under ``target`` (when one of the final bounds is).
    Every reducer's ``target_gmacs`` support goes through here (keep ratio, channel budget, epsilon ...).
    """
    increasing = gmacs_at(hi) >= gmacs_at(lo)
    for _ in range(iters):
        mid = (lo + hi) / 2
        if (gmacs_at(mid) < target) == increasing:
            lo = mid
        else:
            hi = mid
        if hi - lo < tol:
            break
    under = [k for k in (lo, hi) if gmacs_at(k) <= target] if ceiling else []
    return min(under or (lo, hi), key=lambda k: abs(gmacs_at(k) - target))
