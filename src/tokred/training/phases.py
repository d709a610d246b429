"""Running a reducer's phases (search -> extract -> fine-tune ...) with per-phase checkpoints, and resuming them.

Layout of a run directory::

    checkpoints/<phase>/best.ckpt   best val/acc1 of the phase's fit (Lightning checkpoint)
    checkpoints/<phase>/last.ckpt   every ``checkpoint.every_n_train_steps`` steps and every epoch end
    phases/<phase>.pt               the model (tensors + structure + config) once the phase has finished
    phases/<phase>/                 what a phase step that is no fit saves as it goes (a search's finished layers)
    run_config.json                 the config, tokred's version and the identity of the inputs (see record_config)

Every file is written atomically (temporary file + rename). A re-launched run skips finished phases, restores the
last one's model, and resumes an interrupted fit from that phase's ``last.ckpt`` (or the ``.ckpt`` given as
``ckpt_path``) at the same global step, with the optimizer and LR-scheduler state; an interrupted search goes on from
its saved progress.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.metadata
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from tokred.backbones import CheckpointError
from tokred.config import ConfigError
from tokred.data import ImageDataModule
from tokred.io import atomic_write, atomic_write_json
from tokred.reducers.base import Phase, TokenReducer
from tokred.training.module import NonFiniteLossError

log = logging.getLogger("tokred")
POLL_S = 5.0  # how often a rank waiting for rank 0's phase looks for its snapshot


@dataclass
class PhaseContext:
    """What a custom phase step gets: the model, the data, the config and a place for its files.

    ``log`` records metrics in the run's logger (rank 0 only) at the run's current step; ``rank`` is the process's
    global rank, so steps that write files can leave that to rank 0.
    """

    model: TokenReducer
    datamodule: ImageDataModule
    cfg: DictConfig
    run_dir: Path
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    log: Callable[[dict[str, float]], None] = lambda metrics: None
    rank: int = 0

    def phase_dir(self, phase: str) -> Path:
        path = self.run_dir / "phases" / phase
        path.mkdir(parents=True, exist_ok=True)
        return path


# ------------------------------------------------------------------------------------------------ phase snapshots
def phase_checkpoint(run_dir: Path, phase: str) -> Path:
    return run_dir / "phases" / f"{phase}.pt"


def checkpoint_dir(run_dir: Path, phase: str) -> Path:
    return run_dir / "checkpoints" / phase


def save_phase(
    model: TokenReducer,
    run_dir: Path,
    phase: str,
    meta: Mapping[str, Any] | None = None,
    step: int = 0,
    metrics: Mapping[str, float] | None = None,
) -> None:
    """Snapshot a finished phase: tensors, structure, the config to rebuild the model (``meta``), the run's
    cumulative optimizer step and the phase's metrics."""
    payload = {
        "phase": phase,
        "structure": model.structure(),
        "state_dict": model.state_dict(),
        "tokred": dict(meta or {}),
        "global_step": int(step),
        "metrics": dict(metrics or {}),
    }
    atomic_write(phase_checkpoint(run_dir, phase), lambda p: _torch_save(payload, p))


