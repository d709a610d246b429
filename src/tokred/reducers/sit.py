"""SiT (Zong et al., ECCV 2022): Token Slimming Modules + Feature Recalibration Distillation on a timm ViT.

The student runs the stock timm blocks (through :mod:`tokred.vit_ops`) in ``len(stage_blocks)`` stages. Between two
stages a Token Slimming Module (TSM) replaces the N patch tokens by N' = floor(N0 * keep_ratio**k) learned convex
combinations of them; the prefix tokens (CLS, distillation token, registers) bypass it. Training is distillation from
a frozen copy of the unslimmed backbone: CE + token MSE between the teacher's block outputs and the student's, mapped
back to N0 tokens by training-only Reverse TSMs, + logit KL. The deployable model keeps the TSMs and drops the RTSMs.
Nothing in the method needs a CLS token (no token is scored; the distillation compares patch tokens and logits), so
CLS-free backbones (average or attention pooling) are slimmed the same way.

Spec: ``specs/sit.md``. Choices the spec leaves open, and deviations, are marked ``[choice]`` in comments.
[choice] The optional CNN-teacher DIST-token loss (L_hard) is left out, as the spec advises: no released script uses
it and its official code path is broken. ``forward`` returns plain logits in train and eval mode (spec §5.6); the
per-block token outputs the distillation needs come from :func:`forward_with_token_maps`, the patch-assignment maps
(``token_maps``) from the TSM weights recorded on that same path.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import VisionTransformer, init_weights_vit_timm
from torch import nn

from tokred.backbones import load_backbone_checkpoint
from tokred.flops import BlockCost, ModelCost, bisect_budget, head_macs, stem_macs
from tokred.reducers import register_reducer
from tokred.reducers.base import Criterion, ParamGroup, Phase, ReducerConfig, TokenMap, TokenReducer
from tokred.vit_ops import block_forward, check_standard_vit, classify, embed

if TYPE_CHECKING:
    from tokred.training.phases import PhaseContext

log = logging.getLogger("tokred")

# A budget target is met by the stage split alone when one lands this close; otherwise the keep ratio is tuned too.
BUDGET_TOLERANCE = 0.03


@dataclass
class Config(ReducerConfig):
    """SiT knobs; defaults are the released recipe, stage split from the spec's DeiT-S mapping (§1.4)."""

    name: str = "sit"
    # Blocks per stage; a TSM follows every stage but the last. Must sum to the backbone depth.
    stage_blocks: list[int] = field(default_factory=lambda: [6, 2, 2, 2])
    # Patch tokens of stage k: floor(N * keep_ratio**k).
    keep_ratio: float = 0.5
    # Teacher checkpoint (.safetensors/.pth/.ckpt of the same backbone); the student starts from it. None: the
    # student's own initial weights (backbone.checkpoint / backbone.pretrained) are the teacher.
    teacher: Optional[str] = None
    token_weight: float = 2.0  # lambda_tok: weight of the mean-over-blocks token MSE
    kd_weight: float = 2.0  # lambda_log: weight of KL(teacher || student) on the logits
    kd_temperature: float = 1.0
    rtsm_lr_mult: float = 5.0  # the RTSMs' peak learning rate relative to the rest; all end at min_lr
    # Train even when the teacher is a randomly initialised network (no teacher, no pretrained backbone): tests only.
    allow_random_teacher: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.stage_blocks or any(b < 1 for b in self.stage_blocks):
            raise ValueError(
                f"reducer.stage_blocks={list(self.stage_blocks)} needs one or more stages of >= 1 block "
                "each, e.g. [6,2,2,2] for a 12-block backbone"
            )
        if not 0 < self.keep_ratio <= 1:
            raise ValueError(f"reducer.keep_ratio={self.keep_ratio} must be in (0, 1]; the paper uses 0.5")
        for knob in ("token_weight", "kd_weight"):
            if getattr(self, knob) < 0:
                raise ValueError(f"reducer.{knob}={getattr(self, knob)} must be >= 0 (0 switches the term off)")
        if self.kd_temperature <= 0:
            raise ValueError(f"reducer.kd_temperature={self.kd_temperature} must be > 0; the paper uses 1")
        if self.rtsm_lr_mult <= 0:
            raise ValueError(f"reducer.rtsm_lr_mult={self.rtsm_lr_mult} must be > 0; the paper uses 5")
        if self.teacher is not None and not self.teacher.strip():
            raise ValueError(
                "reducer.teacher is empty; give a checkpoint path, or null to distil from the student's initial weights"
            )


