"""Patch Slimming (Tang et al., CVPR 2022): a static, nested, top-down token schedule (spec: patch_slimming.md).

Block ``l`` computes outputs for the tokens ``keep[l]`` only (queries, attention rows, residual, MLP) while its keys
and values span its whole input ``keep[l-1]``: rectangular attention through :func:`tokred.vit_ops.block_forward`,
on the timm block's own weights. The schedule is nested (``keep[l+1]`` is a subset of ``keep[l]``), keeps every
prefix token (CLS, a distilled DeiT's distillation token, registers: ids ``0..P-1``) in every block and only them in
the last one (spec A7: a distilled DeiT keeps both of its head tokens); its local indices are buffers, so inference
does no scoring. The significance score measures what reaches the tokens the head reads (CLS and the distillation
token), not the registers, whose last outputs nobody reads.

A backbone without CLS token (average or attention pooling) is rejected: its head reads every patch of the last
block, so a nested top-down schedule would have to keep every patch in every block -- there is no pruning to search.

The schedule comes from, in order of precedence:

* ``reducer.schedule=<json>``: a schedule written by an earlier search (skips the search);
* the search (phase ``search``, Algorithm 1): top-down, tokens ranked by the factorised significance score, added in
  groups of ``group_size`` while block ``l`` is fine-tuned on cached inputs, until the relative reconstruction error
  at block ``l+1`` is <= ``epsilon``. With ``target_gmacs``/``target_ratio`` the whole search is repeated with
  epsilon bisected (geometrically) until a searched model's GMACs come near the target; then the closest schedule is
  moved onto the target in the search's own token ranking, nesting kept: if over, it loses its lowest-ranked tokens
  until it is not, then it gains next-ranked ones until the next would exceed the target. The target is a ceiling:
  the budget error (achieved vs target GMACs, in [-1%, 0%] unless one token costs more) is ``budget_error_pct``;
* before a search has run, a data-free *parametric pyramid* at (at most) the requested GMACs, so that
  ``build_model(cfg, num_classes).deployable()`` has the target's cost (speed measurement, matched budgets). Its
  tokens are a placeholder (centre-first), not searched ones; without a target the model starts dense.

Then phase ``finetune`` trains the whole pruned network with the masks frozen.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from tokred.flops import BlockCost, ModelCost, bisect_budget, head_macs, num_tokens, stem_macs
from tokred.io import atomic_write, atomic_write_json
from tokred.reducers import register_reducer
from tokred.reducers.base import Phase, ReducerConfig, TokenMap, TokenReducer
from tokred.vit_ops import (
    UnsupportedBackbone,
    attention_logits,
    block_forward,
    check_standard_vit,
    classify,
    embed,
    project_qkv,
    require_cls_token,
)

if TYPE_CHECKING:
    from tokred.training.phases import PhaseContext

log = logging.getLogger("tokred")

SCHEDULE_FORMAT = "tokred.patch_slimming.schedule/1"
SCORE_INPUTS = ("raw", "norm1")
ERROR_TARGETS = ("pruned_next", "original")
# Cached block inputs (spec A4): fp16 halves host memory. Prediction and target are computed from the same rounded
# input, so the rounding adds no error.
CACHE_DTYPE = torch.float16
# Bracketing step of the epsilon bisection [R]: the paper's sweep spans epsilon 0.005-0.05 for 20-55% FLOPs
# reduction, so x4 brackets a target in one or two searches.
EPSILON_BRACKET_FACTOR = 4.0
# A matched budget lands in [-1%, 0%] of its target (the comparison's rule); coarser only where one token costs more.
BUDGET_TOLERANCE_PCT = 1.0


@dataclass
class Config(ReducerConfig):
    """Knobs of Patch Slimming; defaults are the spec's recommended choices (§2.3, §7 A2-A6)."""

    name: str = "patch_slimming"
    schedule: Optional[str] = None  # JSON written by a search: use it, skip the search
    epsilon: float = 0.01  # tolerance on the relative reconstruction error; with a target: the bisection's start
    group_size: int = 10  # r': tokens added per greedy step
    block_epochs: int = 3  # block-only fine-tune after each addition
    block_lr: float = 1e-4
    block_batch_size: int = 128
    block_weight_decay: float = 0.0
    block_grad_clip: float = 1.0
    score_images: int = 5000  # sampled (fixed seed) per layer for the significance score
    score_batch_size: int = 32  # the float64 recursion holds H*N^2 per image and block
    cache_images: int = 50000  # block inputs cached for the block fine-tune
    holdout_images: int = 5000  # disjoint from the cache; the reconstruction error is measured here
    score_input: str = "raw"  # |Z_{l-1}| (raw residual stream, literal) or |LN1(Z_{l-1})|
    error_target: str = "pruned_next"  # Eq. 7 style B^_{l+1}(B_l(Z)) | original: the unpruned network's Z_{l+1}
    seed: int = 0
    bisect_searches: int = 6  # at most this many full searches when a GMACs target is set
    bisect_rtol: float = 0.02  # a search within this relative distance of the target ends the bisection
    finetune_epochs: Optional[int] = 30  # None: trainer.max_epochs; the faithful maximum is DeiT's 300
    finetune_lr: float = 5.0e-5  # per 512 images (DeiT's linear scaling), overrides optim.lr for the fine-tune
    finetune_warmup_epochs: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        positive = ("epsilon", "block_lr", "block_grad_clip", "finetune_lr", "bisect_rtol")
        for knob in positive:
            if not getattr(self, knob) > 0:
                raise ValueError(f"reducer.{knob}={getattr(self, knob)} must be > 0")
        at_least_one = (
            "group_size",
            "block_batch_size",
            "score_images",
            "score_batch_size",
            "cache_images",
            "holdout_images",
            "bisect_searches",
        )
        for knob in at_least_one:
            if getattr(self, knob) < 1:
                raise ValueError(f"reducer.{knob}={getattr(self, knob)} must be >= 1")
        for knob in ("block_epochs", "block_weight_decay", "finetune_warmup_epochs"):
            if getattr(self, knob) < 0:
                raise ValueError(f"reducer.{knob}={getattr(self, knob)} must be >= 0")
        if self.finetune_epochs is not None and self.finetune_epochs < 0:
            raise ValueError(
                f"reducer.finetune_epochs={self.finetune_epochs} must be >= 0 (or null: trainer.max_epochs)"
            )
        if self.bisect_rtol >= 1:
            raise ValueError(f"reducer.bisect_rtol={self.bisect_rtol} must be < 1 (e.g. 0.02 for 2%)")
        if self.score_input not in SCORE_INPUTS:
            raise ValueError(f"reducer.score_input={self.score_input!r}; choose one of: {', '.join(SCORE_INPUTS)}")
        if self.error_target not in ERROR_TARGETS:
            raise ValueError(f"reducer.error_target={self.error_target!r}; choose one of: {', '.join(ERROR_TARGETS)}")
        if self.schedule is not None:
            if self.target_gmacs is not None or self.target_ratio is not None:
                raise ValueError(
                    "reducer.schedule fixes the token schedule; unset reducer.target_gmacs/target_ratio "
                    "or drop reducer.schedule to search for the target"
                )
            if not Path(self.schedule).expanduser().is_file():
                raise ValueError(
                    f"reducer.schedule={self.schedule!r} does not exist; pass the schedule.json a search "
                    "wrote (<run_dir>/phases/search/schedule.json) or unset it to run the search"
                )


