"""Evo-ViT (Xu et al., AAAI 2022): slow-fast token evolution on a stock timm ViT/DeiT.

Every block's CLS attention row feeds a per-image *global class attention* score that evolves across blocks. From
``start_layer`` on, the patch tokens are sorted by that score: CLS and the top ``int(N * keep_ratio)`` ("informative")
go through the timm block (the slow path); the rest ("placeholders") take the fast path -- unchanged (official DeiT
code) or moved by the residuals of a score-weighted representative token (paper / LeViT code). No token is dropped:
the full map is re-assembled after every block (layer-wise) or at stage ends (stage-wise), so P + N tokens leave every
block and the classifier pools all of them. Training runs layer-wise, then switches to stage-wise for its last third;
evaluation and export run stage-wise. Follows the project's Evo-ViT spec (specs/evo_vit.md).

Prefix tokens (CLS, a distilled DeiT's distillation token, registers: the first ``P = vit.num_prefix_tokens`` rows)
all take the slow path in every block, as CLS does in the paper: they are never sorted, scored or placeholders. The
score is the CLS query's row over the patch columns only (row 0, never a register's). A backbone without CLS (average
or attention pooling) scores by the mean attention each token receives over all queries
(:func:`tokred.vit_ops.received_attention`, Learned Token Pruning's score), the established CLS-free substitute: the
global class attention is an attention distribution over the tokens that evolves across blocks, and this one is the
same kind of object (it sums to 1); the rest of the method (slow-fast paths, evolution, a head that pools all patches)
never needed CLS. That score needs the block's full (T x T) attention map, which the cost model charges.

Heads: ``head=gap`` (the paper) moves a CLS-token head -- the backbone's own, with its final norm; a distilled DeiT's
CLS and distillation heads, averaged as timm does -- to an auxiliary loss and classifies by a fresh
Head(LN(mean of patches)). A backbone that already pools its patch tokens (avg, attention pooling) keeps its head, which
is what the GAP head is for, and has no auxiliary loss: there is no CLS head to move (none at all without CLS).

All per-forward state (scores, permutation, placeholders) is local to the forward call, unlike the official LeViT
code's module globals, so several models, DataParallel threads and eval/train interleaving cannot interfere.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from timm.models.vision_transformer import Block, init_weights_vit_timm
from torch import nn

from tokred.flops import BlockCost, ModelCost, head_macs, num_tokens, stem_macs
from tokred.reducers import register_reducer
from tokred.reducers.base import Criterion, ReducerConfig, TokenMap, TokenReducer
from tokred.vit_ops import (
    UnsupportedBackbone,
    attend,
    check_standard_vit,
    classify,
    embed,
    gather_tokens,
    mlp_residual,
    project_qkv,
    scoring_attention,
)

FAST_UPDATES = ("identity", "rep_token")
MODES = ("stage", "layer")
HEADS = ("gap", "cls")
# Global batch of the paper's DeiT runs (8 GPUs x 128). Single-GPU runs of the official recipe (batch 128) reached
# 66% instead of 79.4% top-1 (Evo-ViT issue #10); we warn below half of it.
PAPER_GLOBAL_BATCH = 1024

# on_block(block, tokens, slow): the full (B, P + N, C) token map after a block and the (B, N) mask of the patches its
# slow path computed, both in raster order.
BlockCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


@dataclass
class Config(ReducerConfig):
    name: str = "evo_vit"
    keep_ratio: float = 0.5  # informative share of the N patch tokens: K = int(N * keep_ratio)
    start_layer: int = 4  # first block that selects; blocks before it see all tokens
    tradeoff: float = 0.5  # weight of the current block's class attention in the score from start_layer on
    fast_update: str = "identity"  # placeholders: identity (DeiT code) | rep_token (paper / LeViT code)
    mode: str = "stage"  # selection for evaluation/export and after the switch: stage | layer
    num_stages: int = 2  # stages the blocks from start_layer on are split into (DeiT-12: select at 4 and 8)
    stage_switch: float = 0.6667  # share of max_epochs trained layer-wise before switching to `mode` (200/300)
    head: str = "gap"  # gap: LN(mean of patches) + auxiliary CLS head (paper) | cls: the backbone's CLS-token head
    aux_weight: float = 0.5  # weight of the auxiliary CLS-head loss; the main head gets 1 - aux_weight

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.keep_ratio <= 1:
            raise ValueError(f"reducer.keep_ratio={self.keep_ratio} must be in (0, 1] (the paper uses 0.5)")
        if self.start_layer < 1:
            raise ValueError(
                f"reducer.start_layer={self.start_layer} must be >= 1: the first selection needs the "
                "class attention of an earlier block (the paper uses 4)"
            )
        if not 0 <= self.tradeoff <= 1:
            raise ValueError(f"reducer.tradeoff={self.tradeoff} must be in [0, 1] (the paper uses 0.5)")
        for knob, value, choices in (
            ("fast_update", self.fast_update, FAST_UPDATES),
            ("mode", self.mode, MODES),
            ("head", self.head, HEADS),
        ):
            if value not in choices:
                raise ValueError(f"reducer.{knob}={value!r}; choose one of: {', '.join(choices)}")
        if self.num_stages < 1:
            raise ValueError(f"reducer.num_stages={self.num_stages} must be >= 1 (the paper uses 2)")
        if not 0 <= self.stage_switch <= 1:
            raise ValueError(
                f"reducer.stage_switch={self.stage_switch} must be in [0, 1] "
                "(share of the epochs trained layer-wise; the paper uses 2/3)"
            )
        if not 0 <= self.aux_weight < 1:
            raise ValueError(
                f"reducer.aux_weight={self.aux_weight} must be in [0, 1): the main head needs a loss "
                "(the paper uses 0.5)"
            )


@dataclass(frozen=True)
class _Plan:
    """Where one selection mode sorts and re-assembles, and which blocks' class attention is ever read."""

    starts: frozenset[int]  # blocks before which the patch tokens are re-sorted and split
    ends: frozenset[int]  # blocks after which the full token map is re-assembled
    scored: tuple[bool, ...]  # per block: does a later selection read its class attention?

    @classmethod
    def build(cls, depth: int, start_layer: int, num_stages: int, layer_wise: bool) -> _Plan:
        if layer_wise:
            starts = list(range(start_layer, depth))
        else:
            # Equal stages over the blocks after the full ones, from the depth rather than the official code's
            # hard-coded 4/8 (spec pitfall 5.1.2): DeiT-12 with start_layer 4 -> stages [4..7], [8..11].
            starts = [start_layer + j * (depth - start_layer) // num_stages for j in range(num_stages)]
        ends = [s - 1 for s in starts[1:]] + [depth - 1]
        # Scores feed only selections, so blocks after the last one skip the CLS-row computation.
        return cls(frozenset(starts), frozenset(ends), tuple(i < starts[-1] for i in range(depth)))


def _fresh_copy(module: nn.Module) -> nn.Module:
    """A re-initialised copy (timm's ViT init), so the GAP head does not start as a clone of the CLS head."""
    module = copy.deepcopy(module)
    module.apply(init_weights_vit_timm)
    return module


def _block(blk: Block, x: torch.Tensor, with_row: bool, has_cls: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One timm block on ``x`` and, if ``with_row``, its scoring row summed over heads (B, T): the CLS attention row,
    or without CLS the attention each token receives (see the module docstring).

    The row comes from the block's own q/k beside the fused attention: the CLS row costs O(T*C) and never
    materialises the map; the CLS-free score needs the full map. Heads are summed as in the DeiT code (LeViT
    averages; the ranking is the same).
    """
    h = blk.norm1(x)
    q, k, v = project_qkv(blk.attn, h)
    row = scoring_attention(blk.attn, q, k, has_cls).sum(dim=1) if with_row else None
    x = x + blk.drop_path1(blk.ls1(attend(blk.attn, q, k, v)))
    return x + mlp_residual(blk, x), row


@register_reducer
class EvoViT(TokenReducer):
    name = "evo_vit"
    Config = Config

    def __init__(self, vit: nn.Module, cfg: Config) -> None:
        super().__init__(vit, cfg)
        check_standard_vit(vit, self.name)
        token_head = vit.global_pool == "token"  # attention-pooled (SigLIP) backbones say "map"
        if cfg.head == "cls" and not token_head:
            raise UnsupportedBackbone(
                f"reducer=evo_vit head=cls keeps the backbone's CLS-token head, but it pools with "
                f"global_pool={vit.global_pool!r}; use reducer.head=gap (its own pooling over all patch tokens)"
            )
        depth = len(vit.blocks)
        if cfg.start_layer >= depth:
            raise ValueError(f"reducer.start_layer={cfg.start_layer} must be below the backbone depth {depth}")
        if cfg.num_stages > depth - cfg.start_layer:
            raise ValueError(
                f"reducer.num_stages={cfg.num_stages} exceeds the {depth - cfg.start_layer} blocks from "
                f"start_layer={cfg.start_layer} to the depth {depth}; lower it"
            )
        self._plans = {lw: _Plan.build(depth, cfg.start_layer, cfg.num_stages, lw) for lw in (False, True)}
        self.cls_norm: nn.Module | None = None
        self.cls_head: nn.Module | None = None
        self.dist_head: nn.Module | None = None
        # Whether the main head is our GAP head; it then pools through classify() with every token's size (1: Evo-ViT
        # never merges), because a distilled DeiT's own forward_head reads CLS and the distillation token whatever
        # global_pool says, while classify's size-weighted pooling honours global_pool.
        self._gap = cfg.head == "gap" and token_head
        if self._gap:
            # The backbone's own CLS head (with any pretrained weights) becomes the auxiliary head; timm's avg-pool
            # head (fc_norm after pooling, no final token norm) is exactly the paper's Head(LN(mean of patches)).
            self.cls_norm, self.cls_head = vit.norm, vit.head
            vit.norm, vit.fc_norm, vit.head = nn.Identity(), _fresh_copy(self.cls_norm), _fresh_copy(self.cls_head)
            vit.global_pool = "avg"
            if isinstance(getattr(vit, "head_dist", None), nn.Linear):
                # A distilled DeiT's distillation head joins the auxiliary head (timm averages the two). One GAP head,
                # not the Evo-LeViT code's GAP pair: that pair serves hard distillation, which tokred does not run
                # on the distillation head, and two linear heads on one pooled feature are one linear head.
                self.dist_head, vit.head_dist = vit.head_dist, nn.Identity()
        self._train_layer_wise = cfg.mode == "layer" or cfg.stage_switch > 0
        target = self.target_gmacs()
        if target is not None:
            self._meet_budget(target)
        self._num_keep(self._num_patches(), cfg.keep_ratio)  # fail at build time, not at the first forward

    # ---------------------------------------------------------------- budget and cost
    def _num_patches(self) -> int:
        return num_tokens(self.vit) - self.vit.num_prefix_tokens

    @staticmethod
    def _num_keep(n: int, keep_ratio: float) -> int:
        k = int(n * keep_ratio)
        if k < 1:
            raise ValueError(
                f"reducer.keep_ratio={keep_ratio} keeps none of the {n} patch tokens; use at least {1 / n:.4g}"
            )
        return k

    def _meet_budget(self, target: float) -> None:
        """Set keep_ratio so the deployable model costs ``target`` GMACs; the first start_layer blocks stay full.

        K is an integer, so every K in 1..N is costed (N cheap evaluations) instead of bisecting the ratio.
        """
        n = self._num_patches()
        costs = {k: self._cost(k).gmacs for k in range(1, n + 1)}
        k = min(costs, key=lambda k: abs(costs[k] - target))
        if abs(costs[k] - target) > 0.03 * target:
            raise ValueError(
                f"reducer target {target:.3f} GMACs is out of reach by keep_ratio alone: "
                f"{costs[1]:.3f}..{costs[n]:.3f} GMACs at start_layer={self.cfg.start_layer}; "
                "change the target or reducer.start_layer"
            )
        # Mid-way between K and K+1 so that int(N * keep_ratio) gives K back despite float rounding.
        self.cfg.keep_ratio = min(1.0, (k + 0.5) / n)

    def _cost(self, k: int) -> ModelCost:
        vit, cfg = self.vit, self.cfg
        c, p, n = vit.embed_dim, vit.num_prefix_tokens, self._num_patches()
        rep = cfg.fast_update == "rep_token" and k < n
        plan = self._plans[cfg.mode == "layer"]
        blocks = []
        for i, blk in enumerate(vit.blocks):
            t = p + (k + rep if i >= cfg.start_layer else n)
            # Besides the block: the scoring row -- the CLS query's (q0 . K^T, C*T MACs) or, without CLS, the full map
            # (Q . K^T, C*T*T) -- and the representative token's weighted sum over the placeholders; all are matmuls
            # the FLOP counter sees. Sorting and gathers are not counted.
            row = c * t * (1 if vit.has_class_token else t)
            extra = row * plan.scored[i] + c * (n - k) * (rep and i in plan.starts)
            blocks.append(BlockCost.dense(t, c, blk.mlp.fc1.out_features, extra))
        return ModelCost(blocks, stem_macs(vit), head_macs(vit), tokens_per_block=[b.n_q for b in blocks])

    def cost(self) -> ModelCost:
        return self._cost(self._num_keep(self._num_patches(), self.cfg.keep_ratio))

    def train_forward_macs(self) -> int:
        """Plus the auxiliary CLS head(s). Layer-wise training reads a few more CLS attention rows than stage-wise
        deployment (C x T each, < 0.1 %): not added."""
        heads = (h for h in (self.cls_head, self.dist_head) if isinstance(h, nn.Linear))
        return super().train_forward_macs() + sum(h.in_features * h.out_features for h in heads)

    # ---------------------------------------------------------------- schedule
    def _switch_epoch(self, max_epochs: int) -> int:
        # round(), not floor(): a typed 0.666 x 300 is 199.8, and the paper switches at epoch 200.
        return round(self.cfg.stage_switch * max_epochs)

    def on_fit_start(self, global_batch: int, max_epochs: int) -> None:
        if global_batch < PAPER_GLOBAL_BATCH // 2:
            warnings.warn(
                f"evo_vit: global batch {global_batch} is far below the paper's {PAPER_GLOBAL_BATCH} (8 GPUs x 128); "
                "single-GPU runs of the official recipe reached 66% instead of 79.4% top-1 (Evo-ViT issue #10). "
                "Keep the global batch with trainer.devices / trainer.accumulate_grad_batches; below it the linear "
                "rule (optim.lr_batch) lowers the lr into an untested regime",
                UserWarning,
                stacklevel=2,
            )
        if self.cfg.mode == "stage" and self.cfg.stage_switch > 0 and self._switch_epoch(max_epochs) >= max_epochs:
            warnings.warn(
                f"evo_vit: with reducer.stage_switch={self.cfg.stage_switch:.3g} and {max_epochs} epochs training "
                "never reaches the stage-wise phase, yet evaluation and export run stage-wise (spec pitfall 5); "
                "lower reducer.stage_switch or set reducer.mode=layer",
                UserWarning,
                stacklevel=2,
            )

    def on_train_epoch_start(self, epoch: int, max_epochs: int) -> None:
        self._train_layer_wise = self.cfg.mode == "layer" or epoch < self._switch_epoch(max_epochs)

    def layer_wise(self) -> bool:
        """Whether the next forward re-selects at every block (training before the switch, or mode=layer)."""
        return self._train_layer_wise if self.training else self.cfg.mode == "layer"

    # ---------------------------------------------------------------- forward
    def _tokens(self, images: torch.Tensor, on_block: BlockCallback | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens after the last block, (B, P + N, C), the prefix first and the patches in score order, and that
        order as original patch indices (B, N)."""
        cfg, p, has_cls = self.cfg, self.vit.num_prefix_tokens, self.vit.has_class_token
        x = embed(self.vit, images)
        b, n = x.shape[0], x.shape[1] - p
        k = self._num_keep(n, cfg.keep_ratio)
        rep = cfg.fast_update == "rep_token" and k < n
        plan = self._plans[self.layer_wise()]
        order = torch.arange(n, device=x.device).expand(b, n)  # original (raster) index of each patch position
        score = rest = r0 = None  # global class attention; held-out placeholders; representative token at start
        for i, blk in enumerate(self.vit.blocks):
            if i in plan.starts:
                x, rest, score, order = self._select(x, score, order, k, p)
                if rep:
                    weights = score[:, k:] / score[:, k:].sum(dim=1, keepdim=True)
                    r0 = torch.bmm(weights.unsqueeze(1), rest)
                    x = torch.cat([x, r0], dim=1)
            # Not detached, as in the official code: with identity the score only yields sort indices, so no
            # gradient reaches it anyway; rep_token's merge weights carry gradient into the attention (LeViT code).
            x, row = _block(blk, x, plan.scored[i], has_cls)
            if row is not None:
                score = self._evolve(score, row[:, p:], i, k)
            if i in plan.ends:
                if rep:
                    # The summed residuals of r over the stage's blocks, broadcast to every placeholder.
                    rest = rest + (x[:, -1:] - r0)
                    x = x[:, :-1]
                x, rest = torch.cat([x, rest], dim=1), None
            if on_block is not None:
                full = x if rest is None else torch.cat([x[:, : p + k], rest], dim=1)
                slow = torch.ones_like(order, dtype=torch.bool)
                if i >= cfg.start_layer:
                    slow = torch.zeros_like(slow).scatter_(1, order[:, :k], True)
                on_block(i, self._raster(full, order, p), slow)
        return x, order

    @staticmethod
    def _select(
        x: torch.Tensor, score: torch.Tensor, order: torch.Tensor, k: int, p: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sort the patches by score: [the p prefix tokens; top k] for the slow path, the placeholders, and the
        permuted score and original indices. A full descending sort, as the official code does, so placeholders can
        be promoted."""
        perm = score.argsort(dim=1, descending=True)
        patches = gather_tokens(x[:, p:], perm)
        slow = torch.cat([x[:, :p], patches[:, :k]], dim=1)
        return slow, patches[:, k:], score.gather(1, perm), order.gather(1, perm)

    def _evolve(self, score: torch.Tensor | None, row: torch.Tensor, block: int, k: int) -> torch.Tensor:
        """Mix a block's class attention (over the patches it saw, in score order) into the global score."""
        if block < self.cfg.start_layer:
            return row  # tradeoff 1 before the first selection (DeiT code): the score is the latest block's row
        t = self.cfg.tradeoff
        # Only informative positions are updated; placeholders keep stale scores and are not renormalised (DeiT).
        return torch.cat([(1 - t) * score[:, :k] + t * row[:, :k], score[:, k:]], dim=1)

    @staticmethod
    def _raster(tokens: torch.Tensor, order: torch.Tensor, p: int) -> torch.Tensor:
        """Undo the score-order permutation of the patches (the p prefix tokens stay first)."""
        return torch.cat([tokens[:, :p], gather_tokens(tokens[:, p:], order.argsort(dim=1))], dim=1)

    def forward_features(self, images: torch.Tensor, on_block: BlockCallback | None = None) -> torch.Tensor:
        """Tokens after the last block in raster order, (B, P + N, C), for dense use and inspection.

        ``on_block`` sees every block's full token map and slow-path mask (see :data:`BlockCallback`).
        """
        return self._raster(*self._tokens(images, on_block), self.vit.num_prefix_tokens)

    @torch.no_grad()
    def token_maps(self, images: torch.Tensor) -> list[TokenMap]:
        """Per block, which patches took the slow path (1) or were placeholders (0), in the current mode."""
        grid = self.vit.patch_embed.grid_size
        maps: list[TokenMap] = []
        self.forward_features(
            images, lambda i, _, slow: maps.append(TokenMap(i, "informative", slow.view(-1, *grid).float()))
        )
        return maps

    def _classify(self, tokens: torch.Tensor) -> torch.Tensor:
        # Every head pools or picks prefix tokens, so the score order of the patches can stay.
        return classify(self.vit, tokens, tokens.new_ones(*tokens.shape[:2], 1) if self._gap else None)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._classify(self._tokens(images)[0])

    def losses(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        criterion: Criterion,
        teacher: nn.Module | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        tokens = self._tokens(images)[0]
        logits = self._classify(tokens)
        if self.cls_head is None:
            return logits, {"ce": criterion(logits, targets)}
        w = self.cfg.aux_weight
        # The backbone's token head as timm runs it: CLS, and for a distilled DeiT the mean with the distillation head.
        prefix = self.vit.head_drop(self.cls_norm(tokens[:, : 1 + (self.dist_head is not None)]))
        cls_logits = self.cls_head(prefix[:, 0])
        if self.dist_head is not None:
            cls_logits = (cls_logits + self.dist_head(prefix[:, 1])) / 2
        return logits, {"ce": (1 - w) * criterion(logits, targets), "ce_cls": w * criterion(cls_logits, targets)}

    # ---------------------------------------------------------------- export
    def strip_training_parts(self) -> None:
        # The auxiliary CLS head only trains the selector's CLS token; inference reads the GAP head (remove_cls()).
        self.cls_norm = self.cls_head = self.dist_head = None
