"""DeiT-style augmentation from timm's data utilities, configured by ``dataset.aug``.

Training: RandomResizedCrop + flip + RandAugment + random erasing (``timm.data.create_transform``), and mixup/cutmix
on whole batches (``timm.data.Mixup``, applied in the training step). Evaluation: resize to ``img_size / crop_pct``
then centre-crop ``img_size``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform

# Keys of dataset.aug that only image-file datasets (PIL pipelines) use; the built-in dataset rejects them.
PIL_AUG_KEYS = ("auto_augment", "color_jitter", "scale", "interpolation", "re_prob", "re_mode", "re_count")


def train_transform(cfg: Mapping[str, Any]) -> Callable:
    aug = cfg["aug"]
    return create_transform(
        input_size=int(cfg["img_size"]),
        is_training=True,
        scale=tuple(aug["scale"]),
        hflip=float(aug["hflip"]),
        color_jitter=float(aug["color_jitter"]),
        auto_augment=aug["auto_augment"] or None,
        interpolation=aug["interpolation"],
        re_prob=float(aug["re_prob"]),
        re_mode=aug["re_mode"],
        re_count=int(aug["re_count"]),
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
    )


def eval_transform(cfg: Mapping[str, Any]) -> Callable:
    return create_transform(
        input_size=int(cfg["img_size"]),
        is_training=False,
        crop_pct=float(cfg.get("crop_pct", 0.875)),
        interpolation=cfg["aug"].get("interpolation", "bicubic"),
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
    )


def build_mixup(aug: Mapping[str, Any], num_classes: int, label_smoothing: float) -> Mixup | None:
    """timm's batch mixup/cutmix (soft, smoothed targets), or None when both alphas are 0."""
    mixup, cutmix = float(aug.get("mixup", 0.0)), float(aug.get("cutmix", 0.0))
    if mixup <= 0 and cutmix <= 0:
        return None
    return Mixup(
        mixup_alpha=mixup,
        cutmix_alpha=cutmix,
        prob=float(aug.get("mixup_prob", 1.0)),
        switch_prob=float(aug.get("mixup_switch_prob", 0.5)),
        mode=aug.get("mixup_mode", "batch"),
        label_smoothing=label_smoothing,
        num_classes=num_classes,
    )
