"""ToMe, Token Merging (Bolya et al., ICLR 2023) on a stock timm ViT/DeiT (spec: specs/tome.md).

Inside every block, between the attention residual and the MLP, ``r`` tokens are merged away by *bipartite soft
matching*: the tokens are split alternately into sets A and B, each A token points to its most similar B token
(cosine of the block's keys, averaged over heads), and the ``r`` A tokens with the most similar partners are folded
into them by a size-weighted average. Sizes (how many input patches a token holds) are tracked; with *proportional
attention* every later block adds log(size) to its attention logits, so a merged token weighs in the softmax like the
copies it replaced. Prefix tokens (CLS, a distillation token, registers) are never merged. Average pooling weights
each token by its size and attention pooling (SigLIP's MAP head) adds log(size) to its logits, so both pool over the
patches as the unmerged model would (:func:`tokred.vit_ops.classify`). No parameters are added, so ToMe applies
training-free to any trained backbone (``finetune_epochs=0``) or is fine-tuned with plain cross-entropy.

Unlike the official patch (written for timm 0.4.12), the blocks run through :mod:`tokred.vit_ops`: LayerScale,
q/k-norm and fused SDPA (log-size bias as a float ``attn_mask``) are kept, and the per-block r is indexed rather than
popped from shared state, so every forward is independent of the previous one.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from tokred.flops import BlockCost, ModelCost, head_macs, num_tokens, stem_macs
from tokred.reducers import register_reducer
from tokred.reducers.base import Phase, TokenMap, TokenReducer, TrainingFreeConfig
from tokred.vit_ops import (
    UnsupportedBackbone,
    attend,
    check_standard_vit,
    classify,
    embed,
    gather_tokens,
    mlp_residual,
    project_qkv,
)

# Max pooling is left out: the maximum over merged averages is not the maximum over the patches they hold.
POOLS = ("token", "avg", "map")
# A budget is met when the cost lands in [(1 - BUDGET_RTOL) * target, target].
BUDGET_RTOL = 0.01

# on_block(block, tokens, sizes, sources) after each block: tokens (B, N, C), sizes (B, N, 1), and, when tracing,
# sources (B, N, T0): 1 where output token n holds input token t.
BlockCallback = Callable[[int, torch.Tensor, torch.Tensor, Optional[torch.Tensor]], None]


@dataclass
class Config(TrainingFreeConfig):
    name: str = "tome"
    r: int = 13  # tokens merged per block (the paper's DeiT-S point: 4.60 -> 2.70 GMACs)
    inflection: float = 0.0  # schedule (r, inflection): -1 decreases from 2r to 0, 0 is constant r, +1 increases
    r_list: Optional[list[int]] = None  # per-block r; overrides r and inflection, padded with 0 to the depth
    prop_attn: bool = True  # proportional attention: log(size) added to the attention logits

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r < 0:
            raise ValueError(f"reducer.r={self.r} must be >= 0 (tokens merged per block; the paper's DeiT-S uses 13)")
        if not -1 <= self.inflection <= 1:
            raise ValueError(
                f"reducer.inflection={self.inflection} must be in [-1, 1] "
                "(-1: from 2r down to 0, 0: constant r, 1: from 0 up to 2r)"
            )
        if self.r_list is not None:
            if any(r < 0 for r in self.r_list):
                raise ValueError(f"reducer.r_list={list(self.r_list)} must hold per-block counts >= 0")
            if self.target_gmacs is not None or self.target_ratio is not None:
                raise ValueError("reducer.r_list fixes the schedule; unset it or reducer.target_gmacs/target_ratio")


# --------------------------------------------------------------------------------------------------- schedules
def parse_schedule(r: int, inflection: float, r_list: list[int] | None, depth: int) -> list[int]:
    """Per-block r from the official forms (spec §5): a list (zero-padded, cut to ``depth``), or (r, inflection)
    with r_l = int(lo + l * (hi - lo) / (depth - 1)), lo = int(r * (1 - inflection)), hi = 2r - lo."""
    if r_list is not None:
        return (list(r_list) + [0] * depth)[:depth]
    lo = int(r * (1 - inflection))
    step = (2 * r - 2 * lo) / (depth - 1) if depth > 1 else 0.0
    return [int(lo + step * i) for i in range(depth)]  # step * i, as the official code rounds it


def merge_counts(n_tokens: int, protected: int, schedule: list[int]) -> list[int]:
    """The r each block really merges: at most half of its unprotected tokens, since only set A loses tokens."""
    counts = []
    for r in schedule:
        r = max(0, min(r, (n_tokens - protected) // 2))
        counts.append(r)
        n_tokens -= r
    return counts


# --------------------------------------------------------------------------------------------------- merging
@dataclass(frozen=True)
class Match:
    """One block's bipartite pairing, per image, as positions in its input sequence (B, T, C).

    The output keeps ``keep`` in the official layout -- [prefix tokens, unmerged A tokens, B tokens] -- generalised to
    any number of protected prefix tokens; source ``src[i]`` is merged into output token ``dst[i]``.
    """

    keep: torch.Tensor  # (B, T - r) input positions of the output tokens, in output order
    src: torch.Tensor  # (B, r) input positions of the A tokens merged away
    dst: torch.Tensor  # (B, r) output index of the B token each of them folds into

    def apply(self, x: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
        """(B, T, C) -> (B, T - r, C): the kept tokens with every source reduced into its destination (several
        sources may share one). One gather over the sequence; the reduction touches only the r destinations."""
        out = gather_tokens(x, self.keep)
        index = self.dst.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        return out.scatter_reduce_(1, index, gather_tokens(x, self.src), reduce=reduce)


@torch.no_grad()  # the pairing is a discrete choice; gradient flows through the merge only
def bipartite_soft_matching(metric: torch.Tensor, r: int, protected: int = 1) -> Match | None:
    """Pair the ``r`` A tokens whose most similar B token (cosine of ``metric`` (B, T, d)) is closest with it.

    A = tokens 0, 2, 4, ..., B = tokens 1, 3, 5, ... of the current sequence. Protected tokens (the first
    ``protected``) can neither be merged away (A rows) nor receive a merge (B columns). ``r`` is capped at half the
    unprotected tokens; returns None when nothing is merged.
    """
    b, t, _ = metric.shape
    r = min(r, (t - protected) // 2)
    if r <= 0:
        return None
    # fp32 [R]: fp16 cosines tie far more often, and ties make matches device- and dtype-dependent (spec 9.1.7).
    metric = F.normalize(metric.float(), dim=-1)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)
    protected_a, protected_b = (protected + 1) // 2, protected // 2
    scores[:, :protected_a] = -torch.inf
    scores[:, :, :protected_b] = -torch.inf
    best, partner = scores.max(dim=-1)
    # Stable [R]: the official sort is not, so ties could pick different sources on different devices.
    order = best.argsort(dim=-1, descending=True, stable=True)
    # Protected A tokens score -inf, so they rank last and, being the lowest positions, lead the sorted rest.
    kept_a = order[:, r:].sort(dim=-1).values[:, protected_a:]
    arange = torch.arange(t, device=metric.device)
    kept_b = arange[2 * protected_b + 1 :: 2].expand(b, -1)
    keep = torch.cat([arange[:protected].expand(b, -1), 2 * kept_a, kept_b], dim=1)
    # B token j lands after the prefix and the unmerged A tokens.
    dst = protected + kept_a.shape[1] + partner.gather(1, order[:, :r]) - protected_b
    return Match(keep, 2 * order[:, :r], dst)


def merge_wavg(match: Match, x: torch.Tensor, size: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average of every merged group, and the summed sizes (B, T - r, 1); ``size`` None is all ones.

    Written as destination + sum of s_i (x_i - destination) / S over its sources, which equals the official
    sum(s x) / S (same gradients: s_i / S to each member) but computes only the r merged rows beyond the one gather,
    and never forms s * x, which can exceed fp16's range for groups of hundreds of patches [R] (spec 9.1.7).
    """
    size = torch.ones_like(x[..., :1], dtype=torch.float32) if size is None else size
    merged_size = match.apply(size)
    out = gather_tokens(x, match.keep)
    destination = gather_tokens(x, match.keep.gather(1, match.dst)).float()
    share = gather_tokens(size, match.src) / gather_tokens(merged_size, match.dst)
    delta = share * (gather_tokens(x, match.src).float() - destination)
    index = match.dst.unsqueeze(-1).expand(-1, -1, x.shape[-1])
    return out.scatter_add_(1, index, delta.to(x.dtype)), merged_size


