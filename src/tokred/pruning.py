"""CLS-attention token pruning, written once for every reducer that drops tokens by how much CLS attends to them.

Top-K (Haurum et al., 2023) and EViT (Liang et al., 2022) use all of it; other pruners can reuse the selection,
gather and tracking parts with scores of their own. Spec: ``specs/topk_evit.md``.

Conventions shared by every function here:

* a token sequence is ``(B, N, C)`` with ``num_prefix`` prefix tokens first (``vit.num_prefix_tokens``: CLS, a
  distillation token, registers, or none) and the ``N - num_prefix`` *candidates* after them. Prefix tokens are
  never scored, dropped or fused;
* scores, selections and fusion weights index the candidates only: candidate ``j`` is token ``num_prefix + j``;
* a selection keeps the same number ``k`` of candidates in every image (rectangular batches), chosen per image.

A pruning step inside a timm block (the placement of Top-K, EViT, ToMe and ATS: after the attention residual,
before the MLP) reads::

    x, row = attention_with_cls_row(blk, x, has_cls)       # full attention over all N tokens, and CLS's row
    scores = head_mean_scores(row, p)                      # (B, N - p) candidate scores, p prefix tokens
    x, sel = prune(x, scores, k, fuse=True, num_prefix=p)  # [prefix, kept..., fused]
    x = x + vit_ops.mlp_residual(blk, x)                   # the MLP on the reduced set
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.models.vision_transformer import Block

from tokred.vit_ops import attend, gather_tokens, project_qkv, scoring_attention

ORDERS = ("score", "index")


@dataclass(frozen=True)
class Selection:
    """Which candidates a pruning step keeps, per image.

    ``keep`` (B, k) are the kept candidates in the order they are written out; ``drop`` (B, n - k) the rest, in
    descending score. Both index the step's input candidates (0 = the first token after the prefix).
    """

    keep: torch.Tensor
    drop: torch.Tensor

    @property
    def num_keep(self) -> int:
        return self.keep.shape[1]


def attention_with_cls_row(blk: Block, x: torch.Tensor, has_cls: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """A timm block's attention residual on ``x`` (B, N, C) and the CLS query's attention row per head (B, H, N).

    Fused SDPA never returns attention weights, so the row is recomputed from the block's own q/k (q/k-norm
    included) beside it: O(N * C) per block, equal to row 0 of the full post-softmax map (attention dropout aside,
    which the recipes set to 0). Without a CLS token (``has_cls=False``: average or attention pooling) the row is
    the mean attention each token receives over all queries (:func:`tokred.vit_ops.scoring_attention`), which needs
    the full map: O(N^2 * C).
    """
    q, k, v = project_qkv(blk.attn, blk.norm1(x))
    row = scoring_attention(blk.attn, q, k, has_cls)
    return x + blk.drop_path1(blk.ls1(attend(blk.attn, q, k, v))), row


def head_mean_scores(row: torch.Tensor, num_prefix: int = 1) -> torch.Tensor:
    """Per-candidate scores (B, N - num_prefix) from a CLS attention row (B, H, N): the mean over heads with the
    prefix columns left out and *not* renormalised, so they remain the raw attention mass each candidate gets
    (EViT's fusion weights)."""
    return row[:, :, num_prefix:].mean(dim=1)


def select_top(scores: torch.Tensor, k: int, order: str = "score") -> Selection:
    """The ``k`` highest-scoring candidates of each image and their complement.

    ``order="score"``: kept candidates come out in descending score, as ``torch.topk(sorted=True)`` gives them in
    the official EViT and Haurum code (the raster order is lost); ``"index"``: in their input order. Ties are broken
    by the sort, which is implementation-defined, as in the reference code.
    """
    if order not in ORDERS:
        raise ValueError(f"order={order!r}; choose one of: {', '.join(ORDERS)}")
    n = scores.shape[1]
    if not 0 <= k <= n:
        raise ValueError(f"cannot keep {k} of {n} candidates")
    # One descending sort yields both the kept set and its complement; EViT's separate complement (a scatter and a
    # second full sort per location) is what made it slow at small batches (spec pitfall 8, EViT issue #5).
    ranked = scores.argsort(dim=1, descending=True)
    keep, drop = ranked[:, :k], ranked[:, k:]
    if order == "index":
        keep = keep.sort(dim=1).values
    return Selection(keep, drop)


def gather_kept(x: torch.Tensor, selection: Selection, num_prefix: int = 1) -> torch.Tensor:
    """``[prefix tokens, kept candidates]`` of ``x`` (B, N, C) -> (B, num_prefix + k, C)."""
    b = x.shape[0]
    prefix = torch.arange(num_prefix, device=x.device).expand(b, num_prefix)
    # One gather over prefix and kept rows: concatenating the (small) indices saves a copy of the kept tokens.
    return gather_tokens(x, torch.cat([prefix, selection.keep + num_prefix], dim=1))


def fuse_dropped(
    x: torch.Tensor, scores: torch.Tensor, selection: Selection, num_prefix: int = 1, normalize: bool = False
) -> torch.Tensor:
    """EViT's fused token (B, 1, C): the dropped candidates of ``x`` summed with their scores as weights.

    As in the official EViT code the weights are the raw head-mean CLS attention, *not* renormalised: they sum to
    less than 1, so the fused token is a shrunk combination (one dropped candidate j gives a_j * x_j, not x_j).
    ``normalize=True`` divides by their sum instead (a weighted mean; an ablation, not the released models).
    Gradient flows into the weights, hence into the q/k of the block that scored them.
    """
    weights = scores.gather(1, selection.drop)
    if normalize:
        weights = weights / weights.sum(dim=1, keepdim=True)
    return torch.bmm(weights.unsqueeze(1), gather_tokens(x[:, num_prefix:], selection.drop))


def carry_sizes(size: torch.Tensor, selection: Selection, fused: bool, num_prefix: int = 1) -> torch.Tensor:
    """Token sizes (B, N, 1) -- how many original patches each token stands for -- through one pruning step, in the
    layout :func:`prune` writes: prefix and kept tokens keep theirs; the fused token, when ``fused`` and something
    was dropped, holds the dropped tokens' total (so size-weighted pooling counts the patches it carries)."""
    kept = gather_kept(size, selection, num_prefix)
    if fused and selection.drop.shape[1]:
        dropped = gather_tokens(size[:, num_prefix:], selection.drop).sum(dim=1, keepdim=True)
        kept = torch.cat([kept, dropped], dim=1)
    return kept


def prune(
    x: torch.Tensor,
    scores: torch.Tensor,
    k: int,
    fuse: bool = False,
    normalize: bool = False,
    order: str = "score",
    num_prefix: int = 1,
) -> tuple[torch.Tensor, Selection]:
    """Keep the ``k`` best-scoring candidates of ``x`` (B, N, C), plus EViT's fused token when ``fuse``.

    Returns the reduced tokens ``[prefix, kept (in ``order``), fused]`` -- (B, num_prefix + k + fuse, C) -- and the
    selection. Nothing is fused when nothing is dropped.
    """
    selection = select_top(scores, k, order)
    kept = gather_kept(x, selection, num_prefix)
    if fuse and selection.drop.shape[1]:
        kept = torch.cat([kept, fuse_dropped(x, scores, selection, num_prefix, normalize)], dim=1)
    return kept, selection


def track(where: torch.Tensor, selection: Selection, fused: bool) -> torch.Tensor:
    """Follow the original patches through one pruning step.

    ``where`` (B, P) holds, per original patch, the candidate index of the token that carries it before the step,
    or -1 once it was dropped without fusion. Returns the same after the step: the index of its kept token in the
    output, ``k`` (the fused token, written right after the kept ones) if it was dropped and ``fused``, else -1.
    """
    b, k = selection.keep.shape
    n = k + selection.drop.shape[1]
    # Column n is a sentinel for patches already gone, so one gather maps every patch.
    new_index = torch.full((b, n + 1), -1, dtype=torch.long, device=where.device)
    new_index.scatter_(1, selection.keep, torch.arange(k, device=where.device).expand(b, k))
    if fused:
        new_index.scatter_(1, selection.drop, k)
    return new_index.gather(1, torch.where(where < 0, n, where))
