"""Training infrastructure: resume, NaN handling, DDP, bad input, wandb offline summaries, tokred-eval."""

from __future__ import annotations

import csv
import json
import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_only
from timm.scheduler import create_scheduler_v2

from conftest import FAST, run_cli
from tokred import reducers
from tokred.cli import eval as eval_cli
from tokred.cli import train as train_cli
from tokred.config import compose_config
from tokred.data.datamodule import IMAGENET_MEAN, IMAGENET_STD
from tokred.data.synthetic import ShapesDataset
from tokred.export import load_deployable
from tokred.io import PER_IMAGE, read_per_image
from tokred.reducers.base import Phase, TokenReducer
from tokred.training import phases as phases_mod
from tokred.training.loggers import wandb_mode
from tokred.training.module import NonFiniteLossError, TokredModule
from tokred.training.phases import PhaseContext, save_phase
from tokred.training.run import build_model, train

# FAST without its logger (the CLI tests choose theirs), and FAST's trainer part alone (for the file datasets).
FAST_DATA = [o for o in FAST if not o.startswith("logger=")]
FAST_TRAINER = [o for o in FAST if not o.startswith("dataset.")]
# Token maps are drawn (and tested) in test_visualize; here they would only cost seconds per run.
NO_MAPS = "visualize.every_n_epochs=0"


class Killed(Exception):
    """Stands in for a crash (OOM kill, pre-emption) at a chosen step."""


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> tuple[Path, dict]:
    """One finished FAST run (2 epochs x 2 steps) shared by the eval and bad-input tests."""
    root = tmp_path_factory.mktemp("trained")
    cfg = compose_config([*FAST, NO_MAPS, f"paths.root={root}"])
    cfg.paths.output_dir = str(root / "run")
    return root / "run", train(cfg)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def assert_nothing_lost(before: dict[str, bytes], after: dict[str, bytes]) -> None:
    """Every file is still there, unchanged, or (logs) only appended to."""
    for name, content in before.items():
        assert name in after, f"{name} was removed"
        assert after[name][: len(content)] == content, f"{name} was rewritten"


# ------------------------------------------------------------------------------------------------ resume
def test_a_run_killed_mid_epoch_resumes_at_the_same_step_and_optimizer_state(run_cfg, monkeypatch):
    # 3 steps per epoch, 2 epochs; last.ckpt every 2 steps. The kill comes after step 5, mid-way through epoch 1,
    # so the newest checkpoint is the mid-epoch one written at step 4.
    overrides = ("trainer.limit_train_batches=3", "checkpoint.every_n_train_steps=2", NO_MAPS)
    cfg = run_cfg(*overrides)
    run_dir = Path(cfg.paths.output_dir)

    def kill_at_step_5(self, outputs, batch, batch_idx):
        if self.global_step == 5:
            raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(TokredModule, "on_train_batch_end", kill_at_step_5)
        with pytest.raises(Killed):
            train(cfg)
    saved = torch.load(run_dir / "checkpoints/train/last.ckpt", weights_only=True)
    assert saved["global_step"] == 4 and not (run_dir / "phases/train.pt").exists()
    rows_before = list(csv.DictReader((run_dir / "csv/metrics.csv").open()))

    seen = {}

    def record_resumed_state(self):
        optimizer = self.trainer.optimizers[0]
        first = optimizer.param_groups[0]["params"][0]
        seen.update(
            step=self.global_step,
            lr=optimizer.param_groups[-1]["lr"],
            adam_steps={int(s["step"]) for s in optimizer.state.values()},
            exp_avg=optimizer.state[first]["exp_avg"].clone(),
        )

    monkeypatch.setattr(TokredModule, "on_train_start", record_resumed_state)
    resumed = run_cfg(*overrides, "ckpt_path=last")
    resumed.paths.output_dir = str(run_dir.parent / "a_newer_run")  # `last` finds the killed run next to it
    summary = train(resumed)

    assert summary["run_dir"] == str(run_dir) and not (run_dir.parent / "a_newer_run").exists()
    assert seen["step"] == 4 and seen["adam_steps"] == {4}
    assert torch.equal(seen["exp_avg"], saved["optimizer_states"][0]["state"][0]["exp_avg"])
    probe = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=float(cfg.optim.lr))
    timm_schedule, _ = create_scheduler_v2(
        probe,
        num_epochs=2,
        warmup_epochs=cfg.optim.warmup_epochs,
        warmup_lr=cfg.optim.warmup_lr,
        min_lr=cfg.optim.min_lr,
        step_on_epochs=False,
        updates_per_epoch=3,
    )
    timm_schedule.step_update(4)  # the LR timm's loop trains the 5th update at
    assert seen["lr"] == pytest.approx(probe.param_groups[0]["lr"])
    assert summary["global_step"] == 6, "the interrupted epoch finishes, then training ends where it would have"
    # Metrics first logged after the resume (the final test/*) add columns: the earlier rows keep their values.
    rows_after = list(csv.DictReader((run_dir / "csv/metrics.csv").open()))
    kept = [{k: row[k] for k in rows_before[0]} for row in rows_after[: len(rows_before)]]
    assert kept == rows_before, "the metrics logged before the kill are kept"
    assert json.loads((run_dir / "summary.json").read_text())["global_step"] == 6