# --------------------------------------------------------------------------------------------------- schedules
def check_schedule(
    keep: Any, n_tokens: int, depth: int, where: str = "schedule", cls_only_last: bool = True, num_prefix: int = 1
) -> list[list[int]]:
    """Validated, sorted keep-lists: one per block, nested, the ``num_prefix`` prefix tokens (ids 0..P-1: CLS first)
    in every block and (``cls_only_last``) alone in the last; only the unpruned starting point of a model without
    schedule relaxes the latter."""
    prefix = list(range(num_prefix))
    named = "the CLS token (id 0)" if num_prefix == 1 else f"a prefix token (ids 0..{num_prefix - 1})"
    if not isinstance(keep, list) or len(keep) != depth:
        got = len(keep) if isinstance(keep, list) else type(keep).__name__
        raise ValueError(f"{where}: 'keep' must list the kept token ids of each of the {depth} blocks (got {got})")
    previous = set(range(n_tokens))
    out = []
    for block, ids in enumerate(keep):
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ValueError(f"{where}: block {block} must be a list of integer token ids")
        if len(set(ids)) != len(ids):
            raise ValueError(f"{where}: block {block} lists a token twice")
        if not set(prefix) <= set(ids):
            raise ValueError(f"{where}: block {block} drops {named}; every block must keep it")
        if not set(ids) <= previous:
            stray = sorted(set(ids) - previous)[:5]
            raise ValueError(
                f"{where}: block {block} keeps tokens {stray} that "
                + (f"are outside 0..{n_tokens - 1}" if block == 0 else f"block {block - 1} pruned")
                + "; schedules must be nested (kept at l+1 => kept at l)"
            )
        previous = set(ids)
        out.append(sorted(ids))
    if cls_only_last and out[-1] != prefix:
        raise ValueError(
            f"{where}: the last block must keep only {'CLS' if num_prefix == 1 else 'the prefix tokens'} ({prefix}), "
            f"got {len(out[-1])} tokens"
        )
    return out


def read_schedule(path: str | Path, n_tokens: int, depth: int) -> dict[str, Any]:
    """A schedule document from JSON (as written by the search, or a bare list of keep-lists); validated by
    :meth:`PatchSlimming.set_schedule`."""
    where = f"reducer.schedule={str(path)!r}"
    try:
        doc = json.loads(Path(path).expanduser().read_text())
    except FileNotFoundError:
        raise ValueError(f"{where} does not exist; pass the schedule.json a search wrote or unset it") from None
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{where} is not readable JSON ({err}); pass the schedule.json a search wrote") from None
    if isinstance(doc, list):
        doc = {"keep": doc}
    if not isinstance(doc, dict) or "keep" not in doc:
        raise ValueError(f"{where} has no 'keep' list (one list of kept token ids per block)")
    for key, expected in (("num_tokens", n_tokens), ("depth", depth)):
        if key in doc and doc[key] != expected:
            raise ValueError(
                f"{where} was made for {key}={doc[key]} but the backbone has {expected}; search again for this backbone"
            )
    return doc


def local_positions(child: Sequence[int], parent: Sequence[int]) -> list[int]:
    """Where each global id of ``child`` sits in the compact tensor holding ``parent`` (both sorted)."""
    position = {token: i for i, token in enumerate(parent)}
    return [position[token] for token in child]


