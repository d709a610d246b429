"""ViT-Slim (Chavan et al., CVPR 2022): l1 soft-mask search, budget extraction, a physically slim model, re-training.

Pipeline (``reducer.phases``, default all three, each resumable through ``<run_dir>/phases/<phase>.pt``):

* ``search``: the full model with learnable soft masks, trained jointly with its weights for ``search_epochs`` at a
  constant LR: CE + w1*sum|attention masks| + w2*sum|MLP masks| + w3*sum|tanh(token masks)|.
* ``extract``: global ranking of each mask type over all blocks; the top ``budget.attn / mlp / patch`` fraction is
  kept and the model is *physically* slimmed (smaller qkv/proj/fc1/fc2, heads of different widths, static per-block
  token lists). The slim model is also exported standalone to ``<run_dir>/phases/extract/``.
* ``retrain``: the slim model trained with the run's optim config (the DeiT recipe) from the searched weights.
  Pruned tokens are gathered away exactly as at deployment, so re-training and deployment compute the same function.

Running a phase alone: ``reducer.phases=[extract,retrain] reducer.init_checkpoint=<run>/phases/search.pt`` extracts
from a finished search (at any budget: one search serves them all); ``reducer.phases=[retrain]
reducer.init_checkpoint=<run>/phases/extract.pt`` re-trains an extracted model; ``reducer.phases=[search]`` searches.

Without data or training, ``deployable()`` extracts from the masks at their init: all values tie, and ties are
broken by slot position, then block, then head (see :func:`_top_fraction`), which gives every block the same
structure (each head keeps its first dims, each MLP its first units, every block the first patches), the widths
differing by at most one. That is the untrained model the benchmark times at a given budget.
"""

from __future__ import annotations

import logging
import math
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from timm.layers import Mlp
from torch import nn

from tokred.flops import BlockCost, ModelCost, bisect_budget, count_params, head_macs, stem_macs
from tokred.reducers import register_reducer
from tokred.reducers.base import Criterion, ParamGroup, Phase, ReducerConfig, TokenMap, TokenReducer
from tokred.vit_ops import (
    UnsupportedBackbone,
    attend,
    check_standard_vit,
    classify,
    embed,
    gather_tokens,
    mlp_residual,
    project_qkv,
    split_heads,
)

if TYPE_CHECKING:  # importing the training package at module load would be circular
    from tokred.training.phases import PhaseContext

log = logging.getLogger("tokred")

PHASES = ("search", "extract", "retrain")
TOKEN_RULES = ("code", "paper")
# tanh(3) = 0.995: the official init of the raw token mask (the tanh keeps mask values from exploding).
TOKEN_MASK_INIT = 3.0


@dataclass
class Budget:
    """Fractions kept of each mask type, ranked globally over all blocks (the paper's "budget")."""

    attn: float = 0.7  # (head, dim) slots of q/k/v
    mlp: float = 0.7  # MLP hidden units
    patch: float = 1.0  # patch tokens over all blocks (prefix tokens -- CLS, registers, dist token -- always kept)

    def __post_init__(self) -> None:
        for knob, what in (
            ("attn", "attention (head, dim) slots"),
            ("mlp", "MLP hidden units"),
            ("patch", "patch tokens"),
        ):
            value = getattr(self, knob)
            if not 0 < value <= 1:
                raise ValueError(
                    f"reducer.budget.{knob}={value} must be in (0, 1]: the fraction of {what} kept (1 keeps all)"
                )


