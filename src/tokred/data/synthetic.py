"""The built-in datasets: procedurally drawn shapes on clutter, no download needed.

Two tasks, both deterministic per ``(seed, split)`` and held in memory as uint8 images.

``shapes`` (dataset=synthetic): each image holds one small object at a random position, scale, small rotation and
colour, on a background of colour gradients, noise and distractor strokes. The class is carried by the object alone,
twice: by its *shape* and by its *texture* (stripes, checks, dots, rings ... in a darker shade of its colour). The
texture is what lets a small ViT learn the task in minutes on a CPU: it can be read off any single object patch,
while the shape needs several. Most patches are background, yet one object patch is enough, so at half the GMACs
every reducer stays close to the baseline: the task cannot rank them.

``keys`` (dataset=synthetic_hard): each image holds 10-20 small opaque objects (disks, squares, triangles, rings) on
a dim textured background, each inside one cell of a 16 x 16 grid (one 8-px patch at 128 px) and in one of ten
saturated colours; one or two of them are *keys*, rings with a white core, and the class is the colour of the keys.
Every colour is drawn once or twice per image, with at least one ring, whatever the label, so the image's colour
histogram and its counts of objects and shapes carry nothing about the class: it must be read off the one or two key
patches. A reducer that drops them loses the class, one that keeps them need not lose anything.
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


def _gradient(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """A random two-colour gradient, dim and desaturated, over image coordinates in [0, 1)."""
    c0, c1 = rng.uniform(0.1, 0.55, 3), rng.uniform(0.1, 0.55, 3)
    angle = rng.uniform(0, 2 * np.pi)
    t = (np.cos(angle) * xx + np.sin(angle) * yy + 1) / 2
    return c0 * (1 - t[..., None]) + c1 * t[..., None]


def render_image(rng: np.random.Generator, label: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One (size, size, 3) uint8 image of class ``label`` and the (size, size) bool mask of its object."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    # Background: a gradient plus pixel noise (added last).
    img = _gradient(rng, xx, yy)
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


# The keys task: ten fully saturated hues 36 degrees apart (HSV with S = V = 1), class k is colour k. White, the keys'
# core, is none of them and appears nowhere else: the dim background stays far below it in every channel.
_HUES = np.arange(10)[:, None] * 0.6
PALETTE = np.clip(abs((_HUES + np.array([0.0, 4.0, 2.0])) % 6 - 3) - 1, 0, 1)
OBJECT_SHAPES = ("disk", "square", "triangle", "ring")
# Every object sits centred in its own cell of a GRID x GRID grid, which is deit_tiny_cpu_128's patch grid (8-px
# patches at 128 px): a key is then one token, and dropping that token drops the class. Object radius as a fraction of
# the image side: 2.8-3.1 px at 128 px; REACH * RADIUS[1] stays under half a cell, so no object crosses its cell.
GRID = 16
RADIUS = (0.022, 0.024)
REACH = 1.3  # how far the shapes reach, in object radii (a rotated triangle's corners)
KEY_CORE = 0.55  # a key's white core fills the ring's hole (the ring's inner radius)


def _place(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """Centres (n, 2) as (x, y) pixels of n objects in distinct random cells of the grid."""
    cells = rng.choice(GRID * GRID, n, replace=False)
    return (np.stack([cells % GRID, cells // GRID], 1) + 0.5) * size / GRID


def render_key_image(rng: np.random.Generator, label: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One (size, size, 3) uint8 image of the keys task whose keys have colour ``label``, and the (size, size) bool
    mask of its keys."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    # Background: a gradient under a faint grating of random period and direction.
    img = _gradient(rng, xx, yy)
    period, theta, phase = rng.uniform(0.03, 0.12), rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
    img += 0.06 * np.sin(2 * np.pi * (np.cos(theta) * xx + np.sin(theta) * yy) / period + phase)[..., None]
    # Objects, drawn independently of the label: each colour once or twice, its first object a ring, its second of any
    # shape. The rings of the label's colour are the keys; their white core only fills the hole, so every colour's
    # pixel count is distributed alike whatever the label.
    counts = rng.integers(1, 3, len(PALETTE))
    colours = np.repeat(np.arange(len(PALETTE)), counts)
    n = len(colours)
    first = np.r_[True, colours[1:] != colours[:-1]]
    shapes = np.where(first, OBJECT_SHAPES.index("ring"), rng.integers(len(OBJECT_SHAPES), size=n))
    is_key = (colours == label) & (shapes == OBJECT_SHAPES.index("ring"))
    radii = rng.uniform(*RADIUS, n) * size
    centres = _place(rng, n, size)
    rotations, shades = rng.uniform(-0.5, 0.5, n), rng.uniform(0.8, 1.0, n)
    keys = np.zeros((size, size), bool)
    for i, (cx, cy) in enumerate(centres):
        # Drawn in the object's bounding box only: a full-image mask per object would dominate the generation time.
        r, reach = radii[i], REACH * radii[i]
        box = np.s_[int(cy - reach) : int(cy + reach) + 1, int(cx - reach) : int(cx + reach) + 1]
        dy, dx = (np.mgrid[box] + 0.5 - np.array([cy, cx])[:, None, None]) / r
        cos, sin = np.cos(rotations[i]), np.sin(rotations[i])
        u, v = dx * cos + dy * sin, -dx * sin + dy * cos
        img[box][_shape_mask(OBJECT_SHAPES[shapes[i]], u, v)] = shades[i] * PALETTE[colours[i]]
        if is_key[i]:
            img[box][np.hypot(u, v) < KEY_CORE] = 1.0
            keys[box] |= _shape_mask("disk", u, v)
    img = img + rng.normal(0, 0.04, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8), keys


# dataset.task -> the renderer of one image of a class.
TASKS = {"shapes": render_image, "keys": render_key_image}


class ShapesDataset(Dataset):
    """``size`` images at ``img_size`` px of ``task`` over ``num_classes`` (<= 10) classes, balanced, deterministic."""

    def __init__(
        self,
        size: int,
        img_size: int,
        num_classes: int = 10,
        seed: int = 0,
        split: str = "train",
        transform=None,
        task: str = "shapes",
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"dataset.task={task!r}: the built-in dataset's tasks are {', '.join(TASKS)}")
        if not 2 <= num_classes <= 10:
            raise ValueError(f"dataset.num_classes={num_classes}: the built-in dataset has 2..10 classes")
        split_id = {"train": 0, "val": 1, "test": 2}[split]
        rng = np.random.default_rng([seed, split_id])
        self.labels = np.arange(size) % num_classes
        rng.shuffle(self.labels)
        self.images = np.stack([TASKS[task](rng, int(y), img_size)[0] for y in self.labels])
        self.num_classes = num_classes
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = torch.from_numpy(self.images[index]).permute(2, 0, 1).float().div_(255)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])
