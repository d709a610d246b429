"""Datasets: the built-in one, CIFAR-10/100 and ImageFolder read from tiny on-disk fixtures, DeiT augmentation."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.auto_augment import RandAugment
from timm.data.distributed_sampler import RepeatAugSampler
from timm.data.random_erasing import RandomErasing
from torchvision import transforms as T

from tokred.config import compose_config
from tokred.data import DatasetError, build_datamodule
from tokred.data.synthetic import PALETTE, ShapesDataset, render_image, render_key_image
from tokred.data.transforms import build_mixup, eval_transform, train_transform


def dataset_cfg(*overrides: str):
    return compose_config([*overrides]).dataset


def write_cifar(root: Path, hundred: bool = False, per_batch: int = 4) -> Path:
    """torchvision's CIFAR layout: pickled dicts of uint8 rows (N, 3*32*32) with labels, plus the meta file."""
    rng = np.random.default_rng(0)
    classes = 100 if hundred else 10
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    key = "fine_labels" if hundred else "labels"

    def batch(name: str, offset: int) -> None:
        labels = [(offset + i) % classes for i in range(per_batch)]
        data = rng.integers(0, 256, (per_batch, 3 * 32 * 32), dtype=np.uint8)
        (folder / name).write_bytes(pickle.dumps({"data": data, key: labels}))

    names = (["train"], ["test"]) if hundred else ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"])
    for i, name in enumerate(names[0] + names[1]):
        batch(name, i * per_batch)
    meta_name, meta_key = ("meta", "fine_label_names") if hundred else ("batches.meta", "label_names")
    (folder / meta_name).write_bytes(pickle.dumps({meta_key: [f"class{i}" for i in range(classes)]}))
    return root


def write_image_folder(root: Path, train: dict[str, int], val: dict[str, int]) -> Path:
    rng = np.random.default_rng(0)
    for split, counts in (("train", train), ("val", val)):
        for cls, n in counts.items():
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")
    return root


# ------------------------------------------------------------------------------------------------ built-in dataset
def test_synthetic_is_deterministic_balanced_and_mostly_background():
    a, b = ShapesDataset(40, 64, seed=3), ShapesDataset(40, 64, seed=3)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, ShapesDataset(40, 64, seed=4).images)
    assert not np.array_equal(a.images, ShapesDataset(40, 64, seed=3, split="val").images)
    assert np.bincount(a.labels).tolist() == [4] * 10
    rng = np.random.default_rng(0)
    touched = []
    for label in range(10):
        _, mask = render_image(rng, label, 64)
        assert mask.any()
        touched.append(mask.reshape(8, 8, 8, 8).any(axis=(1, 3)).mean())  # 8x8 grid of 8-px patches
    assert max(touched) < 0.25, "the object must leave most patches to the background"


def test_synthetic_renders_at_224_px():
    image, label = ShapesDataset(2, 224, num_classes=2)[0]
    assert image.shape == (3, 224, 224) and label in (0, 1)


def test_synthetic_rejects_pil_augmentations():
    dm = build_datamodule(dataset_cfg("dataset.train_size=8", "dataset.val_size=4", "+dataset.aug.re_prob=0.25"))
    with pytest.raises(DatasetError, match="re_prob"):
        dm.num_classes