@dataclass
class Config(ReducerConfig):
    name: str = "vit_slim"
    budget: Budget = field(default_factory=Budget)
    # Token monotonicity (spec section 4). "code": a token enters block l if it passes the threshold at any block
    # >= l (the official code; keeps >= budget.patch). "paper": once dropped, dropped at all deeper blocks (keeps
    # <= budget.patch). Default "code": it is what presumably produced the paper's joint-search numbers.
    token_rule: str = "code"
    # (w1, w2, w3) for the attention, MLP and token masks: the paper's grid-searched factors.
    l1_weights: list[float] = field(default_factory=lambda: [2e-4, 5e-5, 1e-4])
    # Our convention: w is relative to the mean CE over the *global* batch on any number of devices (each rank adds
    # the same w*sum|z| and DDP averages gradients). The official search.py divided w by the world size (4 GPUs:
    # effective 2e-4 -> 5e-5); true reproduces that.
    l1_divide_by_world_size: bool = False
    # The official code let AdamW's weight decay shrink the masks too (an extra pull towards 0); false exempts them.
    mask_weight_decay: bool = False
    phases: list[str] = field(default_factory=lambda: list(PHASES))
    init_checkpoint: Optional[str] = None  # phases/<phase>.pt the first phase in `phases` starts from
    search_epochs: int = 50
    search_lr: float = 5e-4  # constant (no warm-up, decay or batch scaling), as the official search
    search_weight_decay: float = 1e-3
    retrain_epochs: Optional[int] = None  # None: trainer.max_epochs
    # Hardware-aware extraction (none of it is in the paper). align: every kept width -- each head's dims, each
    # block's MLP units -- a multiple of this (the search's ranking of chunks of `align` units decides which round up
    # or down), so the GEMMs get the widths their kernels tile. pad_heads: every kept head of a block is zero-padded
    # to the block's widest one, so the block runs one attention call instead of one per distinct width. Either way
    # the structure is then refitted to the GMACs of the plain extraction at the budget, within [-1 %, 0] (padding
    # is counted: it is real work), dropping or adding chunks in the ranking's order. align=16 is the default because
    # it wins on DeiT-S (1.06 vs 0.97 of the GMACs ratio, eager; 1.02 vs 0.95 compiled); align=1 is the paper's.
    align: int = 16
    pad_heads: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.align < 1:
            raise ValueError(f"reducer.align={self.align} must be >= 1 (1: widths as the budget gives them)")
        if self.token_rule not in TOKEN_RULES:
            raise ValueError(f"reducer.token_rule={self.token_rule!r}; choose one of: {', '.join(TOKEN_RULES)}")
        if len(self.l1_weights) != 3 or any(w < 0 for w in self.l1_weights):
            raise ValueError(
                f"reducer.l1_weights={list(self.l1_weights)} must be three weights >= 0 "
                "[attention, MLP, token], e.g. [2e-4, 5e-5, 1e-4]"
            )
        unknown = [p for p in self.phases if p not in PHASES]
        if unknown or not self.phases:
            raise ValueError(f"reducer.phases={list(self.phases)}: choose a non-empty subset of {list(PHASES)}")
        if list(self.phases) != sorted(set(self.phases), key=PHASES.index):
            raise ValueError(
                f"reducer.phases={list(self.phases)} must be in pipeline order without repeats: "
                f"a subset of {list(PHASES)}"
            )
        if self.phases[0] != "search" and not self.init_checkpoint:
            source = "search" if self.phases[0] == "extract" else "extract"
            raise ValueError(
                f"reducer.phases starts at {self.phases[0]!r} but reducer.init_checkpoint is not set; "
                f"set it to <run_dir>/phases/{source}.pt of an earlier run"
            )
        if self.search_epochs < 1:
            raise ValueError(
                f"reducer.search_epochs={self.search_epochs} must be >= 1 (to skip the search, drop "
                "it from reducer.phases and set reducer.init_checkpoint)"
            )
        if self.search_lr <= 0 or self.search_weight_decay < 0:
            raise ValueError(
                f"reducer.search_lr={self.search_lr} must be > 0 and reducer.search_weight_decay="
                f"{self.search_weight_decay} >= 0"
            )
        if self.retrain_epochs is not None and self.retrain_epochs < 1:
            raise ValueError(
                f"reducer.retrain_epochs={self.retrain_epochs} must be >= 1, or null for trainer.max_epochs"
            )


