"""The built-in dataset: procedurally drawn textured shapes on clutter, no download needed.

Each image holds one small object at a random position, scale, small rotation and colour, on a background of colour
gradients, noise and distractor strokes. The class is carried by the object alone, twice: by its *shape* and by its
*texture* (stripes, checks, dots, rings ... in a darker shade of its colour). The texture is what lets a small ViT
learn the task in minutes on a CPU: it can be read off any single object patch, while the shape needs several.
Most patches are background, so a reducer that keeps the right tokens loses little accuracy and one that keeps the
wrong ones loses a lot. Images are generated deterministically from ``(seed, split)`` and held in memory as uint8.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

SHAPES = ("disk", "square", "triangle", "ring", "plus", "diamond", "frame", "half_disk", "bar_pair", "hourglass")
TEXTURES = ("solid", "h_stripes", "v_stripes", "checker", "dots", "h_bands", "v_bands", "grid", "cross_hatch", "rings")
# Texture period as a fraction of the image side: 3 px at 64 px, under half of an 8-px patch.
PERIOD = 3 / 64


def _stripe(t: np.ndarray) -> np.ndarray:
    return np.floor(t) % 2 == 0


# Where each texture shows the object's colour, from (a, b): offsets from the object centre in periods. Every
# texture maps to itself under a horizontal flip, the training augmentation, so flips never change the class.
_TEXTURE_MASKS = {
    "solid": lambda a, b: np.ones_like(a, bool),
    "h_stripes": lambda a, b: _stripe(b),
    "v_stripes": lambda a, b: _stripe(a),
    "checker": lambda a, b: _stripe(a) ^ _stripe(b),
    "dots": lambda a, b: np.hypot(a - np.round(a), b - np.round(b)) < 0.3,
    "h_bands": lambda a, b: _stripe(b / 2),
    "v_bands": lambda a, b: _stripe(a / 2),
    "grid": lambda a, b: (abs(a - np.round(a)) < 0.2) | (abs(b - np.round(b)) < 0.2),
    "cross_hatch": lambda a, b: _stripe((a + b) / 1.4) ^ _stripe((a - b) / 1.4),
    "rings": lambda a, b: _stripe(np.hypot(a, b)),
}


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Binary mask of ``shape`` in object coordinates (u, v), object radius 1."""
    r, m = np.hypot(u, v), np.maximum(abs(u), abs(v))
    return {
        "disk": r < 1.0,
        "square": m < 0.8,
        "triangle": (v > -0.85) & (v < 0.8) & (abs(u) < (v + 0.85) * 0.6),
        "ring": (r < 1.0) & (r > 0.55),
        "plus": ((abs(u) < 0.3) & (abs(v) < 1.0)) | ((abs(v) < 0.3) & (abs(u) < 1.0)),
        "diamond": abs(u) + abs(v) < 1.05,
        "frame": (m < 0.9) & (m > 0.55),
        "half_disk": (r < 1.0) & (v > 0.0),
        "bar_pair": (abs(v) < 1.0) & (abs(abs(u) - 0.6) < 0.22),
        "hourglass": (abs(v) < 0.9) & (abs(u) < abs(v) + 0.05),
    }[shape]


def render_image(rng: np.random.Generator, label: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One (size, size, 3) uint8 image of class ``label`` and the (size, size) bool mask of its object."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    # Background: a random two-colour gradient, dim and desaturated, plus pixel noise.
    c0, c1 = rng.uniform(0.1, 0.55, 3), rng.uniform(0.1, 0.55, 3)
    angle = rng.uniform(0, 2 * np.pi)
    t = (np.cos(angle) * xx + np.sin(angle) * yy + 1) / 2
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    # Distractors: short strokes and dots that are not any class's shape.
    for _ in range(rng.integers(4, 9)):
        x0, y0 = rng.uniform(0, 1, 2)
        length, theta, width = rng.uniform(0.08, 0.3), rng.uniform(0, np.pi), rng.uniform(0.008, 0.02)
        dx, dy = xx - x0, yy - y0
        along = dx * np.cos(theta) + dy * np.sin(theta)
        across = -dx * np.sin(theta) + dy * np.cos(theta)
        stroke = (abs(along) < length / 2) & (abs(across) < width)
        img[stroke] = rng.uniform(0.2, 0.9, 3)
    # The object: class shape and texture, random radius/position/rotation, saturated colour.
    radius = rng.uniform(0.11, 0.2)
    cx, cy = rng.uniform(radius, 1 - radius, 2)
    rot = rng.uniform(-0.3, 0.3)
    dx, dy = (xx - cx) / radius, (yy - cy) / radius
    u = dx * np.cos(rot) + dy * np.sin(rot)
    v = -dx * np.sin(rot) + dy * np.cos(rot)
    colour = rng.uniform(0.0, 1.0, 3)
    colour[rng.integers(3)] = 1.0
    mask = _shape_mask(SHAPES[label], u, v)
    texture = _TEXTURE_MASKS[TEXTURES[label]]((xx - cx) / PERIOD, (yy - cy) / PERIOD)
    img[mask] = np.where(texture[..., None], colour, 0.3 * colour)[mask]
    img = img + rng.normal(0, 0.04, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8), mask


class ShapesDataset(Dataset):
    """``size`` images at ``img_size`` px over ``num_classes`` (<= 10) shape classes, balanced, deterministic."""

    def __init__(
        self, size: int, img_size: int, num_classes: int = 10, seed: int = 0, split: str = "train", transform=None
    ) -> None:
        if not 2 <= num_classes <= len(SHAPES):
            raise ValueError(f"dataset.num_classes={num_classes}: the built-in dataset has 2..{len(SHAPES)} classes")
        split_id = {"train": 0, "val": 1, "test": 2}[split]
        rng = np.random.default_rng([seed, split_id])
        self.labels = np.arange(size) % num_classes
        rng.shuffle(self.labels)
        self.images = np.stack([render_image(rng, int(y), img_size)[0] for y in self.labels])
        self.num_classes = num_classes
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = torch.from_numpy(self.images[index]).permute(2, 0, 1).float().div_(255)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])