# ------------------------------------------------------------------------------------------------ built-in, hard task
def test_synthetic_hard_is_deterministic_per_seed_and_its_splits_are_disjoint():
    a, b = ShapesDataset(30, 64, seed=3, task="keys"), ShapesDataset(30, 64, seed=3, task="keys")
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, ShapesDataset(30, 64, seed=4, task="keys").images)
    assert a.images.dtype == np.uint8 and np.bincount(a.labels).tolist() == [3] * 10
    splits = [
        {image.tobytes() for image in ShapesDataset(30, 64, seed=3, split=s, task="keys").images}
        for s in ("train", "val", "test")
    ]
    assert len(set.union(*splits)) == 3 * 30, "no image is repeated within or across the splits"
    image, label = a[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    assert isinstance(label, int)


def _colour_histogram(image: np.ndarray, where: np.ndarray) -> np.ndarray:
    """Fraction of the saturated pixels under ``where`` nearest each palette colour (the background is desaturated)."""
    pixels = image[where].astype(float) / 255
    pixels = pixels[pixels.max(1) - pixels.min(1) > 0.6]
    nearest = np.argmin(((pixels[:, None] / pixels.max(1)[:, None, None] - PALETTE) ** 2).sum(-1), 1)
    return np.bincount(nearest, minlength=len(PALETTE)) / max(len(nearest), 1)


def _nearest_centroid_accuracy(features: np.ndarray, labels: np.ndarray) -> float:
    """Fit class means on the first half, score the second half."""
    half = len(labels) // 2
    centroids = np.stack([features[:half][labels[:half] == c].mean(0) for c in range(10)])
    predicted = np.argmin(((features[half:, None] - centroids) ** 2).sum(-1), 1)
    return float((predicted == labels[half:]).mean())


def test_synthetic_hard_class_is_read_off_the_keys_and_nothing_else():
    rng = np.random.default_rng(0)
    labels = np.arange(200) % 10
    whole, keys_only = [], []
    for label in labels:
        image, keys = render_key_image(rng, int(label), 128)
        white = (image > 230).all(-1)
        assert (white & keys).any() and not (white & ~keys).any(), "a white core marks the keys and nothing else"
        key_patches = keys.reshape(16, 8, 16, 8).any(axis=(1, 3)).sum()  # 16x16 grid of 8-px patches
        assert 1 <= key_patches <= 2, "each of the one or two keys lies within one patch"
        whole.append(_colour_histogram(image, np.ones_like(keys)))
        keys_only.append(_colour_histogram(image, keys))
    assert (np.argmax(keys_only, 1) == labels).all(), "the keys' colour is the class"
    assert _nearest_centroid_accuracy(np.stack(keys_only), labels) == 1.0
    # The image's colour statistics are drawn alike for every class: the label's colour takes the share of the coloured
    # pixels any other colour takes, and a classifier on them stays at chance (10%).
    whole = np.stack(whole)
    label_share = whole[np.arange(len(labels)), labels]
    assert abs(label_share.mean() - (1 - label_share).mean() / 9) < 0.01
    assert _nearest_centroid_accuracy(whole, labels) < 0.2


def test_synthetic_hard_config_builds_the_keys_task_at_128_px():
    cfg = compose_config(
        ["dataset=synthetic_hard", "backbone=deit_tiny_cpu_128", "dataset.train_size=4", "dataset.val_size=2"]
    )
    dm = build_datamodule(cfg.dataset)
    images, _ = next(iter(dm.val_dataloader()))
    assert images.shape == (2, 3, 128, 128) and dm.num_classes == 10
    assert np.array_equal(dm.val_set.images, ShapesDataset(2, 128, seed=0, split="val", task="keys").images)


def test_synthetic_unknown_task_names_the_choices():
    with pytest.raises(ValueError, match="dataset.task='maze'.*shapes, keys"):
        ShapesDataset(2, 64, task="maze")


# ------------------------------------------------------------------------------------------------ CIFAR
def test_cifar10_reads_torchvisions_pickled_batches(tmp_path):
    cfg = dataset_cfg(
        "dataset=cifar10",
        f"dataset.root={write_cifar(tmp_path)}",
        "dataset.verify=false",
        "dataset.batch_size=4",
        "dataset.num_workers=0",
        "dataset.val_size=4",
    )
    dm = build_datamodule(cfg)
    assert dm.num_classes == 10 and len(dm.train_set) == 16 and len(dm.val_set) == 4 and len(dm.test_set) == 4
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 64, 64) and images.dtype == torch.float32 and labels.max() < 10
    first = dm.val_set[0][0]
    assert torch.equal(first, dm.val_set[0][0]), "evaluation transforms are deterministic"
    assert not torch.equal(dm.train_set[0][0], dm.train_set[0][0]), "training transforms are random"


def test_cifar100_uses_the_fine_labels(tmp_path):
    cfg = dataset_cfg(
        "dataset=cifar100",
        f"dataset.root={write_cifar(tmp_path, hundred=True)}",
        "dataset.verify=false",
        "dataset.val_size=2",
    )
    dm = build_datamodule(cfg)
    assert dm.num_classes == 100 and sorted({y for _, y in dm.test_set}) == [4, 5, 6, 7]


def test_missing_cifar_root_says_how_to_get_the_data(tmp_path):
    dm = build_datamodule(dataset_cfg("dataset=cifar10", f"dataset.root={tmp_path / 'nowhere'}"))
    with pytest.raises(DatasetError) as err:
        dm.num_classes
    message = str(err.value)
    assert "\n" not in message and "dataset.download=true" in message and "cifar-10-batches-py" in message


def test_cifar_files_failing_the_checksums_name_the_fix(tmp_path):
    dm = build_datamodule(dataset_cfg("dataset=cifar10", f"dataset.root={write_cifar(tmp_path)}"))
    with pytest.raises(DatasetError) as err:
        dm.num_classes
    assert "\n" not in str(err.value) and "dataset.verify=false" in str(err.value)


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("verify", ["true", "false"])
def test_a_cifar_batch_that_would_run_code_is_refused_unexecuted(verify, tmp_path):
    root = write_cifar(tmp_path / "data")
    marker = tmp_path / "pwned"
    batch = root / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(pickle.dumps({"data": _RunsCode(marker), "labels": [0]}))
    assert not marker.exists()
    dm = build_datamodule(dataset_cfg("dataset=cifar10", f"dataset.root={root}", f"dataset.verify={verify}"))
    with pytest.raises(DatasetError) as err:
        dm.num_classes
    assert not marker.exists(), "the pickle's code ran"
    message = str(err.value)
    assert "\n" not in message and ("posix.system" in message or "checksums" in message)