def tome_block(
    blk: Block,
    x: torch.Tensor,
    size: torch.Tensor | None,
    r: int,
    protected: int,
    prop_attn: bool,
    source: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One timm block with ToMe between its attention and MLP residuals (spec §4): returns tokens, sizes and,
    when traced, sources. ``size`` is None until the first merge, so blocks before it are the plain block."""
    attn = blk.attn
    q, k, v = project_qkv(attn, blk.norm1(x))
    bias = None
    if prop_attn and size is not None:
        bias = size.log().to(q.dtype).view(size.shape[0], 1, 1, -1)  # per key, the same for every head and query
    x = x + blk.drop_path1(blk.ls1(attend(attn, q, k, v, attn_mask=bias)))
    if r > 0:
        # [R] keys after k_norm (the official code predates k_norm; identical for DeiT), averaged over heads.
        match = bipartite_soft_matching(attn.k_norm(k).mean(dim=1), r, protected)
        if match is not None:
            x, size = merge_wavg(match, x, size)
            if source is not None:
                source = match.apply(source, reduce="amax")
    return x + mlp_residual(blk, x), size, source


# --------------------------------------------------------------------------------------------------- the reducer
@register_reducer
class ToMe(TokenReducer):
    name = "tome"
    Config = Config

    def __init__(self, vit: nn.Module, cfg: Config) -> None:
        super().__init__(vit, cfg)
        check_standard_vit(vit, self.name)
        if vit.global_pool not in POOLS:
            raise UnsupportedBackbone(
                f"reducer=tome supports global_pool token, avg or map (size-weighted), got "
                f"{vit.global_pool!r}; set backbone.kwargs.global_pool"
            )
        self.protected = vit.num_prefix_tokens
        depth = len(vit.blocks)
        target = self.target_gmacs()
        schedule = (
            parse_schedule(cfg.r, cfg.inflection, cfg.r_list, depth) if target is None else self._meet_budget(target)
        )
        self.schedule = merge_counts(num_tokens(vit), self.protected, schedule)

    # ---------------------------------------------------------------- budget and cost
    def _cost(self, schedule: list[int]) -> ModelCost:
        """Block l: attention over N_l tokens, the MLP over N_l - r_l (spec §6), plus the matching matmul
        (|A| x |B| cosines of head_dim-wide keys), which the papers leave out but the FLOP counter sees."""
        vit = self.vit
        n, blocks = num_tokens(vit), []
        for blk, r in zip(vit.blocks, merge_counts(n, self.protected, schedule)):
            width = blk.attn.attn_dim
            matching = (n + 1) // 2 * (n // 2) * blk.attn.head_dim if r else 0
            blocks.append(BlockCost(n, n, vit.embed_dim, width, width, blk.mlp.fc1.out_features, matching, n_mlp=n - r))
            n -= r
        # An attention-pooling head attends over the n tokens leaving the last block.
        return ModelCost(blocks, stem_macs(vit), head_macs(vit, n), tokens_per_block=[b.n_q for b in blocks])

    def cost(self) -> ModelCost:
        return self._cost(self.schedule)

    def _meet_budget(self, target: float) -> list[int]:
        """The per-block schedule (the official list form) whose cost is the highest not above ``target``.

        r is an integer and r + 1 costs DeiT-S ~5 % less than r, so a constant r rarely lands within 1 % of a target.
        Candidates stay close to a constant r: the largest r still at or above the target, plus one merge more in
        the first k blocks and in one later block e. Moving that extra merge one block earlier takes one token out
        of one block, a step of ~0.1 %. Where even these miss (models with a few dozen tokens), single merges are
        added, removed or moved between blocks until the cost is within 1 %.
        """
        depth = len(self.vit.blocks)
        most = (num_tokens(self.vit) - self.protected) // 2  # more than any block can merge: every block capped
        gmacs = lambda schedule: self._cost(schedule).gmacs  # noqa: E731
        lowest, highest = gmacs([most] * depth), gmacs([0] * depth)
        if not lowest <= target <= highest:
            raise ValueError(
                f"reducer target {target:.4g} GMACs is out of ToMe's reach on this backbone: "
                f"{lowest:.4g} (every block merges its maximum) to {highest:.4g} (r = 0); "
                "choose reducer.target_gmacs/target_ratio in that range"
            )
        base = max(r for r in range(most + 1) if gmacs([r] * depth) >= target)
        candidates = [
            [base + (i < k) + (i == e) for i in range(depth)] for k in range(depth) for e in (-1, *range(k, depth))
        ]
        best = max((s for s in candidates if gmacs(s) <= target), key=gmacs)
        if gmacs(best) < (1 - BUDGET_RTOL) * target:
            best = self._climb(best, target, gmacs)
        if gmacs(best) < (1 - BUDGET_RTOL) * target:
            warnings.warn(
                f"tome: no schedule costs within {BUDGET_RTOL:.0%} below {target:.4g} GMACs on this "
                f"backbone (too few tokens); using {gmacs(best):.4g}",
                UserWarning,
                stacklevel=2,
            )
        return best

    def _climb(self, schedule: list[int], target: float, gmacs: Callable[[list[int]], float]) -> list[int]:
        """Hill-climb towards ``target`` from below: add, remove or move one merge at a time while it helps."""
        n0, depth = num_tokens(self.vit), len(schedule)
        best, cost = merge_counts(n0, self.protected, schedule), gmacs(schedule)
        improved = True
        while improved:
            improved = False
            for i in range(depth):
                for j in (-1, *(j for j in range(depth) if j != i)):  # -1: add or remove, else move to/from j
                    for step in (1, -1):
                        moved = list(best)
                        moved[i] += step
                        if j >= 0:
                            moved[j] -= step
                        if min(moved) < 0:
                            continue
                        moved = merge_counts(n0, self.protected, moved)
                        moved_cost = gmacs(moved)
                        if cost < moved_cost <= target:
                            best, cost, improved = moved, moved_cost, True
        return best

    # ---------------------------------------------------------------- forward
    def forward_tokens(
        self, images: torch.Tensor, on_block: BlockCallback | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokens after the last block (B, N_L, C) in ToMe's order (prefix first) and their sizes (None if nothing
        was merged). ``on_block`` (see :data:`BlockCallback`) also turns on source tracing."""
        x = embed(self.vit, images)
        size = None
        source = None if on_block is None else torch.eye(x.shape[1], device=x.device).expand(x.shape[0], -1, -1)
        for i, (blk, r) in enumerate(zip(self.vit.blocks, self.schedule)):
            x, size, source = tome_block(blk, x, size, r, self.protected, self.cfg.prop_attn, source)
            if on_block is not None:
                on_block(i, x, torch.ones_like(x[..., :1]) if size is None else size, source)
        return x, size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # A merged token stands for `size` patches: unweighted pooling would under-weight it (spec §4; ToMe #11).
        return classify(self.vit, *self.forward_tokens(images))

    @torch.no_grad()
    def token_maps(self, images: torch.Tensor) -> list[TokenMap]:
        """Per block, after its merge: the patch token (index among the block's MLP tokens, prefix excluded) that
        each original patch has been merged into; patches with the same id form one group."""
        grid, p = self.vit.patch_embed.grid_size, self.protected
        maps: list[TokenMap] = []

        def record(block: int, tokens: torch.Tensor, size: torch.Tensor, source: torch.Tensor | None) -> None:
            # Every column of the source matrix holds one 1: the group that input patch belongs to.
            maps.append(TokenMap(block, "assignment", source[:, p:, p:].argmax(dim=1).view(-1, *grid)))

        self.forward_tokens(images, record)
        return maps

    # ---------------------------------------------------------------- pipeline and structure
    def phases(self) -> list[Phase]:
        # ToMe adds no parameters and no loss (spec §7): fine-tuning is plain CE on the merged model.
        return self.cfg.phases()

    def knobs(self) -> dict[str, Any]:
        return {**super().knobs(), "r_schedule": list(self.schedule)}

    def structure(self) -> dict[str, Any]:
        return {**super().structure(), "schedule": list(self.schedule)}

    def load_structure(self, structure: dict[str, Any]) -> None:
        super().load_structure(structure)
        if "schedule" in structure:
            schedule = [int(r) for r in structure["schedule"]]
            if len(schedule) != len(self.vit.blocks):
                raise ValueError(
                    f"tome: the stored schedule has {len(schedule)} blocks, the backbone "
                    f"{len(self.vit.blocks)}; rebuild with the checkpoint's backbone"
                )
            self.schedule = merge_counts(num_tokens(self.vit), self.protected, schedule)
