"""Running a reducer's phases (search -> extract -> fine-tune ...) with per-phase checkpoints.

After each finished phase the model (tensors + structure) is written atomically to
``<run_dir>/phases/<phase>.pt``. A re-launched run skips finished phases, restores the last one's model, and resumes
an interrupted fit from that phase's ``last.ckpt``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig

from tokred.data import ImageDataModule
from tokred.io import atomic_write
from tokred.reducers.base import Phase, TokenReducer


@dataclass
class PhaseContext:
    """What a custom phase step gets: the model, the data, the config and a place for its files."""

    model: TokenReducer
    datamodule: ImageDataModule
    cfg: DictConfig
    run_dir: Path
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    log: Callable[[dict[str, float]], None] = lambda metrics: None

    def phase_dir(self, phase: str) -> Path:
        path = self.run_dir / "phases" / phase
        path.mkdir(parents=True, exist_ok=True)
        return path


def phase_checkpoint(run_dir: Path, phase: str) -> Path:
    return run_dir / "phases" / f"{phase}.pt"


def save_phase(model: TokenReducer, run_dir: Path, phase: str) -> None:
    payload = {"phase": phase, "structure": model.structure(), "state_dict": model.state_dict()}
    atomic_write(phase_checkpoint(run_dir, phase), lambda p: torch.save(payload, p))


def load_phase(model: TokenReducer, path: Path) -> None:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    model.load_structure(payload["structure"])
    model.load_state_dict(payload["state_dict"])


def pending_phases(model: TokenReducer, run_dir: Path) -> list[Phase]:
    """Phases not finished yet; restores the model saved by the last finished one."""
    phases = model.phases()
    done = [p for p in phases if phase_checkpoint(run_dir, p.name).is_file()]
    if done:
        load_phase(model, phase_checkpoint(run_dir, done[-1].name))
    finished = {p.name for p in done}
    return [p for p in phases if p.name not in finished]