def pyramid_schedule(grid: tuple[int, int], depth: int, scale: float, num_prefix: int = 1) -> list[list[int]]:
    """The data-free placeholder schedule: patches kept fall linearly from ``scale`` x all (block 0) to none.

    Block ``l`` keeps ``round(N * clip(scale * (1 - l/(L-1)), 0, 1))`` of the N patches plus the ``num_prefix``
    prefix tokens, so the cost is monotone in ``scale`` (0: the prefix only after block 0; L-1: only the last block
    pruned). Patches are taken centre-first [R]: an
    object-centred prior that keeps the pyramid nested; only the counts matter for cost and speed.
    """
    rows, cols = grid
    centre = ((rows - 1) / 2, (cols - 1) / 2)
    order = sorted(range(rows * cols), key=lambda p: ((p // cols - centre[0]) ** 2 + (p % cols - centre[1]) ** 2, p))
    keep = []
    for block in range(depth):
        fraction = min(1.0, max(0.0, scale * (1 - block / (depth - 1)))) if depth > 1 else 0.0
        keep.append(list(range(num_prefix)) + sorted(p + num_prefix for p in order[: round(rows * cols * fraction)]))
    return keep


def schedule_cost(vit: nn.Module, keep: Sequence[Sequence[int]]) -> ModelCost:
    """The spec's cost model (§3): block l has queries on keep[l], keys/values over its input keep[l-1]."""
    n_in, blocks = num_tokens(vit), []
    for blk, ids in zip(vit.blocks, keep):
        width = blk.attn.attn_dim
        blocks.append(BlockCost(len(ids), n_in, vit.embed_dim, width, width, blk.mlp.fc1.out_features))
        n_in = len(ids)
    return ModelCost(blocks, stem_macs(vit), head_macs(vit), tokens_per_block=[len(ids) for ids in keep])


def pyramid_for_target(vit: nn.Module, target: float) -> tuple[list[list[int]], float]:
    """The parametric pyramid whose GMACs are closest to ``target`` without exceeding it, and its scale."""
    depth, grid = len(vit.blocks), tuple(vit.patch_embed.grid_size)
    prefix = vit.num_prefix_tokens
    gmacs_at = lambda scale: schedule_cost(vit, pyramid_schedule(grid, depth, scale, prefix)).gmacs
    lowest, highest = gmacs_at(0.0), gmacs_at(float(depth - 1))
    if not lowest <= target <= highest:
        raise ValueError(
            f"reducer target {target:.4g} GMACs is outside what Patch Slimming reaches on this backbone: "
            f"{lowest:.4g} (prefix tokens only after block 0) to {highest:.4g} (only the last block pruned); "
            "choose reducer.target_gmacs/target_ratio in that range"
        )
    scale = bisect_budget(gmacs_at, target, 0.0, float(depth - 1), tol=1e-5, ceiling=True)
    return pyramid_schedule(grid, depth, scale, prefix), scale


def token_orders(keep: Sequence[Sequence[int]], rankings: Sequence[Sequence[int]]) -> list[list[int]]:
    """Each searched block's priority over all tokens: the next block's tokens (in that block's priority), then the
    block's candidates in the search's score order (``rankings[l]``: every token the next block pruned, best first).

    A searched schedule keeps a prefix of each order, so extending or shortening the prefix continues the search's
    own ranking; blocks 0..L-2 (the last block keeps the prefix tokens alone).
    """
    orders = [list(keep[-1])]
    for block in range(len(keep) - 2, -1, -1):
        order = orders[0][: len(keep[block + 1])] + list(rankings[block])
        if sorted(order) != list(range(len(order))) or set(order[: len(keep[block])]) != set(keep[block]):
            raise ValueError(
                f"block {block}: its ranking does not extend the schedule (kept tokens first, then the "
                "ones the next block pruned); pass the rankings of the search that made it"
            )
        orders.insert(0, order)
    return orders[:-1]


def fit_to_budget(
    vit: nn.Module, keep: Sequence[Sequence[int]], rankings: Sequence[Sequence[int]], target: float
) -> list[list[int]]:
    """A searched schedule moved, one token at a time, to the highest cost at or under ``target`` GMACs.

    Over the target, round after round each searched block (deepest first, as the search goes) loses its
    lowest-ranked token (:func:`token_orders`) that the next block does not keep, until the cost is at or under it.
    Then, round after round, each block gains its next-ranked token together with every shallower block that lacks
    it, so the schedule stays nested; a block whose next token would exceed the target drops out while the others'
    (cheaper) steps go on. The result is within one step (a token of one or a few blocks) below the target.
    """
    orders = token_orders(keep, rankings)
    sets = [set(ids) for ids in keep]
    gmacs = lambda schedule: schedule_cost(vit, schedule).gmacs  # counts only: sets do
    for grow in (False, True):
        active = list(range(len(orders) - 1, -1, -1))
        while active and (grow or gmacs(sets) > target):
            for block in list(active):
                trial = _move_token(sets, orders[block], block, grow)
                if trial is None or (grow and gmacs(trial) > target):
                    active.remove(block)
                    continue
                sets = trial
                if not grow and gmacs(sets) <= target:
                    break
    return [sorted(ids) for ids in sets]


def _move_token(sets: list[set[int]], order: Sequence[int], block: int, grow: bool) -> list[set[int]] | None:
    """``sets`` with block ``block``'s next-ranked token added (and to every shallower block), or its lowest-ranked
    removable one (not kept by the next block) removed; None when there is none."""
    if grow:
        token = next((t for t in order if t not in sets[block]), None)
        return None if token is None else [ids | {token} if b <= block else ids for b, ids in enumerate(sets)]
    removable = sets[block] - sets[block + 1]
    token = next((t for t in reversed(order) if t in removable), None)
    return None if token is None else [ids - {token} if b == block else ids for b, ids in enumerate(sets)]


# --------------------------------------------------------------------------------------------------- significance
def attention_probs(blk: nn.Module, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Post-softmax attention of block ``blk`` for query rows ``keep`` over all of ``x``: (B, H, n_q, n_kv).

    The fused SDPA kernel the block runs never materialises this map, so the score recomputes it from the same
    normalised q/k (q/k-norm included).
    """
    attn = blk.attn
    h = blk.norm1(x)
    q, k, _ = project_qkv(attn, h if keep is None else h.index_select(1, keep), h)
    return attention_logits(attn, q, k).softmax(dim=-1)


def significance(maps: Sequence[torch.Tensor], z: torch.Tensor, head_rows: int | None = None) -> torch.Tensor:
    """Theorem 1's score s_{t,i} = g_i * e_i per image, exactly, in float64: (B, n_t).

    ``maps[0]`` is block t's map (B, H, n_t, n_in) and ``maps[j]`` the next deeper block's, each over the previous
    one's outputs (compact coordinates, so D_l is implicit); ``z`` (B, n_in, d) is block t's input. The sum over head
    paths factorises (‖a u^T‖² = ‖a‖²‖u‖²): g = diag(G) with G <- sum_h P_h^T G P_h from the deepest block, starting
    at the projection onto the outputs the head reads, its first ``head_rows`` (None: all of them; CLS and a
    distillation token, not registers); e_i = sum_h ‖(P_t^h |z|)[i]‖².
    """
    deeper = [p.double() for p in maps[1:]]
    if not deeper:
        raise ValueError("significance needs at least one block after the scored one")
    batch, n_last = deeper[-1].shape[0], deeper[-1].shape[2]
    read = (torch.arange(n_last, device=z.device) < (n_last if head_rows is None else head_rows)).double()
    gram = torch.diag(read).expand(batch, n_last, n_last)
    for p in reversed(deeper[1:]):
        gram = (p.transpose(-2, -1) @ gram.unsqueeze(1) @ p).sum(dim=1)
    p = deeper[0]
    g = (p * (gram.unsqueeze(1) @ p)).sum(dim=(1, 2))  # diag(sum_h P^T G P) without forming the n_t x n_t matrix
    e = (maps[0].double() @ z.abs().double().unsqueeze(1)).pow(2).sum(dim=(1, 3))
    return g * e


# --------------------------------------------------------------------------------------------------- the reducer
@register_reducer
class PatchSlimming(TokenReducer):
    name = "patch_slimming"
    Config = Config

    def __init__(self, vit: nn.Module, cfg: Config) -> None:
        super().__init__(vit, cfg)
        check_standard_vit(vit, self.name)
        # The top-down search starts from the tokens the head reads after the last block. Average or attention
        # pooling reads every patch, so the nested schedule would keep every patch in every block: nothing to prune.
        require_cls_token(vit, self.name, "its nested schedule starts from the head's tokens in the last block")
        if vit.global_pool != "token":
            raise UnsupportedBackbone(
                f"reducer={self.name} needs CLS-token pooling (global_pool='token'), got "
                f"{vit.global_pool!r}: its last block computes the prefix tokens only"
            )
        self.n_tokens, self.depth, self.n_prefix = num_tokens(vit), len(vit.blocks), vit.num_prefix_tokens
        if self.depth < 2:
            raise UnsupportedBackbone(f"reducer={self.name} needs at least 2 blocks, the backbone has {self.depth}")
        target = self.target_gmacs()
        if cfg.schedule is not None:
            doc = read_schedule(cfg.schedule, self.n_tokens, self.depth)
            self.set_schedule(doc | {"source": "file"}, where=f"reducer.schedule={cfg.schedule!r}")
        elif target is not None:
            keep, scale = pyramid_for_target(vit, target)
            self.set_schedule({"keep": keep, "source": "pyramid", "pyramid_scale": scale})
        else:
            self.set_schedule({"keep": [list(range(self.n_tokens))] * self.depth, "source": "dense"})

    # ---------------------------------------------------------------- schedule
    @property
    def keep(self) -> list[list[int]]:
        """Global token ids each block outputs."""
        return [list(ids) for ids in self.schedule["keep"]]

    def set_schedule(self, doc: dict[str, Any], where: str = "schedule") -> None:
        """Adopt a schedule document ({'keep': [...], 'source': ..., metadata}) and rebuild the index buffers."""
        keep = check_schedule(
            doc["keep"], self.n_tokens, self.depth, where, doc["source"] != "dense", num_prefix=self.n_prefix
        )
        self.schedule = {
            **doc,
            "format": SCHEDULE_FORMAT,
            "num_tokens": self.n_tokens,
            "depth": self.depth,
            "keep": keep,
            "gmacs": schedule_cost(self.vit, keep).gmacs,
        }
        device = self.vit.pos_embed.device
        parent = list(range(self.n_tokens))
        for block, ids in enumerate(keep):
            # Persistent, so a state_dict from another schedule fails loudly instead of running the wrong rows.
            self.register_buffer(f"keep_{block}", torch.tensor(local_positions(ids, parent), device=device))
            parent = ids

    def _block_keep(self, block: int, n_in: int) -> torch.Tensor | None:
        index = self.get_buffer(f"keep_{block}")
        return None if index.numel() == n_in else index  # all kept: the plain block, no gather

    def run_blocks(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Blocks ``start..stop-1`` on the compact token tensor entering ``start``."""
        for block in range(start, self.depth if stop is None else stop):
            x = block_forward(self.vit.blocks[block], x, self._block_keep(block, x.shape[1]))
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return classify(self.vit, self.run_blocks(embed(self.vit, images)))

    @torch.no_grad()
    def hybrid_scores(self, images: torch.Tensor, block: int) -> torch.Tensor:
        """Per-image significance (B, n) of block ``block``'s output tokens from the current (hybrid) network.

        During the search blocks 0..block are still original and dense and the deeper ones pruned and fine-tuned:
        exactly the spec's hybrid forward (§2.2).
        """
        x = self.run_blocks(embed(self.vit, images), 0, block)
        z = x if self.cfg.score_input == "raw" else self.vit.blocks[block].norm1(x)
        maps = []
        for b in range(block, self.depth):
            keep = self._block_keep(b, x.shape[1])
            maps.append(attention_probs(self.vit.blocks[b], x, keep))
            x = block_forward(self.vit.blocks[b], x, keep)
        # The head reads CLS (and a distilled DeiT's distillation token), never the registers that follow them.
        return significance(maps, z, self.n_prefix - self.vit.num_reg_tokens)

    # ---------------------------------------------------------------- pipeline
    def phases(self) -> list[Phase]:
        # Spec A6 [R]: DeiT's cosine recipe at 5e-5 x batch/512; min_lr keeps DeiT's peak/min ratio of 50.
        cfg = self.cfg
        finetune = Phase(
            "finetune",
            epochs=cfg.finetune_epochs,
            optim={
                "lr": cfg.finetune_lr,
                "lr_batch": 512,
                "min_lr": cfg.finetune_lr / 50,
                "warmup_epochs": cfg.finetune_warmup_epochs,
            },
        )
        if cfg.schedule is not None:
            return [finetune]
        return [Phase("search", epochs=0, run=lambda ctx: SlimmingSearch(self, ctx).run()), finetune]

    @torch.no_grad()
    def token_maps(self, images: torch.Tensor) -> list[TokenMap]:
        """The static schedule on the patch grid: 1 where block l computes the patch; the same for every image."""
        rows, cols = self.vit.patch_embed.grid_size
        maps = []
        for block, ids in enumerate(self.keep):
            kept = torch.zeros(rows * cols, device=images.device)
            kept[[i - self.n_prefix for i in ids if i >= self.n_prefix]] = 1
            maps.append(TokenMap(block, "kept", kept.view(1, rows, cols).expand(len(images), -1, -1)))
        return maps

    # ---------------------------------------------------------------- accounting and structure
    def cost(self) -> ModelCost:
        return schedule_cost(self.vit, self.keep)

    def knobs(self) -> dict[str, Any]:
        # The budget error as the benchmark rows compute it: achieved vs target GMACs, in % (never above 0 here).
        target = self.target_gmacs()
        error = None if target is None else round(100 * (self.schedule["gmacs"] - target) / target, 2)
        return {
            **super().knobs(),
            "schedule_source": self.schedule["source"],
            "epsilon_used": self.schedule.get("epsilon"),
            "budget_error_pct": error,
        }

    def structure(self) -> dict[str, Any]:
        return {**super().structure(), "schedule": self.schedule}

    def load_structure(self, structure: dict[str, Any]) -> None:
        super().load_structure(structure)
        if "schedule" in structure:
            self.set_schedule(structure["schedule"], where="checkpoint schedule")


# --------------------------------------------------------------------------------------------------- the search
def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def next_epsilon(history: Sequence[tuple[float, float]], target: float, start: float, rtol: float) -> float | None:
    """The next epsilon of the bisection given (epsilon, GMACs) of finished searches, or None when done.

    Larger epsilon prunes more. Bracket geometrically from ``start``, then bisect in log space; stop on a search
    within ``rtol`` of the target or when the results stop being monotone (the search is path dependent).
    """
    if not history:
        return start
    if any(abs(g - target) <= rtol * target for _, g in history):
        return None
    too_costly = [e for e, g in history if g > target]
    too_cheap = [e for e, g in history if g < target]
    if not too_cheap:
        return max(too_costly) * EPSILON_BRACKET_FACTOR
    if not too_costly:
        return min(too_cheap) / EPSILON_BRACKET_FACTOR
    low, high = max(too_costly), min(too_cheap)
    return math.sqrt(low * high) if low < high else None


def _save_progress(path: Path, state: dict[str, Any], blocks: dict[str, torch.Tensor]) -> None:
    """One file for the search state and the block weights, so a kill never leaves them out of step."""
    payload = {"state": state, "blocks": {k: v.detach().cpu() for k, v in blocks.items()}}
    atomic_write(path, lambda p: torch.save(payload, p))


class SlimmingSearch:
    """Algorithm 1 (§2.3), resumable after every finished layer, plus the epsilon bisection for a GMACs target."""

    FINGERPRINT = (
        "group_size",
        "block_epochs",
        "block_lr",
        "block_batch_size",
        "block_weight_decay",
        "block_grad_clip",
        "score_images",
        "cache_images",
        "holdout_images",
        "score_input",
        "error_target",
        "seed",
    )

    def __init__(self, model: PatchSlimming, ctx: PhaseContext) -> None:
        self.model, self.ctx, self.cfg, self.vit = model, ctx, model.cfg, model.vit
        self.root = ctx.phase_dir("search")
        self.device = ctx.device
        self.original = {k: v.detach().cpu().clone() for k, v in self.vit.blocks.state_dict().items()}
        self.data = ctx.datamodule.train_set_for_eval  # spec A2/A8: deterministic scores and errors
        order = np.random.default_rng(_seed(self.cfg.seed, 0)).permutation(len(self.data))
        n_holdout = min(self.cfg.holdout_images, len(self.data) // 2)
        n_cache = min(self.cfg.cache_images, len(self.data) - n_holdout)
        if (n_holdout, n_cache) != (self.cfg.holdout_images, self.cfg.cache_images):
            log.warning(
                "patch_slimming: %d training images; using %d held out and %d cached (asked %d and %d)",
                len(self.data),
                n_holdout,
                n_cache,
                self.cfg.holdout_images,
                self.cfg.cache_images,
            )
        self.holdout_ids, self.cache_ids = order[:n_holdout], order[n_holdout : n_holdout + n_cache]
        self.fingerprint = {k: getattr(self.cfg, k) for k in self.FINGERPRINT}

    # ---------------------------------------------------------------- driver
    def run(self) -> None:
        model, cfg = self.model, self.cfg
        home, was_training = next(model.parameters()).device, model.training
        grads = {name: p.requires_grad for name, p in model.named_parameters()}
        model.to(self.device).eval()  # eval: no drop-path or dropout while scoring and fine-tuning blocks
        model.requires_grad_(False)
        try:
            target = model.target_gmacs()
            if target is None:
                result = self.search(cfg.epsilon, self.root / "search_0")
                self.adopt(result, None, result["keep"])
            else:
                self.meet_budget(target, self.bisect(target))
        finally:
            for name, p in model.named_parameters():
                p.requires_grad_(grads[name])
            model.to(home).train(was_training)

    def bisect(self, target: float) -> list[dict[str, Any]]:
        """Full searches at epsilons chosen by :func:`next_epsilon`, in the order they ran.

        Each search costs as much as the paper's whole search; ``bisect_searches`` caps their number. Endpoints are
        never evaluated (a tiny epsilon keeps everything and is the most expensive search of all).
        """
        cfg, history = self.cfg, []
        for k in range(cfg.bisect_searches):
            epsilon = next_epsilon([(r["epsilon"], r["gmacs"]) for r in history], target, cfg.epsilon, cfg.bisect_rtol)
            if epsilon is None:
                break
            result = self.search(epsilon, self.root / f"search_{k}")
            history.append(result)
            log.info(
                "patch_slimming: epsilon bisection %d/%d: epsilon=%.4g -> %.4f GMACs (target %.4f)",
                k + 1,
                cfg.bisect_searches,
                epsilon,
                result["gmacs"],
                target,
            )
        return history

    def meet_budget(self, target: float, history: list[dict[str, Any]]) -> None:
        """Adopt the search closest to ``target``, moved onto it by :func:`fit_to_budget`: the budget is a ceiling,
        met by a few ranked tokens rather than by more searches. The closest search needs the fewest tokens moved
        (ties: the one under the target, which only gains tokens)."""
        base = min(history, key=lambda r: (abs(r["gmacs"] - target), r["gmacs"] > target))
        if any("ranking" not in r for r in base["layers"]):
            raise ValueError(
                f"{base['dir']}/progress.pt was searched by an older tokred without token rankings; "
                "delete that directory (or start a new run directory) to search again"
            )
        rankings = {r["block"]: r["ranking"] for r in base["layers"]}
        keep = fit_to_budget(self.vit, base["keep"], [rankings[b] for b in range(len(base["keep"]) - 1)], target)
        gmacs = schedule_cost(self.vit, keep).gmacs
        error = 100 * (gmacs - target) / target
        atomic_write_json(
            self.root / "bisection.json",
            {
                "target_gmacs": target,
                "chosen_epsilon": base["epsilon"],
                "searched_gmacs": base["gmacs"],
                "chosen_gmacs": gmacs,
                "budget_error_pct": error,
                "searches": [{"epsilon": r["epsilon"], "gmacs": r["gmacs"], "dir": r["dir"]} for r in history],
            },
        )
        log.info(
            "patch_slimming: search at epsilon %.4g (%.4f GMACs) %s to %.4f GMACs: %+.2f%% of the %.4f target",
            base["epsilon"],
            base["gmacs"],
            "filled" if base["gmacs"] <= target else "trimmed",
            gmacs,
            error,
            target,
        )
        if not -BUDGET_TOLERANCE_PCT <= error <= 0:
            log.warning(
                "patch_slimming: %+.2f%% off the %.4f GMACs target: one token costs more than %.0f%% of it on "
                "this backbone",
                error,
                target,
                BUDGET_TOLERANCE_PCT,
            )
        self.adopt(base, target, keep)
        self.ctx.log({"search/budget_error_pct": error})

    def adopt(self, result: dict[str, Any], target: float | None, keep: list[list[int]]) -> None:
        """Load the chosen search's fine-tuned blocks and ``keep`` (its schedule, or that moved onto the target) into
        the model; write schedule.json."""
        payload = torch.load(Path(result["dir"]) / "progress.pt", map_location="cpu", weights_only=True)
        self.vit.blocks.load_state_dict(payload["blocks"])
        doc = self._schedule_doc(result, target)
        if keep != result["keep"]:
            doc |= {
                "keep": keep,
                "searched_gmacs": result["gmacs"],
                "tokens_moved": [len(a) - len(b) for a, b in zip(keep, result["keep"])],
            }
        self.model.set_schedule(doc)
        atomic_write_json(self.root / "schedule.json", self.model.schedule)
        log.info(
            "patch_slimming: searched schedule (epsilon %.4g, %.4f GMACs), tokens per block %s -> %s",
            result["epsilon"],
            self.model.schedule["gmacs"],
            [len(k) for k in doc["keep"]],
            self.root / "schedule.json",
        )
        self.ctx.log({"search/epsilon": result["epsilon"], "search/gmacs": self.model.schedule["gmacs"]})

    def _schedule_doc(self, state: dict[str, Any], target: float | None) -> dict[str, Any]:
        layers = [{k: v for k, v in rec.items() if k not in ("score_ids", "ranking")} for rec in state["layers"]]
        return {
            "keep": state["keep"],
            "source": "search" if state["done"] else "search_partial",
            "epsilon": state["epsilon"],
            "target_gmacs": target,
            "layers": layers,
            **{k: self.fingerprint[k] for k in ("score_input", "error_target", "seed", "group_size")},
        }

    def search(self, epsilon: float, directory: Path) -> dict[str, Any]:
        """Algorithm 1 at one epsilon, from the original weights; resumes from ``directory/progress.pt``."""
        path, model = directory / "progress.pt", self.model
        if path.is_file():
            payload = torch.load(path, map_location="cpu", weights_only=True)
            state = payload["state"]
            if state["fingerprint"] != self.fingerprint or state["epsilon"] != epsilon:
                raise ValueError(
                    f"{path} is a search with other settings ({state['fingerprint']}, epsilon={state['epsilon']}); "
                    "restore those reducer knobs or start a new run directory"
                )
            self.vit.blocks.load_state_dict(payload["blocks"])
            if state["layers"]:
                log.info(
                    "patch_slimming: resuming the search at epsilon %.4g after block %d (%s)",
                    epsilon,
                    state["layers"][-1]["block"],
                    path,
                )
        else:
            self.vit.blocks.load_state_dict(self.original)
            # Last block: the prefix tokens only, exact for the head.
            keep = [list(range(model.n_tokens))] * (model.depth - 1) + [list(range(model.n_prefix))]
            state = {"fingerprint": self.fingerprint, "epsilon": epsilon, "keep": keep, "layers": [], "done": False}
        state["dir"] = str(directory)  # where the run directory is now, should it have moved since the interruption
        model.set_schedule({"keep": state["keep"], "source": "search_partial"})
        first = model.depth - 2 - len(state["layers"])
        bar = tqdm(
            range(first, -1, -1),
            desc=f"patch-slimming search (eps {epsilon:.3g})",
            initial=len(state["layers"]),
            total=model.depth - 1,
            disable=None,
        )
        for block in bar:
            record = self.search_block(block, epsilon)
            state["layers"].append(record)
            state["keep"] = model.keep
            state["done"] = block == 0
            state["gmacs"] = model.cost().gmacs
            _save_progress(path, state, self.vit.blocks.state_dict())
            bar.set_postfix(block=block, tokens=record["tokens"], error=f"{record['error']:.4f}")
        if not state["done"]:  # nothing was left to search (resumed after the last block)
            state["done"], state["gmacs"] = True, model.cost().gmacs
            _save_progress(path, state, self.vit.blocks.state_dict())
        model.set_schedule(self._schedule_doc(state, None))
        atomic_write_json(directory / "schedule.json", model.schedule)
        return state

    # ---------------------------------------------------------------- one layer
    def search_block(self, block: int, epsilon: float) -> dict[str, Any]:
        """Choose block ``block``'s tokens: rank, add groups, fine-tune the block, stop at error <= epsilon."""
        cfg, model, blocks = self.cfg, self.model, self.vit.blocks
        keep_next = model.keep[block + 1]
        # A fresh fixed-seed draw per layer, as the paper samples before each layer; uniform rather than 5 per class
        # [R], since datasets do not expose labels uniformly (5k of ImageNet's 1.28M is ~5 per class anyway).
        score_ids = np.random.default_rng(_seed(cfg.seed, 1, block)).choice(
            len(self.data), size=min(cfg.score_images, len(self.data)), replace=False
        )
        score = self.mean_score(block, score_ids)
        kept = set(keep_next)
        candidates = sorted((i for i in range(model.n_tokens) if i not in kept), key=lambda i: (-score[i], i))

        original_next = copy.deepcopy(blocks[block + 1])
        prefix = f"{block + 1}."
        original_next.load_state_dict({k[len(prefix) :]: v for k, v in self.original.items() if k.startswith(prefix)})
        problem = BlockProblem(
            blk=blocks[block],
            nxt=blocks[block + 1],
            original=copy.deepcopy(blocks[block]),  # not yet touched
            target_next={"pruned_next": blocks[block + 1], "original": original_next},
            next_index=torch.tensor(keep_next, device=self.device),
            batch_size=cfg.block_batch_size,
            device=self.device,
        )
        z_holdout = self.block_inputs(block, self.holdout_ids)
        z_cache = self.block_inputs(block, self.cache_ids) if cfg.block_epochs else None

        steps = []
        sizes = list(range(0, len(candidates), cfg.group_size)) + [len(candidates)]
        bar = tqdm(sizes, desc=f"block {block}", leave=False, disable=None)
        for added in bar:
            keep = sorted(keep_next + candidates[:added])
            index = torch.tensor(keep, device=self.device)
            index_next = torch.tensor(local_positions(keep_next, keep), device=self.device)
            problem.finetune(z_cache, cfg, index, index_next, _seed(cfg.seed, 2, block, added))
            errors = problem.errors(z_holdout, index, index_next)
            steps.append({"added": added, **errors})
            bar.set_postfix(tokens=len(keep), error=f"{errors[cfg.error_target]:.4f}")
            log.debug("patch_slimming: block %d, %d tokens: error %.5f", block, len(keep), errors[cfg.error_target])
            if errors[cfg.error_target] <= epsilon:
                break
        else:
            # Spec A3 guard: nothing short of every token met epsilon. The unpruned original block is exact for the
            # default target (error 0), which the fine-tuned weights need not be.
            problem.blk.load_state_dict(problem.original.state_dict())
            errors = problem.errors(z_holdout, index, index_next)
            log.warning(
                "patch_slimming: block %d: no group met epsilon %.4g (best %.4g); keeping all %d tokens "
                "with the original block",
                block,
                epsilon,
                min(s[cfg.error_target] for s in steps),
                len(keep),
            )
        model.set_schedule({"keep": model.keep[:block] + [keep] + model.keep[block + 1 :], "source": "search_partial"})
        record = {
            "block": block,
            "tokens": len(keep),
            "added": added,
            "error": errors[cfg.error_target],
            **{f"error_{mode}": e for mode, e in errors.items()},
            "steps": steps,
            "score_ids": score_ids.tolist(),
            "ranking": candidates,
        }
        log.info(
            "patch_slimming: block %d keeps %d/%d tokens (+%d candidates), error %.5f (%s; eps %.4g)",
            block,
            len(keep),
            len(model.keep[block - 1]) if block else model.n_tokens,
            added,
            record["error"],
            ", ".join(f"{m} {e:.5f}" for m, e in errors.items()),
            epsilon,
        )
        self.ctx.log({"search/block": block, "search/tokens": len(keep), "search/error": record["error"]})
        return record

    def _loader(self, ids: Sequence[int], batch_size: int) -> DataLoader:
        workers = int(self.ctx.datamodule.cfg.get("num_workers", 0))
        return DataLoader(
            Subset(self.data, [int(i) for i in ids]), batch_size=batch_size, shuffle=False, num_workers=workers
        )

    @torch.no_grad()
    def mean_score(self, block: int, ids: Sequence[int]) -> list[float]:
        total = torch.zeros(self.model.n_tokens, dtype=torch.float64, device=self.device)
        for images, _ in self._loader(ids, self.cfg.score_batch_size):
            total += self.model.hybrid_scores(images.to(self.device), block).sum(dim=0)
        return (total / len(ids)).tolist()

    @torch.no_grad()
    def block_inputs(self, block: int, ids: Sequence[int]) -> torch.Tensor:
        """Z_{block-1}, the input of ``block`` (original, dense blocks below it), cached on the host."""
        chunks = []
        for images, _ in self._loader(ids, self.cfg.block_batch_size):
            x = self.model.run_blocks(embed(self.vit, images.to(self.device)), 0, block)
            chunks.append(x.to(CACHE_DTYPE).cpu())
        return torch.cat(chunks)


@dataclass
class BlockProblem:
    """Block l's reconstruction problem (spec §2.3, A3, A4): what block l+1 should output, and how to fit block l.

    Targets are recomputed in fp32 from the cached inputs instead of being cached: a stored (rounded) target would
    leave a noise gradient where the pruned block is exact, which Adam rescales into full-size steps.
    """

    blk: nn.Module  # block l, trained in place
    nxt: nn.Module  # block l+1 as searched: frozen, gradients flow through it
    original: nn.Module  # block l before the search touched it
    target_next: dict[str, nn.Module]  # per error mode, the block l+1 the target is computed with
    next_index: torch.Tensor  # keep[l+1]: global ids = positions in block l's dense output
    batch_size: int
    device: torch.device

    def target(self, z: torch.Tensor, mode: str) -> torch.Tensor:
        with torch.no_grad():
            return block_forward(self.target_next[mode], block_forward(self.original, z), self.next_index)

    def predict(self, z: torch.Tensor, index: torch.Tensor, index_next: torch.Tensor) -> torch.Tensor:
        """B^_{l+1}(B^_l(z)) with both blocks pruned."""
        h = block_forward(self.blk, z, None if len(index) == z.shape[1] else index)
        return block_forward(self.nxt, h, None if len(index_next) == h.shape[1] else index_next)

    def _batches(self, z: torch.Tensor, order: torch.Tensor | None = None):
        rows = torch.arange(len(z)) if order is None else order
        for i in range(0, len(z), self.batch_size):
            yield z[rows[i : i + self.batch_size]].to(self.device, torch.float32)

    @torch.no_grad()
    def errors(self, z: torch.Tensor, index: torch.Tensor, index_next: torch.Tensor) -> dict[str, float]:
        """Relative reconstruction error sum‖pred - target‖² / sum‖target‖² over ``z``, for every target mode."""
        sums = {mode: [0.0, 0.0] for mode in self.target_next}
        for zb in self._batches(z):
            pred = self.predict(zb, index, index_next).double()
            for mode, acc in sums.items():
                t = self.target(zb, mode).double()
                acc[0] += (pred - t).pow(2).sum().item()
                acc[1] += t.pow(2).sum().item()
        return {mode: num / den for mode, (num, den) in sums.items()}

    def finetune(
        self, z: torch.Tensor | None, cfg: Config, index: torch.Tensor, index_next: torch.Tensor, seed: int
    ) -> None:
        """Spec A4: only block l trains (AdamW, cosine over block_epochs, no decay, clip 1.0); weights carry over.

        A fresh optimiser per step [R]: the moments of the previous token set do not describe the new one. ``z`` is
        None when block_epochs is 0 (no cache is built)."""
        if z is None:
            return
        params = list(self.blk.parameters())
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(params, lr=cfg.block_lr, weight_decay=cfg.block_weight_decay)
        total = cfg.block_epochs * math.ceil(len(z) / self.batch_size)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total))
        )
        generator = torch.Generator().manual_seed(seed)
        with torch.enable_grad():
            for _ in range(cfg.block_epochs):
                for zb in self._batches(z, torch.randperm(len(z), generator=generator)):
                    t = self.target(zb, cfg.error_target)
                    loss = (self.predict(zb, index, index_next) - t).pow(2).sum() / t.pow(2).sum()
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    nn.utils.clip_grad_norm_(params, cfg.block_grad_clip)
                    optimizer.step()
                    schedule.step()
        for p in params:
            p.requires_grad_(False)