class TwoPhases(TokenReducer):
    """A search step that logs, a fit, then a fine-tuning fit: the shape of a reducer's pipeline."""

    name = "two_phases"

    def phases(self) -> list[Phase]:
        return [Phase("search", 1, run=lambda ctx: ctx.log({"search/score": 0.5})), Phase("finetune", 1)]


def test_phases_log_into_one_run_with_monotonic_steps_and_resume_inside_a_later_phase(run_cfg, monkeypatch):
    monkeypatch.setitem(reducers._REGISTRY, TwoPhases.name, TwoPhases)
    cfg = run_cfg("trainer.limit_train_batches=3", "checkpoint.every_n_train_steps=1", NO_MAPS)
    cfg.reducer = {"name": TwoPhases.name}
    run_dir = Path(cfg.paths.output_dir)

    def kill_in_finetune(self, outputs, batch, batch_idx):
        if self.model.phase == "finetune" and self.global_step == 2:
            raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(TokredModule, "on_train_batch_end", kill_in_finetune)
        with pytest.raises(Killed):
            train(cfg)
    assert (run_dir / "phases/search.pt").is_file() and not (run_dir / "phases/finetune.pt").exists()
    summary = train(cfg)  # the same directory: search is skipped, finetune resumes at its step 2
    assert summary["global_step"] == 6
    assert summary["train/img_s"] > 0  # timed over the (resumed) fit's training batches
    rows = list(csv.DictReader((run_dir / "csv/metrics.csv").open()))
    steps = [int(r["step"]) for r in rows]
    assert steps == sorted(steps) and max(steps) == 6, "one monotonic step axis across phases and the resume"
    assert [r["search/score"] for r in rows if r["search/score"]] == ["0.5"]


class SearchWithoutFit(TokenReducer):
    """A search phase without a fit (like Patch Slimming's), then a fine-tuning fit whose set-up step (run by every
    rank) reports the weights it starts from."""

    name = "search_without_fit"
    searched_on: list[int] = []
    finetune_bias: list[float] = []

    def phases(self) -> list[Phase]:
        return [Phase("search", 0, run=self._search), Phase("finetune", 1, run=self._record)]

    def _search(self, ctx) -> None:
        self.searched_on.append(ctx.rank)
        with torch.no_grad():
            self.vit.head.bias.fill_(7.0)

    def _record(self, ctx) -> None:
        self.finetune_bias.append(float(self.vit.head.bias.detach().mean()))


