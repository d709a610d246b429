"""ATS: Adaptive Token Sampler (Fayyaz et al., ECCV 2022) on a stock timm ViT/DeiT.

In every ATS block (default: every block from the 4th on, as the official DeiT-S release) the patch tokens are scored
by the CLS attention of that block, summed over heads, times the L2 norm of their value vectors. The scores are
sorted ascending and their cumulative sum is min-max normalised; a fixed, evenly spaced grid of ``K - 1`` values on
that CDF's y-axis is mapped to the nearest CDF entries (deterministic inverse-transform sampling). High-score tokens
own long CDF segments and are hit several times, so after removing duplicates each image keeps its own number
``K' <= K - 1`` of patch tokens, plus CLS. The block computes attention outputs, projection and MLP only for those
rows (keys and values span all its input tokens); the other tokens are gone. Parameter-free: it applies to a trained
backbone as is (``finetune_epochs=0``) or is fine-tuned with it (``finetune_epochs``). Spec: ``specs/ats.md``.

Per-image counts differ, so a batch is padded to its largest count with a key-padding mask (spec §5/§10): padded rows
are never attended to, scored or sampled, and every image gets exactly what it would get alone (a choice made where
the official code is batch dependent, see :func:`sample_tokens`). The cost is per image: :meth:`ATS.cost` reports
the **mean per-image MACs over a set of images** -- by default ``cost_images`` seeded N(0, 1) images, the input torch's
FLOP counter is run on -- and ``knobs()`` says so; ``cost(images)`` gives it for any other set (e.g. validation
images, the paper's convention, spec §6). A padded batch executes more than that mean (its largest count per block).

Prefix tokens (CLS, a distilled DeiT's distillation token, registers: the first ``P = vit.num_prefix_tokens`` rows)
are kept in every block like CLS and are never scored or sampled; K counts them, so an ATS block has ``K - P`` grid
points (DeiT: ``K - 1``). The scores always read the CLS query's row (row 0), never a register's. On a backbone without
CLS (average or attention pooling) the CLS row is replaced by the mean attention each token receives over all queries
(:func:`tokred.vit_ops.received_attention`, the score of Learned Token Pruning and Zero-TPrune), the established
CLS-free token-importance score: ATS's significance is defined by an attention distribution over the tokens and this
one is the same kind of object (it sums to 1), whereas the alternative the spec mentions (SViT's dense tasks, §9.13)
adds a randomly initialised CLS token that only training can make meaningful. It needs the block's full attention
map, (T x T) per head, which the cost model charges. The head pools exactly the sampled tokens (padding excluded).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
from timm.models.vision_transformer import Block
from torch import nn

from tokred.flops import BlockCost, ModelCost, head_macs, num_tokens, stem_macs
from tokred.reducers import register_reducer
from tokred.reducers.base import Phase, TokenMap, TokenReducer, TrainingFreeConfig
from tokred.vit_ops import (
    attend,
    block_forward,
    check_standard_vit,
    classify,
    embed,
    gather_tokens,
    mlp_residual,
    project_qkv,
    scoring_attention,
)

GRID_SIZES = ("release", "per_current_T")
VALUE_NORMS = ("full", "per_head")
FIRST_BLOCK = 3  # the release puts ATS into blocks 3..11 (0-based) of DeiT-S
MIN_TOKENS = 8  # the official forward clamps K to at least 8 (spec §3.5)
COST_SEED = 0
# A budget lands at or below its target, as close as K's integer steps allow (within 1% on DeiT at 224 px); a
# shortfall beyond this even at K = all tokens puts it out of reach of num_tokens (the benchmark's tolerance).
BUDGET_REACH = 0.03

# on_block(block, patch, valid): after each block, the original patch index of every non-prefix row it outputs
# (B, n - P), and which of its n output rows are real rather than padding ((B, n) bool; None: all of them).
BlockCallback = Callable[[int, torch.Tensor, Optional[torch.Tensor]], None]


@dataclass
class Config(TrainingFreeConfig):
    name: str = "ats"
    num_tokens: Optional[int] = None  # K: most tokens (prefix tokens included) an ATS block keeps; null: all input
    blocks: Optional[list[int]] = None  # 0-based ATS blocks; null: every block from the 4th (index 3) on; []: none
    grid_size: str = "release"  # release: K - P grid points (P: prefix tokens) | per_current_T: min(K, T) - P
    value_norm: str = "full"  # full: norm of the C-dim value (official) | per_head: sum_h A_h * |V_h| (TokenReduction)
    cost_images: int = 16  # cost() = mean per-image MACs over this many seeded N(0, 1) images

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_tokens is not None and self.num_tokens < MIN_TOKENS:
            raise ValueError(
                f"reducer.num_tokens={self.num_tokens} must be >= {MIN_TOKENS} (the official minimum) "
                "or null (the input token count)"
            )
        if self.blocks is not None:
            blocks = list(self.blocks)
            if any(b < 0 for b in blocks) or blocks != sorted(set(blocks)):
                raise ValueError(
                    f"reducer.blocks={blocks} must list distinct 0-based blocks in increasing order, "
                    "e.g. [3,4,5] (null: every block from index 3 on)"
                )
        for knob, value, choices in (
            ("grid_size", self.grid_size, GRID_SIZES),
            ("value_norm", self.value_norm, VALUE_NORMS),
        ):
            if value not in choices:
                raise ValueError(f"reducer.{knob}={value!r}; choose one of: {', '.join(choices)}")
        if self.cost_images < 1:
            raise ValueError(f"reducer.cost_images={self.cost_images} must be >= 1 (images the mean cost is over)")


def significance(
    row: torch.Tensor,
    v: torch.Tensor,
    valid: torch.Tensor | None = None,
    value_norm: str = "full",
    num_prefix: int = 1,
) -> torch.Tensor:
    """ATS scores (B, N) of the N patch tokens, float32, summing to 1 over each image's real tokens (spec §2).

    ``row`` (B, H, P + N) is the scoring attention per head (:func:`tokred.vit_ops.scoring_attention`), ``v``
    (B, H, P + N, d) the values, ``valid`` (B, P + N) marks real rows (None: all); the ``P = num_prefix`` prefix
    columns are no candidates. Padded
    keys are taken out of the softmax by renormalising the row over the real keys, which is the masked softmax.
    """
    row = row.float()
    if valid is not None:
        row = row * valid.unsqueeze(1)
        row = row / row.sum(dim=-1, keepdim=True)
    row, v = row[:, :, num_prefix:], v[:, :, num_prefix:].float()
    if value_norm == "full":  # the heads concatenated: one C-dimensional value per token (official code)
        # (B, T, H * d): a view for timm's fused qkv layout, so the norm reduces over contiguous memory.
        scores = row.sum(dim=1) * torch.linalg.vector_norm(v.transpose(1, 2).flatten(2), dim=-1)
    else:
        scores = (row * torch.linalg.vector_norm(v, dim=-1)).sum(dim=1)
    return scores / scores.sum(dim=1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)


def sample_tokens(
    scores: torch.Tensor, num_samples: int | torch.Tensor, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic inverse-transform sampling with duplicates removed (spec §3).

    ``scores`` (B, N) over candidates, ``num_samples`` R grid points (an int or one per image), ``valid`` (B, N)
    marks real candidates (None: all). Returns the sampled candidates (B, n), each image's first ``count`` entries in
    ascending significance (the official order) and the rest filler indices of unsampled candidates, and ``count``
    (B,), the distinct candidates each image keeps: at most min(R, its real candidates).

    The CDF is min-max normalised over each image's real candidates only. The official code normalises over the
    padded row, so in a padded batch an image's lowest real token survives where alone it cannot; here an image
    samples the same tokens alone or in any batch (the official result at batch 1).
    """
    b, n = scores.shape
    device = scores.device
    key = scores if valid is None else scores.masked_fill(~valid, -1.0)  # padding sorts first
    key, perm = key.sort(dim=1, stable=True)
    cdf = key.clamp_min(0).cumsum(dim=1)
    n_pad = torch.zeros(b, 1, dtype=torch.long, device=device) if valid is None else (~valid).sum(1, keepdim=True)
    low = cdf.gather(1, n_pad)  # the CDF at the lowest real candidate
    cdf = (cdf - low) / (cdf[:, -1:] - low).clamp_min(torch.finfo(cdf.dtype).tiny)
    real = torch.arange(n, device=device) >= n_pad
    cdf = cdf.masked_fill(~real, -torch.inf)  # never the nearest
    # The grid runs from the smallest strictly positive CDF value to 1, so the lowest real candidate is never hit;
    # an image without one (a single real candidate) gets a grid at 1, which hits its top candidate.
    y_min = torch.where(cdf > 0, cdf, torch.inf).amin(dim=1, keepdim=True)
    y_min = torch.where(torch.isinf(y_min), torch.ones_like(y_min), y_min)
    r = torch.as_tensor(num_samples, device=device).reshape(-1, 1).expand(b, 1)
    steps = torch.arange(int(r.max()), device=device).expand(b, -1)
    # An image with fewer grid points than the batch's largest R repeats its last one (y = 1): no extra hit. A single
    # grid point is that last one.
    fraction = steps.minimum(r - 1).to(cdf.dtype) / (r - 1).clamp_min(1).to(cdf.dtype)
    fraction = fraction.where(r > 1, torch.ones_like(fraction))
    y = torch.where(fraction >= 1, torch.ones_like(fraction), y_min + (1 - y_min) * fraction)
    nearest = _nearest(cdf, y)
    hit = torch.zeros(b, n, dtype=torch.bool, device=device).scatter_(1, nearest, True)
    count = hit.sum(dim=1)
    # Hit ranks first, in ascending significance (a stable sort keeps the rank order within each group).
    ranks = (~hit).to(torch.uint8).sort(dim=1, stable=True).indices[:, : int(count.max())]
    return perm.gather(1, ranks), count