def check_teacher(cfg: Mapping[str, Any]) -> None:
    """Refuse a SiT training config whose teacher would be randomly initialised: without ``reducer.teacher`` the
    teacher is the student's starting backbone, which is random unless ``backbone.pretrained`` or
    ``backbone.checkpoint`` gives it weights. Raises ValueError (the CLIs print it as one line)."""
    reducer, backbone = cfg["reducer"], cfg["backbone"]
    if reducer.get("name") != "sit" or reducer.get("teacher") or reducer.get("allow_random_teacher"):
        return
    if backbone.get("pretrained") or backbone.get("checkpoint"):
        return
    raise ValueError(
        "reducer=sit would distil from a randomly initialised teacher (no reducer.teacher, "
        "backbone.pretrained=false, no backbone.checkpoint): pass reducer.teacher=<trained checkpoint>, "
        "or backbone.pretrained=true / backbone.checkpoint=<weights>, or set "
        "reducer.allow_random_teacher=true"
    )


def stage_tokens(n_patches: int, num_stages: int, keep_ratio: float) -> list[int]:
    """Patch tokens per stage: floor(N * r**k) (196 -> 98, 49, 24 at r = 0.5; the last is floored, not rounded)."""
    return [math.floor(n_patches * keep_ratio**k) for k in range(num_stages)]


def tsm_macs(n_in: int, n_out: int, dim: int) -> int:
    """A TSM's MACs: the two linear layers of its logit MLP and the (n_out x n_in) @ (n_in x dim) aggregation."""
    hidden = dim // 2
    return n_in * dim * hidden + n_in * hidden * n_out + n_out * n_in * dim