# ------------------------------------------------------------------------------------------------ ImageFolder
def test_image_folder_takes_class_indices_from_train(tmp_path):
    root = write_image_folder(tmp_path, {"ant": 2, "bee": 2, "cat": 2}, {"ant": 1, "cat": 2})
    dm = build_datamodule(dataset_cfg("dataset=imagefolder", f"dataset.root={root}", "dataset.num_workers=0"))
    assert dm.num_classes == 3
    assert [y for _, y in dm.val_set.samples] == [0, 2, 2], "val/ lacks 'bee' but keeps train's indices"
    image, _ = dm.val_set[0]
    assert image.shape == (3, 64, 64)


def test_image_folder_class_count_is_checked(tmp_path):
    root = write_image_folder(tmp_path, {"ant": 1, "bee": 1}, {"ant": 1})
    dm = build_datamodule(dataset_cfg("dataset=imagefolder", f"dataset.root={root}", "dataset.num_classes=1000"))
    with pytest.raises(DatasetError, match="has 2 class folders"):
        dm.num_classes


@pytest.mark.parametrize(
    "layout, fragment",
    [
        ("no_root", "does not exist"),
        ("no_val", "val does not exist"),
        ("no_images", "no usable images"),
    ],
)
def test_image_folder_layout_errors_are_one_line(tmp_path, layout, fragment):
    root = tmp_path / "data"
    if layout != "no_root":
        (root / "train" / "ant").mkdir(parents=True)
        if layout == "no_val":
            Image.new("RGB", (8, 8)).save(root / "train" / "ant" / "0.png")
    dm = build_datamodule(dataset_cfg("dataset=imagefolder", f"dataset.root={root}"))
    with pytest.raises(DatasetError) as err:
        dm.num_classes
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_empty_image_files_are_reported_up_front(tmp_path):
    root = write_image_folder(tmp_path, {"ant": 1, "bee": 1}, {"ant": 1})
    (root / "train" / "bee" / "broken.jpg").write_bytes(b"")
    dm = build_datamodule(dataset_cfg("dataset=imagefolder", f"dataset.root={root}"))
    with pytest.raises(DatasetError, match="1 empty image file.*broken.jpg.*delete or re-extract"):
        dm.num_classes


@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_image_is_one_line_naming_the_file(tmp_path, workers):
    root = write_image_folder(tmp_path, {"ant": 1}, {"ant": 1})
    (root / "val" / "ant" / "0.png").write_bytes(b"not a png at all")
    dm = build_datamodule(
        dataset_cfg(
            "dataset=imagefolder", f"dataset.root={root}", "dataset.batch_size=1", f"dataset.num_workers={workers}"
        )
    )
    with pytest.raises(DatasetError) as err:
        next(iter(dm.val_dataloader()))
    message = str(err.value)
    assert "\n" not in message and message.startswith("cannot read image") and "0.png" in message


# ------------------------------------------------------------------------------------------------ augmentation
def _types(transform) -> list[type]:
    return [type(t) for t in transform.transforms]


def test_deit_training_transforms_come_from_timm():
    kinds = _types(train_transform(dataset_cfg("dataset=cifar10")))
    assert {RandAugment, RandomErasing, T.RandomHorizontalFlip} <= set(kinds)
    plain = _types(
        train_transform(dataset_cfg("dataset=cifar10", "dataset.aug.auto_augment=null", "dataset.aug.re_prob=0"))
    )
    assert RandAugment not in plain and RandomErasing not in plain


def test_eval_transform_resizes_then_centre_crops():
    transform = eval_transform(dataset_cfg("dataset=imagefolder"))
    resize, crop = transform.transforms[:2]
    assert isinstance(resize, T.Resize) and resize.size == int(64 / 0.875)
    assert isinstance(crop, T.CenterCrop) and crop.size == (64, 64)
    assert transform(Image.new("RGB", (100, 80))).shape == (3, 64, 64)


def test_mixup_cutmix_give_soft_smoothed_targets():
    mixup = build_mixup(dataset_cfg("dataset=cifar10").aug, num_classes=10, label_smoothing=0.1)
    images, targets = mixup(torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3]))
    assert targets.shape == (4, 10) and torch.allclose(targets.sum(1), torch.ones(4))
    assert (targets > 0).all(), "label smoothing spreads mass over every class"
    assert build_mixup(dataset_cfg().aug, 10, 0.1) is None, "the built-in dataset trains without mixup"


def test_repeated_augmentation_uses_timms_sampler(tmp_path):
    cfg = dataset_cfg(
        "dataset=cifar10",
        f"dataset.root={write_cifar(tmp_path)}",
        "dataset.verify=false",
        "dataset.aug.repeated_aug=true",
        "dataset.batch_size=2",
        "dataset.num_workers=0",
        "dataset.val_size=4",
    )
    loader = build_datamodule(cfg).train_dataloader()
    assert isinstance(loader.sampler, RepeatAugSampler) and loader.sampler.num_repeats == 3
