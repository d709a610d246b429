"""The run's logger (``logger=wandb``, the default, or ``logger=csv``), shared by every phase of a run.

Each phase is its own Lightning fit, whose global step starts at 0; the loggers here add the steps of the phases
before it, so one run's curves stay monotonic. A resumed run appends to its CSV and continues its wandb run.
Lightning already restricts logging to rank 0.
"""

from __future__ import annotations

import csv
import netrc
import os
import secrets
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from tokred.config import ConfigError
from tokred.io import atomic_write


class _PhaseSteps:
    """Mixin: logged step = Lightning's per-fit global step + ``step_offset`` (the steps of finished phases)."""

    step_offset: int = 0

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        super().log_metrics(metrics, None if step is None else step + self.step_offset)


class _AppendingWriter(ExperimentWriter):
    """Keeps an existing ``metrics.csv`` (Lightning's writer deletes it) and continues with its columns."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = next(csv.reader(f), [])


class RunCSVLogger(_PhaseSteps, CSVLogger):
    """Metrics in ``<run_dir>/csv/metrics.csv``, the config in ``hparams.yaml`` next to it."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def finish(self, summary: Mapping[str, Any]) -> None:
        self.save()

    def location(self) -> str:
        return f"CSV logs: {Path(self.log_dir) / 'metrics.csv'}"


class RunWandbLogger(_PhaseSteps, WandbLogger):
    """A wandb run under ``<run_dir>/wandb``; the final summary holds the run's headline numbers."""

    @rank_zero_only
    def finish(self, summary: Mapping[str, Any]) -> None:
        self.experiment.summary.update(dict(summary))
        self.experiment.finish()

    def location(self) -> str:
        if rank_zero_only.rank != 0:  # other ranks hold a dummy experiment
            return ""
        if self._wandb_init.get("mode") == "offline":
            run_dir = Path(self.experiment.dir).parent
            return f"wandb offline run: {run_dir} (upload it with: wandb sync {run_dir})"
        return f"wandb run: {getattr(self.experiment, 'url', None) or 'disabled'}"


def wandb_mode(setting: str) -> str:
    """``auto`` -> ``online`` when wandb has credentials (WANDB_API_KEY or a netrc entry from ``wandb login``),
    otherwise ``offline``: a run never stops at a login prompt. ``WANDB_MODE`` in the environment wins."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if setting != "auto":
        return setting
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return "online" if netrc.netrc(os.environ.get("NETRC")).authenticators(host) else "offline"
    except (OSError, netrc.NetrcParseError):
        return "offline"


def own_wandb_service() -> None:
    """Drop a wandb service inherited from a parent process (``WANDB_SERVICE``): each tokred process starts its own.

    Attached to another process's service, a run that is killed hard stays registered there, and resuming it fails
    with "run ID ... is in use" for as long as that process lives.
    """
    os.environ.pop("WANDB_SERVICE", None)


def _wandb_run_id(run_dir: Path) -> str:
    """The run directory's wandb id, created on first use, so a resumed run continues the same wandb run."""
    path = run_dir / "wandb_run_id"
    if path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)  # wandb ids are [a-z0-9]; its own generator moves between releases
    if rank_zero_only.rank == 0:
        atomic_write(path, lambda p: p.write_text(run_id + "\n"))
    return run_id


def build_logger(cfg: Mapping[str, Any] | None, run_dir: Path) -> Logger | None:
    """The logger ``cfg`` (``cfg.logger``) asks for, or None for ``logger=null``."""
    if not cfg:
        return None
    if cfg["name"] == "csv":
        return RunCSVLogger(run_dir, name="csv", version="")
    if cfg["name"] == "wandb":
        mode = wandb_mode(cfg.get("mode", "auto"))
        if mode not in ("online", "offline", "disabled"):
            raise ConfigError(f"logger.mode={mode!r}; choose one of: auto, online, offline, disabled")
        return RunWandbLogger(
            name=cfg.get("run_name") or run_dir.name, save_dir=str(run_dir), id=_wandb_run_id(run_dir),
            project=cfg.get("project"), entity=cfg.get("entity"), group=cfg.get("group"),
            tags=list(cfg.get("tags") or []), job_type=cfg.get("job_type"), mode=mode, log_model=False,
        )
    raise ConfigError(f"logger.name={cfg['name']!r}; choose one of: wandb, csv")
