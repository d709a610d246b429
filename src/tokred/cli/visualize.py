"""``tokred-visualize ckpt_path=<ckpt | [a,b,...]> images=<val | train | dir> n=8 [blocks=[...]] [overrides]``.

Draws which tokens each model keeps, parks on the fast path or merges (:mod:`tokred.visualize`). Every checkpoint
(any form ``tokred-eval`` reads: run or export directory, phase snapshot, Lightning checkpoint) is rebuilt as deployed,
in eval mode. Writes ``<reducer>.png`` per model (one row per image: the input, then the map of each selected block)
and, for several checkpoints, ``comparison.png`` with the models side by side on the same images, into the run
directory (``outputs/visualize/<time>``); prints the paths. Bad input prints one line, ``tokred-visualize: error: ...``.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, ListConfig, open_dict
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from tokred.cli.eval import load_checkpoint
from tokred.cli.train import USER_ERRORS
from tokred.config import ConfigError, check_overrides, conf_dir, fail, null_groups
from tokred.data import DatasetError, build_datamodule
from tokred.data.transforms import eval_transform
from tokred.reducers.base import TokenMap, TokenReducer
from tokred.visualize import comparison_figure, reducer_figure, save_figure

SPLITS = ("train", "val")


def checkpoint_paths(value: Any) -> list[str]:
    """``ckpt_path`` as a list: one path, or several from ``ckpt_path=[a,b,c]``."""
    paths = [str(p) for p in value] if isinstance(value, (list, ListConfig)) else [str(value)]
    if not paths or any(p in ("", "None") for p in paths):
        raise ConfigError(
            "ckpt_path is required: a run directory, its export/, a phases/*.pt or a "
            "checkpoints/*/*.ckpt file, or several as ckpt_path=[a,b]"
        )
    return paths


def directory_images(folder: Path, n: int, transform: Callable[[Image.Image], torch.Tensor]) -> torch.Tensor:
    """The first ``n`` image files under ``folder`` (recursive, sorted by path) as a (n, 3, H, W) batch."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
    if not files:
        raise DatasetError(
            f"images={folder} holds no image files ({', '.join(IMG_EXTENSIONS)}); point it at a "
            "folder of pictures, or use images=val / images=train"
        )
    batch = []
    for path in files[:n]:
        try:
            with Image.open(path) as image:
                batch.append(transform(image.convert("RGB")))
        except (OSError, UnidentifiedImageError) as err:
            raise DatasetError(f"cannot read image {path} ({type(err).__name__}); remove or replace it") from None
    return torch.stack(batch)


def split_images(dataset: Dataset, n: int) -> torch.Tensor:
    """The first ``n`` images of a dataset split, as the model sees them."""
    if len(dataset) == 0:
        raise DatasetError("the dataset split holds no images")
    return torch.stack([dataset[i][0] for i in range(min(n, len(dataset)))])


def load_images(spec: str, n: int, dataset_cfg: DictConfig) -> torch.Tensor:
    """``images=``: a split of ``dataset`` (evaluation transform, no augmentation) or a directory of files, resized
    and centre-cropped to ``dataset.img_size`` and normalised like the datasets (ImageNet mean/std)."""
    if spec in SPLITS:
        datamodule = build_datamodule(dataset_cfg)
        # The training split carries augmentations; drawn maps should show the images as they are.
        dataset = datamodule.val_set if spec == "val" else datamodule.train_set_for_eval
        return split_images(dataset, n)
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise DatasetError(f"images={spec} is neither a dataset split ({', '.join(SPLITS)}) nor an existing directory")
    transform = eval_transform(
        {
            "img_size": int(dataset_cfg.img_size),
            "crop_pct": dataset_cfg.get("crop_pct", 0.875),
            "aug": dataset_cfg.get("aug") or {},
        }
    )
    return directory_images(folder, n, transform)


def unique_labels(names: Sequence[str]) -> list[str]:
    """Reducer names as figure labels and file names; repeats get -2, -3, ... (two budgets of one method)."""
    counts, seen = Counter(names), Counter()
    labels = []
    for name in names:
        seen[name] += 1
        labels.append(name if counts[name] == 1 else f"{name}-{seen[name]}")
    return labels


def check_blocks(blocks: Sequence[int] | None, maps: dict[str, list[TokenMap]]) -> list[int] | None:
    """``blocks=`` as a list of block indices that every model has, or None (automatic choice per model)."""
    if blocks is None:
        return None
    blocks = [int(b) for b in blocks]
    for label, model_maps in maps.items():
        missing = sorted(set(blocks) - {m.block for m in model_maps})
        if missing or not blocks:
            raise ConfigError(
                f"blocks={blocks}: {label} has blocks 0..{len(model_maps) - 1}; choose some of those "
                "or blocks=null for the automatic choice"
            )
    return blocks


def visualize(
    models: Sequence[tuple[TokenReducer, dict[str, Any]]],
    sources: Sequence[str],
    images: torch.Tensor,
    out_dir: Path,
    blocks: Sequence[int] | None = None,
) -> list[Path]:
    """Draw the token maps of each loaded checkpoint (``(model, meta)`` from :func:`load_checkpoint`, read from
    ``sources``) on ``images`` into ``out_dir``; returns the PNGs written, the comparison last."""
    labels = unique_labels([meta["reducer"]["name"] for _, meta in models])
    maps = {label: model.token_maps(images) for label, (model, _) in zip(labels, models)}
    blocks = check_blocks(blocks, maps)
    written = []
    for label, source, (model, _) in zip(labels, sources, models):
        title = f"{label} ({model.cost().gmacs:.3g} GMACs) - {source}"
        written.append(save_figure(reducer_figure(images, maps[label], blocks, title=title), out_dir / f"{label}.png"))
    if len(models) > 1:
        written.append(save_figure(comparison_figure(images, maps), out_dir / "comparison.png"))
    return written


@hydra.main(config_path=str(conf_dir()), config_name="visualize", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        if int(cfg.n) < 1:
            raise ConfigError(f"n={cfg.n} must be >= 1 (images drawn, one row each)")
        paths = checkpoint_paths(cfg.ckpt_path)
        models = [load_checkpoint(p) for p in paths]
        sizes = {int(meta["backbone"]["img_size"]) for _, meta in models}
        if len(sizes) > 1:
            raise ConfigError(
                f"the checkpoints take images of different sizes ({sorted(sizes)} px); compare models of one input size"
            )
        with open_dict(cfg):
            cfg.backbone = models[0][1]["backbone"]  # the dataset's img_size refers to it
        images = load_images(str(cfg.images), int(cfg.n), cfg.dataset)
        written = visualize(models, paths, images, Path(cfg.paths.output_dir), cfg.blocks)
    except USER_ERRORS as err:
        fail("tokred-visualize", err)
    for path in written:
        print(path, flush=True)


def main() -> None:
    sys.argv[1:] = null_groups(sys.argv[1:])  # logger=null -> ~logger, which Hydra accepts
    try:
        check_overrides(sys.argv[1:], "visualize")
    except USER_ERRORS as err:
        fail("tokred-visualize", err)
    _hydra_main()


if __name__ == "__main__":
    main()
