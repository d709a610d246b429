"""Token maps as pictures: which patches each reducer keeps, parks on the fast path, or merges.

Every reducer reports :class:`~tokred.reducers.base.TokenMap` s through one method, ``token_maps(images)``; this
module only draws them. Kept/informative maps dim the patches a block does not compute; assignment maps (SiT) colour
each input patch by the output token it feeds most.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import matplotlib

matplotlib.use("Agg")  # headless: figures are written to files or logged, never shown
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from lightning.pytorch.loggers import WandbLogger  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402

from tokred.data.datamodule import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from tokred.io import atomic_write  # noqa: E402
from tokred.reducers.base import TokenMap, TokenReducer  # noqa: E402

log = logging.getLogger("tokred")

KIND_LABEL = {"kept": "kept", "informative": "slow path", "assignment": "merged into"}


def denormalize(images: torch.Tensor) -> np.ndarray:
    """Model inputs (B, 3, H, W), ImageNet-normalised -> (B, H, W, 3) floats in [0, 1] for display."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()


# 60 distinct colours for assignment ids; ids beyond repeat, but group outlines (see draw_map) still separate them.
PALETTE = np.concatenate([plt.get_cmap(name)(np.arange(20))[:, :3] for name in ("tab20", "tab20b", "tab20c")])


def overlay(image: np.ndarray, token_map: torch.Tensor, kind: str) -> np.ndarray:
    """One image (H, W, 3) with one block's map (grid_h, grid_w) drawn over it."""
    h, w = image.shape[:2]
    up = F.interpolate(token_map[None, None].float().cpu(), size=(h, w), mode="nearest")[0, 0].numpy()
    if kind == "assignment":
        colours = PALETTE[up.astype(int) % len(PALETTE)]
        return 0.45 * image + 0.55 * colours
    grey = image.mean(axis=-1, keepdims=True).repeat(3, axis=-1)
    dropped = 0.15 + 0.25 * grey  # pruned / placeholder patches: dark and colourless, so kept ones stand out
    return np.where(up[..., None] > 0.5, image, dropped)


def group_edges(token_map: torch.Tensor, height: int, width: int) -> list[list[tuple[float, float]]]:
    """Line segments (image pixel coordinates) between neighbouring patches with different assignment ids."""
    ids = token_map.cpu().numpy()
    rows, cols = ids.shape
    ph, pw = height / rows, width / cols
    segments = []
    for r, c in zip(*np.nonzero(ids[:, 1:] != ids[:, :-1])):  # vertical edge right of patch (r, c)
        x = (c + 1) * pw - 0.5
        segments.append([(x, r * ph - 0.5), (x, (r + 1) * ph - 0.5)])
    for r, c in zip(*np.nonzero(ids[1:] != ids[:-1])):  # horizontal edge below patch (r, c)
        y = (r + 1) * ph - 0.5
        segments.append([(c * pw - 0.5, y), ((c + 1) * pw - 0.5, y)])
    return segments


def draw_map(ax: plt.Axes, image: np.ndarray, token_map: torch.Tensor, kind: str) -> None:
    """``overlay`` on ``ax``; assignment maps also get white outlines around each merged group, so groups whose
    colours repeat (more ids than palette entries) or look alike stay apart."""
    ax.imshow(overlay(image, token_map, kind))
    if kind == "assignment":
        ax.add_collection(LineCollection(group_edges(token_map, *image.shape[:2]), colors="white", linewidths=0.6))


def select_blocks(maps: Sequence[TokenMap], most: int = 4) -> list[int]:
    """Blocks worth showing: those whose map differs from the previous block's, evenly thinned to ``most``."""
    changes = [m.block for i, m in enumerate(maps) if i == 0 or not torch.equal(m.values, maps[i - 1].values)]
    if len(changes) <= 1:
        changes = [maps[0].block, maps[-1].block]
    picks = np.linspace(0, len(changes) - 1, min(most, len(changes))).round().astype(int)
    return sorted({changes[i] for i in picks})


def summarize(token_map: TokenMap) -> str:
    """A title note for one block, averaged over the images: the share kept / on the slow path, or the number of
    groups the patches are merged into."""
    if token_map.kind == "assignment":
        groups = round(float(np.mean([len(v.unique()) for v in token_map.values])))
        return f"{groups} group{'s' * (groups != 1)}"
    return f"{100 * token_map.values.gt(0.5).float().mean().item():.0f}% {KIND_LABEL[token_map.kind]}"


