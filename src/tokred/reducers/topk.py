"""Top-K pruning by CLS attention (Haurum et al., ICCVW 2023, "Which Tokens to Use?") on a stock timm ViT/DeiT.

At each location block (default 3, 6, 9: blocks 4, 7 and 10 of a 12-block DeiT) the full attention runs over every
token; then the patch tokens are ranked by that block's CLS attention (mean over heads, CLS->CLS left out), the top
k are kept in descending-score order and the rest are dropped for good; the block's MLP and every later block run on
[CLS, kept]. Nothing carries over between blocks. EViT (``reducers/evit.py``) is this plus the fusion of the dropped
tokens. The mechanics live in :mod:`tokred.pruning`; this file holds the keep counts, the cost and the pipeline.
Spec: ``specs/topk_evit.md``.

Keep counts (``count_mode``, spec §2), with ``keep_rate`` = rho:

* ``absolute_floor`` (Haurum's code, the default here): the i-th location keeps floor(rho^(i+1) * P) patch tokens,
  P = the backbone's patch count. [deviation] Haurum hard-codes P = 196; we read it from the backbone, which is the
  same at 224 px and right at every other size.
* ``relative_ceil`` (EViT's code): ceil(rho * n) of the n patch tokens present, computed in float as EViT does (so
  0.55 * 100 keeps 56).

A location that would keep every token does nothing (no scoring), so ``keep_rate=1`` is the plain backbone.

Prefix tokens (CLS, a distillation token, registers: ``vit.num_prefix_tokens``, always the first rows) pass through
every location like CLS: they are never candidates, their columns are left out of the scores, and the CLS query's
row (row 0) scores -- never a register's or the distillation token's. On backbones without CLS (average or attention
pooling) the candidates are ranked by the mean attention they receive over all queries (Learned Token Pruning, Kim et
al. 2022; Zero-TPrune 2024; :func:`tokred.vit_ops.scoring_attention`), the established substitute for the CLS row:
like it, a distribution over the keys, so keep counts and EViT's fusion weights keep their meaning. It needs the
block's full attention map, which the cost counts. Pooling sees exactly the tokens leaving the last block
(:func:`tokred.vit_ops.classify`); EViT's fused token is weighted there by the patches it stands for.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from tokred.flops import BlockCost, ModelCost, head_macs, num_tokens, stem_macs
from tokred.pruning import Selection, attention_with_cls_row, carry_sizes, head_mean_scores, prune, track
from tokred.reducers import register_reducer
from tokred.reducers.base import Phase, TokenMap, TokenReducer, TrainingFreeConfig
from tokred.vit_ops import block_forward, check_standard_vit, classify, embed, mlp_residual

COUNT_MODES = ("relative_ceil", "absolute_floor")
# Budget search: the cost is a step function of keep_rate, so every rate on this grid is costed (spec §10).
RATE_GRID = [i / 1000 for i in range(1, 1001)]
# A budget is met when the cost lands in [target * (1 - BUDGET_TOLERANCE), target]: never above it.
BUDGET_TOLERANCE = 0.01

# on_block(block, where): after each block, per original patch (B, P), the index (among the non-prefix tokens
# leaving the block) of the token carrying it; -1 once it was dropped (see tokred.pruning.track).
BlockCallback = Callable[[int, torch.Tensor], None]


@dataclass
class Config(TrainingFreeConfig):
    name: str = "topk"
    keep_rate: float = 0.7  # rho: share of patch tokens kept at each location (see count_mode)
    locations: list[int] = field(default_factory=lambda: [3, 6, 9])  # 0-based blocks that prune after attention
    count_mode: str = "absolute_floor"  # absolute_floor: floor(rho^(i+1) * P) (Haurum) | relative_ceil (EViT)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.keep_rate <= 1:
            raise ValueError(f"reducer.keep_rate={self.keep_rate} must be in (0, 1] (the papers use 0.7)")
        locations = list(self.locations)
        if not locations or any(b < 0 for b in locations) or locations != sorted(set(locations)):
            raise ValueError(
                f"reducer.locations={locations} must list distinct 0-based blocks in increasing order, e.g. [3,6,9]"
            )
        if self.count_mode not in COUNT_MODES:
            raise ValueError(f"reducer.count_mode={self.count_mode!r}; choose one of: {', '.join(COUNT_MODES)}")


def keep_count(count_mode: str, keep_rate: float, n_candidates: int, n_patches: int, location: int) -> int:
    """Patch tokens kept at the ``location``-th (0-based) pruning block, which receives ``n_candidates`` of them,
    on a backbone with ``n_patches``; never more than it receives."""
    if count_mode == "relative_ceil":
        k = math.ceil(keep_rate * n_candidates)  # the float product, as EViT: 0.55 * 100 -> 56, 0.7 * 10 -> 8
    else:
        k = math.floor(keep_rate ** (location + 1) * n_patches)
    return min(k, n_candidates)


@register_reducer
class TopK(TokenReducer):
    name = "topk"
    Config = Config
    fuses = False  # EViT appends a fused token after each pruning step

    def __init__(self, vit: nn.Module, cfg: Config) -> None:
        super().__init__(vit, cfg)
        check_standard_vit(vit, self.name)
        self.num_prefix = vit.num_prefix_tokens
        self.has_cls = vit.has_class_token  # False: rank by received attention (module docstring)
        depth = len(vit.blocks)
        if cfg.locations[-1] >= depth:
            raise ValueError(
                f"reducer.locations={list(cfg.locations)} must be below the backbone depth {depth} (0-based blocks)"
            )
        self._rank = {block: i for i, block in enumerate(cfg.locations)}
        target = self.target_gmacs()
        if target is not None:
            self._meet_budget(target)
        self.plan(cfg.keep_rate)  # fail at build time, not at the first forward

    # ---------------------------------------------------------------- keep counts, cost, budget
    def plan(self, keep_rate: float, n_tokens: int | None = None) -> list[int | None]:
        """Per block, the patch tokens it keeps after attention, or None where it prunes nothing."""
        n = num_tokens(self.vit) if n_tokens is None else n_tokens
        p = self.num_prefix
        n_patches, cfg, plan = n - p, self.cfg, []
        for block in range(len(self.vit.blocks)):
            k = None
            if block in self._rank:
                k = keep_count(cfg.count_mode, keep_rate, n - p, n_patches, self._rank[block])
                if k < 1:
                    raise ValueError(
                        f"reducer.keep_rate={keep_rate} keeps no patch token at block {block} "
                        f"(count_mode={cfg.count_mode}); raise it or use fewer reducer.locations"
                    )
                if k == n - p:
                    k = None
                else:
                    n = p + k + self.fuses
            plan.append(k)
        return plan

    def _cost(self, keep_rate: float) -> ModelCost:
        vit = self.vit
        c, n, p = vit.embed_dim, num_tokens(vit), self.num_prefix
        blocks, tokens = [], []
        for blk, k in zip(vit.blocks, self.plan(keep_rate)):
            d, hidden = blk.attn.attn_dim, blk.mlp.fc1.out_features
            if k is None:
                blocks.append(BlockCost(n, n, c, d, d, hidden))
            else:
                n_out = p + k + self.fuses
                # Besides the block: the CLS query row (q0 . K^T) -- without CLS the full map Q . K^T, for the
                # attention each token receives -- and the fused token's weighted sum over the dropped tokens, all
                # matmuls the FLOP counter sees (the spec's convention leaves them out; < 0.01% here with CLS).
                row = d * n * (1 if self.has_cls else n)
                extra = row + self.fuses * c * (n - p - k)
                blocks.append(BlockCost(n, n, c, d, d, hidden, extra_macs=extra, n_mlp=n_out))
                n = n_out
            tokens.append(n)
        # tokens_per_block: tokens *leaving* each block (what the token maps show); a pruning block's attention
        # still sees its input count, which BlockCost.n_q holds. An attention-pooling head attends over the n tokens
        # leaving the last block.
        return ModelCost(blocks, stem_macs(vit), head_macs(vit, n), tokens_per_block=tokens)

    def cost(self) -> ModelCost:
        return self._cost(self.cfg.keep_rate)

    def _meet_budget(self, target: float) -> None:
        """Set keep_rate to the grid rate whose cost is the highest not above ``target`` (exact search, spec §10)."""
        costs: dict[float, float] = {}
        for rate in RATE_GRID:
            try:
                costs[rate] = self._cost(rate).gmacs
            except ValueError:  # keeps no token somewhere: not a model
                continue
        below = [rate for rate, g in costs.items() if g <= target]
        best = max(below, key=lambda rate: (costs[rate], rate)) if below else None
        if best is None or costs[best] < (1 - BUDGET_TOLERANCE) * target:
            low, high = min(costs.values()), max(costs.values())
            raise ValueError(
                f"reducer target {target:.4g} GMACs is out of reach by keep_rate alone at "
                f"locations={list(self.cfg.locations)} ({low:.4g}..{high:.4g} GMACs in steps); change "
                "the target or reducer.locations"
            )
        self.cfg.keep_rate = best

    # ---------------------------------------------------------------- forward
    def keep_rate_now(self) -> float:
        """The keep rate the next forward uses."""
        return self.cfg.keep_rate

    def _prune(self, x: torch.Tensor, scores: torch.Tensor, k: int) -> tuple[torch.Tensor, Selection]:
        return prune(x, scores, k, num_prefix=self.num_prefix)

    def forward_tokens(
        self, images: torch.Tensor, on_block: BlockCallback | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokens after the last block -- the prefix tokens, the surviving patch tokens in score order (then EViT's
        fused token) -- and their sizes (B, N, 1), the patches each stands for; None until a token is fused.

        ``on_block`` sees, after every block, where each original patch went (see :data:`BlockCallback`).
        """
        x = embed(self.vit, images)
        p, size, where = self.num_prefix, None, None
        if on_block is not None:
            b, n = x.shape[0], x.shape[1] - p
            where = torch.arange(n, device=x.device).expand(b, n)
        for i, (blk, k) in enumerate(zip(self.vit.blocks, self.plan(self.keep_rate_now(), x.shape[1]))):
            if k is None:
                x = block_forward(blk, x)
            else:
                x, row = attention_with_cls_row(blk, x, self.has_cls)
                if self.fuses and size is None:
                    size = torch.ones(*x.shape[:2], 1, device=x.device)  # fp32: counts stay exact under autocast
                x, selection = self._prune(x, head_mean_scores(row, p), k)
                if size is not None:
                    size = carry_sizes(size, selection, self.fuses, p)
                x = x + mlp_residual(blk, x)
                if where is not None:
                    where = track(where, selection, self.fuses)
            if on_block is not None:
                on_block(i, where)
        return x, size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return classify(self.vit, *self.forward_tokens(images))

    @torch.no_grad()
    def token_maps(self, images: torch.Tensor) -> list[TokenMap]:
        """Per block, 1 where the patch is still its own token after the block (pruned patches never come back)."""
        grid = self.vit.patch_embed.grid_size
        maps: list[TokenMap] = []
        self.forward_tokens(images, lambda i, where: maps.append(self._map(i, where.view(-1, *grid))))
        return maps

    def _map(self, block: int, where: torch.Tensor) -> TokenMap:
        return TokenMap(block, "kept", (where >= 0).float())

    # ---------------------------------------------------------------- pipeline
    def phases(self) -> list[Phase]:
        # One fit of the whole network with the reduction in place; 0 epochs applies the pruning to the backbone's
        # weights as they are (training-free), so the run only evaluates and exports.
        return self.cfg.phases()