def test_ranks_other_than_0_take_a_phase_without_fit_from_rank_0s_snapshot(run_cfg, monkeypatch):
    # Ranks started together by the cluster (srun) all reach the search; only rank 0 may run it, or GPU
    # non-determinism could give the ranks different architectures.
    monkeypatch.setitem(reducers._REGISTRY, SearchWithoutFit.name, SearchWithoutFit)
    monkeypatch.setattr(SearchWithoutFit, "searched_on", [])
    monkeypatch.setattr(SearchWithoutFit, "finetune_bias", [])
    cfg = run_cfg(NO_MAPS, "trainer.limit_train_batches=1")
    cfg.reducer = {"name": SearchWithoutFit.name}
    run_dir = Path(cfg.paths.output_dir)

    waiting = threading.Event()  # set by the "waiting for rank 0" message: rank 1 is blocked in the search phase
    monkeypatch.setattr(phases_mod, "log", SimpleNamespace(info=lambda *args: waiting.set()))
    monkeypatch.setattr(phases_mod, "POLL_S", 0.01)

    def rank_0_searches_later() -> None:
        assert waiting.wait(timeout=60)
        rank_0 = build_model(cfg, 10)
        rank_0._search(PhaseContext(rank_0, None, cfg, run_dir))
        save_phase(rank_0, run_dir, "search")

    writer = threading.Thread(target=rank_0_searches_later)
    writer.start()
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    try:
        train(cfg)
    finally:
        writer.join()
    assert waiting.is_set() and SearchWithoutFit.searched_on == [0], (
        "rank 1 waited for rank 0's search instead of running its own"
    )
    assert SearchWithoutFit.finetune_bias == [7.0], "and continued from rank 0's searched model"


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(run_cfg, monkeypatch):
    cfg = run_cfg("trainer.limit_train_batches=3", "checkpoint.every_n_train_steps=1", NO_MAPS)
    criterion = TokredModule.criterion

    def diverge_at_step_4(self, logits, targets):
        loss = criterion(self, logits, targets)
        return loss * float("nan") if self.global_step == 4 else loss

    monkeypatch.setattr(TokredModule, "criterion", diverge_at_step_4)
    with pytest.raises(NonFiniteLossError) as err:
        train(cfg)
    last = Path(cfg.paths.output_dir) / "checkpoints/train/last.ckpt"
    message = str(err.value)
    assert "non-finite training loss" in message and "step 4" in message and str(last) in message
    assert "optim.lr" in message and "\n" not in message
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 4
    assert all(torch.isfinite(t).all() for t in saved["state_dict"].values())
    assert not (Path(cfg.paths.output_dir) / "summary.json").exists()


def test_non_finite_weights_never_replace_a_checkpoint(run_cfg, monkeypatch):
    cfg = run_cfg("trainer.limit_train_batches=3", "checkpoint.every_n_train_steps=1", NO_MAPS)
    step = TokredModule.optimizer_step

    def corrupt_after_second_step(self, *args, **kwargs):
        step(self, *args, **kwargs)
        if self.global_step == 1:  # Lightning counts the step after this hook: this was the second update
            with torch.no_grad():
                self.model.vit.head.weight.fill_(float("inf"))

    monkeypatch.setattr(TokredModule, "optimizer_step", corrupt_after_second_step)
    with pytest.raises(NonFiniteLossError, match="vit.head.weight became non-finite at step 2"):
        train(cfg)
    saved = torch.load(Path(cfg.paths.output_dir) / "checkpoints/train/last.ckpt", weights_only=True)
    assert saved["global_step"] == 1 and torch.isfinite(saved["state_dict"]["model.vit.head.weight"]).all()


# ------------------------------------------------------------------------------------------------ after training
def _fail(*args, **kwargs):
    raise RuntimeError("simulated failure")