def reducer_figure(
    images: torch.Tensor, maps: Sequence[TokenMap], blocks: Sequence[int] | None = None, title: str = ""
) -> plt.Figure:
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
            draw_map(axes[row, col], picture, m.values[row], m.kind)
    for col, block in enumerate(blocks, start=1):
        axes[0, col].set_title(f"block {block} ({summarize(by_block[block])})", fontsize=7)
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
    fig, axes = plt.subplots(
        len(pictures), 1 + len(names), figsize=(1.9 * (1 + len(names)), 1.9 * len(pictures)), squeeze=False
    )
    for col, name in enumerate(names, start=1):
        chosen = select_blocks(maps[name], most=3)
        block = chosen[len(chosen) // 2]
        m = next(m for m in maps[name] if m.block == block)
        axes[0, col].set_title(f"{name}\nblock {block} ({summarize(m)})", fontsize=7)
        for row, picture in enumerate(pictures):
            draw_map(axes[row, col], picture, m.values[row], m.kind)
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
    """Every ``every_n_epochs`` validations and at the last epoch of each fit, draw the token maps of the first ``n``
    validation images: saved as ``<out_dir>/<phase>_epoch_<e>.png`` (phases restart their epoch count) and logged to
    wandb under ``token_maps`` when a WandbLogger is attached. The model is drawn in eval mode, as deployed."""

    def __init__(self, out_dir: Path, every_n_epochs: int = 5, n: int = 8) -> None:
        self.out_dir = Path(out_dir)
        self.every_n_epochs = every_n_epochs
        self.n = n
        self.failures: list[str] = []  # one line per drawing that failed; the run reports them when it ends

    def due(self, epoch: int, max_epochs: int) -> bool:
        """Whether the validation ending (0-based) ``epoch`` of a ``max_epochs`` fit is drawn."""
        return (epoch + 1) % self.every_n_epochs == 0 or epoch + 1 == max_epochs

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (
            trainer.sanity_checking
            or not trainer.is_global_zero
            or not self.due(trainer.current_epoch, trainer.max_epochs)
        ):
            return
        model: TokenReducer = pl_module.model
        was_training, phase, epoch = model.training, model.phase or "fit", trainer.current_epoch
        try:
            self.draw(trainer, model, phase, epoch)
        except Exception as err:  # noqa: BLE001 - a figure is never worth the training run
            run_dir = self.out_dir.parent
            log.warning(
                "token maps of %s epoch %d failed (%s: %s); draw them later with tokred-visualize ckpt_path=%s",
                phase,
                epoch,
                type(err).__name__,
                err,
                run_dir,
            )
            self.failures.append(
                f"drawing token maps failed ({type(err).__name__}; redo: tokred-visualize ckpt_path={run_dir})"
            )
        finally:
            model.train(was_training)

    def draw(self, trainer: L.Trainer, model: TokenReducer, phase: str, epoch: int) -> None:
        dataset = trainer.datamodule.val_set
        device = next(model.parameters()).device
        images = torch.stack([dataset[i][0] for i in range(min(self.n, len(dataset)))]).to(device)
        model.eval()
        maps = model.token_maps(images)
        fig = reducer_figure(images, maps, title=f"{model.name} - {phase} epoch {epoch}")
        path = save_figure(fig, self.out_dir / f"{phase}_epoch_{epoch:03d}.png")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("token_maps", [str(path)], step=trainer.global_step)


def token_map_callbacks(cfg: Mapping[str, Any] | None, run_dir: Path) -> list[Callback]:
    """The training run's token-map callback from ``cfg.visualize`` (``every_n_epochs``: 0 or unset = off)."""
    cfg = cfg or {}
    every, n = int(cfg.get("every_n_epochs", 0)), int(cfg.get("n", 8))
    if every < 0:
        raise ValueError(f"visualize.every_n_epochs={every} must be >= 0 (0: no token maps during training)")
    if n < 1:
        raise ValueError(f"visualize.n={n} must be >= 1 (validation images drawn per figure)")
    return [TokenMapCallback(run_dir / "token_maps", every, n)] if every else []
