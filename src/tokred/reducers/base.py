"""The :class:`TokenReducer` interface every method implements.

A reducer *is* the model: an ``nn.Module`` holding a stock timm ``VisionTransformer`` as ``self.vit`` and running its
blocks with the method's token handling. The timm blocks' own weights and sub-modules (norms, qkv, q/k-norm,
LayerScale, drop-path, MLP) are reused through :mod:`tokred.vit_ops`, never re-implemented, so a reducer keeps working
on any timm ViT with the standard block layout.

What the rest of tokred asks of a reducer:

* ``forward(images) -> logits``: the deployable computation (eval mode) or the training one.
* ``losses(...)``: the named loss terms of one training step (CE plus the method's auxiliary terms).
* ``phases()``: the pipeline, e.g. search -> extract -> re-train, each a fit and/or a custom step.
* ``cost()``: per-block token counts and widths for analytic FLOPs.
* ``structure()`` / ``load_structure()``: whatever a checkpoint needs, beyond tensors, to rebuild the model
  (a searched token schedule, kept channels).
* ``deployable()``: a copy with training-only parts (aux heads, reconstruction modules) removed.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Optional

import torch
from torch import nn

from tokred.flops import ModelCost, dense_block_costs, head_macs, stem_macs

if TYPE_CHECKING:
    from tokred.training.phases import PhaseContext

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class ReducerConfig:
    """Knobs common to every reducer. Each reducer subclasses this with its own fields and checks.

    ``target_gmacs`` (absolute) or ``target_ratio`` (fraction of the unreduced backbone's GMACs) ask the reducer to
    set its own budget knob (keep ratio, stage split, epsilon, channel budget) so methods meet at equal cost.
    """

    name: str = "none"
    target_gmacs: Optional[float] = None
    target_ratio: Optional[float] = None

    def __post_init__(self) -> None:
        """Validate values; raise :class:`ValueError` naming the knob and the fix."""
        if self.target_gmacs is not None and self.target_ratio is not None:
            raise ValueError("set reducer.target_gmacs or reducer.target_ratio, not both")
        if self.target_gmacs is not None and self.target_gmacs <= 0:
            raise ValueError(f"reducer.target_gmacs={self.target_gmacs} must be > 0")
        if self.target_ratio is not None and not 0 < self.target_ratio <= 1:
            raise ValueError(f"reducer.target_ratio={self.target_ratio} must be in (0, 1]")


@dataclass
class TrainingFreeConfig(ReducerConfig):
    """Knobs of a method that applies to a trained backbone as it is (ToMe, Top-K, EViT, ATS) or fine-tuned with it."""

    finetune_epochs: Optional[int] = None  # None: trainer.max_epochs; 0: training-free (apply, evaluate, export)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.finetune_epochs is not None and self.finetune_epochs < 0:
            raise ValueError(
                f"reducer.finetune_epochs={self.finetune_epochs} must be >= 0 (0: training-free, "
                "null: trainer.max_epochs)"
            )

    def phases(self) -> list[Phase]:
        """The pipeline: one fine-tuning fit, or none when training-free (the run evaluates and exports)."""
        return [Phase("finetune", epochs=self.finetune_epochs)]


@dataclass
class ParamGroup:
    """Parameters that need optimiser settings of their own (e.g. SiT's RTSMs at 5x the LR)."""

    name: str
    params: list[nn.Parameter]
    lr_mult: float = 1.0  # scales the group's whole LR schedule, min_lr and warm-up included (timm's lr_scale)
    weight_decay: float | None = None  # None: the run's weight decay
    peak_lr_mult: float = 1.0  # the group's own schedule from this x the peak LR down to the common min_lr (SiT)


@dataclass
class TokenMap:
    """What a reducer did to the patch tokens at one block, on the original patch grid (CLS excluded).

    ``kind`` says how to read ``values`` (B, grid_h, grid_w):
    ``kept`` 1 = the block computes this token, 0 = pruned before it (Patch Slimming, ViT-Slim, baseline);
    ``informative`` 1 = slow path, 0 = placeholder on the fast path (Evo-ViT);
    ``assignment`` index of the output token each input patch feeds most (SiT's soft aggregation).
    """

    block: int
    kind: str
    values: torch.Tensor


@dataclass
class Phase:
    """One step of a reducer's pipeline.

    ``run`` is custom work (a search, an extraction) done before the fit; ``epochs`` is the length of the Lightning
    fit that follows (``None``: the trainer's ``max_epochs``; ``0``: no fit). ``optim`` overrides ``cfg.optim`` for
    this phase's fit (e.g. ViT-Slim's constant-LR search).
    """

    name: str
    epochs: int | None = None
    run: Callable[[PhaseContext], None] | None = None
    optim: dict[str, Any] = field(default_factory=dict)


class TokenReducer(nn.Module):
    """Base class: the baseline behaviour (no reduction) for every hook."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[ReducerConfig]] = ReducerConfig
    # True for methods whose token counts differ per image (ATS): their cost(images) is the mean over those images,
    # and cost() the mean over reference images; everyone else's cost is the same for every image.
    adaptive: ClassVar[bool] = False

    def __init__(self, vit: nn.Module, cfg: ReducerConfig) -> None:
        super().__init__()
        self.vit = vit
        self.cfg = cfg
        self.phase = ""

    # ---------------------------------------------------------------- inference
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vit(images)

    # ---------------------------------------------------------------- training
    def losses(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        criterion: Criterion,
        teacher: nn.Module | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits and the named, already weighted loss terms of one training step; the total is their sum."""
        logits = self(images)
        return logits, {"ce": criterion(logits, targets)}

    def build_teacher(self) -> nn.Module | None:
        """A frozen teacher for distillation, or None. The training module keeps it in eval mode, without grad."""
        return None

    def param_groups(self) -> list[ParamGroup]:
        """Parameters with their own optimiser settings; everything else gets the standard decay/no-decay split."""
        return []

    def no_weight_decay(self) -> set[str]:
        """Names (relative to this module) of parameters exempt from weight decay, besides 1-D ones."""
        return {f"vit.{name}" for name in self.vit.no_weight_decay()}

    def phases(self) -> list[Phase]:
        return [Phase("train")]

    def enter_phase(self, name: str) -> None:
        """Called before a phase starts or resumes; reducers switch modes (soft masks, slim structure) here."""
        self.phase = name

    def on_fit_start(self, global_batch: int, max_epochs: int) -> None:
        """Called once per fit with the effective global batch (e.g. to warn about a recipe's batch-size needs)."""

    def on_train_epoch_start(self, epoch: int, max_epochs: int) -> None:
        """Per-epoch schedule hook (e.g. Evo-ViT's layer-to-stage switch)."""

    # ---------------------------------------------------------------- accounting
    def cost(self) -> ModelCost:
        """Analytic cost of the deployable model at its configured budget."""
        blocks = dense_block_costs(self.vit)
        return ModelCost(blocks, stem_macs(self.vit), head_macs(self.vit), tokens_per_block=[b.n_q for b in blocks])

    def train_forward_macs(self) -> int:
        """MACs per image of the forward the method *trains* with (teacher excluded): the deployable cost plus what
        training runs that deployment does not (auxiliary heads, reverse modules, dense masked training). The
        benchmark's training GMACs are 3x this plus a frozen teacher's forward (:func:`tokred.flops.train_cost`)."""
        return self.cost().macs

    def target_gmacs(self) -> float | None:
        """The requested budget in GMACs, resolving ``target_ratio`` against the unreduced backbone."""
        if self.cfg.target_gmacs is not None:
            return self.cfg.target_gmacs
        if self.cfg.target_ratio is not None:
            return self.cfg.target_ratio * TokenReducer.cost(self).gmacs
        return None

    def knobs(self) -> dict[str, Any]:
        """The reducer's config as plain values, for logs and run summaries."""
        return asdict(self.cfg)

    @torch.no_grad()
    def token_maps(self, images: torch.Tensor) -> list[TokenMap]:
        """Per-block maps of what happens to each input patch for ``images``; the baseline keeps every patch."""
        grid = self.vit.patch_embed.grid_size
        kept = torch.ones(images.shape[0], *grid, device=images.device)
        return [TokenMap(i, "kept", kept) for i in range(len(self.vit.blocks))]

    # ---------------------------------------------------------------- structure and export
    def structure(self) -> dict[str, Any]:
        """JSON-able description of searched structure that a state_dict alone cannot rebuild."""
        return {"phase": self.phase}

    def load_structure(self, structure: dict[str, Any]) -> None:
        """Rebuild the modules described by :meth:`structure` so a matching state_dict can be loaded."""
        self.phase = structure.get("phase", "")

    def deployable(self) -> nn.Module:
        """A copy in eval mode without training-only parts; its forward returns plain logits."""
        model = copy.deepcopy(self)
        model.strip_training_parts()
        return model.eval()

    def strip_training_parts(self) -> None:
        """Delete training-only sub-modules in place (called on the copy made by :meth:`deployable`)."""
