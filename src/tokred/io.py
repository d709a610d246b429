"""Atomic file writes: a crash mid-write never leaves a truncated checkpoint, summary or result file."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write via a temporary file in the same directory and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        # mkstemp's file is owner-only (0600), and some writers (safetensors) create the file anew: the result gets
        # the mode the user's umask gives any new file, so a teammate on a shared cluster can read the results.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=2, default=str) + "\n"))


# <run_dir>/per_image.json: per evaluated split, a string of '1' (top-1 right) and '0', one character per image in the
# split's order. Text, no pickle; 50 000 ImageNet images are 50 kB. tokred-report pairs two runs' strings image by
# image (runs of one dataset config see the same images in the same order).
PER_IMAGE = "per_image.json"


def write_per_image(path: Path, per_image: Mapping[str, Sequence[bool]]) -> None:
    atomic_write_json(path, {split: "".join("1" if c else "0" for c in list(v)) for split, v in per_image.items()})


def read_per_image(path: Path) -> dict[str, list[bool]]:
    """The splits of a ``per_image.json``; a ValueError naming the file when it is not one."""
    try:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or not all(isinstance(v, str) and set(v) <= {"0", "1"} for v in data.values()):
            raise ValueError("not a split -> '0'/'1' string mapping")
    except (OSError, UnicodeDecodeError, ValueError) as err:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path} is no per-image result file ({err}); delete it or re-run that run") from None
    return {split: [c == "1" for c in v] for split, v in data.items()}
