"""``tokred-train``'s work, independent of the command line: compose, run every phase, evaluate, export."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from omegaconf import DictConfig, OmegaConf

from tokred.backbones import create_backbone
from tokred.data import build_datamodule
from tokred.export import save_deployable
from tokred.flops import count_params, counted_gmacs
from tokred.reducers import create_reducer
from tokred.reducers.base import Phase, TokenReducer
from tokred.training.module import TokredModule
from tokred.training.optim import effective_lr
from tokred.io import atomic_write_json
from tokred.training.phases import PhaseContext, pending_phases, save_phase

log = logging.getLogger("tokred")


def build_model(cfg: DictConfig, num_classes: int) -> TokenReducer:
    vit = create_backbone(cfg.backbone, num_classes)
    return create_reducer(cfg.reducer, vit)


def model_stats(model: TokenReducer, img_size: int) -> dict[str, Any]:
    cost = model.cost()
    deploy = model.deployable()
    return {
        "model/gmacs": cost.gmacs,
        "model/gmacs_counted": counted_gmacs(deploy, img_size),
        "model/params_m": count_params(deploy) / 1e6,
        "model/tokens_per_block": cost.tokens_per_block,
    }


def _trainer(cfg: DictConfig, phase: Phase, run_dir: Path, logger: Any) -> L.Trainer:
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    if phase.epochs is not None:
        trainer_cfg["max_epochs"] = phase.epochs
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints" / phase.name, filename="best", monitor="val/acc1", mode="max",
        save_last=True, auto_insert_metric_name=False,
    )
    return L.Trainer(
        default_root_dir=run_dir, logger=logger, callbacks=[checkpoint, TQDMProgressBar(refresh_rate=10)],
        enable_model_summary=False, **trainer_cfg,
    )


def _fit(cfg: DictConfig, model: TokenReducer, datamodule, phase: Phase, run_dir: Path, logger: Any) -> dict[str, float]:
    optim = OmegaConf.to_container(cfg.optim, resolve=True) | phase.optim
    trainer = _trainer(cfg, phase, run_dir, logger)
    global_batch = int(cfg.dataset.batch_size) * trainer.world_size * int(cfg.trainer.get("accumulate_grad_batches", 1))
    module = TokredModule(
        model, optim, datamodule.num_classes, lr=effective_lr(optim, global_batch),
        label_smoothing=float(cfg.optim.get("label_smoothing", 0.0)), teacher=model.build_teacher(),
    )
    last = run_dir / "checkpoints" / phase.name / "last.ckpt"
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if last.is_file() else None)
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run every pending phase of the configured reducer; return the run summary (also written to summary.json)."""
    L.seed_everything(int(cfg.seed), workers=True)
    run_dir = Path(cfg.paths.output_dir)
    datamodule = build_datamodule(cfg.dataset)
    model = build_model(cfg, datamodule.num_classes)
    logger = L.pytorch.loggers.CSVLogger(run_dir, name="csv", version="")
    stats = model_stats(model, int(cfg.backbone.img_size))
    log.info("model: %s + %s, %.3f GMACs, %.2f M params", cfg.backbone.model, cfg.reducer.name,
             stats["model/gmacs"], stats["model/params_m"])
    metrics: dict[str, float] = {}
    for phase in pending_phases(model, run_dir):
        log.info("phase %r", phase.name)
        model.enter_phase(phase.name)
        if phase.run is not None:
            phase.run(PhaseContext(model, datamodule, cfg, run_dir))
        if phase.epochs != 0:
            metrics = _fit(cfg, model, datamodule, phase, run_dir, logger)
        save_phase(model, run_dir, phase.name)
    stats = model_stats(model, int(cfg.backbone.img_size))
    summary = {
        "backbone": cfg.backbone.model, "reducer": cfg.reducer.name, "dataset": cfg.dataset.name,
        "reducer_knobs": model.knobs(), **stats, **metrics, "run_dir": str(run_dir),
    }
    save_deployable(model, run_dir / "export", OmegaConf.to_container(cfg, resolve=True))
    atomic_write_json(run_dir / "summary.json", summary)
    return summary
