"""AdamW parameter groups and the learning-rate schedules of the four papers' recipes."""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from tokred.reducers.base import TokenReducer


def build_param_groups(model: TokenReducer, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """Reducer-specific groups first, then decay / no-decay for the rest.

    No decay on 1-D parameters (norms, biases, LayerScale) and on what the model names (pos-embed, CLS token):
    the DeiT convention all four recipes inherit.
    """
    groups: list[dict[str, Any]] = []
    claimed: set[int] = set()
    for spec in model.param_groups():
        params = [p for p in spec.params if p.requires_grad]
        claimed.update(id(p) for p in spec.params)
        if params:
            wd = weight_decay if spec.weight_decay is None else spec.weight_decay
            groups.append({"name": spec.name, "params": params, "lr": lr * spec.lr_mult, "weight_decay": wd})
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in claimed:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    groups.append({"name": "decay", "params": decay, "lr": lr, "weight_decay": weight_decay})
    groups.append({"name": "no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def lr_factor(step: int, steps_per_epoch: int, cfg: Mapping[str, Any], max_epochs: int, peak: float) -> float:
    """Multiplier of the peak LR at optimiser step ``step``.

    ``scheduler``: ``cosine`` (DeiT: linear warm-up from ``warmup_lr``, cosine to ``min_lr``) or ``constant``
    (ViT-Slim's search). ``per_epoch: true`` holds the LR for a whole epoch (SiT's schedule); ``cooldown_epochs``
    are spent at ``min_lr`` after the cosine ends (SiT's 125 + 10).
    """
    if cfg.get("scheduler", "cosine") == "constant":
        return 1.0
    epoch = step / max(steps_per_epoch, 1)
    if cfg.get("per_epoch", False):
        epoch = math.floor(epoch)
    warmup = float(cfg.get("warmup_epochs", 0))
    min_lr, warmup_lr = float(cfg.get("min_lr", 0.0)), float(cfg.get("warmup_lr", 0.0))
    if epoch < warmup:
        return (warmup_lr + (peak - warmup_lr) * epoch / warmup) / peak
    decay_epochs = max(max_epochs - int(cfg.get("cooldown_epochs", 0)) - warmup, 1e-8)
    progress = min((epoch - warmup) / decay_epochs, 1.0)
    return (min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * progress))) / peak


def build_optimizer(model: TokenReducer, cfg: Mapping[str, Any], lr: float) -> torch.optim.Optimizer:
    groups = build_param_groups(model, lr, float(cfg["weight_decay"]))
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.get("betas", (0.9, 0.999))), eps=float(cfg.get("eps", 1e-8)))


def effective_lr(cfg: Mapping[str, Any], global_batch: int) -> float:
    """DeiT's linear scaling rule: ``lr * global_batch / lr_batch`` when ``lr_batch`` is set."""
    ref = cfg.get("lr_batch")
    return float(cfg["lr"]) * (global_batch / float(ref) if ref else 1.0)
