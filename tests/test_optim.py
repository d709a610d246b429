"""The presets' LR schedules equal their official training loops' (timm's schedulers, per parameter), in a real fit
and across a resume; the weight EMA."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler, create_scheduler_v2

from conftest import TINY_REDUCER
from tokred.config import compose_config
from tokred.training.module import TokredModule
from tokred.training.optim import build_optimizer, build_scheduler, effective_lr, scheduler_interval, step_scheduler
from tokred.training.run import build_model, train

UPDATES = 3  # optimiser updates per epoch in the simulated fits
NO_MAPS = "visualize.every_n_epochs=0"


class Killed(Exception):
    """Stands in for a crash at a chosen point."""


def preset_fit(preset: str, phase: str | None = None):
    """The model (tiny backbone, the preset's reducer), merged optim config, LR and epochs of one fit of ``preset``."""
    overrides = [f"experiment={preset}", "backbone=deit_tiny_cpu", "backbone.pretrained=false"]
    cfg = compose_config(overrides)
    tiny = [o for o in TINY_REDUCER.get(cfg.reducer.name, []) if not o.startswith("reducer.finetune_epochs=")]
    cfg = compose_config([*overrides, *tiny, "reducer.target_gmacs=null"])
    model = build_model(cfg, 10)
    fit = next(p for p in model.phases() if p.name == (phase or p.name) and p.epochs != 0)
    model.enter_phase(fit.name)
    optim = dict(cfg.optim) | fit.optim
    batch = int(cfg.dataset.batch_size) * int(cfg.trainer.devices) * int(cfg.trainer.get("accumulate_grad_batches", 1))
    return model, optim, effective_lr(optim, batch), fit.epochs or int(cfg.trainer.max_epochs)


def lr_by_param(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g["lr"] for g in optimizer.param_groups for p in g["params"]}


def tokred_curve(model, optim: dict, lr: float, epochs: int) -> list[dict[str, float]]:
    """The LR of every parameter at every optimiser update, stepped as TokredModule.lr_scheduler_step does."""
    optimizer = build_optimizer(model, optim, lr)
    scheduler = build_scheduler(optimizer, optim, epochs, UPDATES)
    curve = []
    for epoch in range(epochs):
        for update in range(UPDATES):
            curve.append(lr_by_param(model, optimizer))
            if scheduler_interval(optim) == "step":
                step_scheduler(scheduler, optim, epoch, epoch * UPDATES + update + 1)
        if scheduler_interval(optim) == "epoch":
            step_scheduler(scheduler, optim, epoch, (epoch + 1) * UPDATES)
    return curve


def deit_loop(model, optim: dict, lr: float, epochs: int) -> list[dict[str, float]]:
    """DeiT's main.py (Evo-ViT, ViT-Slim retrain.py, EViT): timm's create_optimizer / create_scheduler from its args,
    ``lr_scheduler.step(epoch)`` after each epoch."""
    optimizer = create_optimizer_v2(model, "adamw", lr=lr, weight_decay=optim["weight_decay"])
    args = SimpleNamespace(
        sched=optim["scheduler"],
        epochs=epochs,
        warmup_epochs=optim["warmup_epochs"],
        warmup_lr=optim["warmup_lr"],
        min_lr=optim["min_lr"],
        cooldown_epochs=10,
        decay_epochs=30,
    )
    lr_scheduler, _ = create_scheduler(args, optimizer)
    curve = []
    for epoch in range(epochs):
        curve += [lr_by_param(model, optimizer)] * UPDATES
        lr_scheduler.step(epoch)
    return curve


def per_update_loop(model, optim: dict, lr: float, epochs: int) -> list[dict[str, float]]:
    """timm's train.py with --sched-on-updates (Haurum et al.'s Top-K): step_update after every update."""
    optimizer = create_optimizer_v2(model, "adamw", lr=lr, weight_decay=optim["weight_decay"])
    scheduler, _ = create_scheduler_v2(
        optimizer,
        "cosine",
        num_epochs=epochs,
        warmup_epochs=optim["warmup_epochs"],
        warmup_lr=optim["warmup_lr"],
        min_lr=optim["min_lr"],
        step_on_epochs=False,
        updates_per_epoch=UPDATES,
    )
    curve = []
    for update in range(epochs * UPDATES):
        curve.append(lr_by_param(model, optimizer))
        scheduler.step_update(update + 1)
    return curve


@pytest.mark.parametrize(
    "preset, phase, official",
    [
        ("evo_vit_deit_s", None, deit_loop),
        ("vit_slim_deit_s", "retrain", deit_loop),
        ("vit_slim_deit_b", "retrain", deit_loop),
        ("evit_deit_s", None, deit_loop),
        ("tome_deit_s", None, deit_loop),
        ("ats_deit_s", None, deit_loop),
        ("ps_vit_s", "finetune", deit_loop),
        ("topk_deit_s", None, per_update_loop),
    ],
)
def test_each_presets_lr_equals_its_official_loop_per_parameter_at_every_update(preset, phase, official):
    model, optim, lr, epochs = preset_fit(preset, phase)
    ours, theirs = tokred_curve(model, optim, lr, epochs), official(model, optim, lr, epochs)
    assert len(ours) == len(theirs) == epochs * UPDATES
    for update, (mine, ref) in enumerate(zip(ours, theirs)):
        assert mine.keys() == ref.keys()
        assert all(mine[n] == pytest.approx(ref[n], rel=1e-12, abs=0) for n in mine), (preset, update)


def test_the_vit_slim_search_is_constant_and_dynamicvit_matches_its_per_iteration_cosine():
    model, optim, lr, epochs = preset_fit("vit_slim_deit_s", "search")
    assert {v for lrs in tokred_curve(model, optim, lr, epochs) for v in lrs.values()} == {5e-4}

    # DynamicViT's own cosine_scheduler after its warm-up (phase finetune): final + (base - final)(1 + cos(pi i/N))/2
    # over the N remaining iterations, the backbone's whole schedule scaled by lr_scale 0.01.
    model, optim, lr, epochs = preset_fit("dynamicvit_deit_s", "finetune")
    total = epochs * UPDATES
    for i, lrs in enumerate(tokred_curve(model, optim, lr, epochs)):
        value = 1e-6 + 0.5 * (lr - 1e-6) * (1 + math.cos(math.pi * i / total))
        for name, got in lrs.items():
            assert got == pytest.approx(value * (1.0 if "predictor" in name else 0.01), rel=1e-12), (i, name)


def test_a_bad_cooldown_is_one_line_naming_the_key():
    model, optim, lr, _ = preset_fit("sit_deit_s")
    with pytest.raises(ValueError, match="optim.cooldown_epochs=10") as err:
        build_scheduler(build_optimizer(model, optim, lr), optim, 10, UPDATES)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------ in a real fit
def record_lrs(seen: list):
    def hook(self, batch, batch_idx):
        optimizer = self.trainer.optimizers[0]
        seen.append((self.current_epoch, lr_by_param(self.model, optimizer)))

    return hook


def test_a_per_epoch_schedule_steps_at_epoch_ends_and_resumes_after_a_kill(run_cfg, monkeypatch):
    # DeiT's loop in a real fit: 5 epochs of 2 updates, 2 warm-up epochs, the LR lagging one epoch; killed at the
    # start of epoch 3, resumed from the end-of-epoch-2 checkpoint.
    overrides = (
        "trainer.max_epochs=5",
        "optim.per_epoch=true",
        "optim.lag_one_epoch=true",
        "optim.warmup_epochs=2",
        "optim.lr=1e-2",
        "checkpoint.every_n_train_steps=0",
        NO_MAPS,
    )
    cfg = run_cfg(*overrides)
    seen: list = []
    record = record_lrs(seen)

    def kill_in_epoch_3(self, batch, batch_idx):
        record(self, batch, batch_idx)
        if self.current_epoch == 3:
            raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(TokredModule, "on_train_batch_start", kill_in_epoch_3, raising=False)
        with pytest.raises(Killed):
            train(cfg)
    seen.pop()  # epoch 3's first batch never trained
    monkeypatch.setattr(TokredModule, "on_train_batch_start", record, raising=False)
    train(run_cfg(*overrides, "ckpt_path=last"))

    model = build_model(cfg, 10)
    optim = dict(cfg.optim)
    expected = deit_loop(model, optim, float(cfg.optim.lr), 5)[::UPDATES]
    assert [e for e, _ in seen] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    for (epoch, got), ref in zip(seen, [x for x in expected for _ in range(2)]):
        assert got == pytest.approx(ref, rel=1e-12), epoch
    assert len({lrs["vit.cls_token"] for _, lrs in seen}) == 4  # epochs 0 and 1 share the start value


# ------------------------------------------------------------------------------------------------ EMA
def test_the_weight_ema_follows_each_update_is_validated_and_resumes(run_cfg, monkeypatch):
    overrides = ("optim.ema_decay=0.5", "trainer.max_epochs=2", "checkpoint.every_n_train_steps=0", NO_MAPS)
    cfg = run_cfg(*overrides)
    run_dir = Path(cfg.paths.output_dir)
    hook = TokredModule.on_train_batch_end

    def check_update(self, outputs, batch, batch_idx):
        before = {k: v.clone() for k, v in self.ema.module.state_dict().items()}
        hook(self, outputs, batch, batch_idx)
        model = self.model.state_dict()
        for k, v in self.ema.module.state_dict().items():
            if v.is_floating_point():
                torch.testing.assert_close(v, 0.5 * before[k] + 0.5 * model[k])
        if self.current_epoch == 1:
            raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(TokredModule, "on_train_batch_end", check_update)
        with pytest.raises(Killed):
            train(cfg)
    saved = torch.load(run_dir / "checkpoints/train/last.ckpt", weights_only=True)["state_dict"]
    ema = {k.removeprefix("ema.module."): v for k, v in saved.items() if k.startswith("ema.module.")}
    assert (
        ema and ema.keys() == {k.removeprefix("model."): v for k, v in saved.items() if k.startswith("model.")}.keys()
    )
    assert any(not torch.equal(ema[k], saved[f"model.{k}"]) for k in ema)

    resumed = {}

    def record_resumed(self):
        resumed.update({k: v.clone() for k, v in self.ema.module.state_dict().items()})

    monkeypatch.setattr(TokredModule, "on_train_start", record_resumed)
    train(run_cfg(*overrides, "ckpt_path=last"))
    assert all(torch.equal(resumed[k], v) for k, v in ema.items())
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val_ema/acc1")]
    assert rows and all(0 <= float(r["val_ema/acc1"]) <= 1 for r in rows)