class TokenSlimming(nn.Module):
    """N input tokens -> ``n_out`` tokens, each a convex combination of the inputs (spec §1.1).

    No residual, no positional re-injection, no train/eval difference.
    """

    def __init__(self, dim: int, n_out: int) -> None:
        super().__init__()
        self.n_out = n_out
        self.norm = nn.LayerNorm(dim)  # eps 1e-5, not the backbone's 1e-6 (spec §5.9)
        self.mlp = Mlp(dim, dim // 2, n_out)
        # Shape (1, 1, 1) as in the official code: 3-D, so the optimiser's 1-D rule leaves it weight-decayed (§5.8).
        self.scale = nn.Parameter(torch.ones(1, 1, 1))

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, n_out) aggregation weights; softmax over the *input* axis, so each output's weights sum to 1."""
        return (self.scale * self.mlp(self.norm(x))).softmax(dim=1)

    def forward(self, x: torch.Tensor, record: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The ``n_out`` aggregated tokens; ``record``, if given, receives the weights used (for the token maps)."""
        weights = self.weights(x)
        if record is not None:
            record.append(weights)
        return weights.transpose(1, 2) @ x


class ReverseTokenSlimming(nn.Module):
    """Training-only map of ``n_in`` tokens back to ``n_out``: a token MLP (n_in -> 4 n_out -> n_out) along the
    token axis, then a channel MLP with a residual (spec §2.2)."""

    def __init__(self, n_in: int, n_out: int, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mlp = Mlp(n_in, 4 * n_out, n_out)
        self.norm2 = nn.LayerNorm(dim)
        self.channel_mlp = Mlp(dim, 4 * dim, dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        v = self.token_mlp(self.norm1(z).transpose(1, 2)).transpose(1, 2)
        return v + self.channel_mlp(self.norm2(v))


def forward_with_token_maps(
    vit: VisionTransformer,
    images: torch.Tensor,
    tsms: Mapping[str, TokenSlimming],
    tsm_weights: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits and each block's patch-token output (pre-final-norm residual stream, prefix tokens excluded, after the
    TSM that follows the block, if any). ``tsms`` maps a block index (as str) to the TSM applied after it; empty: the
    teacher. ``tsm_weights``, if given, receives each TSM's (B, N_in, N_out) aggregation weights in block order.

    [choice] Average / attention pooling weighs the slimmed tokens equally (``classify`` without ``size``): a TSM
    output is a new learned token -- a convex combination of all inputs, its weights summing to 1 like every other
    output's -- not a group of merged patches with a size, and the student learns its TSMs under this pooling.
    """
    prefix = vit.num_prefix_tokens
    x = embed(vit, images)
    maps = []
    for i, blk in enumerate(vit.blocks):
        x = block_forward(blk, x)
        if str(i) in tsms:
            x = torch.cat([x[:, :prefix], tsms[str(i)](x[:, prefix:], tsm_weights)], dim=1)
        maps.append(x[:, prefix:])
    return classify(vit, x), maps


def stage_splits(depth: int, num_stages: int) -> list[list[int]]:
    """Every way to cut ``depth`` blocks into ``num_stages`` non-empty stages, in order."""
    return [
        [b - a for a, b in zip((0, *cuts), (*cuts, depth))]
        for cuts in itertools.combinations(range(1, depth), num_stages - 1)
    ]


def example_split(depth: int, num_stages: int) -> list[int]:
    """The spec's S-style split for any depth: half the blocks at full tokens, the rest spread over later stages."""
    if num_stages == 1:
        return [depth]
    first = min(depth // 2, depth - (num_stages - 1))
    rest, stages = divmod(depth - first, num_stages - 1)
    return [first] + [rest + (k < stages) for k in range(num_stages - 1)]


@register_reducer
class SiT(TokenReducer):
    name = "sit"
    Config = Config
    cfg: Config

    def __init__(self, vit: nn.Module, cfg: Config) -> None:
        check_standard_vit(vit, self.name)
        super().__init__(vit, cfg)
        depth, num_stages = len(vit.blocks), len(cfg.stage_blocks)
        if num_stages > depth:
            raise ValueError(
                f"reducer.stage_blocks has {num_stages} stages but the backbone has only {depth} "
                f"blocks; use at most {depth} stages, e.g. {example_split(depth, min(4, depth))}"
            )
        target = self.target_gmacs()
        if target is None:
            if sum(cfg.stage_blocks) != depth:
                raise ValueError(
                    f"reducer.stage_blocks={list(cfg.stage_blocks)} sums to {sum(cfg.stage_blocks)} but "
                    f"the backbone has {depth} blocks; make it sum to {depth}, e.g. "
                    f"{example_split(depth, num_stages)}"
                )
            self._build(list(cfg.stage_blocks), cfg.keep_ratio)
        else:
            self._build(*self._fit_budget(target, num_stages))

    # ---------------------------------------------------------------- structure
    def _build(self, stage_blocks: list[int], keep_ratio: float) -> None:
        """(Re)create the TSMs and RTSMs for a stage split and keep ratio."""
        n_patches, dim = self.vit.patch_embed.num_patches, self.vit.embed_dim
        layout = self._layout(stage_blocks, keep_ratio)
        self.stage_blocks, self.keep_ratio = stage_blocks, keep_ratio
        self.tsms = nn.ModuleDict(
            {str(i): TokenSlimming(dim, n_out) for i, (_, n_out) in enumerate(layout) if n_out is not None}
        )
        # A block's output is counted after the TSM that follows it, so a stage's last block already needs an RTSM.
        outputs = [n_in if n_out is None else n_out for n_in, n_out in layout]
        self.rtsms = nn.ModuleDict(
            {str(i): ReverseTokenSlimming(n, n_patches, dim) for i, n in enumerate(outputs) if n < n_patches}
        )
        # trunc-normal(.02) weights, zero biases: the slimmed tokens start near the global mean token (spec §5.2).
        self.tsms.apply(init_weights_vit_timm)
        self.rtsms.apply(init_weights_vit_timm)

    def _layout(self, stage_blocks: list[int], keep_ratio: float) -> list[tuple[int, int | None]]:
        """Per block: the patch tokens it runs on, and the output width of the TSM after it (None: no TSM)."""
        n_patches = self.vit.patch_embed.num_patches
        tokens = stage_tokens(n_patches, len(stage_blocks), keep_ratio)
        if tokens[-1] < 1:
            raise ValueError(
                f"reducer.keep_ratio={keep_ratio} leaves no tokens in stage {tokens.index(0)} "
                f"(tokens per stage {tokens} from {n_patches} patches); raise keep_ratio or use fewer "
                "stages"
            )
        return [
            (tokens[k], tokens[k + 1] if j == n_blocks - 1 and k + 1 < len(tokens) else None)
            for k, n_blocks in enumerate(stage_blocks)
            for j in range(n_blocks)
        ]

    def _cost(self, stage_blocks: list[int], keep_ratio: float) -> ModelCost:
        dim, prefix = self.vit.embed_dim, self.vit.num_prefix_tokens
        blocks = []
        for blk, (n_in, n_out) in zip(self.vit.blocks, self._layout(stage_blocks, keep_ratio)):
            extra = 0 if n_out is None else tsm_macs(n_in, n_out, dim)
            blocks.append(BlockCost.dense(n_in + prefix, dim, blk.mlp.fc1.out_features, extra))
        # Attention pooling (SigLIP) costs by the tokens leaving the last block: the last stage's.
        head = head_macs(self.vit, n_out=blocks[-1].n_q)
        return ModelCost(blocks, stem_macs(self.vit), head, tokens_per_block=[b.n_q for b in blocks])

    def _fit_budget(self, target: float, num_stages: int) -> tuple[list[int], float]:
        """Stage split (and, only if no split lands within 3%, keep ratio) whose analytic cost is closest to target.

        [choice] The split is the paper's own budget knob (SiT-S vs SiT-XS differ only there, r = 0.5 in every
        model), so it is searched first at the configured keep ratio; the ratio is bisected only when the target lies
        outside what splits can reach (e.g. > ~80% of DeiT-S) or the depth allows too few splits.
        """
        r = self.cfg.keep_ratio
        split = min(stage_splits(len(self.vit.blocks), num_stages), key=lambda s: abs(self._cost(s, r).gmacs - target))
        if num_stages > 1 and abs(self._cost(split, r).gmacs - target) > BUDGET_TOLERANCE * target:
            # Smallest ratio that leaves the last stage one token; nudged up against floor() rounding below 1.
            lowest = self.vit.patch_embed.num_patches ** (-1 / (num_stages - 1)) * (1 + 1e-6)
            r = bisect_budget(lambda ratio: self._cost(split, ratio).gmacs, target, lowest, 1.0, tol=1e-4)
        achieved = self._cost(split, r).gmacs
        if abs(achieved - target) > BUDGET_TOLERANCE * target:
            # e.g. a target at or above the unreduced backbone: even keep_ratio 1 costs more (the TSMs add work)
            raise ValueError(
                f"reducer target {target:.3f} GMACs is out of reach: the closest is {achieved:.3f} GMACs "
                f"(stage_blocks={split}, keep_ratio={r:.3g}); set a target below the unreduced "
                f"backbone's {TokenReducer.cost(self).gmacs:.3f} GMACs"
            )
        log.info(
            "reducer=sit: target %.3f GMACs -> stage_blocks=%s keep_ratio=%.4g (%.3f GMACs)", target, split, r, achieved
        )
        return split, r

    def cost(self) -> ModelCost:
        return self._cost(self.stage_blocks, self.keep_ratio)

    def train_forward_macs(self) -> int:
        """Plus the training-only Reverse TSMs, each a token MLP over the C channels and a channel MLP over its
        n_out tokens: on DeiT-S [6,2,2,2] 2.14 GMACs beside the student's 3.00, the bulk of SiT's training cost."""
        dim = self.vit.embed_dim

        def mlp(m: nn.Module, rows: int) -> int:
            return rows * (m.fc1.in_features * m.fc1.out_features + m.fc2.in_features * m.fc2.out_features)

        rtsms = self.rtsms.values()
        return super().train_forward_macs() + sum(
            mlp(r.token_mlp, dim) + mlp(r.channel_mlp, r.token_mlp.fc2.out_features) for r in rtsms
        )

    def structure(self) -> dict[str, Any]:
        return {**super().structure(), "stage_blocks": self.stage_blocks, "keep_ratio": self.keep_ratio}

    def load_structure(self, structure: dict[str, Any]) -> None:
        super().load_structure(structure)
        split = list(structure.get("stage_blocks", self.stage_blocks))
        ratio = float(structure.get("keep_ratio", self.keep_ratio))
        if (split, ratio) != (self.stage_blocks, self.keep_ratio):
            self._build(split, ratio)

    def knobs(self) -> dict[str, Any]:
        # The split and ratio actually built: they differ from the config when a budget target chose them.
        return {**asdict(self.cfg), "stage_blocks": self.stage_blocks, "keep_ratio": self.keep_ratio}

    def strip_training_parts(self) -> None:
        self.rtsms = nn.ModuleDict()

    # ---------------------------------------------------------------- inference
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return forward_with_token_maps(self.vit, images, self.tsms)[0]

    @torch.no_grad()
    def token_maps(self, images: torch.Tensor) -> list[TokenMap]:
        """Per block, the token it runs on that each ORIGINAL patch feeds most (``assignment`` ids < its tokens).

        Composition: a TSM's weights W_k (B, N_k, N_k+1) are convex over its inputs, so the product
        C_k = W_1 @ ... @ W_k (B, N_0, N_k) gives each stage-k token as a convex combination of the original patches
        (its columns still sum to 1); a patch's id at a block of stage k is the argmax of its row of C_k, the token
        it has the largest weight in. Only the TSMs' aggregation is traced, not the attention mixing inside the
        blocks. Before the first TSM, C_0 is the identity and every patch is its own token.
        """
        weights: list[torch.Tensor] = []
        forward_with_token_maps(self.vit, images, self.tsms, weights)
        grid = self.vit.patch_embed.grid_size
        composed = torch.eye(self.vit.patch_embed.num_patches, device=images.device).expand(images.shape[0], -1, -1)
        maps, stage_weights = [], iter(weights)
        for i, (_, n_out) in enumerate(self._layout(self.stage_blocks, self.keep_ratio)):
            maps.append(TokenMap(i, "assignment", composed.argmax(dim=2).view(-1, *grid)))
            if n_out is not None:  # the TSM after this block defines the next stage's tokens
                composed = composed @ next(stage_weights)
        return maps

    # ---------------------------------------------------------------- training
    def phases(self) -> list[Phase]:
        return [Phase("train", run=self._start_from_teacher)]

    def _start_from_teacher(self, ctx: PhaseContext) -> None:
        """Self-slimming: the student's backbone starts from the teacher's weights; TSMs and RTSMs stay fresh."""
        if self.cfg.teacher:
            load_backbone_checkpoint(self.vit, self.cfg.teacher)
            log.info("reducer=sit: student initialised from teacher %s", self.cfg.teacher)

    def build_teacher(self) -> nn.Module:
        """The unslimmed backbone with the teacher's weights; read here, not at construction, so that rebuilding an
        exported model never needs the teacher file."""
        teacher = copy.deepcopy(self.vit)
        if self.cfg.teacher:
            load_backbone_checkpoint(teacher, self.cfg.teacher)
        return teacher

    def param_groups(self) -> list[ParamGroup]:
        # All RTSM parameters, LayerNorms and biases included, are weight-decayed in the official code (§3).
        # The official schedule gives them their own cosine from rtsm_lr_mult x the LR down to the common min_lr.
        return [ParamGroup("rtsm", list(self.rtsms.parameters()), peak_lr_mult=self.cfg.rtsm_lr_mult)]

    def losses(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        criterion: Criterion,
        teacher: nn.Module | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """CE + token_weight * mean-over-blocks MSE(RTSM(student tokens), teacher tokens) + kd_weight * tau^2 KL."""
        if teacher is None:
            raise ValueError("reducer=sit trains by distillation: losses() needs the teacher from build_teacher()")
        logits, student_maps = forward_with_token_maps(self.vit, images, self.tsms)
        with torch.no_grad():
            teacher_logits, teacher_maps = forward_with_token_maps(teacher, images, {})
        # Blocks that still hold all N tokens are compared directly (identity), as in the official code.
        token_mse = torch.stack(
            [
                F.mse_loss(self.rtsms[str(i)](z) if str(i) in self.rtsms else z, t)
                for i, (z, t) in enumerate(zip(student_maps, teacher_maps))
            ]
        ).mean()
        tau = self.cfg.kd_temperature
        kl = (
            F.kl_div(
                F.log_softmax(logits / tau, dim=-1),
                F.log_softmax(teacher_logits / tau, dim=-1),
                reduction="batchmean",
                log_target=True,
            )
            * tau**2
        )
        return logits, {
            "ce": criterion(logits, targets),
            "token_mse": self.cfg.token_weight * token_mse,
            "kl": self.cfg.kd_weight * kl,
        }
