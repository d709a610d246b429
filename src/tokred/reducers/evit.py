"""EViT (Liang et al., ICLR 2022, "Not All Patches are What You Need"): Top-K pruning by CLS attention plus the fusion
of the inattentive tokens, on a stock timm ViT/DeiT.

Everything of :mod:`tokred.reducers.topk` applies (placement after the attention residual, locations, scoring). The
differences, from the official code (spec ``specs/topk_evit.md`` §2, §3, §5):

* the dropped ("inattentive") tokens are summed into one fused token, weighted by their raw head-mean CLS attention
  (not renormalised, so the weights sum to less than 1), appended after the kept tokens; at a later location it is
  an ordinary candidate that may be kept or fused again;
* keep counts are relative: ceil(rho * n) of the n non-prefix tokens present, fused token included (``count_mode``);
* [extension] on average or attention pooling the fused token is pooled with the weight of the patches it stands for
  (its size: the dropped tokens' sizes summed, a re-fused earlier fused token counting all of its patches; average
  pooling weights by size, attention pooling adds log(size) to the logits, :func:`tokred.vit_ops.classify`). The
  official code pools the CLS token only (DeiT; its distilled variant reads CLS and the distillation token), so it
  never pools the fused token and gives it no size; pooled as one token it would stand for the dropped tokens -- at
  0.7, 30 % of the patches at the first location -- with the weight of one, and the pooled feature would drift from
  the mean over the image that the backbone was trained to classify. Pooling reads the fused token after the
  final (per-token) norm, which removes its shrunk scale (weights summing to < 1). Inside the blocks it stays one
  ordinary token, as in the official code (no proportional attention);
* training may warm the keep rate up: 1 for the first ``keep_warmup_start`` of the epochs, then a cosine down to
  ``keep_rate`` over the next ``keep_warmup_epochs`` (the paper's from-scratch run: 10 and 100 of 300 epochs; its
  30-epoch fine-tune from DeiT uses none). The scheduled rate applies at every location. Evaluation and export always
  use ``keep_rate``.

[deviation] The official schedule moves every iteration; tokred's reducers get an epoch hook, so the rate is the
schedule's value at each epoch start (a staircase cosine). The maintainer found the warm-up itself makes a negligible
difference (EViT issue #7), and k then changes once per epoch rather than every step (spec pitfall 6: fewer shapes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from tokred.pruning import Selection, prune
from tokred.reducers import register_reducer
from tokred.reducers.base import TokenMap
from tokred.reducers.topk import Config as TopKConfig
from tokred.reducers.topk import TopK


@dataclass
class Config(TopKConfig):
    name: str = "evit"
    count_mode: str = "relative_ceil"  # ceil(rho * n) of the tokens present (EViT) | absolute_floor (Haurum)
    fuse: bool = True  # fuse the dropped tokens into one (false: EViT-style Top-K, the README's no-fusion rows)
    fuse_normalize: bool = False  # divide the fusion weights by their sum (ablation; the official code does not)
    keep_warmup_start: float = 0.0  # share of the fit's epochs at keep rate 1 (paper, from scratch: 10/300)
    keep_warmup_epochs: float = 0.0  # share of the epochs of the cosine from 1 down to keep_rate (paper: 100/300)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.fuse_normalize and not self.fuse:
            raise ValueError(
                "reducer.fuse_normalize=true needs reducer.fuse=true (there is no fused token to normalise)"
            )
        for knob in ("keep_warmup_start", "keep_warmup_epochs"):
            if not 0 <= getattr(self, knob) <= 1:
                raise ValueError(
                    f"reducer.{knob}={getattr(self, knob)} must be in [0, 1] (a share of the epochs; "
                    "the paper's from-scratch run uses 10/300 and 100/300)"
                )
        if self.keep_warmup_start + self.keep_warmup_epochs > 1:
            raise ValueError(
                f"reducer.keep_warmup_start + keep_warmup_epochs = "
                f"{self.keep_warmup_start + self.keep_warmup_epochs:.4g} must be <= 1, or training never "
                "reaches the keep_rate that evaluation and export use"
            )


def keep_rate_schedule(keep_rate: float, epoch: float, start: float, length: float) -> float:
    """EViT's keep-rate warm-up at ``epoch`` (spec §5): 1 before ``start``, a cosine from 1 down to ``keep_rate`` over
    the next ``length`` epochs, ``keep_rate`` from then on (at once when ``length`` is 0)."""
    if epoch < start:
        return 1.0
    if epoch >= start + length:
        return keep_rate
    return keep_rate + (1 - keep_rate) * (1 + math.cos(math.pi * (epoch - start) / length)) / 2


@register_reducer
class EViT(TopK):
    name = "evit"
    Config = Config

    def __init__(self, vit: nn.Module, cfg: Config) -> None:
        super().__init__(vit, cfg)
        self._train_rate: float | None = None  # set by the warm-up at each training epoch start

    @property
    def fuses(self) -> bool:
        return self.cfg.fuse

    def keep_rate_now(self) -> float:
        if self.training and self._train_rate is not None:
            return self._train_rate
        return self.cfg.keep_rate

    def on_train_epoch_start(self, epoch: int, max_epochs: int) -> None:
        cfg = self.cfg
        # Whole epochs, as the rate only moves at epoch starts; so 0.0333 x 300 starts the cosine at 10, not 9.99.
        start = round(cfg.keep_warmup_start * max_epochs)
        length = round(cfg.keep_warmup_epochs * max_epochs)
        self._train_rate = keep_rate_schedule(cfg.keep_rate, epoch, start, length)

    def _prune(self, x: torch.Tensor, scores: torch.Tensor, k: int) -> tuple[torch.Tensor, Selection]:
        return prune(x, scores, k, fuse=self.cfg.fuse, normalize=self.cfg.fuse_normalize, num_prefix=self.num_prefix)

    def _map(self, block: int, where: torch.Tensor) -> TokenMap:
        if not self.cfg.fuse:
            return super()._map(block, where)
        # [deviation from the spec's "kept" map] A kept map would read 0 for fused patches, and its count of ones
        # would vary per image once an earlier fused token is kept again. The assignment map is exact instead: each
        # patch points at the token carrying it, its own or the fused one (spec §10's optional map).
        return TokenMap(block, "assignment", where)