def read_phase(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def load_phase(model: TokenReducer, path: Path) -> dict[str, Any]:
    """Restore a phase snapshot into ``model``; returns the payload (step, metrics, config)."""
    payload = read_phase(path)
    model.load_structure(payload["structure"])
    model.load_state_dict(payload["state_dict"])
    return payload


def wait_for_phase(model: TokenReducer, run_dir: Path, phase: str) -> dict[str, Any]:
    """Block until rank 0 has written ``phase``'s snapshot, then restore it into ``model``; returns the payload.

    For ranks started together by the cluster (``srun``, ``torchrun``) before any fit: a phase without a fit (a
    search, an extraction) is rank 0's alone, and the others take its result, so every rank trains the same
    architecture even where searches on GPUs are not bit-identical.
    """
    path = phase_checkpoint(run_dir, phase)
    started = next_note = time.monotonic()
    while not path.is_file():
        if time.monotonic() >= next_note:
            log.info(
                "waiting for rank 0 to finish phase %r (%s), %.0f min so far",
                phase,
                path,
                (time.monotonic() - started) / 60,
            )
            next_note += 600
        time.sleep(POLL_S)
    return load_phase(model, path)


@dataclass
class Progress:
    """Where a run stands: the phases still to run, optimizer steps already taken, the last fit's metrics."""

    pending: list[Phase]
    step: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


def progress(model: TokenReducer, run_dir: Path, meta: Mapping[str, Any]) -> Progress:
    """Phases not finished yet; restores the model saved by the last finished one after checking it fits ``meta``."""
    phases = model.phases()
    done = [p for p in phases if phase_checkpoint(run_dir, p.name).is_file()]
    finished = {p.name for p in done}
    pending = [p for p in phases if p.name not in finished]
    if not done:
        return Progress(pending)
    path = phase_checkpoint(run_dir, done[-1].name)
    check_compatible(read_phase(path).get("tokred") or {}, meta, path)
    payload = load_phase(model, path)
    return Progress(pending, int(payload.get("global_step", 0)), dict(payload.get("metrics", {})))


# ------------------------------------------------------------------------------------------------ checkpoints
def _torch_save(payload: Any, path: Path) -> None:
    """torch.save, with a failed write (a full disk) reported as the OSError it is: torch raises a RuntimeError."""
    try:
        torch.save(payload, path)
    except RuntimeError as err:
        if "write" not in str(err).lower():
            raise
        raise OSError(errno.EIO, f"torch could not finish writing ({str(err).splitlines()[0]})", str(path)) from None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a temporary file next to the target and renames it over the target.

    Lightning's own writer opens the final path (or stages in /tmp, then copies across file systems), so a kill
    mid-write can leave a truncated ``last.ckpt``, the very file a resume needs.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        atomic_write(Path(path), lambda p: _torch_save(checkpoint, p))

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


class _FiniteCheckpoint(ModelCheckpoint):
    """Refuses to replace a checkpoint with non-finite weights: a NaN step must not destroy the last good one."""

    def _save_checkpoint(self, trainer: Any, filepath: str) -> None:
        module = trainer.lightning_module
        module.check_finite_loss()  # a non-finite loss, read lazily, is the likelier cause: say that first
        # Reduced on the device, then read once: one host-device sync, not one per tensor.
        if not bool(torch.stack([torch.isfinite(p).all() for p in module.parameters()]).all()):
            name = next(n for n, p in module.named_parameters() if not torch.isfinite(p).all())
            raise NonFiniteLossError(
                f"parameter {name} became non-finite at step {trainer.global_step}; {Path(filepath).name} was not "
                "overwritten. Lower optim.lr or set trainer.gradient_clip_val, then resume with ckpt_path=last"
            )
        super()._save_checkpoint(trainer, filepath)


class RunInterrupted(BaseException):
    """Ctrl-C (SIGINT) or SIGTERM stopped a fit after it saved a resumable ``last.ckpt``. A BaseException, like
    KeyboardInterrupt, so nothing on the way out mistakes it for a failure to recover from."""

    def __init__(self, signum: int, checkpoint: Path, step: int) -> None:
        self.signum = signum
        super().__init__(f"{signal.Signals(signum).name} at step {step}: saved {checkpoint}")


class InterruptCheckpoint(Callback):
    """On the first SIGINT or SIGTERM (Ctrl-C; what SLURM sends before pre-emption or at the time limit) the fit
    finishes its current step, writes ``last.ckpt`` atomically and raises :class:`RunInterrupted`; a second signal
    exits at once. Every rank learns of the request in the same step, so DDP ranks stop together."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, path: Path) -> None:
        self.path = path
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None:
            self._restore()
            raise KeyboardInterrupt
        self.requested = signum
        log.warning(
            "%s: saving a checkpoint after this step (press Ctrl-C again to exit at once)", signal.Signals(signum).name
        )

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # After Lightning has installed its own handlers (fit start), so these take over for the fit.
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.getsignal(s) for s in self.SIGNALS}
            for signum in self.SIGNALS:
                signal.signal(signum, self._handle)

    def _stop_if_requested(self, trainer: Any) -> None:
        if trainer.strategy.reduce_boolean_decision(self.requested is not None, all=False):
            trainer.save_checkpoint(self.path)
            self._restore()
            raise RunInterrupted(self.requested or signal.SIGTERM, self.path, trainer.global_step)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._stop_if_requested(trainer)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._stop_if_requested(trainer)
        self._restore()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._restore()


def checkpoint_callbacks(directory: Path, every_n_train_steps: int) -> list[Callback]:
    """``best.ckpt`` (highest val/acc1) and ``last.ckpt``, written every ``every_n_train_steps`` steps (so a kill
    mid-epoch loses little), after every validation (so each epoch's end state is kept) and on Ctrl-C / SIGTERM."""
    common = dict(dirpath=directory, auto_insert_metric_name=False, enable_version_counter=False)
    callbacks: list[Callback] = [
        _FiniteCheckpoint(filename="best", monitor="val/acc1", mode="max", save_top_k=1, **common),
        _FiniteCheckpoint(filename="last", save_top_k=1, every_n_epochs=1, save_on_train_epoch_end=False, **common),
        InterruptCheckpoint(directory / "last.ckpt"),
    ]
    if every_n_train_steps > 0:
        callbacks.append(
            _FiniteCheckpoint(filename="last", save_top_k=1, every_n_train_steps=every_n_train_steps, **common)
        )
    return callbacks


def check_checkpoint(path: Path, meta: Mapping[str, Any]) -> None:
    """Fail with the fix when the Lightning checkpoint ``path`` cannot be resumed by this run."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("tokred") or {}
    except Exception as err:
        raise CheckpointError(
            f"cannot read checkpoint {path} ({type(err).__name__}); it is truncated or not a "
            "tokred checkpoint: pass another ckpt_path, e.g. the run's best.ckpt"
        ) from None
    check_compatible(saved, meta, path)


def check_compatible(saved: Mapping[str, Any], meta: Mapping[str, Any], path: Path) -> None:
    """Fail with the fix when a checkpoint's recorded model (``saved``) is another backbone, reducer or number
    of classes than this run's (``meta``)."""
    if not saved:
        return
    was, now = saved.get("backbone", {}), meta["backbone"]
    if (was.get("model"), was.get("img_size")) != (now["model"], now["img_size"]):
        raise CheckpointError(
            f"checkpoint {path} is from backbone {was.get('model')} at {was.get('img_size')} px, this run builds "
            f"{now['model']} at {now['img_size']} px; resume with backbone={was.get('name')} "
            f"backbone.img_size={was.get('img_size')}, or drop ckpt_path to start a new run"
        )
    if saved.get("reducer", {}).get("name") != meta["reducer"]["name"]:
        raise CheckpointError(
            f"checkpoint {path} is from reducer={saved['reducer'].get('name')}, this run uses "
            f"reducer={meta['reducer']['name']}; resume with reducer={saved['reducer'].get('name')} or drop ckpt_path"
        )
    if saved.get("num_classes") != meta["num_classes"]:
        raise CheckpointError(
            f"checkpoint {path} has a {saved.get('num_classes')}-class head but dataset {meta['dataset']} has "
            f"{meta['num_classes']} classes; resume with the dataset it was trained on, or fine-tune it as a new run: "
            f"backbone.checkpoint={path} backbone.reset_head=true"
        )


# ------------------------------------------------------------------------------------------------ the run's config
RUN_CONFIG = "run_config.json"
RECORD = "_tokred"  # run_config.json's entry for what the config does not say (see record_config)
# Keys that do not change what a run computes: where things go, how they are logged and drawn (the callbacks that
# only save or watch; early stopping does change it), resume pointers, the re-launch policy, CPU threads and
# data-loading processes.
NO_EFFECT = (
    "ckpt_path",
    "paths",
    "logger",
    "checkpoint",
    "visualize",
    "sweep_name",
    "sweep",
    "verbose",
    "threads",
    "dataset.num_workers",
    "callbacks.checkpoints",
    "callbacks.progress_bar",
    "callbacks.lr_monitor",
    "callbacks.throughput_monitor",
)
# What may differ between a run and its resume: the above, the hardware, and the number of epochs (to extend a run).
# Anything else would make the run's record describe weights it did not train.
MAY_CHANGE_ON_RESUME = (
    *NO_EFFECT,
    "trainer.max_epochs",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.accelerator",
    "trainer.strategy",
    "reducer.finetune_epochs",
    "reducer.retrain_epochs",
)
# Compared by content rather than by path: the same file moved elsewhere is the same input, and another file written
# over the old path is not.
BY_CONTENT = ("backbone.checkpoint",)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat |= (
            _flatten(value, f"{prefix}{key}.") if isinstance(value, Mapping) and value else {f"{prefix}{key}": value}
        )
    return flat


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == k or key.startswith(k + ".") for k in prefixes)


def _changed(was: Mapping[str, Any], now: Mapping[str, Any], ignored: tuple[str, ...]) -> list[str]:
    """Flattened keys whose values differ, but for ``ignored`` keys and everything under them."""
    return sorted(key for key in was.keys() | now.keys() if was.get(key) != now.get(key) and not _under(key, ignored))


def _shown(was: Mapping[str, Any], now: Mapping[str, Any], keys: list[str]) -> str:
    more = f" and {len(keys) - 4} more" if len(keys) > 4 else ""
    return ", ".join(f"{k}={json.dumps(was.get(k))} (now {json.dumps(now.get(k))})" for k in keys[:4]) + more


def tokred_version() -> str:
    return importlib.metadata.version("tokred")


def file_identity(path: str | None, known: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """A file's path, size, modification time and SHA-256 (None without a path; ``sha256`` None when it is missing).

    The hash is taken from ``known`` (the identity recorded earlier) while path, size and time are unchanged, so a
    launch reads a large checkpoint again only after it changed or moved.
    """
    if not path:
        return None
    file = Path(path).expanduser().absolute()
    try:
        stat = file.stat()
    except FileNotFoundError:
        return {"path": str(file), "sha256": None}
    where = {"path": str(file), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if known and known.get("sha256") and all(known.get(k) == v for k, v in where.items()):
        return {**where, "sha256": known["sha256"]}
    digest = hashlib.sha256()
    with open(file, "rb") as f:  # in 1-MiB chunks: hashlib.file_digest is Python 3.11+, and 3.10 is supported
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return {**where, "sha256": digest.hexdigest()}


def dataset_identity(datamodule: ImageDataModule) -> dict[str, Any]:
    """Per split, the number of images and a hash of their labels and (image folders) their paths relative to the
    split's folder: the same data moved elsewhere keeps its identity; images added, removed, renamed or relabelled
    change it. The pixels are not read (a whole dataset each launch); those of a built-in dataset follow its config."""
    identity: dict[str, Any] = {"num_classes": datamodule.num_classes}
    for split, data in (("train", datamodule.train_set), ("val", datamodule.val_set)):
        digest = hashlib.sha256()
        root = getattr(data, "root", None)
        for path, label in getattr(data, "samples", ()):
            digest.update(f"{os.path.relpath(path, root) if root else path}\t{label}\n".encode())
        labels = getattr(data, "targets", getattr(data, "labels", None))
        if labels is not None:
            digest.update(np.asarray(labels, dtype=np.int64).tobytes())
        identity[split] = {"images": len(data), "sha256": digest.hexdigest()}
    return identity


def _stored(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(config, record) of ``run_dir``'s run_config.json; the record is empty for runs of tokred before it."""
    path = run_dir / RUN_CONFIG
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    return config, config.pop(RECORD, None) or {}


def run_inputs(cfg: DictConfig, datamodule: ImageDataModule, run_dir: Path) -> dict[str, Any]:
    """The identity of the run's inputs: the backbone checkpoint's content (:func:`file_identity`) and the dataset
    (:func:`dataset_identity`)."""
    stored = _stored(run_dir)
    known = (stored[1].get("inputs") or {}).get("backbone.checkpoint") if stored else None
    return {
        "backbone.checkpoint": file_identity(cfg.backbone.get("checkpoint"), known),
        "dataset": dataset_identity(datamodule),
    }


def config_hash(config: Mapping[str, Any], checkpoint: Mapping[str, Any] | None) -> str:
    """Hash of what shapes a run's result: the resolved config but for :data:`NO_EFFECT`, with the backbone
    checkpoint by content. The dataset is in it by its config (its files are only compared on a resume)."""
    flat = {k: v for k, v in _flatten(config).items() if not _under(k, (*NO_EFFECT, *BY_CONTENT))}
    payload = {"config": flat, "backbone.checkpoint": (checkpoint or {}).get("sha256")}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def record_config(cfg: DictConfig, run_dir: Path, inputs: Mapping[str, Any]) -> None:
    """Keep the config of the run's latest launch (``run_config.json``), with tokred's version, the config's hash
    and the identity of the inputs (:func:`run_inputs`) under ``_tokred``: a resume is checked against them, and a
    re-launch of the finished run compares its hash and version (:func:`finished_changes`)."""
    config = OmegaConf.to_container(cfg, resolve=True)
    record = {
        "version": tokred_version(),
        "config_hash": config_hash(config, inputs.get("backbone.checkpoint")),
        "inputs": dict(inputs),
    }
    atomic_write_json(run_dir / RUN_CONFIG, {**config, RECORD: record})


def _describe_checkpoint(was: Mapping[str, Any] | None, now: Mapping[str, Any] | None) -> str:
    def one(identity: Mapping[str, Any] | None) -> str:
        if identity is None:
            return "none"
        content = "missing" if identity["sha256"] is None else f"sha256 {identity['sha256'][:12]}"
        return f"{identity['path']} ({content})"

    return f"backbone.checkpoint {one(was)} (now {one(now)})"


def _describe_dataset(was: Mapping[str, Any], now: Mapping[str, Any]) -> str:
    def one(identity: Mapping[str, Any]) -> str:
        return (
            f"{identity['num_classes']} classes, {identity['train']['images']} training and "
            f"{identity['val']['images']} validation images"
        )

    same_counts = one(was) == one(now)
    return f"a dataset of {one(was)} (now {'the same counts, but other files or labels' if same_counts else one(now)})"


def check_resumed_config(cfg: DictConfig, run_dir: Path, inputs: Mapping[str, Any]) -> None:
    """Refuse to continue ``run_dir`` with settings other than the ones it was started with (besides
    :data:`MAY_CHANGE_ON_RESUME`) or on other inputs (another backbone checkpoint, even at the same path, or other
    dataset files; ``inputs`` from :func:`run_inputs`): its summary and export would describe weights it did not train.
    """
    stored = _stored(run_dir)
    if stored is None:
        return
    config, record = stored
    recorded = record.get("inputs") or {}
    was, now = _flatten(config), _flatten(OmegaConf.to_container(cfg, resolve=True))
    # Runs recorded before inputs had an identity compare the checkpoint by path.
    changed = _changed(was, now, (*MAY_CHANGE_ON_RESUME, *(BY_CONTENT if recorded else ())))
    if changed:
        raise ConfigError(
            f"{run_dir} was trained with {_shown(was, now, changed)}; resume it with those settings, or "
            "drop ckpt_path to start a new run (on resume only "
            f"{', '.join(MAY_CHANGE_ON_RESUME)} may change)"
        )
    if not recorded:
        return
    differences = []
    checkpoint_was, checkpoint_now = recorded.get("backbone.checkpoint"), inputs.get("backbone.checkpoint")
    if (checkpoint_was or {}).get("sha256") != (checkpoint_now or {}).get("sha256"):
        differences.append(_describe_checkpoint(checkpoint_was, checkpoint_now))
    if recorded.get("dataset") not in (None, inputs.get("dataset")):
        differences.append(_describe_dataset(recorded["dataset"], inputs["dataset"]))
    if differences:
        raise ConfigError(
            f"{run_dir} was trained on other inputs: {'; '.join(differences)}; restore them (a moved "
            "checkpoint may have a new path, not new content), or train into a new run directory "
            "(drop ckpt_path or hydra.run.dir)"
        )


def finished_changes(cfg: DictConfig, run_dir: Path) -> list[str]:
    """What differs between the finished run in ``run_dir`` and a launch of ``cfg`` in its place, besides
    :data:`NO_EFFECT`: config values, the backbone checkpoint's content, tokred's version. Empty: the stored result
    is this launch's result."""
    stored = _stored(run_dir)
    if stored is None:
        return [f"it has no {RUN_CONFIG} to compare with"]
    config, record = stored
    recorded = record.get("inputs") or {}
    now_config = OmegaConf.to_container(cfg, resolve=True)
    checkpoint = file_identity(cfg.backbone.get("checkpoint"), recorded.get("backbone.checkpoint"))
    version = tokred_version()
    if record.get("config_hash") == config_hash(now_config, checkpoint) and record.get("version") == version:
        return []
    was, now = _flatten(config), _flatten(now_config)
    changes = [_shown(was, now, [key]) for key in _changed(was, now, (*NO_EFFECT, *(BY_CONTENT if recorded else ())))]
    if recorded and (recorded.get("backbone.checkpoint") or {}).get("sha256") != (checkpoint or {}).get("sha256"):
        changes.append(_describe_checkpoint(recorded.get("backbone.checkpoint"), checkpoint))
    if record.get("version") != version:
        changes.append(f"tokred {record.get('version', '(not recorded)')} (now {version})")
    return changes


RERUN = ("never", "changed")  # sweep.rerun: what a re-launch does with a finished run whose config has changed


def rerun_policy(cfg: DictConfig) -> str:
    rerun = str(OmegaConf.select(cfg, "sweep.rerun", default="never"))
    if rerun not in RERUN:
        raise ConfigError(f"sweep.rerun={rerun!r}; choose one of: {', '.join(RERUN)}")
    return rerun


def finished_result(cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    """For a launch into ``run_dir`` that holds a finished run (a re-launched multirun job, whose directory derives
    from its overrides): the stored summary when nothing that shapes it changed (:func:`finished_changes`); else
    under ``sweep.rerun=never`` the stored summary with ``stale`` listing the changes, and under ``changed`` None:
    the run trains again, its earlier results moved aside by :func:`set_aside`. None too when nothing finished."""
    finished = run_dir / "summary.json"
    summary = json.loads(finished.read_text()) if finished.is_file() else {}
    if not summary or "failed_steps" in summary:
        return None
    changes = finished_changes(cfg, run_dir)
    if not changes:
        log.info("%s exists: run finished earlier, nothing to do (delete %s to train it again)", finished, run_dir)
        return summary
    if rerun_policy(cfg) == "never":
        log.warning(
            "%s finished earlier, but since then %s: returning its stored result marked stale (train it "
            "again with sweep.rerun=changed, which keeps the earlier results beside it)",
            run_dir,
            "; ".join(changes),
        )
        return {**summary, "stale": changes}
    if rank_zero_only.rank == 0:  # the other ranks of a DDP job train in the directory rank 0 starts anew
        old = set_aside(run_dir)
        log.warning(
            "%s finished earlier, but since then %s: training it again (sweep.rerun=changed); the earlier "
            "results are in %s",
            run_dir,
            "; ".join(changes),
            old,
        )
    return None


def set_aside(run_dir: Path) -> Path:
    """Move ``run_dir`` to ``<run_dir>.old-<time>`` in one rename (its results are never deleted, nor split between
    two places) and start it anew. What this launch has written there already comes back: Hydra's copy of this
    launch's config (the files directly in its output subdirectory; earlier resumes' copies stay with the old run),
    and the log goes on in a new file."""
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    old, n = run_dir.with_name(f"{run_dir.name}.old-{stamp}"), 1
    while old.exists():
        old, n = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{n}"), n + 1
    os.rename(run_dir, old)
    run_dir.mkdir()
    subdir = HydraConfig.get().output_subdir if HydraConfig.initialized() else None
    if subdir and (old / subdir).is_dir():
        (run_dir / subdir).mkdir(parents=True)
        for file in (old / subdir).iterdir():
            if file.is_file():
                os.rename(file, run_dir / subdir / file.name)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == run_dir.absolute():
            previous = handler.setStream(open(handler.baseFilename, handler.mode, encoding=handler.encoding))
            if previous is not None:
                previous.close()
    return old


# ------------------------------------------------------------------------------------------------ ownership
class RunLock:
    """One process owns a run directory while it trains (``.lock``: owner pid, host, start time), so two launches
    into one directory (the same ``hydra.run.dir`` twice, a multirun job started twice) cannot interleave their
    checkpoints, metrics and exports. A lock left by a process that is gone (killed) is taken over with a message.
    Held by rank 0 only: the other DDP ranks belong to its run."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                self._take_over_or_refuse()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.owner, f)
            return self

    def _take_over_or_refuse(self) -> None:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            holder = {}
        pid, host = holder.get("pid"), holder.get("host")
        if host == self.owner["host"] and isinstance(pid, int) and not _alive(pid):
            log.warning(
                "taking over %s: its owner (pid %d, since %s) is no longer running", self.path, pid, holder.get("since")
            )
            self.path.unlink(missing_ok=True)
            return
        raise ConfigError(
            f"{self.path.parent} is in use by pid {pid} on {host} since {holder.get('since')}; wait for "
            f"it to finish or pass another hydra.run.dir (if that process is gone, delete {self.path})"
        )

    def __exit__(self, *exc: Any) -> None:
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


# ------------------------------------------------------------------------------------------------ resume targets
def _saved_progress(run_dir: Path) -> list[Path]:
    """What a run can go on from: fits' checkpoints, finished phases' snapshots, and whatever a phase step that is no
    fit saved under ``phases/<phase>/`` as it went (a search's finished layers)."""
    return [f for f in (*run_dir.glob("checkpoints/*/*.ckpt"), *run_dir.glob("phases/**/*")) if f.is_file()]


def _has_checkpoints(run_dir: Path) -> bool:
    return bool(_saved_progress(run_dir))


def _newest_checkpoint_time(run_dir: Path) -> float:
    return max((f.stat().st_mtime for f in _saved_progress(run_dir)), default=0.0)


def find_resume(ckpt_path: str | None, runs_root: Path) -> tuple[Path | None, Path | None]:
    """``ckpt_path`` -> (run directory to continue, or None for a new one; explicit ``.ckpt`` file or None).

    ``last``: the run under ``runs_root`` (the directory holding this config's runs) that saved progress (a
    checkpoint, a phase snapshot, a search's finished layer) most recently. A run directory: continue it. A ``.ckpt``
    inside a run's ``checkpoints/<phase>/``: continue that run from that file. Any other ``.ckpt``: a new run whose
    first fit starts from it.
    """
    if ckpt_path in (None, "", "null"):
        return None, None
    if ckpt_path == "last":
        runs = [d for d in runs_root.iterdir() if d.is_dir() and _has_checkpoints(d)] if runs_root.is_dir() else []
        if not runs:
            raise ConfigError(
                f"ckpt_path=last: no run under {runs_root} has saved progress yet; drop ckpt_path to "
                "start a new run, or pass ckpt_path=<run dir or .ckpt file>"
            )
        return max(runs, key=_newest_checkpoint_time), None
    path = Path(ckpt_path).expanduser().resolve()
    if path.is_dir():
        if not _has_checkpoints(path):
            raise ConfigError(
                f"ckpt_path={path} has no saved progress (checkpoints/<phase>/*.ckpt, phases/); pass "
                "a run directory of tokred-train, a .ckpt file, or ckpt_path=last"
            )
        return path, None
    if not path.is_file():
        raise ConfigError(f"ckpt_path={ckpt_path} does not exist; pass a run directory, a .ckpt file or ckpt_path=last")
    if path.suffix != ".ckpt":
        raise ConfigError(
            f"ckpt_path={path} is not a Lightning .ckpt; to start from model weights use "
            "backbone.checkpoint=PATH instead"
        )
    if path.parent.parent.name == "checkpoints":
        return path.parents[2], path
    return None, path
