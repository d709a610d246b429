"""The LightningModule shared by every reducer: the reducer supplies the forward pass and loss terms."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from tokred.backbones import create_backbone, freeze
from tokred.reducers import create_reducer
from tokred.reducers.base import TokenReducer
from tokred.training.optim import build_optimizer, build_scheduler, scheduler_interval, step_scheduler

# No step yet had a non-finite loss: larger than any step, so the first bad step is a minimum (also across ranks).
NO_STEP = torch.iinfo(torch.int64).max


class NonFiniteLossError(RuntimeError):
    """Raised when a training loss turns NaN/inf; the last good checkpoint is left untouched."""


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy for class indices (with label smoothing) or soft targets (mixup/cutmix already smoothed)."""
    if targets.dim() == 1:
        return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()


class TokredModule(L.LightningModule):
    """Trains and evaluates a reducer; ``optim``/``lr`` are only needed to fit, ``meta`` (the config that rebuilds the
    model: backbone, reducer, num_classes) is stored in every checkpoint so resume and tokred-eval can check it.

    ``optim.ema_decay`` (off: null) keeps a weight EMA of the model (timm's ModelEmaV3, updated after every optimiser
    step, as the official DeiT-family loops do); it is validated alongside the model (``val_ema/*``) and is part of
    every checkpoint, so a resumed fit continues it. The exported model is the trained one, not the EMA.
    """

    def __init__(
        self,
        model: TokenReducer | None = None,
        optim: Mapping[str, Any] | None = None,
        num_classes: int | None = None,
        lr: float = 0.0,
        label_smoothing: float = 0.0,
        mixup: nn.Module | None = None,
        teacher: nn.Module | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        # What rebuilds this module without the run's config: ``TokredModule.load_from_checkpoint(path)`` calls
        # __init__ with these (model=None: rebuilt from ``meta``), then restores structure and tensors. Not the
        # model, teacher or mixup objects: the teacher's weights are the run's business, not the checkpoint's.
        self.save_hyperparameters(ignore=["model", "teacher", "mixup"], logger=False)
        if model is None or num_classes is None:
            if not meta:
                raise ValueError("TokredModule needs a model and num_classes, or the meta that rebuilds them")
            num_classes = int(meta["num_classes"]) if num_classes is None else num_classes
            if model is None:
                model = create_reducer(meta["reducer"], create_backbone(meta["backbone"], num_classes))
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
        self.ema: ModelEmaV3 | None = None
        if self.optim_cfg.get("ema_decay") is not None:
            self.ema = self._new_ema()
            self.val_ema_acc1 = self.val_acc1.clone()
            self.val_ema_acc5 = self.val_acc5.clone()
        self._ema_step = -1
        # The first step whose loss was non-finite, kept on the device: reading it forces a host-device sync, so
        # check_finite_loss() reads it only every trainer.log_every_n_steps batches and before every checkpoint.
        # A plain tensor, not a buffer: DDP would broadcast rank 0's buffer over the other ranks' every step.
        self._first_nonfinite_step: torch.Tensor | None = None
        self._unchecked_batches = 0
        # Set to {} to record, per evaluated split, whether each image's top-1 was right (tokred.training.run.evaluate
        # does, for the paired tests and bootstrap intervals of tokred-report); None during training.
        self.per_image: dict[str, list[torch.Tensor]] | None = None

    def _new_ema(self) -> ModelEmaV3:
        ema = ModelEmaV3(self.model, decay=float(self.optim_cfg["ema_decay"]))
        ema.requires_grad_(False)  # not optimised; DDP must not wait for its gradients
        return ema

    def train(self, mode: bool = True) -> TokredModule:
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
        global_batch = (
            trainer.world_size * trainer.accumulate_grad_batches * int(self.trainer.datamodule.cfg["batch_size"])
        )
        self.model.on_fit_start(global_batch, trainer.max_epochs)
        self._first_nonfinite_step = torch.full((), NO_STEP, dtype=torch.int64, device=self.device)
        self._unchecked_batches = 0

    def on_train_epoch_start(self) -> None:
        self.model.on_train_epoch_start(self.current_epoch, self.trainer.max_epochs)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        targets = labels
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)
        logits, terms = self.model.losses(images, targets, self.criterion, self.teacher)
        loss = torch.stack(list(terms.values())).sum()
        step = torch.where(torch.isfinite(loss.detach()), NO_STEP, self.global_step)
        self._first_nonfinite_step = torch.minimum(self._first_nonfinite_step, step)
        self._unchecked_batches += 1
        self.train_acc(logits.detach(), labels)
        self.log("train/loss", loss, prog_bar=True)
        for name, value in terms.items():
            self.log(f"train/{name}", value)
        self.log("train/acc1", self.train_acc, on_step=False, on_epoch=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[-1]["lr"])
        return loss

    def check_finite_loss(self) -> None:
        """Raise :class:`NonFiniteLossError` if a training loss was NaN/inf since the fit started: one host-device
        sync, decided across ranks (a rank left running would wait forever in the next gradient all-reduce). No-op
        when no batch trained since the last check, so every caller may check."""
        if self._unchecked_batches == 0:
            return
        self._unchecked_batches = 0
        # A copy: DDP's all-reduce works in place.
        first = int(self.trainer.strategy.reduce(self._first_nonfinite_step.clone(), reduce_op="min"))
        if first != NO_STEP:
            # Read lazily, the loss is found up to log_every_n_steps steps late, and those steps have trained on it:
            # their weights are never saved.
            raise NonFiniteLossError(
                f"non-finite training loss at step {first}, found at step {self.global_step} (read every "
                f"trainer.log_every_n_steps steps and before each save): nothing trained from step {first} on is "
                "saved; lower optim.lr or set trainer.gradient_clip_val; the last good checkpoint is kept"
            )

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Once per optimiser step: with gradient accumulation several batches end before the next one.
        if self.ema is not None and self.global_step != self._ema_step:
            self.ema.update(self.model)
            self._ema_step = self.global_step
        # Along with the logged metrics; trainer.log_every_n_steps=0 (no logging): at epoch ends and saves only.
        if 0 < self.trainer.log_every_n_steps <= self._unchecked_batches:
            self.check_finite_loss()

    def on_train_epoch_end(self) -> None:
        self.check_finite_loss()

    def _score(self, split: str, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.val_acc1(logits, labels)
        self.val_acc5(logits, labels)
        # torchmetrics objects sync their counts across ranks when computed; the mean loss needs sync_dist.
        self.log(f"{split}/loss", F.cross_entropy(logits, labels), sync_dist=True)
        self.log(f"{split}/acc1", self.val_acc1, prog_bar=True)
        self.log(f"{split}/acc5", self.val_acc5)
        if self.per_image is not None:
            self.per_image.setdefault(split, []).append(logits.argmax(-1) == labels)

    def _gather_per_image(self, split: str) -> None:
        """One bool per image of ``split`` in dataset order, from every rank."""
        if self.per_image is None or split not in self.per_image:
            return
        gathered = self.all_gather(torch.cat(self.per_image[split]))
        if gathered.dim() == 2:  # [world, n]: the DistributedSampler deals image i to rank i % world
            gathered = gathered.t().reshape(-1)
        self.per_image[split] = [gathered.cpu()]

    def on_validation_epoch_end(self) -> None:
        self._gather_per_image("val")

    def on_test_epoch_end(self) -> None:
        self._gather_per_image("test")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """``trainer.test``: the held-out test split, scored as validation is, under ``test/``."""
        images, labels = batch
        self._score("test", self.model(images), labels)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self.model(images)
        self._score("val", logits, labels)
        if self.ema is not None:
            ema_logits = self.ema.module(images)
            self.val_ema_acc1(ema_logits, labels)
            self.val_ema_acc5(ema_logits, labels)
            self.log("val_ema/loss", F.cross_entropy(ema_logits, labels), sync_dist=True)
            self.log("val_ema/acc1", self.val_ema_acc1)
            self.log("val_ema/acc5", self.val_ema_acc5)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = build_optimizer(self.model, self.optim_cfg, self.lr)
        max_epochs = max(int(self.trainer.max_epochs), 1)
        updates_per_epoch = max(1, int(self.trainer.estimated_stepping_batches) // max_epochs)
        scheduler = build_scheduler(optimizer, self.optim_cfg, max_epochs, updates_per_epoch)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": scheduler_interval(self.optim_cfg)},
        }

    def lr_scheduler_step(self, scheduler: Scheduler, metric: Any) -> None:
        # Lightning calls this after the last batch of each epoch ("epoch") or after each optimiser update ("step"),
        # before on_train_batch_end writes any checkpoint: a saved optimiser already holds the next LR.
        step_scheduler(scheduler, self.optim_cfg, self.current_epoch, self.global_step)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_finite_loss()  # every save, also those no _FiniteCheckpoint makes (Ctrl-C, SIGTERM)
        checkpoint["tokred_structure"] = self.model.structure()
        checkpoint["tokred"] = self.meta

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Rebuild searched structure (token schedules, kept channels) before Lightning loads the tensors into it.
        self.model.load_structure(checkpoint.get("tokred_structure", {}))
        if self.teacher is None:  # load_from_checkpoint builds no teacher: its frozen copy is not part of the model
            state = checkpoint.get("state_dict", {})
            for key in [k for k in state if k.startswith("teacher.")]:
                del state[key]
        if self.ema is not None:
            self.ema = self._new_ema()  # the same structure; its weights come with the checkpoint
