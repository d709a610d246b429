"""One DataModule for every image-classification source; sources differ only in how they build their splits.

Model selection (best checkpoint, early stopping) uses the validation split; a dataset that has a held-out test split
(the built-in one, CIFAR, an image folder with ``test/``) is scored on it once, after training."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import v2

from tokred.data.errors import DatasetError
from tokred.data.files import Splits, cifar, image_folder
from tokred.data.synthetic import ShapesDataset
from tokred.data.transforms import PIL_AUG_KEYS

log = logging.getLogger(__name__)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _synthetic(cfg: Mapping[str, Any]) -> Splits:
    aug = cfg.get("aug") or {}
    unsupported = [k for k in PIL_AUG_KEYS if aug.get(k)]
    if unsupported:
        raise DatasetError(
            f"dataset={cfg['name']} does not use dataset.aug.{unsupported[0]} (only hflip, mixup, cutmix "
            "and repeated_aug); remove it or use an image dataset"
        )
    norm = v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    hflip = float(aug.get("hflip", 0.5))
    train_tf = v2.Compose([v2.RandomHorizontalFlip(hflip), norm]) if hflip > 0 else norm

    def make(split: str, size: int, transform: Callable) -> ShapesDataset:
        task = cfg.get("task", "shapes")
        return ShapesDataset(size, cfg["img_size"], cfg["num_classes"], cfg["seed"], split, transform, task)

    test_size = int(cfg.get("test_size") or 0)  # each split is drawn from its own random stream: disjoint
    return Splits(
        make("train", cfg["train_size"], train_tf),
        make("val", cfg["val_size"], norm),
        make("test", test_size, norm) if test_size else None,
        cfg["num_classes"],
    )


# dataset.source (default: dataset.name) -> builder of its splits.
DATASETS: dict[str, Callable[[Mapping[str, Any]], Splits]] = {
    "synthetic": _synthetic,
    "cifar10": cifar,
    "cifar100": cifar,
    "imagefolder": image_folder,
}


class ImageDataModule(L.LightningDataModule):
    """Train/val/test loaders over datasets built lazily by ``DATASETS[cfg.name]``.

    Samplers are Lightning's (distributed when the trainer is) unless ``aug.repeated_aug`` is set: then timm's
    RepeatAugSampler shards the training set itself, and the trainer must run with ``use_distributed_sampler=False``
    (:func:`uses_own_sampler`).
    """

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__()
        self.cfg = cfg
        self._splits: Splits | None = None

    def _build(self) -> Splits:
        if self._splits is None:
            self._splits = DATASETS[source(self.cfg)](self.cfg)
        return self._splits

    @property
    def num_classes(self) -> int:
        return self._build().num_classes

    @property
    def train_set(self) -> Dataset:
        return self._build().train

    @property
    def val_set(self) -> Dataset:
        return self._build().val

    @property
    def test_set(self) -> Dataset | None:
        """The held-out test split, or None for a dataset without one."""
        return self._build().test

    @property
    def train_set_for_eval(self) -> Dataset:
        """Training images under the validation transform: deterministic, for scoring and token maps.

        Datasets that keep their transform in ``.transform`` (torchvision, the built-in one) get a shallow copy with
        the validation transform; others are used as they are, with a warning.
        """
        train, val = self.train_set, self.val_set
        if hasattr(train, "transform") and hasattr(val, "transform"):
            view = copy.copy(train)
            view.transform = val.transform
            return view
        log.warning(
            "%s: cannot swap the training set's transform; it keeps its training augmentations",
            self.cfg.get("name", "dataset"),
        )
        return train

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _loader(self, dataset: Dataset, train: bool, sampler: Any = None) -> DataLoader:
        workers = int(self.cfg.get("num_workers", 0))
        return DataLoader(
            dataset,
            batch_size=int(self.cfg["batch_size"]),
            shuffle=train and sampler is None,
            sampler=sampler,
            drop_last=train,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        if not uses_own_sampler(self.cfg):
            return self._loader(self.train_set, train=True)
        replicas, rank = self._world()
        repeats = int(self.cfg["aug"].get("repeats", 3))
        return self._loader(self.train_set, True, RepeatAugSampler(self.train_set, replicas, rank, num_repeats=repeats))

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        replicas, rank = self._world()
        if uses_own_sampler(self.cfg) and replicas > 1:
            return self._loader(dataset, False, DistributedSampler(dataset, replicas, rank, shuffle=False))
        return self._loader(dataset, train=False)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        if self.test_set is None:
            raise DatasetError(f"dataset {self.cfg.get('name')} has no test split; score its validation split instead")
        return self._eval_loader(self.test_set)


def uses_own_sampler(cfg: Mapping[str, Any]) -> bool:
    """Whether the DataModule shards the data itself (repeated augmentation)."""
    return bool((cfg.get("aug") or {}).get("repeated_aug", False))


def source(cfg: Mapping[str, Any]) -> str:
    """The builder a dataset config uses: ``imagenet`` is an ImageFolder, ``synthetic`` is itself."""
    return cfg.get("source") or cfg["name"]


def build_datamodule(cfg: Mapping[str, Any]) -> ImageDataModule:
    if source(cfg) not in DATASETS:
        raise DatasetError(f"unknown dataset source {source(cfg)!r}; choose one of: {', '.join(sorted(DATASETS))}")
    return ImageDataModule(cfg)
