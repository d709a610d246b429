"""``tokred-train``'s work, independent of the command line: build, run every phase, evaluate, export, summarise.

Only rank 0 writes (phase snapshots, export, summary.json; Lightning limits checkpoints and logs to rank 0), so a
DDP run has one output directory.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from tokred.backbones import create_backbone
from tokred.config import ConfigError
from tokred.data import ImageDataModule, build_datamodule, uses_own_sampler
from tokred.data.transforms import build_mixup
from tokred.export import save_deployable
from tokred.flops import count_params, counted_gmacs, train_cost
from tokred.io import PER_IMAGE, atomic_write_json, write_per_image
from tokred.reducers import create_reducer
from tokred.reducers.base import Phase, TokenReducer
from tokred.training.callbacks import TrainThroughput, build_callbacks
from tokred.training.loggers import build_logger
from tokred.training.module import NonFiniteLossError, TokredModule
from tokred.training.optim import effective_lr
from tokred.training.phases import (
    AtomicCheckpointIO,
    PhaseContext,
    Progress,
    RunLock,
    check_checkpoint,
    check_resumed_config,
    checkpoint_dir,
    find_resume,
    finished_result,
    progress,
    record_config,
    rerun_policy,
    run_inputs,
    save_phase,
    wait_for_phase,
)
from tokred.visualize import token_map_callbacks

log = logging.getLogger("tokred")


def build_model(cfg: DictConfig, num_classes: int) -> TokenReducer:
    vit = create_backbone(cfg.backbone, num_classes)
    return create_reducer(cfg.reducer, vit)


def model_stats(model: TokenReducer, img_size: int, counted: bool = True) -> dict[str, Any]:
    """Analytic GMACs, params and tokens per block of the deployable model; ``counted``: also run torch's FLOP
    counter on a forward pass (the cross-check, a few seconds on a CPU)."""
    cost = model.cost()
    deploy = model.deployable()
    stats = {
        "model/gmacs": cost.gmacs,
        "model/params_m": count_params(deploy) / 1e6,
        "model/tokens_per_block": cost.tokens_per_block,
    }
    if counted:
        stats["model/gmacs_counted"] = counted_gmacs(deploy, img_size)
    return stats


def model_meta(cfg: DictConfig, num_classes: int) -> dict[str, Any]:
    """What rebuilds the model without the run's config; stored in every checkpoint and phase snapshot."""
    backbone = OmegaConf.to_container(cfg.backbone, resolve=True)
    return {
        # The weights come with the checkpoint: rebuilding must not download or read the initial ones again.
        "backbone": {**backbone, "pretrained": False, "checkpoint": None},
        "reducer": OmegaConf.to_container(cfg.reducer, resolve=True),
        "num_classes": num_classes,
        "dataset": str(cfg.dataset.name),
    }


def build_trainer(
    cfg: DictConfig,
    run_dir: Path,
    logger: Logger | None,
    callbacks: Sequence[Callback] = (),
    max_epochs: int | None = None,
) -> L.Trainer:
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    if max_epochs is not None:
        trainer_cfg["max_epochs"] = max_epochs
    return L.Trainer(
        default_root_dir=run_dir,
        logger=logger if logger is not None else False,
        callbacks=list(callbacks),
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_model_summary=False,
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=not uses_own_sampler(cfg.dataset),
        **trainer_cfg,
    )