@pytest.mark.parametrize(
    "broken, step, kept",
    [
        ("tokred.training.run.counted_gmacs", "counting FLOPs", "export/model.safetensors"),
        ("tokred.training.run.save_deployable", "the export", "phases/train.pt"),
        ("tokred.visualize.TokenMapCallback.draw", "drawing token maps", "export/model.safetensors"),
    ],
)
def test_a_failing_post_training_step_keeps_the_run_and_names_the_redo(
    broken, step, kept, tmp_path, capsys, monkeypatch
):
    args = [*FAST, f"paths.root={tmp_path}", "trainer.max_epochs=1", "visualize.every_n_epochs=1"]
    with monkeypatch.context() as patch:
        patch.setattr(broken, _fail)
        code, out, err = run_cli(train_cli.main, capsys, *args)
    (run_dir,) = (tmp_path / "outputs/none/deit_tiny_cpu").iterdir()
    assert code == 1
    (line,) = err.strip().splitlines()[-1:]
    assert line.startswith("tokred-train: error: training finished, but") and step in line
    assert f"ckpt_path={run_dir}" in line and "val top-1" in out, "what was computed is still reported"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_step"] == 2 and summary["val/acc1"] is not None and (run_dir / kept).is_file()
    assert any(step in failure for failure in summary["failed_steps"])

    # The redo route the message names: no training again, the missing steps done, a complete record.
    code, out, err = run_cli(train_cli.main, capsys, *args, f"ckpt_path={run_dir}")
    assert code == 0, err
    redone = json.loads((run_dir / "summary.json").read_text())
    assert "failed_steps" not in redone and redone["global_step"] == 2
    assert redone["model/gmacs_counted"] == pytest.approx(redone["model/gmacs"], rel=0.02)
    assert (run_dir / "export/model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------ CLI: wandb + resume
def _wandb_records(path: Path):
    """Records of a wandb transaction log (``run-<id>.wandb``): the LevelDB-style log wandb writes offline."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, chunk = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST fragment
            record = pb.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def wandb_offline_run(path: Path) -> tuple[dict, dict, list[str], str]:
    """(final summary, config, tags, group) of an offline run directory."""
    summary, config, tags, group = {}, {}, [], ""
    for record in _wandb_records(next(path.glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            tags, group = list(record.run.tags), record.run.run_group
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "summary":
            for item in record.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return summary, config, tags, group


@pytest.mark.slow
def test_a_killed_run_resumes_with_ckpt_path_last_into_the_same_wandb_run(tmp_path, processes):
    # A wandb service inherited from a parent process (WANDB_SERVICE) must not be shared: a run killed while attached
    # to it would keep its id busy and the resume would fail with "run ID ... is in use". The parent is a separate
    # process that holds its service for the whole test, so the case does not depend on this process's wandb state.
    parent = processes.start(
        [
            sys.executable,
            "-c",
            "import os, sys, wandb; wandb.init(project='parent', mode='offline', dir=sys.argv[1]); "
            "print(os.environ['WANDB_SERVICE'], flush=True); sys.stdin.read()",
            str(tmp_path),
        ],
        env={k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    args = [
        sys.executable,
        "-m",
        "tokred.cli.train",
        *FAST_DATA,
        NO_MAPS,
        "logger=wandb",
        f"paths.root={tmp_path}",
        "trainer.limit_train_batches=4",
        "trainer.max_epochs=3",
        "checkpoint.every_n_train_steps=1",
    ]
    runs = tmp_path / "outputs/none/deit_tiny_cpu"
    env = dict(os.environ, WANDB_SERVICE=parent.stdout.readline().strip())
    assert env["WANDB_SERVICE"], "the parent process started no wandb service"
    first = processes.start(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not list(runs.glob("*/checkpoints/train/last.ckpt")) and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, f"the first run ended early: {first.stderr.read()[-2000:]}"
    processes.kill(first)
    (run_dir,) = runs.iterdir()
    assert not (run_dir / "summary.json").exists(), "the first run was killed before it finished"
    second = processes.run([*args, "ckpt_path=last"], timeout=300, env=env)
    processes.kill(parent)
    assert second.returncode == 0, second.stderr[-2000:]
    assert list(runs.iterdir()) == [run_dir], "the resumed run continues in the killed run's directory"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_step"] == 12
    out = second.stdout
    assert "val top-1" in out and "GMACs" in out and f"checkpoints:   {run_dir / 'checkpoints'}" in out
    assert (run_dir / ".hydra/config.yaml").is_file(), "the original Hydra config is kept"

    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and len({p.name.rsplit("-", 1)[1] for p in offline}) == 1, "one wandb run, continued"
    assert "wandb sync" in out and str(offline[-1]) in out
    logged, config, tags, group = wandb_offline_run(offline[-1])
    for key in (
        "backbone",
        "reducer",
        "reducer_knobs",
        "dataset",
        "model/gmacs",
        "model/params_m",
        "val/acc1",
        "val/acc1_best",
        "val/acc5",
    ):
        assert key in logged, key
    assert logged["model/gmacs"] == pytest.approx(0.0972, rel=0.01) and logged["reducer"] == "none"
    assert logged["val/acc1"] == pytest.approx(summary["val/acc1"])
    assert config["backbone"]["name"] == "deit_tiny_cpu" and config["reducer"]["name"] == "none"
    assert config["dataset"]["name"] == "synthetic" and "model/gmacs" in config
    assert group == "default" and {"none", "deit_tiny_cpu", "synthetic"} <= set(tags)  # the sweep_name


# ------------------------------------------------------------------------------------------------ DDP
def _evaluate_export(run_dir: Path) -> tuple[list[bool], float]:
    """Per-image top-1 right/wrong and mean loss of the exported model on the whole FAST validation split, in one
    process."""
    model = load_deployable(run_dir / "export")
    val = ShapesDataset(32, 64, 10, 0, "val")
    images = (
        torch.from_numpy(val.images).permute(0, 3, 1, 2).float() / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    ) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    labels = torch.from_numpy(val.labels).long()
    with torch.no_grad():
        logits = model(images)
    return (logits.argmax(1) == labels).tolist(), F.cross_entropy(logits, labels).item()


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_syncs_metrics_and_writes_one_run(tmp_path, processes):
    proc = processes.run(
        [
            sys.executable,
            "-m",
            "tokred.cli.train",
            *FAST,
            NO_MAPS,
            "trainer=ddp_cpu",
            f"paths.root={tmp_path}",
            "trainer.max_epochs=1",
        ],
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs/none/deit_tiny_cpu").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    # 64 images / 16 per batch = 4 batches, 2 per rank: 2 optimizer steps for the epoch.
    assert summary["global_step"] == 2
    assert (run_dir / "checkpoints/train/last.ckpt").is_file() and not list(run_dir.glob("**/*.tmp"))
    # Each rank validates 16 of the 32 images; the logged numbers must cover all 32, and the per-image results come
    # back in the split's order from both ranks.
    right, loss = _evaluate_export(run_dir)
    assert summary["val/acc1"] == pytest.approx(sum(right) / len(right))
    assert read_per_image(run_dir / PER_IMAGE)["val"] == right
    rows = (run_dir / "csv/metrics.csv").read_text().splitlines()
    header, last = rows[0].split(","), rows[-1].split(",")
    assert float(last[header.index("val/loss")]) == pytest.approx(loss, rel=1e-4)
    assert proc.stdout.count("val top-1") == 1, "only rank 0 reports"
    assert sorted(p.name for p in run_dir.glob("*.log")) == ["train.log"], "rank 1 writes no log file"


# ------------------------------------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def other_backbone_weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "deit_tiny.pth"
    torch.save(timm.create_model("deit_tiny_patch16_224", num_classes=10).state_dict(), path)
    return path


def _bad_image_folder(root: Path, problem: str) -> Path:
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("ant", "bee"):
            (root / split / cls).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (64, 64), (i * 40, 0, 0)).save(root / split / cls / f"{i}.png")
    broken = root / "val" / "ant" / "0.png"  # the first validation image: the sanity check reads it
    broken.write_bytes(b"" if problem == "empty" else b"\x89PNG garbage")
    return root


@pytest.mark.parametrize(
    "case",
    [
        "missing_root",
        "empty_image",
        "unreadable_image",
        "indivisible_size",
        "classes_vs_checkpoint",
        "classes_vs_resumed_run",
        "other_backbone_weights",
        "other_backbone_resume",
    ],
)
def test_bad_input_is_one_line_naming_the_fix_and_loses_nothing(
    case, trained_run, other_backbone_weights, tmp_path, capsys
):
    run_dir, _ = trained_run
    best = run_dir / "checkpoints/train/best.ckpt"
    args, fragment = {
        "missing_root": (
            ["dataset=cifar10", f"dataset.root={tmp_path / 'absent'}", f"ckpt_path={run_dir}"],
            "dataset.download=true",
        ),
        "empty_image": (
            ["dataset=imagefolder", f"dataset.root={_bad_image_folder(tmp_path / 'empty', 'empty')}"],
            "empty image file",
        ),
        "unreadable_image": (
            [
                "dataset=imagefolder",
                f"dataset.root={_bad_image_folder(tmp_path / 'bad', 'bad')}",
                "dataset.num_workers=0",
                "dataset.batch_size=4",
                "dataset.aug.mixup=0",
                "dataset.aug.cutmix=0",
            ],
            "0.png",
        ),
        "indivisible_size": ([*FAST, "backbone.img_size=60"], "use a multiple of 8"),
        "classes_vs_checkpoint": (
            [*FAST, "dataset.num_classes=5", f"backbone.checkpoint={best}"],
            "backbone.reset_head=true",
        ),
        "classes_vs_resumed_run": (
            [*FAST, "dataset.num_classes=5", f"ckpt_path={run_dir}"],
            "backbone.reset_head=true",
        ),
        "other_backbone_weights": ([*FAST, f"backbone.checkpoint={other_backbone_weights}"], "another backbone"),
        "other_backbone_resume": ([*FAST, "backbone.img_size=32", f"ckpt_path={run_dir}"], "backbone.img_size=64"),
    }[case]
    before = snapshot(run_dir)
    code, _, err = run_cli(train_cli.main, capsys, *FAST_TRAINER, NO_MAPS, f"paths.root={tmp_path}", *args)
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("tokred-train: error: ") and fragment in line, err[-2000:]
    assert "Traceback" not in err
    assert_nothing_lost(before, snapshot(run_dir))


# ------------------------------------------------------------------------------------------------ tokred-eval
def test_tokred_eval_agrees_across_checkpoint_formats(trained_run, tmp_path, capsys):
    run_dir, summary = trained_run
    data = [*FAST_DATA, f"paths.root={tmp_path}", "logger=csv"]
    rows = []
    for target in ("checkpoints/train/last.ckpt", "phases/train.pt", "export", ""):
        code, out, err = run_cli(eval_cli.main, capsys, f"ckpt_path={run_dir / target}", *data)
        assert code == 0, err[-2000:]
        rows.append(json.loads(out.strip().splitlines()[-1]))
    for row in rows:
        assert row["val/acc1"] == pytest.approx(summary["val/acc1"]) and row["val/acc5"] == pytest.approx(
            summary["val/acc5"]
        )
        assert row["model/gmacs"] == pytest.approx(summary["model/gmacs"], abs=1e-4)
        assert row["model/params_m"] == pytest.approx(summary["model/params_m"], abs=1e-4)
    assert "val/acc1" in (next((tmp_path / "outputs/eval").iterdir()) / "csv/metrics.csv").read_text()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["dataset.num_classes=5"], "dataset it was trained on (dataset=synthetic)"),
        (["ckpt_path=/nonexistent/best.ckpt"], "does not exist"),
    ],
)
def test_tokred_eval_bad_input_is_one_line(trained_run, tmp_path, capsys, args, fragment):
    run_dir, _ = trained_run
    code, _, err = run_cli(
        eval_cli.main, capsys, f"ckpt_path={run_dir / 'phases/train.pt'}", *FAST_DATA, f"paths.root={tmp_path}", *args
    )
    line = err.strip().splitlines()[-1]
    assert code == 2 and line.startswith("tokred-eval: error: ") and fragment in line


# ------------------------------------------------------------------------------------------------ launch details
def test_slurm_tasks_share_one_run_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_PROCID", "3")
    extra = train_cli.launch_overrides([f"paths.root={tmp_path}"])[1:]
    assert extra[0] == f'hydra.run.dir="{tmp_path}/outputs/none/deit_tiny_cpu/slurm-4242.0"'
    assert "hydra.output_subdir=null" in extra, "only rank 0 writes Hydra's config files"


def test_wandb_goes_online_only_with_credentials(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert wandb_mode("auto") == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "x" * 40 + "\n")
    assert wandb_mode("auto") == "online" and wandb_mode("offline") == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode("online") == "disabled"
