"""Datasets read from local files: CIFAR-10/100 (torchvision's pickled batches, read by a restricted unpickler) and
ImageNet-style ImageFolders.

Nothing downloads unless ``dataset.download=true`` (CIFAR only). Every problem with the files on disk is reported as
a one-line :class:`DatasetError` that says how to get or fix the data.

Splits: CIFAR validates on ``dataset.val_size`` images held out of its training batches and tests on its official test
batch; an image folder validates on ``val/`` and tests on ``test/`` when there is one.
"""

from __future__ import annotations

import copy
import logging
import os
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import CIFAR10, CIFAR100, ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.datasets.utils import check_integrity, download_and_extract_archive

from tokred.data.errors import DatasetError
from tokred.data.transforms import eval_transform, train_transform

log = logging.getLogger(__name__)


class Splits(NamedTuple):
    """What a dataset builder returns: model selection uses ``val``; ``test`` (None: the dataset has none) is only
    scored once, after training."""

    train: Dataset
    val: Dataset
    test: Dataset | None
    num_classes: int


class SafeUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR's batch files hold: containers, strings, bytes, numbers and numpy arrays.

    A pickle names the classes and functions it calls while loading, so a crafted batch file run through plain
    ``pickle.load`` (torchvision's loader) executes code of its choosing; this one refuses every other name, whatever
    ``dataset.verify`` says (the checksums only hold for the published archive).
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}, which a CIFAR batch never holds")
        return super().find_class(module, name)


def _unpickle(path: Path) -> Any:
    with open(path, "rb") as f:
        return SafeUnpickler(f, encoding="latin1").load()


class CifarBatches(Dataset):
    """CIFAR-10/100 from the python batch files (torchvision's layout), read through :class:`SafeUnpickler`."""

    def __init__(
        self, folder: Path, files: list[str], meta: dict[str, str], label_key: str, transform: Callable | None
    ) -> None:
        batches = [_unpickle(folder / name) for name in files]
        self.data = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        self.targets = [int(y) for b in batches for y in b[label_key]]
        self.classes = list(_unpickle(folder / meta["filename"])[meta["key"]])
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = Image.fromarray(self.data[index])
        return (self.transform(image) if self.transform else image), self.targets[index]

    def subset(self, indices: np.ndarray, transform: Callable | None) -> CifarBatches:
        """The images at ``indices`` (in that order) under ``transform``."""
        part = copy.copy(self)
        part.data = self.data[indices]
        part.targets = [self.targets[i] for i in indices]
        part.transform = transform
        return part


def hold_out(num_images: int, val_size: int, title: str) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices): ``val_size`` of ``num_images`` drawn by a fixed seed, so every run validates on
    the same images; both sorted."""
    if not 0 < val_size < num_images:
        raise DatasetError(
            f"dataset.val_size={val_size}: {title} holds {num_images} training images, of which "
            f"validation takes 1 to {num_images - 1}; set dataset.val_size in that range"
        )
    order = np.random.default_rng(0).permutation(num_images)
    return np.sort(order[val_size:]), np.sort(order[:val_size])


# torchvision's classes supply the published layout, download address and checksums; they never read a batch here.
CIFAR = {"cifar10": (CIFAR10, "labels", "CIFAR-10"), "cifar100": (CIFAR100, "fine_labels", "CIFAR-100")}


def cifar(cfg: Mapping[str, Any]) -> Splits:
    spec, label_key, title = CIFAR[cfg["name"]]
    root = Path(cfg["root"]).expanduser()
    folder = root / spec.base_folder
    if not folder.is_dir() and not cfg.get("download", False):
        raise DatasetError(
            f"{title} not found: {folder} does not exist; download it once with dataset.download=true "
            f"(~170 MB from {spec.url}) or set dataset.root to the directory that holds {spec.base_folder}/"
        )
    try:
        if not folder.is_dir():
            download_and_extract_archive(spec.url, str(root), filename=spec.filename, md5=spec.tgz_md5)
        files = spec.train_list + spec.test_list + [(spec.meta["filename"], spec.meta["md5"])]
        check = check_integrity if cfg.get("verify", True) else (lambda path, md5: os.path.isfile(path))
        bad = [name for name, md5 in files if not check(str(folder / name), md5)]
        if bad:
            raise DatasetError(
                f"{title} under {folder} is incomplete or fails the published checksums ({', '.join(bad)}); delete "
                "the folder and re-download it with dataset.download=true, or set dataset.verify=false for a "
                "re-packed copy"
            )
        official_train = CifarBatches(folder, [n for n, _ in spec.train_list], spec.meta, label_key, None)
        test = CifarBatches(folder, [n for n, _ in spec.test_list], spec.meta, label_key, eval_transform(cfg))
    except OSError as err:  # a failed download (no network) or an unreadable batch file
        raise DatasetError(
            f"cannot get {title} into {root} ({type(err).__name__}: {err}); download {spec.url} yourself and "
            f"extract it there (it unpacks to {spec.base_folder}/)"
        ) from None
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, AttributeError) as err:
        raise DatasetError(
            f"{title} batch files under {folder} are damaged or not CIFAR batches ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); delete the folder and re-download it with "
            "dataset.download=true"
        ) from None
    train_idx, val_idx = hold_out(len(official_train), int(cfg["val_size"]), title)
    train = official_train.subset(train_idx, train_transform(cfg))
    return Splits(train, official_train.subset(val_idx, eval_transform(cfg)), test, len(train.classes))


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
                "every split must use train/'s class folder names"
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


def image_folder(cfg: Mapping[str, Any]) -> Splits:
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
    test = _split(root, "test", train.classes, eval_transform(cfg), check) if (root / "test").is_dir() else None
    if test is None:
        log.info("%s has no test/ folder: no test split (test/<class>/<image> would add one)", root)
    expected = cfg.get("num_classes")
    if expected is not None and int(expected) != len(train.classes):
        raise DatasetError(
            f"dataset.num_classes={expected} but {root / 'train'} has {len(train.classes)} class folders; fix the "
            "folders or set dataset.num_classes=null to use what is there"
        )
    return Splits(train, val, test, len(train.classes))
