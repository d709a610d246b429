"""A run's record tells the truth: resumes with changed settings, Ctrl-C and SIGTERM, file permissions, degenerate
results, no clutter from refused runs, quiet libraries."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import FAST, run_cli
from tokred.benchmark.report import configurations, load_runs
from tokred.cli import eval as eval_cli
from tokred.cli import train as train_cli
from tokred.config import ConfigError, compose_config
from tokred.training.phases import InterruptCheckpoint
from tokred.training.run import degenerate, train

NO_MAPS = "visualize.every_n_epochs=0"


def files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------ permissions
def test_written_files_get_the_permissions_the_umask_gives(run_cfg):
    previous = os.umask(0o022)
    try:
        cfg = run_cfg("trainer.max_epochs=1", "visualize.every_n_epochs=1")
        train(cfg)
    finally:
        os.umask(previous)
    run_dir = Path(cfg.paths.output_dir)
    written = [
        "summary.json",
        "run_config.json",
        "export/config.json",
        "export/model.safetensors",
        "phases/train.pt",
        "checkpoints/train/last.ckpt",
        "checkpoints/train/best.ckpt",
    ]
    written += [str(p.relative_to(run_dir)) for p in run_dir.glob("token_maps/*.png")]
    assert any(name.startswith("token_maps/") for name in written)
    for name in written:
        assert stat.S_IMODE(os.stat(run_dir / name).st_mode) == 0o644, name


# ------------------------------------------------------------------------------------------------ resume
def test_a_resume_with_changed_settings_is_refused_and_the_record_kept(run_cfg):
    cfg = run_cfg("reducer=evo_vit", "reducer.keep_ratio=0.5", NO_MAPS)
    train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    before = files(run_dir)

    changed = run_cfg("reducer=evo_vit", "reducer.keep_ratio=0.25", "optim.lr=5e-4", NO_MAPS, f"ckpt_path={run_dir}")
    with pytest.raises(ConfigError, match=r"reducer\.keep_ratio=0\.5 \(now 0\.25\)") as refused:
        train(changed)
    assert "optim.lr" in str(refused.value) and "\n" not in str(refused.value)
    assert files(run_dir) == before, "a refused resume changes nothing in the run"

    # Extending a run that was cut short (here: killed after its last checkpoint, before its phase snapshot) by more
    # epochs is a change a resume may make: it trains on from where the run stopped.
    (run_dir / "phases/train.pt").unlink()
    (run_dir / "summary.json").unlink()
    longer = run_cfg(
        "reducer=evo_vit", "reducer.keep_ratio=0.5", NO_MAPS, "trainer.max_epochs=3", f"ckpt_path={run_dir}"
    )
    assert train(longer)["global_step"] == 3 * 2


# ------------------------------------------------------------------------------------------------ signals
def _read_until(stream, pattern: str, deadline: float) -> re.Match:
    """Read a subprocess's output (the progress bar writes ``\\r``-separated updates) until ``pattern`` matches."""
    seen = ""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([stream], [], [], 0.5)
        if ready:
            chunk = os.read(stream.fileno(), 65536).decode(errors="replace")
            if not chunk:
                break
            seen += chunk
            match = re.search(pattern, seen[-4000:])
            if match:
                return match
    raise AssertionError(f"never saw {pattern!r}; stderr ended with: {seen[-2000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_save_a_resumable_checkpoint(signum, tmp_path, processes):
    # 100 steps of 16 images in one epoch, periodic checkpoints off: only the signal can write last.ckpt mid-epoch.
    args = [
        sys.executable,
        "-m",
        "tokred.cli.train",
        "dataset.train_size=1600",
        "dataset.val_size=32",
        "dataset.batch_size=16",
        "trainer.max_epochs=1",
        "trainer.limit_val_batches=1",
        "logger=csv",
        NO_MAPS,
        "checkpoint.every_n_train_steps=0",
        f"paths.root={tmp_path}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = processes.start(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _read_until(run.stdout, r"Epoch 0:[^\r\n]*?\| [1-9]\d+/100", time.monotonic() + 300)  # >= 10 steps done
    run.send_signal(signum)
    _, err = run.communicate(timeout=120)
    (run_dir,) = (tmp_path / "outputs/none/deit_tiny_cpu").iterdir()
    last = run_dir / "checkpoints/train/last.ckpt"
    line = err.decode().strip().splitlines()[-1]
    assert run.returncode == 128 + signum, line
    assert line.startswith(f"tokred-train: error: interrupted by {signal.Signals(signum).name} at step")
    assert f"saved {last}" in line and f"ckpt_path={run_dir}" in line
    step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert 10 <= step < 100 and not (run_dir / "summary.json").exists()

    resumed = processes.run([*args, f"ckpt_path={run_dir}"], timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((run_dir / "summary.json").read_text())["global_step"] == 100


def test_a_second_interrupt_exits_at_once(tmp_path):
    callback = InterruptCheckpoint(tmp_path / "last.ckpt")
    callback._handle(signal.SIGINT, None)  # the first one only asks for a checkpoint after this step
    assert callback.requested == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
        callback._handle(signal.SIGINT, None)


# ------------------------------------------------------------------------------------------------ degenerate results
def test_degenerate_structures_and_chance_level_are_named():
    assert degenerate([17, 9, 5, 3], 1, 0.9, 10, 1000) == []
    assert degenerate([17, 9, 1, 1], 1, 0.9, 10, 1000) == ["keeps no patch token from block 2 on"]
    # chance for 10 classes on 1000 images: 10 % + 3 standard errors (2.8 %) is still chance; 13.0 % is not.
    assert degenerate([17] * 4, 1, 0.128, 10, 1000) == ["top-1 12.8% is chance level for 10 classes"]
    assert degenerate([17] * 4, 1, 0.130, 10, 1000) == []
    assert degenerate([17, 5, 5, 5], 5, None, 10, 1000) == ["keeps no patch token from block 1 on"]  # 4 registers


def _summary(root: Path, name: str, reducer: str, gmacs: float, acc1: float, reasons: list[str]) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "summary.json").write_text(
        json.dumps(
            {
                "backbone": "deit_tiny_cpu",
                "reducer": reducer,
                "model/gmacs": gmacs,
                "val/acc1": acc1,
                "reducer_knobs": {},
                "degenerate": reasons,
            }
        )
    )


def test_report_leaves_degenerate_runs_off_the_pareto_front_unless_asked(tmp_path):
    _summary(tmp_path, "base", "none", 0.1, 0.9, [])
    _summary(tmp_path, "half", "evo_vit", 0.05, 0.85, [])
    _summary(tmp_path, "cls_only", "patch_slimming", 0.004, 0.11, ["keeps no patch token from block 0 on"])
    runs = load_runs(tmp_path)

    def front(include_degenerate: bool) -> set[str]:
        groups, _, _ = configurations(runs, include_degenerate)
        return {Path(r["run_dir"]).name for r in groups if r["pareto_gmacs"]}

    assert front(False) == {"base", "half"}
    assert front(True) == {"base", "half", "cls_only"}


def test_a_trained_run_records_whether_it_is_degenerate(run_cfg):
    summary = train(run_cfg("trainer.max_epochs=1", NO_MAPS))
    assert isinstance(summary["degenerate"], list)
    expected = degenerate(summary["model/tokens_per_block"], 1, summary["val/acc1"], 10, 32)
    assert summary["degenerate"] == expected


# ------------------------------------------------------------------------------------------------ refused runs
@pytest.mark.parametrize("bad", ["optim.lr=-1", "reducer=evo_vit reducer.keep_ratio=2", "dataset.batch_size=0"])
def test_a_refused_run_leaves_no_directory_behind(bad, tmp_path, capsys):
    code, _, err = run_cli(train_cli.main, capsys, *FAST, f"paths.root={tmp_path}", *bad.split())
    assert code == 2 and err.count("\n") == 1
    assert not list((tmp_path / "outputs").rglob("*.log")), "the refused run's directory was left behind"


def test_a_refused_resume_leaves_the_run_untouched(run_cfg, tmp_path, capsys):
    cfg = run_cfg("trainer.max_epochs=1", NO_MAPS)
    train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    before = files(run_dir)
    code, _, err = run_cli(
        train_cli.main,
        capsys,
        *FAST,
        f"paths.root={tmp_path}",
        "trainer.max_epochs=1",
        NO_MAPS,
        "optim.lr=0.5",
        f"ckpt_path={run_dir}",
    )
    assert code == 2 and "optim.lr" in err
    assert files(run_dir) == before and not list(run_dir.glob(".hydra/resume-*"))


# ------------------------------------------------------------------------------------------------ papercuts
def test_quiet_by_default_and_verbose_on_request(tmp_path, capsys):
    args = [*FAST, f"paths.root={tmp_path}", "trainer.max_epochs=1", NO_MAPS]
    code, out, err = run_cli(train_cli.main, capsys, *args)
    assert code == 0 and "GPU available" not in out + err and "val top-1" in out
    code, out, err = run_cli(train_cli.main, capsys, *args, "verbose=true", "sweep_name=again")
    assert code == 0 and "GPU available" in out + err


def test_threads_sets_torch_threads(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        code, _, err = run_cli(
            train_cli.main, capsys, *FAST, f"paths.root={tmp_path}", "trainer.max_epochs=1", NO_MAPS, "threads=1"
        )
        assert code == 0, err
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_cpu_processes_sharing_a_machine_share_its_cores():
    from tokred.cli.train import torch_threads

    cores = os.cpu_count()
    assert torch_threads(compose_config(["trainer=ddp_cpu"])) == max(1, cores // 2)
    assert torch_threads(compose_config(["trainer=ddp_cpu", "threads=3"])) == 3
    assert torch_threads(compose_config([])) is None


def test_tokred_eval_says_where_it_wrote_and_flops_defaults_to_the_training_backbone(run_cfg, tmp_path, capsys):
    cfg = run_cfg("trainer.max_epochs=1", NO_MAPS)
    train(cfg)
    out_dir = tmp_path / "eval"
    code, out, err = run_cli(
        eval_cli.main, capsys, f"ckpt_path={cfg.paths.output_dir}", "dataset.val_size=32", f"hydra.run.dir={out_dir}"
    )
    assert code == 0, err
    assert f"wrote {out_dir / 'eval.json'}" in out and json.loads(out.strip().splitlines()[-1])["val/acc1"] >= 0
    assert compose_config([], "flops").backbone.name == compose_config([]).backbone.name == "deit_tiny_cpu"
