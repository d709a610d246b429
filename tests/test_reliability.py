"""Nothing lost, nothing run that should not be: one process per run directory, results files that merge, resumes
validated before they touch anything, read-only and full disks, one-line errors naming the knob in every CLI."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FAST, run_cli
from tokred.backbones import CheckpointError
from tokred.benchmark.compare import main as compare_main
from tokred.benchmark.outputs import merge_rows
from tokred.cli import benchmark as benchmark_cli
from tokred.cli import eval as eval_cli
from tokred.cli import flops as flops_cli
from tokred.cli import report as report_cli
from tokred.cli import train as train_cli
from tokred.cli import visualize as visualize_cli
from tokred.config import ConfigError, compose_config
from tokred.training import phases
from tokred.training.module import NonFiniteLossError, TokredModule
from tokred.training.run import build_model, train

NO_MAPS = "visualize.every_n_epochs=0"
TINY_TIMING = ["batch_size=2", "warmup=1", "repeats=2", "iters=1", "latency_repeats=1"]


def files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------ one owner
def test_a_run_directory_has_one_owner_and_a_dead_owners_lock_is_taken_over(run_cfg, caplog):
    cfg = run_cfg("trainer.max_epochs=1", NO_MAPS)
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True)
    lock = run_dir / ".lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "since": "earlier"}))
    with pytest.raises(ConfigError, match=f"is in use by pid {os.getpid()}") as refused:
        train(cfg)
    assert "\n" not in str(refused.value) and lock.is_file(), "the owner's lock stays"
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"], "the refused run wrote nothing"

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock.write_text(json.dumps({"pid": gone.pid, "host": os.uname().nodename, "since": "earlier"}))
    assert train(cfg)["global_step"] == 2
    assert "taking over" in caplog.text and not lock.exists()


# ------------------------------------------------------------------------------------------------ results files
def test_merge_rows_replaces_only_the_re_measured_rows(tmp_path):
    path = tmp_path / "benchmark.json"
    key = lambda r: (r["reducer"],)  # noqa: E731
    path.write_text(
        json.dumps(
            {
                "rows": [{"reducer": "none", "x": 1}, {"reducer": "sit", "x": 1}],
                "failed": [{"reducer": "tome", "error": "boom"}],
            }
        )
    )
    merged = merge_rows(path, [{"reducer": "none", "x": 2}, {"reducer": "tome", "x": 2}], key)
    assert {r["reducer"]: r["x"] for r in merged if "x" in r} == {"none": 2, "sit": 1, "tome": 2}
    assert len(merged) == 3 and all("measured" in r for r in merged if r["x"] == 2)


def test_a_partial_benchmark_keeps_the_earlier_rows(tmp_path, monkeypatch, capsys):
    def bench(*reducers: str) -> dict:
        monkeypatch.setattr(
            sys,
            "argv",
            [
                "tokred-benchmark",
                "backbones=[deit_tiny_cpu]",
                *TINY_TIMING,
                f"reducers=[{','.join(reducers)}]",
                "budgets=[]",
                f"out_dir={tmp_path}",
                "machine=test",
            ],
        )
        benchmark_cli.main()
        return json.loads((tmp_path / "test/benchmark.json").read_text())

    first = {r["reducer"]: r for r in bench("evo_vit", "sit")["rows"]}
    second = {r["reducer"]: r for r in bench("sit")["rows"]}
    assert set(second) == {"none", "evo_vit", "sit"}, "the evo_vit row of the first run is kept"
    assert second["evo_vit"] == first["evo_vit"] and second["sit"]["measured"] >= first["sit"]["measured"]
    assert "measured" in (tmp_path / "test/benchmark.md").read_text()


# ------------------------------------------------------------------------------------------------ resume
def test_an_unreadable_checkpoint_is_refused_before_the_run_is_touched(run_cfg):
    cfg = run_cfg("trainer.max_epochs=1", NO_MAPS)
    train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    (run_dir / "phases/train.pt").unlink()  # as if killed before the phase finished: the resume needs last.ckpt
    (run_dir / "summary.json").unlink()
    (run_dir / "checkpoints/train/last.ckpt").write_bytes(b"not a checkpoint")
    before = files(run_dir)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        train(run_cfg("trainer.max_epochs=1", NO_MAPS, f"ckpt_path={run_dir}"))
    assert files(run_dir) == before, "csv/hparams.yaml and the rest are untouched"


# ------------------------------------------------------------------------------------------------ NaN
@pytest.mark.parametrize(
    "log_every, nan_step, found, reads",
    [
        (2, 3, 5, [2, 3, 5]),  # read every 2nd step: at step 2, at epoch 1's end (a save) and 2 steps after the NaN
        (50, 4, 6, [3, 6]),  # read before each save only: the NaN ran on to epoch 2's end, whose save is refused
    ],
)
def test_a_nan_loss_read_lazily_still_stops_the_run_and_keeps_the_last_good_checkpoint(
    run_cfg, monkeypatch, log_every, nan_step, found, reads
):
    # 2 epochs of 3 steps, saved at epoch ends only; the loss is read every `log_every` steps and before each save.
    overrides = ["trainer.limit_train_batches=3", f"trainer.log_every_n_steps={log_every}"]
    cfg = run_cfg(*overrides, "checkpoint.every_n_train_steps=0", NO_MAPS)
    criterion, check = TokredModule.criterion, TokredModule.check_finite_loss
    synced = []

    def diverge(self, logits, targets):  # in epoch 2; the updates of the steps until the read run on the NaN
        loss = criterion(self, logits, targets)
        return loss * float("nan") if self.global_step == nan_step else loss

    def counted_check(self):
        if self._unchecked_batches:
            synced.append(self.global_step)
        check(self)

    monkeypatch.setattr(TokredModule, "criterion", diverge)
    monkeypatch.setattr(TokredModule, "check_finite_loss", counted_check)
    with pytest.raises(NonFiniteLossError) as err:
        train(cfg)
    last = Path(cfg.paths.output_dir) / "checkpoints/train/last.ckpt"
    message = str(err.value)
    assert f"non-finite training loss at step {nan_step}, found at step {found} (read every" in message
    assert str(last) in message and "\n" not in message
    assert synced == reads, "the loss is read on the host only there, not every step"
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 3 and all(torch.isfinite(t).all() for t in saved["state_dict"].values())


# ------------------------------------------------------------------------------------------------ disks
@pytest.fixture
def read_only_dir(tmp_path):
    source, target = tmp_path / "src", tmp_path / "ro"
    source.mkdir()
    target.mkdir()
    if subprocess.run(["mount", "--bind", "-o", "ro", str(source), str(target)], capture_output=True).returncode:
        pytest.skip("cannot make a read-only bind mount here (needs root)")
    yield target
    subprocess.run(["umount", str(target)], check=True)


def test_a_read_only_output_root_is_one_line(read_only_dir, capsys):
    code, _, err = run_cli(train_cli.main, capsys, *FAST, f"paths.root={read_only_dir}")
    assert code == 2 and err.count("\n") == 1 and "Read-only file system" in err and "paths.root=" in err


def test_a_file_in_the_way_of_the_output_root_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    code, _, err = run_cli(train_cli.main, capsys, *FAST, f"paths.root={tmp_path / 'file' / 'runs'}")
    assert code == 2 and err.count("\n") == 1 and "paths.root=" in err


def test_a_full_disk_keeps_the_last_checkpoint_and_is_one_line(tmp_path, capsys, monkeypatch):
    real_save = torch.save
    saves = []

    def save(payload, path):
        saves.append(path)
        if len(saves) < 3:
            return real_save(payload, path)
        Path(path).write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(phases.torch, "save", save)
    code, _, err = run_cli(
        train_cli.main, capsys, *FAST, NO_MAPS, f"paths.root={tmp_path}", "checkpoint.every_n_train_steps=1"
    )
    assert code == 2 and err.count("\n") == 1 and "No space left on device" in err and "ckpt_path=" in err
    (run_dir,) = (tmp_path / "outputs/none/deit_tiny_cpu").iterdir()
    assert not list(run_dir.rglob("*.tmp")), "no half-written temporary file is left"
    assert torch.load(run_dir / "checkpoints/train/last.ckpt", weights_only=True)["global_step"] >= 1


# ------------------------------------------------------------------------------------------------ one-line errors
BAD = {  # one bad value per config group, plus unknown keys
    "backbone": ["backbone.img_size=abc"],
    "reducer": ["reducer=evo_vit", "reducer.keep_ratio=abc"],
    "dataset": ["dataset.batch_size=abc"],
    "optim": ["optim.lr=abc"],
    "trainer": ["trainer.max_epochs=abc"],
    "logger": ["logger=nonexistent"],
    "unknown key": ["foo=1"],
    "unknown reducer knob": ["reducer=evo_vit", "reducer.kep_ratio=1"],
}
CLIS = {
    "tokred-train": (train_cli.main, []),
    "tokred-flops": (flops_cli.main, []),
    "tokred-eval": (eval_cli.main, ["ckpt_path=/nowhere"]),
    "tokred-visualize": (visualize_cli.main, ["ckpt_path=/nowhere"]),
}
NAMES = {
    "backbone": "backbone.img_size",
    "reducer": "reducer.keep_ratio",
    "dataset": "dataset.batch_size",
    "optim": "optim.lr",
    "trainer": "trainer.max_epochs",
    "logger": "nonexistent",
    "unknown key": "foo",
    "unknown reducer knob": "reducer.keep_ratio",
}


@pytest.mark.parametrize("cli", sorted(CLIS))
@pytest.mark.parametrize("group", sorted(BAD))
def test_every_cli_answers_bad_values_with_one_line_naming_the_key(cli, group, tmp_path, capsys):
    main, extra = CLIS[cli]
    args = [*extra, *BAD[group], *([] if cli == "tokred-flops" else [f"paths.root={tmp_path}"])]
    if cli == "tokred-flops" and group in ("dataset", "optim", "trainer", "logger"):
        pytest.skip("tokred-flops builds no data, optimiser, trainer or logger")
    if cli in ("tokred-eval", "tokred-visualize") and group in ("backbone", "reducer", "optim", "unknown reducer knob"):
        pytest.skip("the model comes from the checkpoint")
    code, out, err = run_cli(main, capsys, *args)
    assert code == 2, out + err
    assert err.count("\n") == 1 and "Traceback" not in err and NAMES[group] in err, err
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*.log")), "a run dir is left"


@pytest.mark.parametrize(
    "cli, args, key",
    [
        ("tokred-benchmark", ["batch_size=abc"], "batch_size"),
        ("tokred-benchmark", ["bogus=1"], "bogus"),
        ("tokred-compare", ["epochs=abc"], "epochs"),
        ("tokred-compare", ["bogus=1"], "bogus"),
        ("tokred-report", ["runs_dir=/tmp", "batch_size=abc"], "batch_size"),
        ("tokred-report", ["runs_dir=/nowhere"], "/nowhere"),
        ("tokred-report", ["/nowhere"], "runs_dir=/nowhere"),
        ("tokred-report", [], "runs_dir"),
    ],
)
def test_the_benchmark_and_report_clis_answer_bad_values_with_one_line(cli, args, key, processes):
    done = processes.run([str(Path(sys.executable).with_name(cli)), *args], timeout=120)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    errors = done.stderr.splitlines()
    assert len(errors) == 1 and "Traceback" not in done.stderr and key in errors[0], done.stderr


@pytest.mark.parametrize("name", ["train", "eval", "visualize", "flops", "benchmark", "compare", "report"])
def test_every_cli_answers_help(name, capsys):
    """--help prints the choices and keys and exits 0; shared config fragments are no choice (the dataset recipe)."""
    main = {"compare": compare_main, "report": report_cli.main}.get(name) or globals()[f"{name}_cli"].main
    code, out, err = run_cli(main, capsys, "--help")
    assert code == 0 and "Traceback" not in err, err
    assert ("reducer" in out or name == "report") and "deit_data_recipe" not in out
    if name in ("train", "eval"):
        assert "dataset: cifar10, cifar100, imagefolder, imagenet, synthetic" in out


def test_tokred_eval_without_ckpt_path_names_it(capsys, tmp_path):
    code, _, err = run_cli(eval_cli.main, capsys, f"paths.root={tmp_path}")
    assert code == 2 and err.count("\n") == 1 and "tokred-eval needs a model: ckpt_path=" in err


def test_sit_refuses_a_budget_it_cannot_reach():
    baseline = build_model(compose_config(["backbone=deit_tiny_cpu"], "flops"), 10).cost().gmacs
    cfg = compose_config(["backbone=deit_tiny_cpu", "reducer=sit", f"reducer.target_gmacs={2 * baseline}"], "flops")
    with pytest.raises(ValueError, match="out of reach"):
        build_model(cfg, 10)