@dataclass
class Keep:
    """A discrete structure: what each block keeps."""

    attn: torch.Tensor  # (L, H, d) bool: (head, dim) slots of q, k and v
    mlp: torch.Tensor  # (L, M) bool: hidden units
    tokens: torch.Tensor  # (L, P) bool: patch tokens entering the block

    def to_json(self) -> dict[str, Any]:
        indices = lambda t: t.nonzero().flatten().tolist()
        return {
            "attn": [[indices(head) for head in block] for block in self.attn],
            "mlp": [indices(block) for block in self.mlp],
            "tokens": [indices(block) for block in self.tokens],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> Keep:
        """Inverse of :meth:`to_json`, checked against the backbone's shapes (a foreign or edited file fails)."""

        def rows(lists: Any, shape: tuple[int, ...], what: str) -> torch.Tensor:
            out = torch.zeros(shape, dtype=torch.bool)
            try:
                if len(lists) != shape[0]:
                    raise ValueError(f"{len(lists)} rows for {shape[0]}")
                for i, row in enumerate(lists):
                    if len(shape) == 3:
                        out[i] = rows(row, shape[1:], what)
                    elif any(not 0 <= j < shape[-1] for j in row):
                        raise ValueError(f"an index outside [0, {shape[-1]})")
                    else:
                        out[i, row] = True
            except (TypeError, ValueError) as err:
                raise ValueError(
                    f"vit_slim structure: bad {what} lists ({err}); is the checkpoint from another backbone?"
                ) from None
            return out

        return cls(*(rows(data.get(k, []), shapes[k], k) for k in ("attn", "mlp", "tokens")))

    def equal(self, other: Keep) -> bool:
        return all(torch.equal(a, b) for a, b in zip(asdict(self).values(), asdict(other).values()))


def _top_fraction(values: torch.Tensor, fraction: float) -> torch.Tensor:
    """Global ranking: keep the top ``fraction`` of ``values`` (L, [H,] U), as a bool tensor of the same shape.

    The official rule keeps values >= the one at index floor((1-b)*count) of the ascending sort; top-k with that
    count is the same when there are no ties, and with ties (masks at their init) still keeps exactly the count.
    Ties go to the lower position within the unit (last axis), then the lower block, then the lower head.
    """
    n = values.numel()
    return _top_count(values, n - math.floor(round((1 - fraction) * n, 6)))  # round: (1-0.9)*10 must not floor to 0


def _top_count(values: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` largest of ``values`` (L, [H,] U) as a bool tensor, ties broken as in :func:`_top_fraction`."""
    by_position = values.movedim(-1, 0)
    order = torch.sort(by_position.reshape(-1), descending=True, stable=True).indices
    keep = torch.zeros(by_position.numel(), dtype=torch.bool)
    keep[order[:count]] = True
    return keep.view(by_position.shape).movedim(0, -1)


class _Chunks:
    """The units of each row (a head's dims, a block's MLP units) in the search's ranking order (value, then
    position), cut into chunks of ``align``: a row keeps its first ``count`` chunks. A chunk's score is the mean mask
    value of its units, non-increasing along a row, so a global top-k over chunk scores keeps prefixes of rows."""

    def __init__(self, values: torch.Tensor, align: int) -> None:
        self.shape = values.shape
        rows = values.reshape(-1, values.shape[-1])
        ranked, self.order = torch.sort(rows, dim=-1, descending=True, stable=True)
        self.align, self.units = align, rows.shape[1]
        self.scores = torch.stack([c.mean(-1) for c in ranked.split(align, dim=-1)], dim=-1)  # (R, chunks)

    def initial(self, kept_units: int) -> list[int]:
        """Chunks per row: the top round(kept_units / align) chunks over all rows."""
        chunks = _top_count(self.scores, round(kept_units / self.align))
        return chunks.sum(-1).tolist()

    def width(self, count: int) -> int:
        return min(count * self.align, self.units)

    def mask(self, counts: list[int]) -> torch.Tensor:
        ranks = torch.empty_like(self.order).scatter_(-1, self.order, torch.arange(self.units).expand_as(self.order))
        widths = torch.tensor([self.width(c) for c in counts]).unsqueeze(1)
        return (ranks < widths).view(self.shape)


def _monotone_tokens(selected: torch.Tensor, rule: str) -> torch.Tensor:
    """Token sets non-increasing with depth from per-block selections (L, P); see ``Config.token_rule``."""
    if rule == "paper":
        return selected.int().cummin(dim=0).values.bool()
    return selected.flip(0).int().cummax(dim=0).values.flip(0).bool()


def _sub_linear(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A smaller Linear holding rows (outputs) and columns (inputs) of ``linear``; values copied unscaled."""
    weight = linear.weight.detach()
    bias = None if linear.bias is None else linear.bias.detach()
    if rows is not None:
        weight = weight[rows.to(weight.device)]
        bias = None if bias is None else bias[rows.to(weight.device)]
    if cols is not None:
        weight = weight[:, cols.to(weight.device)]
    # Built empty on the meta device and given the copied tensors: no random init of a layer about to be overwritten.
    new = nn.Linear(1, 1, bias=bias is not None, device="meta")
    new.in_features, new.out_features = weight.shape[1], weight.shape[0]
    new.weight = nn.Parameter(weight.clone())
    if bias is not None:
        new.bias = nn.Parameter(bias.clone())
    return new


class _SlimLayout(nn.Module):
    """The static part of one slim block: which tokens enter it and how its heads are grouped by width."""

    def __init__(self, tokens: torch.Tensor | None, groups: list[tuple[int, int]], dims: torch.Tensor) -> None:
        super().__init__()
        self.groups = groups  # (number of heads, width) in the order of the slim qkv rows
        self.register_buffer("tokens", tokens, persistent=False)  # rows of the incoming sequence; None: all
        self.register_buffer("dims", dims, persistent=False)  # each slim q/k channel's dim in its original head


def _to_full_head_width(t: torch.Tensor, dims: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, n, N, w) kept dims -> (B, n, N, head_dim) with zeros at pruned dims: what a q/k-norm saw in search."""
    index = dims.view(1, dims.shape[0], 1, -1).expand_as(t)
    return t.new_zeros(*t.shape[:-1], head_dim).scatter(-1, index, t)


def _grouped_attention(attn: nn.Module, layout: _SlimLayout, h: torch.Tensor) -> torch.Tensor:
    """timm attention with heads of different widths, one SDPA per group of equal-width heads (exact MACs, unlike
    zero-padding every head to the widest), at the original scale head_dim^-0.5.

    A q/k-norm normalises over the full head: the kept dims are put back in place, zeros elsewhere, as the binary
    mask left them, so q.k runs at the full head width there; v stays slim.
    """
    width = sum(n * w for n, w in layout.groups)
    if width == 0:  # every head pruned: all-zero masks left the branch the projection bias alone
        return attn.proj_drop(attn.proj(h.new_zeros(*h.shape[:-1], 0)))
    q, k, v = attn.qkv(h).split(width, dim=-1)
    full_qk = not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity))
    # Each group writes its heads straight into their columns: one copy, not a flatten and then a cat.
    merged, start = h.new_empty(*h.shape[:-1], width), 0
    for n_heads, w in layout.groups:
        span = slice(start, start + n_heads * w)
        qg, kg, vg = (split_heads(t[..., span], n_heads) for t in (q, k, v))
        if full_qk:
            dims = layout.dims[span].view(n_heads, w)
            qg, kg = _to_full_head_width(qg, dims, attn.head_dim), _to_full_head_width(kg, dims, attn.head_dim)
        out = F.scaled_dot_product_attention(
            attn.q_norm(qg), attn.k_norm(kg), vg, scale=attn.scale, dropout_p=attn.attn_drop.p if attn.training else 0.0
        )
        merged[..., span].unflatten(-1, (n_heads, w)).copy_(out.transpose(1, 2))
        start += n_heads * w
    return attn.proj_drop(attn.proj(merged))


def _gated_mlp(mlp: Mlp, h: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """timm's Mlp with the hidden units multiplied by ``gate`` right after the activation."""
    return mlp.drop2(mlp.fc2(mlp.norm(mlp.drop1(mlp.act(mlp.fc1(h)) * gate))))


def _check_backbone(vit: nn.Module) -> None:
    check_standard_vit(vit, "vit_slim")
    hidden = {blk.mlp.fc1.out_features for blk in vit.blocks}
    for i, blk in enumerate(vit.blocks):
        # A norm over the pruned axis (attention scale-norm, MLP norm) sees the zeros of pruned slots in the search:
        # removing the slots would change its statistics, so the slim model could not equal the masked one.
        if type(blk.mlp) is not Mlp or not isinstance(blk.mlp.norm, nn.Identity):
            raise UnsupportedBackbone(
                f"reducer=vit_slim: block {i} has a {type(blk.mlp).__name__} MLP with a "
                "hidden norm or gating; choose a ViT/DeiT backbone with timm's plain Mlp"
            )
        if not isinstance(blk.attn.norm, nn.Identity):
            raise UnsupportedBackbone(
                f"reducer=vit_slim: block {i} normalises the attention output (scale_norm), "
                "which slimmed heads cannot reproduce; choose a backbone without it"
            )
    if len(hidden) != 1:
        raise UnsupportedBackbone(f"reducer=vit_slim needs one MLP width in all blocks, got {sorted(hidden)}")
    if getattr(vit, "dynamic_img_size", False):
        raise UnsupportedBackbone(
            "reducer=vit_slim learns one mask per patch position; set a fixed img_size (dynamic_img_size=False)"
        )


def effective_l1_weights(cfg: Config, world_size: int) -> tuple[float, float, float]:
    """(w1, w2, w3) as they act against the mean CE over the global batch on ``world_size`` processes: every rank adds
    the same l1 term and DDP averages the gradients, so a per-rank weight is also the effective one; the official
    search.py (``l1_divide_by_world_size``) divides the weights by the world size first."""
    divisor = world_size if cfg.l1_divide_by_world_size else 1
    w_attn, w_mlp, w_tok = (w / divisor for w in cfg.l1_weights)
    return w_attn, w_mlp, w_tok


@register_reducer
class ViTSlim(TokenReducer):
    name = "vit_slim"
    Config = Config

    def __init__(self, vit: nn.Module, cfg: Config) -> None:
        _check_backbone(vit)
        super().__init__(vit, cfg)
        first = vit.blocks[0]
        depth, heads, head_dim = len(vit.blocks), first.attn.num_heads, first.attn.head_dim
        self.shapes = {
            "attn": (depth, heads, head_dim),
            "mlp": (depth, first.mlp.fc1.out_features),
            "tokens": (depth, vit.patch_embed.num_patches),
        }
        # Raw masks, no activation for attention/MLP (init 1); tanh of the token masks. Prefix tokens (CLS, registers,
        # distillation token) have no token mask, so they can never be pruned (the official code's 197-entry mask
        # could prune CLS). Nothing here reads a CLS token: models without one (average or attention pooling) slim
        # the same way, and classify() pools over the tokens each image keeps.
        self.mask_attn = nn.Parameter(torch.ones(self.shapes["attn"]))
        self.mask_mlp = nn.Parameter(torch.ones(self.shapes["mlp"]))
        self.mask_tokens = nn.Parameter(torch.full(self.shapes["tokens"], TOKEN_MASK_INIT))
        for mask, weight in zip(self._masks(), cfg.l1_weights):
            mask.requires_grad_(weight > 0)  # the official code freezes a mask type with weight 0 at its init
        self.keep: Keep | None = None  # set once slim: the model is then physically smaller and has no masks
        self.slim_budget: dict[str, float] | None = None
        self.layouts = nn.ModuleList()

    @property
    def slim(self) -> bool:
        return self.keep is not None

    def _masks(self) -> list[nn.Parameter]:
        return [self.mask_attn, self.mask_mlp, self.mask_tokens]

    # ---------------------------------------------------------------- forward
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = embed(self.vit, images)
        if self.slim:
            for blk, layout in zip(self.vit.blocks, self.layouts):
                if layout.tokens is not None:
                    x = gather_tokens(x, layout.tokens)
                x = x + blk.drop_path1(blk.ls1(_grouped_attention(blk.attn, layout, blk.norm1(x))))
                x = x + mlp_residual(blk, x)
            return classify(self.vit, x)
        token_gates = F.pad(torch.tanh(self.mask_tokens), (self.vit.num_prefix_tokens, 0), value=1.0)  # prefix first
        for blk, z_attn, z_mlp, z_tok in zip(self.vit.blocks, self.mask_attn, self.mask_mlp, token_gates):
            z_tok = z_tok.view(1, -1, 1)
            z = z_attn.view(1, z_attn.shape[0], 1, -1)  # one entry gates the same (head, dim) of q, k and v
            q, k, v = project_qkv(blk.attn, blk.norm1(x) * z_tok)
            x = x + blk.drop_path1(blk.ls1(attend(blk.attn, q * z, k * z, v * z, scale=blk.attn.scale)))
            # Official semantics: the token mask scales the branches' normalised inputs, the residual is untouched.
            x = x + blk.drop_path2(blk.ls2(_gated_mlp(blk.mlp, blk.norm2(x) * z_tok, z_mlp)))
        return classify(self.vit, x)

    # ---------------------------------------------------------------- search
    def losses(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        criterion: Criterion,
        teacher: nn.Module | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self(images)
        terms = {"ce": criterion(logits, targets)}
        if self.slim:
            return logits, terms
        world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        w_attn, w_mlp, w_tok = effective_l1_weights(self.cfg, world_size)
        terms["l1_attn"] = w_attn * self.mask_attn.abs().sum()  # plain sums over all blocks, as in the paper
        terms["l1_mlp"] = w_mlp * self.mask_mlp.abs().sum()
        terms["l1_tokens"] = w_tok * torch.tanh(self.mask_tokens).abs().sum()
        return logits, terms

    def param_groups(self) -> list[ParamGroup]:
        if self.slim:
            return []
        return [ParamGroup("vit_slim_masks", self._masks(), weight_decay=None if self.cfg.mask_weight_decay else 0.0)]

    def phases(self) -> list[Phase]:
        search_optim = {
            "scheduler": "constant",
            "lr": self.cfg.search_lr,
            "lr_batch": None,
            "weight_decay": self.cfg.search_weight_decay,
            "warmup_epochs": 0,
        }
        steps = {
            "search": Phase("search", self.cfg.search_epochs, self._run_search, search_optim),
            "extract": Phase("extract", 0, self._run_extract),
            "retrain": Phase("retrain", self.cfg.retrain_epochs, self._run_retrain),
        }
        return [steps[name] for name in self.cfg.phases]

    def _start(self, ctx: PhaseContext, phase: str) -> None:
        """Load ``reducer.init_checkpoint`` when ``phase`` is the first one configured (a phase run alone)."""
        path = self.cfg.init_checkpoint
        if not path or phase != self.cfg.phases[0]:
            return
        from tokred.training.phases import load_phase

        if not Path(path).is_file():
            raise FileNotFoundError(
                f"reducer.init_checkpoint={path!r} does not exist; point it at "
                "<run_dir>/phases/<phase>.pt of an earlier run"
            )
        try:
            load_phase(self, Path(path))
        except (RuntimeError, KeyError, TypeError, pickle.UnpicklingError) as err:
            raise ValueError(
                f"reducer.init_checkpoint={path!r} cannot be loaded ({str(err).splitlines()[0]}); it "
                "must be a <run_dir>/phases/<phase>.pt of a run with this backbone"
            ) from None
        self.phase = phase

    def _run_search(self, ctx: PhaseContext) -> None:
        self._start(ctx, "search")
        if self.slim:
            raise ValueError(
                "reducer=vit_slim: the search needs the masked full model, but the model is already "
                "extracted; point reducer.init_checkpoint at a phases/search.pt"
            )
        if not (ctx.cfg.backbone.get("pretrained") or ctx.cfg.backbone.get("checkpoint") or self.cfg.init_checkpoint):
            log.warning(
                "vit_slim: searching from a randomly initialised backbone; the method slims a converged "
                "model (set backbone.pretrained=true or backbone.checkpoint=PATH)"
            )

    def _run_extract(self, ctx: PhaseContext) -> None:
        from tokred.export import save_deployable

        self._start(ctx, "extract")
        if self.slim:
            raise ValueError(
                "reducer=vit_slim: extract needs a searched (masked) model, but the model is already "
                "extracted; point reducer.init_checkpoint at a phases/search.pt"
            )
        self.extract()
        cost, kept = self.cost(), self.kept_fractions()
        log.info(
            "vit_slim: extracted at budget %s: kept %s, %.3f GMACs, %.2f M params",
            self.slim_budget,
            kept,
            cost.gmacs,
            count_params(self) / 1e6,
        )
        ctx.log({"extract/gmacs": cost.gmacs, **{f"extract/kept_{k}": v for k, v in kept.items()}})
        save_deployable(self, ctx.phase_dir("extract"), OmegaConf.to_container(ctx.cfg, resolve=True))

    def _run_retrain(self, ctx: PhaseContext) -> None:
        self._start(ctx, "retrain")
        if not self.slim:
            raise ValueError(
                "reducer=vit_slim: retrain needs an extracted model; put extract before it in "
                "reducer.phases or set reducer.init_checkpoint=<run_dir>/phases/extract.pt"
            )

    # ---------------------------------------------------------------- extraction
    def budget(self) -> Budget:
        """The configured budget, or with ``target_gmacs``/``target_ratio`` one common attention = MLP fraction
        (the paper always uses equal ones) bisected to the target on the current masks; ``budget.patch`` is kept."""
        target, patch = self.target_gmacs(), self.cfg.budget.patch
        if target is None:
            return self.cfg.budget
        gmacs_at = lambda b: self._cost(self._select(b, b, patch)).gmacs
        low, high = gmacs_at(0.0), gmacs_at(1.0)
        if not low * 0.97 <= target <= high * 1.03:
            raise ValueError(
                f"the target of {target:.3f} GMACs (reducer.target_gmacs / target_ratio) cannot be met: "
                f"vit_slim spans {low:.3f}..{high:.3f} GMACs at reducer.budget.patch={patch}; change the "
                "target or budget.patch"
            )
        b = max(bisect_budget(gmacs_at, target, 0.0, 1.0, tol=1e-4), 1e-4)  # > 0: a valid Budget
        return Budget(b, b, patch)

    @torch.no_grad()
    def _select(self, attn: float, mlp: float, patch: float) -> Keep:
        """Rank each mask type over all blocks and keep its top fraction (raw values, tanh for tokens)."""
        tokens = _top_fraction(torch.tanh(self.mask_tokens.detach().float().cpu()), patch)
        return Keep(
            _top_fraction(self.mask_attn.detach().float().cpu(), attn),
            _top_fraction(self.mask_mlp.detach().float().cpu(), mlp),
            _monotone_tokens(tokens, self.cfg.token_rule),
        )

    def _structure(self, budget: Budget) -> Keep:
        """The extraction at ``budget``: the ranking's selection, refitted to the hardware knobs if any are set."""
        keep = self._select(**asdict(budget))
        if self.cfg.align == 1 and not self.cfg.pad_heads:
            return keep
        return self._fit_to_hardware(keep, budget)

    @torch.no_grad()
    def _fit_to_hardware(self, keep: Keep, budget: Budget) -> Keep:
        """``keep`` with aligned widths (and padded heads costed), its MACs brought within [-1 %, 0] of ``keep``'s.

        Greedy in the ranking's order: while over, the lowest-scored last chunk of a row goes (only where that saves
        MACs: under padding, narrowing a head other than the block's only widest one does not); then, while a chunk
        still fits, the highest-scored next chunk comes back. The mask type further above its budget fraction is
        trimmed first, the one further below it grown first, so attention and MLP keep their budgets' proportion.
        """
        attn_rows = _Chunks(self.mask_attn.detach().float().cpu(), self.cfg.align)
        mlp_rows = _Chunks(self.mask_mlp.detach().float().cpu(), self.cfg.align)
        heads = self.shapes["attn"][1]
        tokens = keep.tokens.sum(-1).tolist()
        counts = {"attn": attn_rows.initial(int(keep.attn.sum())), "mlp": mlp_rows.initial(int(keep.mlp.sum()))}
        rows = {"attn": attn_rows, "mlp": mlp_rows}
        share = {
            "attn": budget.attn * attn_rows.scores.shape[0] * attn_rows.units,
            "mlp": budget.mlp * mlp_rows.scores.shape[0] * mlp_rows.units,
        }

        def block_macs(block: int, attn: list[int], mlp: list[int]) -> int:
            widths = torch.tensor([attn_rows.width(c) for c in attn[block * heads : (block + 1) * heads]])
            return self._block_cost(tokens[block], widths, mlp_rows.width(mlp[block])).macs()

        def delta(kind: str, row: int, step: int) -> int:
            block = row // heads if kind == "attn" else row
            changed = {**counts, kind: [c + step * (i == row) for i, c in enumerate(counts[kind])]}
            return block_macs(block, changed["attn"], changed["mlp"]) - block_macs(block, counts["attn"], counts["mlp"])

        def fraction(kind: str) -> float:
            return sum(rows[kind].width(c) for c in counts[kind]) / share[kind]

        target = sum(b.macs() for b in self._cost(keep, pad=False).blocks)  # stem and head do not change
        total = sum(block_macs(b, counts["attn"], counts["mlp"]) for b in range(len(tokens)))
        while total > target:
            for kind in sorted(counts, key=fraction, reverse=True):
                options = [
                    (float(rows[kind].scores[r, c - 1]), r)
                    for r, c in enumerate(counts[kind])
                    if c > 0 and delta(kind, r, -1) < 0
                ]
                if options:
                    row = min(options)[1]
                    total += delta(kind, row, -1)
                    counts[kind][row] -= 1
                    break
            else:
                break  # nothing left to drop
        grown = True
        while grown:
            grown = False
            for kind in sorted(counts, key=fraction):
                chunks = rows[kind].scores.shape[1]
                options = [
                    (-float(rows[kind].scores[r, c]), r)
                    for r, c in enumerate(counts[kind])
                    if c < chunks and total + delta(kind, r, 1) <= target
                ]
                if options:
                    row = min(options)[1]
                    total += delta(kind, row, 1)
                    counts[kind][row] += 1
                    grown = True
                    break
        return Keep(attn_rows.mask(counts["attn"]), mlp_rows.mask(counts["mlp"]), keep.tokens)

    def current_keep(self) -> Keep:
        """The slim model's structure, or while searching the one extraction would give now."""
        return self.keep if self.slim else self._structure(self.budget())

    def kept_fractions(self) -> dict[str, float]:
        return {k: round(float(v.float().mean()), 4) for k, v in asdict(self.current_keep()).items()}

    def extract(self) -> None:
        """Slim the model at the budget from the current masks."""
        budget = self.budget()
        self._slim(self._structure(budget))
        self.slim_budget = asdict(budget)

    def _slots(self, k_attn: torch.Tensor) -> torch.Tensor:
        """The (head, dim) slots a slim block computes for its kept slots ``k_attn`` (H, d): those, and with
        ``pad_heads`` each kept head's first pruned dims too, up to the block's widest head (zero weights there)."""
        if not self.cfg.pad_heads:
            return k_attn
        widths = k_attn.sum(-1, keepdim=True)
        missing = (widths.max() - widths) * (widths > 0)
        return k_attn | (~k_attn & ((~k_attn).cumsum(-1) <= missing))

    def _slim(self, keep: Keep) -> None:
        """Physically slim every block to ``keep``, copying the kept weights unscaled (the binary mask is 1 there),
        and drop the masks. Padding slots (``pad_heads``) get zero q/k/v weights and biases and zero proj columns:
        they add nothing to q.k and output nothing, so the padded block computes exactly the unpadded one."""
        prefix = self.vit.num_prefix_tokens
        previous = torch.arange(self.shapes["tokens"][1])
        for blk, k_attn, k_mlp, k_tok in zip(self.vit.blocks, keep.attn, keep.mlp, keep.tokens):
            attn, head_dim = blk.attn, blk.attn.head_dim
            slots = self._slots(k_attn)
            widths = slots.sum(-1).tolist()
            heads = sorted((h for h in range(len(widths)) if widths[h]), key=lambda h: (widths[h], h))
            dims = torch.cat([slots[h].nonzero().flatten() for h in heads] or [torch.zeros(0, dtype=torch.long)])
            channels = torch.cat(
                [h * head_dim + slots[h].nonzero().flatten() for h in heads] or [torch.zeros(0, dtype=torch.long)]
            )
            attn.qkv = _sub_linear(attn.qkv, rows=torch.cat([s * attn.attn_dim + channels for s in range(3)]))
            attn.proj = _sub_linear(attn.proj, cols=channels)
            padding = ~k_attn.flatten()[channels]  # per slim channel
            with torch.no_grad():
                attn.qkv.weight[padding.repeat(3)] = 0
                if attn.qkv.bias is not None:
                    attn.qkv.bias[padding.repeat(3)] = 0
                attn.proj.weight[:, padding] = 0
            units = k_mlp.nonzero().flatten()
            blk.mlp.fc1 = _sub_linear(blk.mlp.fc1, rows=units)
            blk.mlp.fc2 = _sub_linear(blk.mlp.fc2, cols=units)

            current = k_tok.nonzero().flatten()
            if not torch.isin(current, previous).all():
                raise ValueError("vit_slim structure: token sets must not grow with depth")
            rows = None
            if len(current) != len(previous):  # every prefix token (CLS, registers, dist token) stays, first
                rows = torch.cat([torch.arange(prefix), prefix + torch.searchsorted(previous, current)])
            previous = current
            groups: list[tuple[int, int]] = []
            for h in heads:
                if groups and groups[-1][1] == widths[h]:
                    groups[-1] = (groups[-1][0] + 1, widths[h])
                else:
                    groups.append((1, widths[h]))
            device = attn.proj.weight.device
            self.layouts.append(_SlimLayout(None if rows is None else rows.to(device), groups, dims.to(device)))
        for name in ("mask_attn", "mask_mlp", "mask_tokens"):
            delattr(self, name)
        self.keep = keep

    def strip_training_parts(self) -> None:
        """The deployable model is the slim one: extract at the budget from the current masks, if not done yet."""
        if not self.slim:
            self.extract()

    # ---------------------------------------------------------------- accounting and structure
    def _block_cost(self, patches: int, widths: torch.Tensor, mlp: int, pad: bool | None = None) -> BlockCost:
        """One slim block on ``patches`` patch tokens (plus every prefix token) with heads of real ``widths`` (H,),
        padded to the widest with ``pad`` (default ``pad_heads``): the padding is computed, so it is counted."""
        n = self.vit.num_prefix_tokens + patches
        heads = int((widths > 0).sum())
        pad = self.cfg.pad_heads if pad is None else pad
        s = heads * int(widths.max()) if pad else int(widths.sum())
        # With q/k-norm, q.k runs at the full width of every kept head (see _grouped_attention).
        full_qk = not isinstance(self.vit.blocks[0].attn.q_norm, nn.Identity)
        extra = n * n * (self.shapes["attn"][2] * heads - s) if full_qk else 0
        return BlockCost(n, n, self.vit.embed_dim, s, s, mlp, extra)

    def _cost_widths(self, widths: torch.Tensor, mlp: list[int], patches: list[int], pad: bool | None) -> ModelCost:
        """Analytic MACs of a slim model with per-head widths (L, H), MLP widths and patch counts per block."""
        blocks = [self._block_cost(p, w, m, pad) for w, m, p in zip(widths, mlp, patches)]
        # An attention-pooling head (SigLIP) attends over the tokens leaving the last block.
        head = head_macs(self.vit, n_out=blocks[-1].n_q)
        return ModelCost(blocks, stem_macs(self.vit), head, tokens_per_block=[b.n_q for b in blocks])

    def _cost(self, keep: Keep, pad: bool | None = None) -> ModelCost:
        """Analytic MACs of the slim model for ``keep``: linear layers + the two attention matmuls (tokred's DeiT
        convention). The official get_flops also counts softmax (5Hn^2), biases and LayerNorms and costs block l
        with block l-1's token count; the difference is ~0.5% (DeiT-S 70/70: 3.24 GMACs, the paper says 3.3)."""
        return self._cost_widths(keep.attn.sum(-1), keep.mlp.sum(-1).tolist(), keep.tokens.sum(-1).tolist(), pad)

    def cost(self) -> ModelCost:
        return self._cost(self.current_keep())

    @torch.no_grad()
    def token_maps(self, images: torch.Tensor) -> list[TokenMap]:
        """The patches entering each block: static, the same for every image."""
        grid = self.vit.patch_embed.grid_size
        kept = self.current_keep().tokens.to(images.device, torch.float32)
        return [TokenMap(i, "kept", k.view(1, *grid).expand(images.shape[0], -1, -1)) for i, k in enumerate(kept)]

    def structure(self) -> dict[str, Any]:
        slim = None if not self.slim else {**self.keep.to_json(), "budget": self.slim_budget}
        return {**super().structure(), "slim": slim}

    def load_structure(self, structure: dict[str, Any]) -> None:
        super().load_structure(structure)
        data = structure.get("slim")
        if data is None:
            if self.slim:
                raise ValueError("vit_slim: cannot load a searched (masked) checkpoint into an extracted model")
            return
        keep = Keep.from_json(data, self.shapes)
        if not self.slim:
            self._slim(keep)
            self.slim_budget = data.get("budget")
        elif not self.keep.equal(keep):
            raise ValueError("vit_slim: the checkpoint's extracted structure differs from this model's")