def evaluate(
    model: TokenReducer,
    datamodule: ImageDataModule,
    cfg: DictConfig,
    run_dir: Path,
    logger: Logger | None = None,
    per_image: dict[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """val/acc1, val/acc5, val/loss of ``model`` over the whole validation split and, where the dataset has a test
    split, test/acc1, test/acc5, test/loss over it (all ranks, metrics synced); logged as one row at the logger's
    current step. ``per_image``, if given, receives per split one bool per image (in dataset order): top-1 right."""
    trainer = build_trainer(cfg, run_dir, None, build_callbacks(cfg.get("callbacks")))
    module = TokredModule(model, None, datamodule.num_classes)
    module.per_image = {}
    trainer.validate(module, datamodule=datamodule, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    splits = {"val": datamodule.val_set}
    if datamodule.test_set is not None:
        trainer.test(module, datamodule=datamodule, verbose=False)
        metrics |= {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
        splits["test"] = datamodule.test_set
    if per_image is not None:
        # [: len]: a DistributedSampler pads the split to a multiple of the world size with repeated images
        per_image |= {split: module.per_image[split][0][: len(data)] for split, data in splits.items()}
    if logger is not None:
        logger.log_metrics(metrics, step=0)
        logger.save()
    return metrics


def _device(cfg: DictConfig) -> torch.device:
    """The device custom phase steps (searches) should use: this rank's GPU when the trainer trains on GPUs."""
    if str(cfg.trainer.get("accelerator", "cpu")) in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _fit(
    cfg: DictConfig,
    model: TokenReducer,
    datamodule: ImageDataModule,
    phase: Phase,
    run_dir: Path,
    logger: Logger | None,
    meta: dict[str, Any],
    ckpt: Path | None,
    extra_callbacks: Sequence[Callback] = (),
) -> tuple[int, dict[str, float]]:
    """One phase's Lightning fit; returns its global step count and its metrics (with ``val/acc1_best``)."""
    optim = OmegaConf.to_container(cfg.optim, resolve=True) | phase.optim
    directory = checkpoint_dir(run_dir, phase.name)
    callbacks = build_callbacks(cfg.get("callbacks"), directory)  # anew per phase: a callback's state is its fit's
    throughput = TrainThroughput()
    trainer = build_trainer(cfg, run_dir, logger, [*callbacks, *extra_callbacks, throughput], max_epochs=phase.epochs)
    global_batch = int(cfg.dataset.batch_size) * trainer.world_size * int(cfg.trainer.get("accumulate_grad_batches", 1))
    label_smoothing = float(cfg.optim.get("label_smoothing", 0.0))
    module = TokredModule(
        model,
        optim,
        datamodule.num_classes,
        lr=effective_lr(optim, global_batch),
        label_smoothing=label_smoothing,
        mixup=build_mixup(cfg.dataset.get("aug") or {}, datamodule.num_classes, label_smoothing),
        teacher=model.build_teacher(),
        meta=meta,
    )
    ckpt = resume_point(run_dir, phase, ckpt)
    if ckpt is not None:
        log.info("phase %r resumes from %s", phase.name, ckpt)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None)
    except NonFiniteLossError as err:
        kept = directory / "last.ckpt"
        where = f"last good checkpoint: {kept}" if kept.is_file() else "no checkpoint had been written yet"
        raise NonFiniteLossError(f"{err} ({where})") from None
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    best = next(
        (c.best_model_score for c in callbacks if isinstance(c, ModelCheckpoint) and c.monitor == "val/acc1"), None
    )
    if best is not None:
        metrics["val/acc1_best"] = float(best)
    if throughput.img_s is not None:
        metrics["train/img_s"] = throughput.img_s
    return trainer.global_step, metrics


def resume_point(run_dir: Path, phase: Phase, explicit: Path | None) -> Path | None:
    """The checkpoint a phase's fit continues from: ``ckpt_path`` if it names one, else the phase's ``last.ckpt``."""
    last = checkpoint_dir(run_dir, phase.name) / "last.ckpt"
    return explicit or (last if last.is_file() else None)


def _phase_of(ckpt: Path | None, in_run_dir: bool, pending: list[Phase]) -> str | None:
    """The phase an explicit ``ckpt_path=<.ckpt>`` resumes: the one whose checkpoints/<phase>/ holds it, or, for a
    file from outside any run directory, the first phase that trains."""
    if ckpt is None:
        return None
    fitting = [p.name for p in pending if p.epochs != 0]
    phase = ckpt.parent.name if in_run_dir else (fitting[0] if fitting else None)
    if phase not in fitting:
        raise ConfigError(
            f"ckpt_path={ckpt} belongs to phase {phase!r}, which has no fit left to resume "
            f"(still to train: {', '.join(fitting) or 'nothing'}); pass ckpt_path=<the run directory>"
        )
    return phase


def _log_config(logger: Logger, cfg: DictConfig, model: TokenReducer, stats: dict[str, Any]) -> None:
    """The full config plus the columns a dashboard compares runs by."""
    logger.log_hyperparams(
        {
            **OmegaConf.to_container(cfg, resolve=True),
            "reducer_knobs": model.knobs(),
            **{k: v for k, v in stats.items() if k in ("model/gmacs", "model/params_m")},
        }
    )


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run every pending phase of the configured reducer; return the run summary (also written to summary.json).

    ``cfg.ckpt_path`` (``last``, a run directory or a ``.ckpt``) continues an earlier run in its own directory;
    see :func:`tokred.training.phases.find_resume`. Without it, a run directory that already holds checkpoints
    (an interrupted multirun job, re-launched) is continued, and one holding summary.json returns that summary
    unless the config or tokred changed since (``sweep.rerun``; see :func:`tokred.training.phases.finished_result`).
    """
    L.seed_everything(int(cfg.seed), workers=True)
    rerun_policy(cfg)  # a bad value fails before anything is read or written
    output_dir = Path(cfg.paths.output_dir)
    resume_dir, ckpt_file = find_resume(cfg.get("ckpt_path"), output_dir.parent)
    run_dir = resume_dir or output_dir
    stored = finished_result(cfg, run_dir) if resume_dir is None else None
    if stored is not None:  # the sweeper gets a finished job's result without training it again
        return stored
    token_maps = token_map_callbacks(cfg.get("visualize"), run_dir)  # a bad value fails before anything is written
    datamodule = build_datamodule(cfg.dataset)
    num_classes = datamodule.num_classes  # reads the data now: a bad dataset fails before anything is written
    model = build_model(cfg, num_classes)
    meta = model_meta(cfg, num_classes)
    state = progress(model, run_dir, meta)
    ckpt_phase = _phase_of(ckpt_file, resume_dir is not None, state.pending)
    for phase in state.pending:  # an unusable checkpoint is refused now, before anything in the run is written
        point = resume_point(run_dir, phase, ckpt_file if phase.name == ckpt_phase else None)
        if phase.epochs != 0 and point is not None:
            check_checkpoint(point, meta)
    inputs = run_inputs(cfg, datamodule, run_dir)
    check_resumed_config(cfg, run_dir, inputs)  # after the checks above, whose messages name a more specific fix
    with RunLock(run_dir) if rank_zero_only.rank == 0 else nullcontext():
        if rank_zero_only.rank == 0:  # this launch's config: what the finished run will have been trained with
            record_config(cfg, run_dir, inputs)
        return _run_phases(cfg, model, datamodule, run_dir, state, meta, ckpt_file, ckpt_phase, token_maps)


def _run_phases(
    cfg: DictConfig,
    model: TokenReducer,
    datamodule: ImageDataModule,
    run_dir: Path,
    state: Progress,
    meta: dict[str, Any],
    ckpt_file: Path | None,
    ckpt_phase: str | None,
    token_maps: Sequence[Callback],
) -> dict[str, Any]:
    """Every pending phase, then :func:`finish`; the caller holds the run directory."""
    logger = build_logger(cfg.get("logger"), run_dir)
    stats = model_stats(model, int(cfg.backbone.img_size), counted=False)  # the counted figure comes with the summary
    log.info(
        "model: %s + %s, %.3f GMACs, %.2f M params; run directory %s",
        cfg.backbone.model,
        cfg.reducer.name,
        stats["model/gmacs"],
        stats["model/params_m"],
        run_dir,
    )
    if logger is not None:
        _log_config(logger, cfg, model, stats)
    for phase in state.pending:
        log.info("phase %r", phase.name)
        model.enter_phase(phase.name)
        if logger is not None:
            logger.step_offset = state.step
        if phase.run is not None and phase.epochs == 0 and rank_zero_only.rank != 0:
            payload = wait_for_phase(model, run_dir, phase.name)  # rank 0 runs it; see wait_for_phase
            state.step, state.metrics = int(payload.get("global_step", 0)), dict(payload.get("metrics", {}))
            continue
        if phase.run is not None:
            log_fn = partial(logger.log_metrics, step=0) if logger is not None else (lambda metrics: None)
            phase.run(PhaseContext(model, datamodule, cfg, run_dir, _device(cfg), log_fn, rank_zero_only.rank))
        if phase.epochs != 0:
            explicit = ckpt_file if phase.name == ckpt_phase else None
            steps, state.metrics = _fit(cfg, model, datamodule, phase, run_dir, logger, meta, explicit, token_maps)
            state.step += steps
        if rank_zero_only.rank == 0:
            save_phase(model, run_dir, phase.name, meta, state.step, state.metrics)
    if logger is not None:
        logger.step_offset = state.step
    return finish(cfg, model, datamodule, run_dir, logger, state.step, state.metrics, token_maps)


def degenerate(
    tokens_per_block: Sequence[int], num_prefix: int, acc1: float | None, num_classes: int, num_val: int
) -> list[str]:
    """Why a result should not be read as a working model: a block left with no patch token at all, or a top-1 within
    three standard errors of guessing (a chance-level classifier on ``num_val`` images). Empty when neither."""
    reasons = []
    empty = [i for i, n in enumerate(tokens_per_block) if n <= num_prefix]
    if empty:
        reasons.append(f"keeps no patch token from block {empty[0]} on")
    chance = 1 / num_classes
    if acc1 is not None and num_val and acc1 <= chance + 3 * (chance * (1 - chance) / num_val) ** 0.5:
        reasons.append(f"top-1 {100 * acc1:.1f}% is chance level for {num_classes} classes")
    return reasons


class IncompleteRunError(RuntimeError):
    """Training finished but a step after it failed; the run directory holds everything else (see ``finish``)."""

    def __init__(self, summary: dict[str, Any], failed: list[str]) -> None:
        self.summary = summary
        super().__init__(
            f"training finished, but {'; '.join(failed)}. Everything else is in {summary['run_dir']} "
            "(summary.json lists what is missing)"
        )


def finish(
    cfg: DictConfig,
    model: TokenReducer,
    datamodule: ImageDataModule,
    run_dir: Path,
    logger: Logger | None,
    step: int,
    metrics: dict[str, float],
    token_maps: Sequence[Callback] = (),
) -> dict[str, Any]:
    """Evaluate, count, export and summarise a trained model; return the summary (also written to summary.json).

    No step here may lose the trained run: each failure is logged and skipped, summary.json and export/ are written
    with whatever the other steps produced, and :class:`IncompleteRunError` then names what failed. Re-running with
    ``ckpt_path=<run_dir>`` redoes only these steps, since every phase has its snapshot.
    """
    failed = [failure for callback in token_maps for failure in getattr(callback, "failures", [])]

    def attempt(step_name: str, work: Callable[[], Any], default: Any = None) -> Any:
        try:
            return work()
        except Exception as err:  # noqa: BLE001 - whatever broke, the trained weights must still be written out
            log.exception("%s failed", step_name)
            reason = f"{type(err).__name__}: {str(err).splitlines()[0]}" if str(err) else type(err).__name__
            failed.append(f"{step_name} failed ({reason}; redo: tokred-train <same overrides> ckpt_path={run_dir})")
            return default

    img_size = int(cfg.backbone.img_size)
    # The deployable model on the validation split and, once, on the held-out test split (the best checkpoint was
    # chosen on validation, so only the test numbers are untouched by model selection).
    per_image: dict[str, torch.Tensor] = {}
    final = attempt(
        "the final evaluation", lambda: evaluate(model.deployable(), datamodule, cfg, run_dir, logger, per_image), {}
    )
    if datamodule.test_set is None:
        log.info(
            "dataset %s has no test split: summary.json's test/acc1 and test/acc5 are null; val/acc1 is the "
            "reported figure (the same split chose the best checkpoint)",
            cfg.dataset.name,
        )
    stats = model_stats(model, img_size, counted=False)
    stats |= attempt("counting FLOPs", lambda: {"model/gmacs_counted": counted_gmacs(model.deployable(), img_size)}, {})
    stats |= attempt(
        "costing a training step",
        lambda: {"model/train_gmacs": train_cost(model, model.build_teacher())["train_gmacs"]},
        {},
    )
    summary = {
        "backbone": cfg.backbone.name,
        "backbone_model": cfg.backbone.model,
        "reducer": cfg.reducer.name,
        "reducer_knobs": model.knobs(),
        "dataset": cfg.dataset.name,
        "seed": int(cfg.seed),
        **stats,
        "val/acc1": final.get("val/acc1"),
        "val/acc5": final.get("val/acc5"),
        "val/acc1_best": metrics.get("val/acc1_best"),
        "val/acc1_last_epoch": metrics.get("val/acc1"),
        "test/acc1": final.get("test/acc1"),
        "test/acc5": final.get("test/acc5"),
        "global_step": step,
        "train/img_s": metrics.get("train/img_s"),  # the fits' images per second of training, where measured
        "run_dir": str(run_dir),
        "checkpoints": str(run_dir / "checkpoints"),
        "logs": logger.location() if logger is not None else "none (logger=null)",
        "degenerate": degenerate(
            stats["model/tokens_per_block"],
            model.vit.num_prefix_tokens,
            final.get("val/acc1"),
            datamodule.num_classes,
            len(datamodule.val_set),
        ),
    }
    if summary["degenerate"]:
        log.warning(
            "degenerate result: %s (tokred-report leaves it off the Pareto front)", "; ".join(summary["degenerate"])
        )
    if rank_zero_only.rank == 0:
        config = OmegaConf.to_container(cfg, resolve=True)
        attempt("the export", lambda: save_deployable(model, run_dir / "export", config))
        if per_image:
            attempt(
                "writing per-image results",
                lambda: write_per_image(run_dir / PER_IMAGE, {k: v.tolist() for k, v in per_image.items()}),
            )
        if failed:
            summary["failed_steps"] = list(failed)
        atomic_write_json(run_dir / "summary.json", summary)
    if logger is not None:
        attempt("logging the summary", lambda: logger.finish(summary))
    if failed:
        raise IncompleteRunError(summary, failed)
    return summary
