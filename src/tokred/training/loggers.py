"""The run's logger (the ``logger`` config group, conf/logger/: wandb, the default, csv, tensorboard, mlflow, or any
Lightning logger named by ``_target_``), shared by every phase of a run.

Each phase is its own Lightning fit, whose global step starts at 0; every logger built here adds the steps of the
phases before it (:class:`RunLogger`), so one run's curves stay monotonic. A resumed run appends to its CSV and
continues its wandb run. Lightning already restricts logging to rank 0.
"""

from __future__ import annotations

import csv
import inspect
import netrc
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from tokred.config import ConfigError, group_choices
from tokred.io import atomic_write
from tokred.training.callbacks import instantiated


class RunLogger:
    """Mixin for any Lightning logger: logged step = Lightning's per-fit global step + ``step_offset`` (the steps of
    finished phases); ``location()`` and ``finish()`` for the run's summary."""

    step_offset: int = 0

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        super().log_metrics(metrics, None if step is None else step + self.step_offset)

    def location(self) -> str:
        return f"{type(self).__name__} logs: {getattr(self, 'log_dir', None) or self.save_dir}"

    @rank_zero_only
    def finish(self, summary: Mapping[str, Any]) -> None:
        self.finalize("success")


class _AppendingWriter(ExperimentWriter):
    """Keeps an existing ``metrics.csv`` (Lightning's writer deletes it) and continues with its columns."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = next(csv.reader(f), [])


class RunCSVLogger(RunLogger, CSVLogger):
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


class RunWandbLogger(RunLogger, WandbLogger):
    """A wandb run under ``<save_dir>/wandb``; the final summary holds the run's headline numbers. ``mode``: see
    :func:`wandb_mode`; ``name`` defaults to the run directory's name, ``id`` to the run directory's wandb id."""

    def __init__(
        self, save_dir: str, mode: str = "auto", name: str | None = None, id: str | None = None, **kwargs: Any
    ) -> None:
        mode = wandb_mode(mode)
        if mode not in ("online", "offline", "disabled"):
            raise ConfigError(f"logger.mode={mode!r}; choose one of: auto, online, offline, disabled")
        super().__init__(
            save_dir=save_dir,
            mode=mode,
            name=name or Path(save_dir).name,
            id=id or _wandb_run_id(Path(save_dir)),
            **kwargs,
        )

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


_RUN_LOGGER_CLASSES: dict[type, type] = {}


def run_logger_class(cls: type[Logger]) -> type[Logger]:
    """``cls`` with :class:`RunLogger` mixed in (a subclass of the same name), or ``cls`` when it has it already."""
    if issubclass(cls, RunLogger):
        return cls
    if cls not in _RUN_LOGGER_CLASSES:
        _RUN_LOGGER_CLASSES[cls] = type(cls.__name__, (RunLogger, cls), {"__module__": cls.__module__})
    return _RUN_LOGGER_CLASSES[cls]


def build_logger(cfg: Mapping[str, Any] | None, run_dir: Path) -> Logger | None:
    """The logger ``cfg`` (``cfg.logger``) names by ``_target_``, or None for ``logger=null``.

    Built with Hydra's instantiate, with :class:`RunLogger` mixed into classes that lack it (Lightning's own, a
    user's), so a logger added as a YAML file alone keeps one step axis across phases. A logger that takes a
    ``save_dir`` gets it relative to ``run_dir`` (default: ``run_dir`` itself), which is only known once the run (or
    its resume) has its directory.
    """
    if not cfg:
        return None
    if "_target_" not in cfg:
        raise ConfigError(
            f"logger has no _target_; choose logger=<one of: {', '.join(group_choices('logger'))}> or "
            "logger=null, or give logger._target_=<a Lightning Logger class>"
        )
    factory = instantiated("logger", lambda: instantiate(cfg, _partial_=True, _convert_="all"))
    if not (isinstance(factory.func, type) and issubclass(factory.func, Logger)):
        raise ConfigError(f"logger._target_={cfg['_target_']} is not a Lightning Logger class")
    kwargs = dict(factory.keywords)
    if "save_dir" in inspect.signature(factory.func).parameters:
        kwargs["save_dir"] = str(Path(run_dir) / str(kwargs.get("save_dir") or ""))
    return instantiated("logger", lambda: run_logger_class(factory.func)(*factory.args, **kwargs))
