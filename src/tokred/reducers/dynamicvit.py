"""DynamicViT (Rao et al., NeurIPS 2021): learned prediction modules that prune patch tokens, on a stock timm ViT/DeiT.

Before each block of ``pruning_loc`` (DeiT: 3, 6, 9) a small prediction module scores every alive patch token from its
own features and the mean of the alive ones. Stage s keeps ``int(N * keep_ratio**s)`` of the N original patches;
every prefix token (CLS, distillation token, registers) is always kept, never scored.

Nothing in the method needs a CLS token: the predictors read patch tokens only and the teacher is distilled through
its logits and patch tokens. On an average- or attention-pooled backbone the head pools the kept tokens, as the
DynamicViT extension to hierarchical, average-pooled models (Rao et al., TPAMI 2023) does; in training the pooling
is masked by the keep decisions like attention is.

* Training never removes a token: a hard straight-through Gumbel-softmax sample per token, multiplied into the
  previous stage's mask, hides the dropped ones from every other token's attention (a dropped token still sees the
  kept ones and itself). The loss is CE + the ratio MSE pulling each stage's kept share to keep_ratio**s + KL to a
  frozen teacher's logits + MSE to its final tokens at the kept positions. The teacher is the backbone as it was
  before fine-tuning.
* Inference really prunes: the top ``int(N * keep_ratio**s)`` tokens by keep score are gathered, the same count in
  every image, and the following blocks are the plain timm blocks on the shorter sequence.

Spec: ``specs/dynamicvit.md``. Choices and deviations are marked ``[choice]`` where they are made:
Masked attention in training (``masked_softmax``, spec §12): ``exact`` (default) is the official hand-written softmax
with its eps terms (§3.3), row max over all keys included; ``sdpa`` an additive mask log(G + 1e-20) in fused SDPA.
They differ once a dropped key's logit lies more than ~14 above the kept ones ("gap"):
- exact: the kept terms' sum S falls under eps and the row turns ~uniform over all keys, dropped ones included (the
  leak of §11.2); the gradient w.r.t. the dropped key's mask entry, exp(a_j - M) / (S + eps), stays under ~1/eps.
- sdpa: no leak, but that gradient grows as exp(gap), up to 1e20.
Measured (README): on dataset=synthetic_hard, whose one key patch draws CLS's attention by a wide margin, sdpa gave
predictor gradient norms of 1e13-1e16 and test top-1 87.8 / 86.5 / 59.0 % over three seeds, exact 99.9 / 86.7 /
86.3 %; on dataset=synthetic (64 px, 0.5 / 0.65 of the GMACs) sdpa gave 83.3 / 85.9 %, exact 32.3 / 34.9 %, its
training masks keeping far more than the target. The default follows the spec's recommendation (the paper's formula).
[choice] The blocks before the first prediction module run plain attention: with an all-ones policy the official
masked softmax equals it up to the eps terms (spec pitfall §11.3).
[choice] Keep counts come from the backbone's own patch grid, not the official hard-coded 14 x 14 (identical at 224).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block, VisionTransformer, init_weights_vit_timm
from torch import nn

from tokred.flops import BlockCost, ModelCost, head_macs, stem_macs
from tokred.reducers import register_reducer
from tokred.reducers.base import Criterion, ParamGroup, Phase, ReducerConfig, TokenMap, TokenReducer
from tokred.vit_ops import (
    attend,
    attention_logits,
    block_forward,
    check_standard_vit,
    classify,
    embed,
    gather_tokens,
    merge_heads,
    mlp_residual,
    project_qkv,
)

log = logging.getLogger("tokred")

TRAIN_COMMAND = (
    "tokred-train reducer=dynamicvit backbone.checkpoint=<trained backbone> (or experiment=dynamicvit_deit_s)"
)
# eps of the official masked softmax (spec §3.3): (exp(a - M) G + eps / T) / (sum_k exp(a_k - M) G_k + eps).
POLICY_EPS = 1e-6
# masked_softmax=sdpa: the additive mask is log(G + delta), so a dropped key keeps delta x its unmasked weight.
SDPA_MASK_DELTA = 1e-20
# L_tok is skipped when the whole batch keeps fewer tokens than this (official code: 0.1).
MIN_DISTILLED_TOKENS = 0.1

# on_block(block, order): the original indices (B, n) of the patch tokens block ``block`` computes.
BlockCallback = Callable[[int, torch.Tensor], None]


@dataclass
class Config(ReducerConfig):
    """DynamicViT knobs; defaults are the DeiT-S recipe of the official code (spec §7.1)."""

    name: str = "dynamicvit"
    keep_ratio: float = 0.7  # rho: stage s keeps int(N * rho**s) patch tokens (196 -> 137 / 96 / 67 at 0.7)
    pruning_loc: list[int] = field(default_factory=lambda: [3, 6, 9])  # blocks preceded by a prediction module
    ratio_weight: float = 2.0  # lambda_ratio (DeiT-B: 5.0); the stages' squared errors are summed, then / stages
    kl_weight: float = 0.5  # KL(teacher || student) on the logits, temperature 1
    token_weight: float = 0.5  # MSE to the teacher's final-norm patch tokens at the positions kept to the end
    gumbel_tau: float = 1.0  # Gumbel-softmax temperature of the straight-through gradient; never annealed
    freeze_backbone_epochs: int = 5  # first phase: only the prediction modules train (official fix_step)
    finetune_epochs: Optional[int] = None  # joint phase after the frozen one; None: trainer.max_epochs
    backbone_lr_scale: float = 0.01  # the backbone's LR relative to the prediction modules' in the joint phase
    train_pos_cls: bool = False  # the official recipe never updates pos_embed and cls_token (nor other prefix tokens)
    masked_softmax: str = "exact"  # exact: the official softmax with eps | sdpa: additive mask in fused attention

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.keep_ratio <= 1:
            raise ValueError(f"reducer.keep_ratio={self.keep_ratio} must be in (0, 1] (the paper uses 0.7)")
        locs = list(self.pruning_loc)
        if not locs or locs[0] < 0 or any(b <= a for a, b in zip(locs, locs[1:])):
            raise ValueError(
                f"reducer.pruning_loc={locs} must be one or more increasing block indices >= 0, "
                "e.g. [3,6,9] for a 12-block DeiT"
            )
        for knob in ("ratio_weight", "kl_weight", "token_weight", "backbone_lr_scale"):
            if getattr(self, knob) < 0:
                raise ValueError(f"reducer.{knob}={getattr(self, knob)} must be >= 0 (0 switches it off)")
        if self.masked_softmax not in ("exact", "sdpa"):
            raise ValueError(
                f"reducer.masked_softmax={self.masked_softmax!r}: choose exact (the official formula, default) or sdpa"
            )
        if self.gumbel_tau <= 0:
            raise ValueError(f"reducer.gumbel_tau={self.gumbel_tau} must be > 0 (the paper uses 1)")
        if self.freeze_backbone_epochs < 0:
            raise ValueError(f"reducer.freeze_backbone_epochs={self.freeze_backbone_epochs} must be >= 0 (paper: 5)")
        if self.finetune_epochs is not None and self.finetune_epochs < 1:
            raise ValueError(
                f"reducer.finetune_epochs={self.finetune_epochs}: DynamicViT is not training-free (its "
                f"prediction modules start untrained); fine-tune with {TRAIN_COMMAND}, "
                "finetune_epochs >= 1 or null"
            )


def keep_counts(n_patches: int, keep_ratio: float, stages: int) -> list[int]:
    """Patch tokens kept by stage 1..stages: int(N * rho**s), a floor as in the official code (196 -> 137/96/67)."""
    return [int(n_patches * keep_ratio**s) for s in range(1, stages + 1)]


def predictor_macs(dim: int) -> int:
    """MACs per token of a prediction module: C -> C, then C -> C/2 -> C/4 -> 2 (LayerNorm, GELU, pooling free)."""
    return dim * dim + dim * (dim // 2) + (dim // 2) * (dim // 4) + (dim // 4) * 2


def ratio_loss(decisions: list[torch.Tensor], keep_ratio: float) -> torch.Tensor:
    """Sum over stages of the batch mean of (kept share of the N patches - rho**s)**2 (spec §5)."""
    return sum(((d.mean(dim=1) - keep_ratio**s) ** 2).mean() for s, d in enumerate(decisions, start=1))


def token_distillation(student: torch.Tensor, teacher: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """MSE over the (token, channel) entries of the tokens ``keep`` (B, N) marks; 0 when (almost) none is kept."""
    keep = keep > 0.5
    if keep.sum() < MIN_DISTILLED_TOKENS:
        return student.sum() * 0.0
    return F.mse_loss(student[keep], teacher[keep])


def full_policy(keep: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """The keep mask over all tokens (B, P + N): the ``num_prefix`` prefix tokens, always kept, then ``keep``."""
    return torch.cat([keep.new_ones(keep.shape[0], num_prefix), keep], dim=1)


def connection(keep: torch.Tensor, num_prefix: int = 1) -> torch.Tensor:
    """G (B, 1, T, T) for the policy [prefix; keep]: G_ij = m_j off the diagonal and 1 on it (spec §3.3), so a
    dropped key is visible to its own query only. Differentiable in ``keep``."""
    policy = full_policy(keep, num_prefix)
    t = policy.shape[1]
    diagonal = torch.eye(t, dtype=torch.bool, device=keep.device)
    return policy[:, None, None, :].expand(-1, 1, t, -1).masked_fill(diagonal, 1.0)


def additive_mask(connection: torch.Tensor) -> torch.Tensor:
    """masked_softmax=sdpa: the additive attention mask log(G + delta) for fused SDPA."""
    return torch.log(connection + SDPA_MASK_DELTA)


def policy_softmax(logits: torch.Tensor, connection: torch.Tensor) -> torch.Tensor:
    """The official masked softmax (spec §3.3) of attention logits (B, H, T, T) under G, in float32, cast back."""
    # The row max is over all keys, dropped ones included, as in the official code: it bounds the mask's gradient.
    shifted = logits.float() - logits.float().amax(dim=-1, keepdim=True)
    weights = shifted.exp() * connection
    eps = POLICY_EPS
    return ((weights + eps / logits.shape[-1]) / (weights.sum(dim=-1, keepdim=True) + eps)).to(logits.dtype)


class Predictor(nn.Module):
    """Prediction module (spec §1): log-probabilities (keep, drop) per patch token from [local ; masked global].

    Module names follow the official checkpoints (``score_predictor.<s>.in_conv.{0,1}``, ``out_conv.{0,2,4}``).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        # Its own LayerNorm at torch's eps 1e-5, not the backbone's 1e-6 (spec §1.1).
        self.in_conv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(dim, dim // 2),
            nn.GELU(),
            nn.Linear(dim // 2, dim // 4),
            nn.GELU(),
            nn.Linear(dim // 4, 2),
            nn.LogSoftmax(dim=-1),
        )

    def forward(self, x: torch.Tensor, alive: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (B, n, C) patch tokens, ``alive`` (B, n) the current mask (None: all alive) -> (B, n, 2)."""
        z = self.in_conv(x)
        half = z.shape[-1] // 2
        local, rest = z[..., :half], z[..., half:]
        if alive is None:
            pooled = rest.mean(dim=1, keepdim=True)
        else:
            weights = alive.unsqueeze(-1)
            # [choice] An image whose patches were all dropped pools zeros, where the official code divides 0 by 0
            # and turns the whole batch's loss NaN (rare on 196 patches, common on small grids late in training).
            pooled = (rest * weights).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True).clamp_min(1.0)
        return self.out_conv(torch.cat([local, pooled.expand(-1, z.shape[1], -1)], dim=-1))


def _masked_block(blk: Block, x: torch.Tensor, connection: torch.Tensor | None, exact: bool = True) -> torch.Tensor:
    """A timm block over all tokens whose attention is masked by ``connection`` (None: the plain block): the official
    softmax (``exact``) or fused SDPA with the additive mask log(G + delta)."""
    if connection is None:
        return block_forward(blk, x)
    attn = blk.attn
    q, k, v = project_qkv(attn, blk.norm1(x))
    if exact:
        weights = attn.attn_drop(policy_softmax(attention_logits(attn, q, k), connection))
        out = merge_heads(attn, weights @ v)
    else:  # SDPA wants the mask in the query's dtype (bf16 under autocast)
        out = attend(attn, q, k, v, attn_mask=additive_mask(connection).to(q.dtype))
    x = x + blk.drop_path1(blk.ls1(out))
    return x + mlp_residual(blk, x)


@register_reducer
class DynamicViT(TokenReducer):
    name = "dynamicvit"
    Config = Config
    cfg: Config

    def __init__(self, vit: nn.Module, cfg: Config) -> None:
        check_standard_vit(vit, self.name)
        super().__init__(vit, cfg)
        depth = len(vit.blocks)
        if cfg.pruning_loc[-1] >= depth:
            raise ValueError(
                f"reducer.pruning_loc={list(cfg.pruning_loc)} must index blocks below the backbone "
                f"depth {depth}, e.g. {[depth * s // 4 for s in (1, 2, 3)]}"
            )
        self.locs = {block: s for s, block in enumerate(cfg.pruning_loc)}
        self.score_predictor = nn.ModuleList(Predictor(vit.embed_dim) for _ in cfg.pruning_loc)
        # trunc-normal(.02) Linear weights, zero biases; LayerNorms at 1/0 (spec §1.2).
        self.score_predictor.apply(init_weights_vit_timm)
        target = self.target_gmacs()
        if target is not None:
            cfg.keep_ratio = self._meet_budget(target)
        self._counts(cfg.keep_ratio)  # fail at build time, not at the first forward

    # ---------------------------------------------------------------- budget and cost
    def _counts(self, keep_ratio: float) -> list[int]:
        n = self.vit.patch_embed.num_patches
        counts = keep_counts(n, keep_ratio, len(self.cfg.pruning_loc))
        if counts[-1] < 1:
            raise ValueError(
                f"reducer.keep_ratio={keep_ratio:.4g} keeps no patch token in stage {len(counts)} "
                f"(of {n}); use at least {n ** (-1 / len(counts)):.4g} or fewer pruning_loc"
            )
        return counts

    def _cost(self, counts: list[int]) -> ModelCost:
        vit, dim = self.vit, self.vit.embed_dim
        alive, blocks = vit.patch_embed.num_patches, []
        for i, blk in enumerate(vit.blocks):
            extra = 0
            if i in self.locs:  # the module scores the tokens alive before it; the block runs on the kept ones
                extra, alive = alive * predictor_macs(dim), counts[self.locs[i]]
            blocks.append(BlockCost.dense(vit.num_prefix_tokens + alive, dim, blk.mlp.fc1.out_features, extra))
        head = head_macs(vit, blocks[-1].n_q)  # attention pooling reads the tokens kept to the end
        return ModelCost(blocks, stem_macs(vit), head, tokens_per_block=[b.n_q for b in blocks])

    def cost(self) -> ModelCost:
        return self._cost(self._counts(self.cfg.keep_ratio))

    def train_forward_macs(self) -> int:
        """Training masks instead of pruning: every block on all tokens, every prediction module on all N patches."""
        n = self.vit.patch_embed.num_patches
        return TokenReducer.cost(self).macs + len(self.locs) * n * predictor_macs(self.vit.embed_dim)

    def _meet_budget(self, target: float) -> float:
        """The keep ratio whose cost is the highest at or below ``target``, by exact search.

        The counts only change where N * rho**s crosses an integer, so every interval between two such breakpoints
        is costed once (at its midpoint, safe from float rounding in the floor); ~stages x N evaluations.
        """
        n, stages = self.vit.patch_embed.num_patches, len(self.cfg.pruning_loc)
        lowest = n ** (-1 / stages)  # the last stage keeps one token
        points = sorted({(m / n) ** (1 / s) for s in range(1, stages + 1) for m in range(1, n + 1)} | {1.0})
        points = [p for p in points if p >= lowest * (1 - 1e-12)]
        candidates = [(a + b) / 2 for a, b in zip(points, points[1:])] + [1.0]
        costs = {r: self._cost(keep_counts(n, r, stages)).gmacs for r in candidates}
        costs = {r: c for r, c in costs.items() if keep_counts(n, r, stages)[-1] >= 1}
        below = [r for r, c in costs.items() if c <= target]
        if not below:
            raise ValueError(
                f"reducer target {target:.4g} GMACs is below what DynamicViT reaches with "
                f"pruning_loc={list(self.cfg.pruning_loc)} ({min(costs.values()):.4g} GMACs, one token "
                "left); raise the target or prune earlier"
            )
        best = max(below, key=lambda r: costs[r])
        if costs[best] < 0.99 * target:
            above = min((c for c in costs.values() if c > target), default=costs[best])
            raise ValueError(
                f"reducer target {target:.4g} GMACs falls between two keep counts of DynamicViT "
                f"({costs[best]:.4g} and {above:.4g} GMACs), more than 1% from either; change the target"
            )
        log.info("reducer=dynamicvit: target %.4g GMACs -> keep_ratio=%.4f (%.4g GMACs)", target, best, costs[best])
        return best

    def structure(self) -> dict[str, Any]:
        return {**super().structure(), "keep_ratio": self.cfg.keep_ratio}

    def load_structure(self, structure: dict[str, Any]) -> None:
        super().load_structure(structure)
        self.cfg.keep_ratio = float(structure.get("keep_ratio", self.cfg.keep_ratio))

    # ---------------------------------------------------------------- inference: real pruning
    def _pruned_tokens(self, images: torch.Tensor, on_block: BlockCallback | None = None) -> torch.Tensor:
        """Tokens after the last block, (B, P + k_S, C): the P prefix tokens, then the kept patches in keep-score
        order."""
        counts = self._counts(self.cfg.keep_ratio)
        x = embed(self.vit, images)
        prefix = self.vit.num_prefix_tokens
        b, n = x.shape[0], x.shape[1] - prefix
        order = torch.arange(n, device=x.device).expand(b, n)  # original index of each patch position
        for i, blk in enumerate(self.vit.blocks):
            if i in self.locs:
                s = self.locs[i]
                score = self.score_predictor[s](x[:, prefix:])[..., 0]  # channel 0 is "keep" (spec fact 2)
                keep = score.topk(counts[s], dim=1, sorted=False).indices  # a fixed count per image (spec §4)
                x = torch.cat([x[:, :prefix], gather_tokens(x[:, prefix:], keep)], dim=1)
                order = order.gather(1, keep)
            if on_block is not None:
                on_block(i, order)
            x = block_forward(blk, x)
        return x

    # ---------------------------------------------------------------- training: Gumbel masks, nothing removed
    def _masked_forward(
        self, images: torch.Tensor, decide: Callable[[int, torch.Tensor], torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Logits, final-norm patch tokens (B, N, C) in raster order and each stage's cumulative keep mask (B, N).

        ``decide(stage, log_probs)`` replaces the Gumbel sample (tests inject deterministic masks through it); its
        (B, N) decision is multiplied into the previous stage's mask, as the sample is.
        """
        x = embed(self.vit, images)
        prefix = self.vit.num_prefix_tokens
        keep = x.new_ones(x.shape[0], x.shape[1] - prefix)
        allowed = None
        decisions: list[torch.Tensor] = []
        for i, blk in enumerate(self.vit.blocks):
            if i in self.locs:
                s = self.locs[i]
                log_probs = self.score_predictor[s](x[:, prefix:], keep)
                if decide is None:
                    decision = F.gumbel_softmax(log_probs, tau=self.cfg.gumbel_tau, hard=True)[..., 0]
                else:
                    decision = decide(s, log_probs)
                keep = decision * keep  # hierarchical: dropped once, dropped for good; carries the ST gradient
                decisions.append(keep)
                allowed = connection(keep, prefix)
            x = _masked_block(blk, x, allowed, exact=self.cfg.masked_softmax == "exact")
        # Average / attention pooling over the kept tokens, as the pruned model pools (CLS-token pooling ignores the
        # sizes). A dropped token keeps size eps, as in the masked softmax: ~0, yet an image that dropped every patch
        # pools them all rather than dividing by 0, and the log-size bias of attention pooling has a bounded gradient.
        logits = classify(self.vit, x, (full_policy(keep, prefix) + POLICY_EPS).unsqueeze(-1))
        return logits, self.vit.norm(x)[:, prefix:], decisions

    # ---------------------------------------------------------------- the hooks
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self._masked_forward(images)[0]
        return classify(self.vit, self._pruned_tokens(images))

    @torch.no_grad()
    def token_maps(self, images: torch.Tensor) -> list[TokenMap]:
        """Per block, the patches the deployed (top-k) model computes."""
        grid = self.vit.patch_embed.grid_size
        maps: list[TokenMap] = []

        def record(block: int, order: torch.Tensor) -> None:
            kept = torch.zeros(order.shape[0], grid[0] * grid[1], device=order.device).scatter_(1, order, 1.0)
            maps.append(TokenMap(block, "kept", kept.view(-1, *grid)))

        self._pruned_tokens(images, record)
        return maps

    def losses(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        criterion: Criterion,
        teacher: nn.Module | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """CE + ratio_weight / stages * L_ratio + kl_weight * KL + token_weight * MSE at the finally kept tokens."""
        if teacher is None:
            raise ValueError(
                "reducer=dynamicvit distils from the frozen backbone: losses() needs the teacher from build_teacher()"
            )
        logits, tokens, decisions = self._masked_forward(images)
        with torch.no_grad():
            teacher_tokens = teacher.forward_features(images)
            teacher_logits = teacher.forward_head(teacher_tokens)
        kl = F.kl_div(
            F.log_softmax(logits, dim=-1), F.log_softmax(teacher_logits, dim=-1), reduction="batchmean", log_target=True
        )
        cfg, teacher_patches = self.cfg, teacher_tokens[:, self.vit.num_prefix_tokens :]
        return logits, {
            "ce": criterion(logits, targets),
            "ratio": cfg.ratio_weight / len(decisions) * ratio_loss(decisions, cfg.keep_ratio),
            "kl": cfg.kl_weight * kl,
            "token_mse": cfg.token_weight * token_distillation(tokens, teacher_patches, decisions[-1].detach()),
        }

    def build_teacher(self) -> VisionTransformer:
        """The backbone as it is when the fit starts: its initial weights, since the first phase leaves it frozen."""
        return copy.deepcopy(self.vit)

    def phases(self) -> list[Phase]:
        """Prediction modules alone for ``freeze_backbone_epochs``, then everything for ``finetune_epochs``.

        [choice] The official recipe freezes the backbone by giving it LR 0 during its 5 warm-up epochs within one
        schedule; here the frozen epochs are their own phase, whose whole length is the linear warm-up, and the joint
        phase is the cosine from the peak, so the LRs match the official schedule when optim.warmup_epochs equals the
        frozen epochs. The optimiser's moments restart at the joint phase.
        """
        frozen = self.cfg.freeze_backbone_epochs
        if frozen == 0:
            return [Phase("finetune", self.cfg.finetune_epochs)]
        return [
            Phase("predictors", frozen, optim={"warmup_epochs": frozen}),
            Phase("finetune", self.cfg.finetune_epochs, optim={"warmup_epochs": 0}),
        ]

    def enter_phase(self, name: str) -> None:
        super().enter_phase(name)
        self.vit.requires_grad_(name == "finetune")
        if not self.cfg.train_pos_cls:
            # Registers and the distillation token are learned prefix embeddings like CLS: frozen alike.
            prefix = (self.vit.cls_token, self.vit.reg_token, getattr(self.vit, "dist_token", None))
            for param in (self.vit.pos_embed, *prefix):
                if param is not None:
                    param.requires_grad_(False)

    def param_groups(self) -> list[ParamGroup]:
        """The backbone at ``backbone_lr_scale`` x the LR (decay / no-decay as DeiT); the prediction modules get the
        default groups at the full LR."""
        skip = self.vit.no_weight_decay()
        decay, no_decay = [], []
        for name, param in self.vit.named_parameters():
            (no_decay if param.ndim <= 1 or name in skip else decay).append(param)
        scale = self.cfg.backbone_lr_scale
        return [
            ParamGroup("backbone", decay, lr_mult=scale),
            ParamGroup("backbone_no_decay", no_decay, lr_mult=scale, weight_decay=0.0),
        ]
