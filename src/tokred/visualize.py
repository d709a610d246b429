"""Token maps as pictures: which patches each reducer keeps, parks on the fast path, or merges.

Every reducer reports :class:`~tokred.reducers.base.TokenMap` s through one method, ``token_maps(images)``; this
module only draws them. Kept/informative maps dim the patches a block does not compute; assignment maps (SiT) colour
each input patch by the output token it feeds most.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: figures are written to files or logged, never shown
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from lightning.pytorch.loggers import WandbLogger  # noqa: E402

from tokred.data.datamodule import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from tokred.io import atomic_write  # noqa: E402
from tokred.reducers.base import TokenMap, TokenReducer  # noqa: E402

KIND_LABEL = {"kept": "kept", "informative": "slow path", "assignment": "merged into"}


def denormalize(images: torch.Tensor) -> np.ndarray:
    """Model inputs (B, 3, H, W), ImageNet-normalised -> (B, H, W, 3) floats in [0, 1] for display."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()


def overlay(image: np.ndarray, token_map: torch.Tensor, kind: str) -> np.ndarray:
    """One image (H, W, 3) with one block's map (grid_h, grid_w) drawn over it."""
    h, w = image.shape[:2]
    up = F.interpolate(token_map[None, None].float().cpu(), size=(h, w), mode="nearest")[0, 0].numpy()
    if kind == "assignment":
        palette = plt.get_cmap("tab20")(np.arange(20))[:, :3]
        colours = palette[up.astype(int) % 20]
        return 0.45 * image + 0.55 * colours
    grey = image.mean(axis=-1, keepdims=True).repeat(3, axis=-1)
    dropped = 0.15 + 0.25 * grey  # pruned / placeholder patches: dark and colourless, so kept ones stand out
    return np.where(up[..., None] > 0.5, image, dropped)


def select_blocks(maps: Sequence[TokenMap], most: int = 4) -> list[int]:
    """Blocks worth showing: those whose map differs from the previous block's, evenly thinned to ``most``."""
    changes = [m.block for i, m in enumerate(maps) if i == 0 or not torch.equal(m.values, maps[i - 1].values)]
    if len(changes) <= 1:
        changes = [maps[0].block, maps[-1].block]
    picks = np.linspace(0, len(changes) - 1, min(most, len(changes))).round().astype(int)
    return sorted({changes[i] for i in picks})


def reducer_figure(images: torch.Tensor, maps: Sequence[TokenMap], blocks: Sequence[int] | None = None,
                   title: str = "") -> plt.Figure:
    """One row per image: the input, then the token map of each selected block."""
    blocks = list(blocks) if blocks else select_blocks(maps)
    by_block = {m.block: m for m in maps}
    pictures = denormalize(images)
    n, cols = len(pictures), 1 + len(blocks)
    fig, axes = plt.subplots(n, cols, figsize=(1.8 * cols, 1.8 * n), squeeze=False)
    for row, picture in enumerate(pictures):
        axes[row, 0].imshow(picture)
        for col, block in enumerate(blocks, start=1):
            m = by_block[block]
            axes[row, col].imshow(overlay(picture, m.values[row], m.kind))
            if row == 0:
                kept = m.values[row].gt(0.5).float().mean().item()
                note = "" if m.kind == "assignment" else f" ({100 * kept:.0f}% {KIND_LABEL[m.kind]})"
                axes[0, col].set_title(f"block {block}{note}", fontsize=7)
    axes[0, 0].set_title("input", fontsize=7)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def comparison_figure(images: torch.Tensor, maps: dict[str, Sequence[TokenMap]]) -> plt.Figure:
    """Reducers side by side on the same images, each at the middle one of its blocks where the map changes."""
    pictures = denormalize(images)
    names = list(maps)
    fig, axes = plt.subplots(len(pictures), 1 + len(names), figsize=(1.9 * (1 + len(names)), 1.9 * len(pictures)),
                             squeeze=False)
    for col, name in enumerate(names, start=1):
        chosen = select_blocks(maps[name], most=3)
        block = chosen[len(chosen) // 2]
        m = next(m for m in maps[name] if m.block == block)
        axes[0, col].set_title(f"{name}\nblock {block}", fontsize=7)
        for row, picture in enumerate(pictures):
            axes[row, col].imshow(overlay(picture, m.values[row], m.kind))
    for row, picture in enumerate(pictures):
        axes[row, 0].imshow(picture)
    axes[0, 0].set_title("input", fontsize=7)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.tight_layout()
    return fig


def save_figure(fig: plt.Figure, path: Path) -> Path:
    atomic_write(path, lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)
    return path


class TokenMapCallback(Callback):
    """Every ``every_n_epochs`` validations, draw the token maps of ``n`` fixed validation images: saved under
    ``<run_dir>/token_maps/`` and logged to wandb when a WandbLogger is attached."""

    def __init__(self, out_dir: Path, every_n_epochs: int = 1, n: int = 8) -> None:
        self.out_dir = Path(out_dir)
        self.every_n_epochs = every_n_epochs
        self.n = n

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        dataset = trainer.datamodule.val_set
        images = torch.stack([dataset[i][0] for i in range(min(self.n, len(dataset)))]).to(pl_module.device)
        model: TokenReducer = pl_module.model
        was_training = model.training
        model.eval()
        maps = model.token_maps(images)
        model.train(was_training)
        fig = reducer_figure(images, maps, title=f"{model.name} - epoch {trainer.current_epoch}")
        path = save_figure(fig, self.out_dir / f"epoch_{trainer.current_epoch:03d}.png")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("token_maps", [str(path)], step=trainer.global_step)
