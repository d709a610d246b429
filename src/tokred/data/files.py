"""Datasets read from local files: CIFAR-10/100 (torchvision's pickled batches) and ImageNet-style ImageFolders.

Nothing downloads unless ``dataset.download=true`` (CIFAR only). Every problem with the files on disk is reported as
a one-line :class:`DatasetError` that says how to get or fix the data.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Mapping

from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import CIFAR10, CIFAR100, ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from tokred.data.errors import DatasetError
from tokred.data.transforms import eval_transform, train_transform


class _PresenceChecked:
    """torchvision's CIFAR with file-presence checks instead of MD5s (``dataset.verify=false``): for re-packed
    copies and for test fixtures, whose bytes cannot match the published checksums."""

    def _check_integrity(self) -> bool:
        folder = Path(self.root) / self.base_folder
        return all((folder / name).is_file() for name, _ in self.train_list + self.test_list)

    def _load_meta(self) -> None:
        with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}


class _UnverifiedCIFAR10(_PresenceChecked, CIFAR10):
    pass


class _UnverifiedCIFAR100(_PresenceChecked, CIFAR100):
    pass


CIFAR = {"cifar10": (CIFAR10, _UnverifiedCIFAR10, "CIFAR-10"), "cifar100": (CIFAR100, _UnverifiedCIFAR100, "CIFAR-100")}


def cifar(cfg: Mapping[str, Any]) -> tuple[Dataset, Dataset, int]:
    verified, unverified, title = CIFAR[cfg["name"]]
    cls = verified if cfg.get("verify", True) else unverified
    root = Path(cfg["root"]).expanduser()
    folder = root / cls.base_folder
    download = bool(cfg.get("download", False))
    if not folder.is_dir() and not download:
        raise DatasetError(
            f"{title} not found: {folder} does not exist; download it once with dataset.download=true "
            f"(~170 MB from {cls.url}) or set dataset.root to the directory that holds {cls.base_folder}/"
        )
    try:
        train = cls(str(root), train=True, transform=train_transform(cfg), download=download)
        val = cls(str(root), train=False, transform=eval_transform(cfg), download=False)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted", "metadata file ... corrupted"
        raise DatasetError(
            f"{title} under {folder} is incomplete or fails torchvision's checksums ({str(err).splitlines()[0]}); "
            "delete the folder and re-download it with dataset.download=true, or set dataset.verify=false for a "
            "re-packed copy"
        ) from None
    except OSError as err:  # a failed download (no network) or an unreadable batch file
        raise DatasetError(
            f"cannot get {title} into {root} ({type(err).__name__}: {err}); download {cls.url} yourself and "
            f"extract it there (it unpacks to {cls.base_folder}/)"
        ) from None
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError) as err:
        raise DatasetError(
            f"{title} batch files under {folder} are damaged ({type(err).__name__}); delete the folder and "
            "re-download it with dataset.download=true"
        ) from None
    return train, val, len(train.classes)


def load_image(path: str) -> Image.Image:
    """PIL loader that turns a corrupt, truncated or non-image file into a DatasetError naming the file."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, ValueError, SyntaxError) as err:  # PIL.UnidentifiedImageError is an OSError
        raise DatasetError(
            f"cannot read image {path} ({type(err).__name__}); the file is corrupt or not an image: delete or "
            "replace it (or re-extract the dataset)"
        ) from None


class _Folder(ImageFolder):
    """An ImageFolder split whose class indices come from the training split, so val/ may lack a class."""

    def __init__(self, root: Path, classes: list[str] | None, **kwargs: Any) -> None:
        self._given = classes
        super().__init__(str(root), loader=load_image, allow_empty=classes is not None, **kwargs)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        if self._given is None:
            return super().find_classes(directory)
        extra = sorted(e.name for e in os.scandir(directory) if e.is_dir() and e.name not in self._given)
        if extra:
            raise DatasetError(
                f"{directory} has class folders that train/ lacks ({', '.join(extra[:5])}); "
                "train/ and val/ must use the same class folder names"
            )
        return self._given, {name: i for i, name in enumerate(self._given)}


def _split(root: Path, split: str, classes: list[str] | None, transform: Any, check_empty: bool) -> _Folder:
    path = root / split
    if not path.is_dir():
        raise DatasetError(
            f"ImageFolder split {path} does not exist; dataset.root must hold train/<class>/<image> and "
            f"val/<class>/<image> (set dataset.root=<that directory>)"
        )
    try:
        folder = _Folder(path, classes, transform=transform)
    except FileNotFoundError as err:  # torchvision: no class folders, or class folders without images
        raise DatasetError(
            f"no usable images under {path} ({str(err).splitlines()[0]}); put images with one of the extensions "
            f"{', '.join(IMG_EXTENSIONS)} in {path}/<class>/"
        ) from None
    if not folder.samples:
        raise DatasetError(f"no images under {path}; put images in {path}/<class>/")
    if check_empty:
        empty = [p for p, _ in folder.samples if os.path.getsize(p) == 0]
        if empty:
            raise DatasetError(
                f"{len(empty)} empty image file(s) under {path}, e.g. {empty[0]}; delete or re-extract them "
                "(dataset.check_empty=false skips this scan)"
            )
    return folder


def image_folder(cfg: Mapping[str, Any]) -> tuple[Dataset, Dataset, int]:
    root = Path(cfg["root"]).expanduser()
    if not root.is_dir():
        raise DatasetError(
            f"dataset.root={root} does not exist; point it at a directory with train/<class>/<image> and "
            "val/<class>/<image> (for ImageNet: the extracted ILSVRC2012 train and val sets, val sorted into "
            "class folders)"
        )
    check = bool(cfg.get("check_empty", True))
    train = _split(root, "train", None, train_transform(cfg), check)
    val = _split(root, "val", train.classes, eval_transform(cfg), check)
    expected = cfg.get("num_classes")
    if expected is not None and int(expected) != len(train.classes):
        raise DatasetError(
            f"dataset.num_classes={expected} but {root / 'train'} has {len(train.classes)} class folders; fix the "
            "folders or set dataset.num_classes=null to use what is there"
        )
    return train, val, len(train.classes)
