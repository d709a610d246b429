"""Datasets as Lightning DataModules. ``build_datamodule(cfg.dataset)`` dispatches on ``cfg.source`` or ``cfg.name``."""

from tokred.data.datamodule import DATASETS, ImageDataModule, build_datamodule, uses_own_sampler
from tokred.data.errors import DatasetError

__all__ = ["DATASETS", "DatasetError", "ImageDataModule", "build_datamodule", "uses_own_sampler"]