def _nearest(cdf: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """For each y (B, R), the index of the nearest value of the non-decreasing ``cdf`` (B, N); on ties the first
    index, as the official argmin over |y - cdf| gives it, found by binary search instead of an (R x N) table."""
    cdf = cdf.contiguous()
    above = torch.searchsorted(cdf, y).clamp(max=cdf.shape[1] - 1)  # the first value >= y (or the last value)
    below = (above - 1).clamp(min=0)
    low, high = cdf.gather(1, below), cdf.gather(1, above)
    below_first = torch.searchsorted(cdf, low)  # the first of a run of equal values
    return torch.where((y - low).abs() <= (high - y).abs(), below_first, above)


def _padding_mask(count: torch.Tensor, width: int) -> torch.Tensor | None:
    """(B, width) True on each image's first ``count`` rows; None when no image has padding."""
    if bool((count == width).all()):
        return None
    return torch.arange(width, device=count.device) < count.unsqueeze(1)


def _key_mask(valid: torch.Tensor | None) -> torch.Tensor | None:
    return None if valid is None else valid[:, None, None, :]


def _count(valid: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """Real rows of ``x`` per image (B,)."""
    if valid is None:
        return torch.full((x.shape[0],), x.shape[1], dtype=torch.long, device=x.device)
    return valid.sum(dim=1)


def _dense_block(blk: Block, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """A plain timm block on a possibly padded batch: padded keys are masked out of every query's attention."""
    if valid is None:
        return block_forward(blk, x)
    q, k, v = project_qkv(blk.attn, blk.norm1(x))
    x = x + blk.drop_path1(blk.ls1(attend(blk.attn, q, k, v, _key_mask(valid))))
    return x + mlp_residual(blk, x)


@register_reducer
class ATS(TokenReducer):
    name = "ats"
    Config = Config
    adaptive = True

    def __init__(self, vit: nn.Module, cfg: Config) -> None:
        super().__init__(vit, cfg)
        check_standard_vit(vit, self.name)
        depth, n_ref, prefix = len(vit.blocks), num_tokens(vit), vit.num_prefix_tokens
        blocks = list(range(FIRST_BLOCK, depth)) if cfg.blocks is None else list(cfg.blocks)
        if cfg.blocks is None and not blocks:
            raise ValueError(
                f"reducer.blocks=null means every block from index {FIRST_BLOCK} on, but the backbone "
                f"has {depth} blocks; list the ATS blocks explicitly"
            )
        if blocks and blocks[-1] >= depth:
            raise ValueError(f"reducer.blocks={blocks} must be below the backbone depth {depth}")
        if cfg.num_tokens is not None and cfg.num_tokens > n_ref:
            raise ValueError(
                f"reducer.num_tokens={cfg.num_tokens} exceeds the backbone's {n_ref} input tokens; "
                "lower it or use null (the input count)"
            )
        if cfg.num_tokens is not None and cfg.num_tokens <= prefix:
            raise ValueError(
                f"reducer.num_tokens={cfg.num_tokens} leaves no patch token beside the backbone's {prefix} prefix "
                f"tokens; raise it above {prefix}"
            )
        self._ats = frozenset(blocks)
        target = self.target_gmacs()
        if target is not None and cfg.blocks is None:
            self._meet_budget_from_any_start(target, depth)
        elif target is not None:
            self._meet_budget(target)

    # ---------------------------------------------------------------- forward
    def keep_limit(self) -> int:
        """K: the most tokens (prefix tokens included) an ATS block keeps."""
        return num_tokens(self.vit) if self.cfg.num_tokens is None else self.cfg.num_tokens

    def _ats_block(
        self, blk: Block, x: torch.Tensor, valid: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One ATS block: (output rows, the input rows they came from (B, n) with the prefix first, output padding
        mask).

        q, k and v are computed for every input row (one fused projection; the CLS scores need only CLS's query, and
        the unsampled rows' queries cost (T - T') * C^2 MACs, which the cost model charges); attention, projection
        and MLP run for the sampled rows only, over all input keys and values (spec §1).
        """
        attn, cfg, prefix = blk.attn, self.cfg, self.vit.num_prefix_tokens
        h = blk.norm1(x)
        q, k, v = project_qkv(attn, h)
        # Scoring attention beside the fused attention (CLS row: O(T * C)): SDPA never returns its weights. No
        # gradient reaches the scores' use: they only feed a sort and a nearest-value search (spec §2).
        row = scoring_attention(attn, q, k, self.vit.has_class_token, valid)
        scores = significance(row, v, valid, cfg.value_norm, prefix)
        r = self.keep_limit() - prefix
        if cfg.grid_size == "per_current_T":
            r = _count(valid, x).clamp(max=r + prefix) - prefix
        candidates, count = sample_tokens(scores, r, None if valid is None else valid[:, prefix:])
        kept_prefix = torch.arange(prefix, device=x.device).expand(x.shape[0], prefix)
        rows = torch.cat([kept_prefix, candidates + prefix], dim=1)
        # (B, H, T, d) -> (B, T, H, d) is a view of the fused qkv output, so each row is one contiguous copy.
        q_rows = gather_tokens(q.transpose(1, 2), rows).transpose(1, 2)
        y = gather_tokens(x, rows) + blk.drop_path1(blk.ls1(attend(attn, q_rows, k, v, _key_mask(valid))))
        return y + mlp_residual(blk, y), rows, _padding_mask(count + prefix, rows.shape[1])

    def _tokens(
        self, images: torch.Tensor, on_block: BlockCallback | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokens after the last block (B, n, C), prefix first, and which rows are real ((B, n) bool; None: all);
        rows past an image's count are padding."""
        x = embed(self.vit, images)
        prefix = self.vit.num_prefix_tokens
        patch = torch.arange(x.shape[1] - prefix, device=x.device).expand(x.shape[0], -1)
        valid = None
        for i, blk in enumerate(self.vit.blocks):
            if i in self._ats:
                x, rows, valid = self._ats_block(blk, x, valid)
                patch = patch.gather(1, rows[:, prefix:] - prefix)
            else:
                x = _dense_block(blk, x, valid)
            if on_block is not None:
                on_block(i, patch, valid)
        return x, valid

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x, valid = self._tokens(images)
        # Padding has size 0: average and attention pooling see exactly each image's sampled tokens.
        return classify(self.vit, x, None if valid is None else valid.unsqueeze(-1))

    def _trace(self, images: torch.Tensor, record: BlockCallback) -> None:
        """One eval-mode pass that hands each ATS block's sampled rows to ``record`` (maps and cost read them)."""
        was_training = self.training
        self.eval()
        try:
            self._tokens(images, record)
        finally:
            self.train(was_training)

    @torch.no_grad()
    def token_maps(self, images: torch.Tensor) -> list[TokenMap]:
        """Per block, 1 on the patches the block computes (its output rows), 0 on those sampled away before."""
        grid = self.vit.patch_embed.grid_size
        n = grid[0] * grid[1]
        maps: list[TokenMap] = []

        def record(i: int, patch: torch.Tensor, valid: torch.Tensor | None) -> None:
            real = torch.ones_like(patch, dtype=torch.bool) if valid is None else valid[:, self.vit.num_prefix_tokens :]
            kept = torch.zeros(patch.shape[0], n + 1, device=patch.device)
            kept.scatter_(1, torch.where(real, patch, n), 1.0)  # padding goes to the extra column n
            maps.append(TokenMap(i, "kept", kept[:, :n].view(-1, *grid)))

        self._trace(images, record)
        return maps

    # ---------------------------------------------------------------- cost
    def _block_costs(self, counts: list[tuple[torch.Tensor, torch.Tensor]]) -> list[BlockCost]:
        """Per block, a BlockCost whose fields are (B,) tensors of per-image counts (input, output real tokens)."""
        c = self.vit.embed_dim
        costs = []
        for i, (blk, (n_in, n_out)) in enumerate(zip(self.vit.blocks, counts)):
            hidden = blk.mlp.fc1.out_features
            if i in self._ats:
                # Besides the block's sampled rows: the unsampled rows' queries and the scores' q . K^T, for the CLS
                # row alone or, without CLS, for every query (the received attention).
                score_rows = 1 if self.vit.has_class_token else n_in
                extra = (n_in - n_out) * c * c + score_rows * n_in * c
                costs.append(BlockCost(n_out, n_in, c, c, c, hidden, extra))
            else:
                costs.append(BlockCost(n_in, n_in, c, c, c, hidden))
        return costs

    @torch.no_grad()
    def _counts(self, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per block, the real input and output token counts of every image (B,), int64, in eval mode."""
        counts: list[tuple[torch.Tensor, torch.Tensor]] = []

        def record(i: int, patch: torch.Tensor, valid: torch.Tensor | None) -> None:
            n_out = patch.shape[1] + self.vit.num_prefix_tokens if valid is None else valid.sum(dim=1)
            n_out = torch.as_tensor(n_out, device=patch.device).expand(patch.shape[0])
            n_in = counts[-1][1] if counts else torch.full_like(n_out, num_tokens(self.vit))
            counts.append((n_in, n_out))

        self._trace(images, record)
        return counts

    def image_macs(self, images: torch.Tensor) -> torch.Tensor:
        """MACs of each image (B,), int64, from its own token counts (padding excluded): what the FLOP counter
        measures on that image alone. A padded batch executes more (its largest count per block)."""
        counts = self._counts(images)
        blocks = self._block_costs(counts)
        return stem_macs(self.vit) + sum(b.macs() for b in blocks) + self._head_macs(counts[-1][1])

    def _head_macs(self, n_out: torch.Tensor) -> torch.Tensor:
        """Per image (B,), int64: the head's MACs given the tokens leaving the last block (attention pooling's cost
        depends on them)."""
        return torch.tensor([head_macs(self.vit, n) for n in n_out.tolist()], dtype=torch.long, device=n_out.device)

    def reference_images(self) -> torch.Tensor:
        """The images :meth:`cost` averages over: ``cost_images`` N(0, 1) images, seeded, at the backbone's size."""
        h, w = self.vit.patch_embed.img_size
        param = next(self.parameters())
        generator = torch.Generator().manual_seed(COST_SEED)
        images = torch.randn(self.cfg.cost_images, self.vit.patch_embed.proj.in_channels, h, w, generator=generator)
        return images.to(param.device, param.dtype)

    def cost(self, images: torch.Tensor | None = None) -> ModelCost:
        """Mean per-image cost over ``images`` (default :meth:`reference_images`), exactly: each block holds the
        mean of its per-image MACs, ``tokens_per_block`` the mean token count each block computes (floats)."""
        counts = self._counts(self.reference_images() if images is None else images)
        head = self._head_macs(counts[-1][1]).double().mean().item()
        blocks = []
        for cost in self._block_costs(counts):
            n_q, n_kv = cost.n_q.double(), cost.n_kv.double()
            # Counts enter linearly except in the attention matmuls (n_q * n_kv): the mean's covariance term goes to
            # extra_macs, so the block's macs() is the mean of the per-image MACs.
            spread = ((n_q * n_kv).mean() - n_q.mean() * n_kv.mean()) * (cost.qk_dim + cost.v_dim)
            extra = torch.as_tensor(cost.extra_macs, dtype=torch.float64).mean() + spread
            blocks.append(
                BlockCost(
                    n_q.mean().item(),
                    n_kv.mean().item(),
                    cost.embed_dim,
                    cost.qk_dim,
                    cost.v_dim,
                    cost.mlp_hidden,
                    extra.item(),
                )
            )
        return ModelCost(blocks, stem_macs(self.vit), head, tokens_per_block=[b.n_q for b in blocks])

    def knobs(self) -> dict:
        return {**super().knobs(), "gmacs_over": f"mean per image over {self.cfg.cost_images} seeded N(0,1) images"}

    def _meet_budget_from_any_start(self, target: float, depth: int) -> None:
        """With ``blocks`` left to the default, the first ATS block moves later when no K reaches ``target`` from
        block 3: on a trained model ATS keeps few distinct tokens even at the largest K (duplicate samples collapse),
        so each start block covers only a narrow GMACs window, and a larger budget needs fewer ATS blocks."""
        first: ValueError | None = None
        for start in range(FIRST_BLOCK, depth):
            self._ats = frozenset(range(start, depth))
            try:
                self._meet_budget(target)
                if start > FIRST_BLOCK:  # recorded, so the run's config and export say which blocks sample
                    self.cfg.blocks = sorted(self._ats)
                return
            except ValueError as err:
                first = first or err  # names the widest range: the one from block 3
        self._ats = frozenset(range(FIRST_BLOCK, depth))
        raise first

    def _meet_budget(self, target: float) -> None:
        """Set num_tokens to a K whose mean cost is <= ``target`` GMACs and as close to it as a bisection over the
        integers finds. The cost grows with K (more grid points hit more tokens), though not strictly: a new K moves
        the whole grid. The bisection only ever settles on a K it has costed at or below the target."""
        if not self._ats:
            raise ValueError("reducer.blocks is empty, so no budget can be met; list ATS blocks or drop the target")
        images = self.reference_images()

        def gmacs(k: int) -> float:
            self.cfg.num_tokens = k
            return self.cost(images).gmacs

        lo, hi = max(MIN_TOKENS, self.vit.num_prefix_tokens + 1), num_tokens(self.vit)
        low, high = gmacs(lo), gmacs(hi)
        if low > target or high < target * (1 - BUDGET_REACH):
            self.cfg.num_tokens = None
            raise ValueError(
                f"reducer target {target:.4g} GMACs is out of reach by num_tokens alone: "
                f"{low:.4g}..{high:.4g} GMACs (mean over the reference images) with ATS in blocks "
                f"{sorted(self._ats)}; change the target or reducer.blocks"
            )
        if high <= target:
            self.cfg.num_tokens = hi
            return
        # Invariant: cost(lo) <= target < cost(hi). The cost is close to linear in K, so the step interpolates
        # (a forward over the reference images per step); a step that fails to halve the bracket is followed by a
        # plain bisection, so the worst case stays logarithmic.
        bisect = False
        while hi - lo > 1:
            mid = (lo + hi) // 2 if bisect else lo + round((target - low) / (high - low) * (hi - lo))
            mid = min(max(mid, lo + 1), hi - 1)
            width, cost = hi - lo, gmacs(mid)
            if cost <= target:
                lo, low = mid, cost
            else:
                hi, high = mid, cost
            bisect = not bisect and hi - lo > width // 2
        self.cfg.num_tokens = lo

    # ---------------------------------------------------------------- pipeline and export
    def phases(self) -> list[Phase]:
        # Parameter-free: fine-tuning trains the backbone with sampling in the loop, one LR for everything (spec §7
        # recommendation; the paper's schedule is unknown). finetune_epochs=0 applies ATS to the weights as they are.
        return self.cfg.phases()

    def structure(self) -> dict:
        # A budget's K was searched on the weights at build time; a rebuild (export, eval) must not search again on
        # different (e.g. freshly initialised) weights.
        return {**super().structure(), "num_tokens": self.cfg.num_tokens}

    def load_structure(self, structure: dict) -> None:
        super().load_structure(structure)
        if "num_tokens" in structure:
            self.cfg.num_tokens = structure["num_tokens"]
