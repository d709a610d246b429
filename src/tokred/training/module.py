"""The LightningModule shared by every reducer: the reducer supplies the forward pass and loss terms."""

from __future__ import annotations

from typing import Any, Mapping

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from tokred.backbones import freeze
from tokred.reducers.base import TokenReducer
from tokred.training.optim import build_optimizer, lr_factor


class NonFiniteLossError(RuntimeError):
    """Raised when a training loss turns NaN/inf; the last good checkpoint is left untouched."""


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy for class indices (with label smoothing) or soft targets (mixup/cutmix already smoothed)."""
    if targets.dim() == 1:
        return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()


class TokredModule(L.LightningModule):
    """Trains and evaluates a reducer; ``optim``/``lr`` are only needed to fit, ``meta`` (the config that rebuilds the
    model: backbone, reducer, num_classes) is stored in every checkpoint so resume and tokred-eval can check it."""

    def __init__(
        self,
        model: TokenReducer,
        optim: Mapping[str, Any] | None,
        num_classes: int,
        lr: float = 0.0,
        label_smoothing: float = 0.0,
        mixup: nn.Module | None = None,
        teacher: nn.Module | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.optim_cfg = dict(optim or {})
        self.meta = dict(meta or {})
        self.lr = lr
        self.label_smoothing = label_smoothing
        self.mixup = mixup
        self.teacher = freeze(teacher) if teacher is not None else None
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_acc5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro")

    def train(self, mode: bool = True) -> "TokredModule":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # Lightning puts the whole module in train mode each epoch; the teacher stays frozen
        return self

    def criterion(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return soft_cross_entropy(logits, targets, self.label_smoothing)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def on_fit_start(self) -> None:
        trainer = self.trainer
        global_batch = trainer.world_size * trainer.accumulate_grad_batches * int(self.trainer.datamodule.cfg["batch_size"])
        self.model.on_fit_start(global_batch, trainer.max_epochs)

    def on_train_epoch_start(self) -> None:
        self.model.on_train_epoch_start(self.current_epoch, self.trainer.max_epochs)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        targets = labels
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)
        logits, terms = self.model.losses(images, targets, self.criterion, self.teacher)
        loss = torch.stack(list(terms.values())).sum()
        # Decided across ranks: a rank left running would wait forever in the next gradient all-reduce.
        if not self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True):
            bad = ", ".join(f"{k}={v.item():.3g}" for k, v in terms.items())
            raise NonFiniteLossError(
                f"non-finite training loss at epoch {self.current_epoch}, step {self.global_step} ({bad}); "
                "lower optim.lr or set trainer.gradient_clip_val; the last good checkpoint is kept"
            )
        self.train_acc(logits.detach(), labels)
        self.log("train/loss", loss, prog_bar=True)
        for name, value in terms.items():
            self.log(f"train/{name}", value)
        self.log("train/acc1", self.train_acc, on_step=False, on_epoch=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[-1]["lr"])
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self.model(images)
        self.val_acc1(logits, labels)
        self.val_acc5(logits, labels)
        # torchmetrics objects sync their counts across ranks when computed; the mean loss needs sync_dist.
        self.log("val/loss", F.cross_entropy(logits, labels), sync_dist=True)
        self.log("val/acc1", self.val_acc1, prog_bar=True)
        self.log("val/acc5", self.val_acc5)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = build_optimizer(self.model, self.optim_cfg, self.lr)
        steps_per_epoch = max(1, self.trainer.estimated_stepping_batches // max(self.trainer.max_epochs, 1))
        max_epochs = self.trainer.max_epochs
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, steps_per_epoch, self.optim_cfg, max_epochs, self.lr)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tokred_structure"] = self.model.structure()
        checkpoint["tokred"] = self.meta

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Rebuild searched structure (token schedules, kept channels) before Lightning loads the tensors into it.
        self.model.load_structure(checkpoint.get("tokred_structure", {}))
