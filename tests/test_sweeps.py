"""Sweeps: every experiment preset runs, launchers, resumable multiruns (skip finished, resume interrupted), and the
Optuna multi-objective sweeper. The multiruns are real ``tokred-train -m`` processes writing under tmp_path."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import TINY_REDUCER, Processes
from tokred.config import MAX_DIRNAME, compose_config, conf_dir, group_choices, job_dirname
from tokred.training.run import train

PRESETS = group_choices("experiment")
PAPER_PRESETS = [
    "evo_vit_deit_s",
    "sit_deit_s",
    "sit_deit_s_aggressive",
    "ps_vit_s",
    "vit_slim_deit_s",
    "vit_slim_deit_b",
]
# Any preset shrunk to the CPU backbone on the built-in data: the presets' GPU, precision, pretrained-weight and
# batch settings would not run here.
TINY = [
    "backbone=deit_tiny_cpu",
    "dataset=synthetic",
    "trainer=cpu",
    "trainer.devices=1",
    "trainer.precision=32-true",
    "trainer.fast_dev_run=true",
    "backbone.pretrained=false",
    "dataset.train_size=32",
    "dataset.val_size=16",
    "dataset.batch_size=16",
    "dataset.num_workers=0",
    "logger=csv",
    "optim.cooldown_epochs=0",
]  # one epoch leaves no room for SiT's 10 cooldown epochs
# A multirun job of 2 steps of 8 images: trains in about a second.
JOB = [
    "dataset.train_size=16",
    "dataset.val_size=8",
    "dataset.batch_size=8",
    "dataset.num_workers=0",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "logger=csv",
]
# The installed console script: Lightning's DDP launcher re-runs the script path (it cannot re-run ``python -c``).
TRAIN = [str(Path(sys.executable).with_name("tokred-train"))]


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: the preset runs are tiny, and a second thread only contends with the multirun processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def multirun(
    processes: Processes, root: Path, *args: str, wait: bool = True
) -> subprocess.CompletedProcess | subprocess.Popen:
    """``tokred-train -m <args>`` with outputs under ``root`` and one torch thread per process."""
    env = {**os.environ, "TOKRED_ROOT": str(root), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [*TRAIN, "-m", *args]
    if not wait:
        return processes.start(command, env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    done = processes.run(command, timeout=180, env=env, cwd=root)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def summaries(sweep_dir: Path) -> dict[str, dict]:
    """Job directory name -> its summary.json."""
    return {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("*/summary.json")}


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_and_runs(preset, tmp_path):
    overrides = [f"experiment={preset}", *TINY, f"paths.root={tmp_path}"]
    reducer = compose_config(overrides).reducer.name
    cfg = compose_config([*overrides, *TINY_REDUCER.get(reducer, [])])
    cfg.paths.output_dir = str(tmp_path / "run")
    summary = train(cfg)
    assert summary["reducer"] == reducer and 0 <= summary["val/acc1"] <= 1
    assert (tmp_path / "run" / "summary.json").is_file()


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_paper_preset_states_its_expected_numbers(preset):
    lines = (conf_dir() / "experiment" / f"{preset}.yaml").read_text().splitlines()
    expected = "\n".join(line for line in lines if line.startswith("#"))
    expected = expected[expected.index("# Expected") :]
    assert re.search(r"^# Expected[^\n]* \d+\.\d+ GMACs", expected) and "top-1" in expected, expected


@pytest.mark.parametrize("preset", [p for p in PRESETS if p.startswith(("grid_", "pareto_"))])
def test_sweep_preset_is_multirun_ready(preset):
    """The swept values are valid: every swept group choice exists and the sweep has its own stable directory."""
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"experiment={preset}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params and cfg.sweep_name == preset and cfg.hydra.sweep.dir.endswith(f"multirun/{preset}")
    for key, values in params.items():
        if key in ("backbone", "reducer", "dataset"):
            assert set(values.split(",")) <= set(group_choices(key)), (key, values)


@pytest.mark.slow
def test_submitit_local_sweep_then_relaunch_runs_nothing(tmp_path, processes):
    """Two jobs through submitit's local executor; the same sweep re-launched (launcher choice does not enter the
    job directories) finds both finished and returns their stored summaries without training."""
    sweep = ["sweep_name=pair", *JOB, "reducer=evo_vit", "reducer.keep_ratio=0.5,0.75"]
    multirun(
        processes,
        tmp_path,
        *sweep,
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=5",
        "hydra.launcher.cpus_per_task=1",
    )
    sweep_dir = tmp_path / "multirun" / "pair"
    first = summaries(sweep_dir)
    assert sorted(s["reducer_knobs"]["keep_ratio"] for s in first.values()) == [0.5, 0.75]
    # Hydra itself rewrites a job's .hydra/ configs and appends to its <job>.log on every launch; the run's files
    # (checkpoints, phases, export, metrics, summary) are what a skipped job must leave alone.
    stamps = {
        p: p.stat().st_mtime_ns
        for p in sweep_dir.glob("*/**/*")
        if p.is_file() and ".hydra" not in p.parts and p.suffix != ".log"
    }
    assert any(p.suffix == ".ckpt" for p in stamps)

    again = multirun(processes, tmp_path, *sweep)
    assert (
        again.stdout.count("run finished earlier, nothing to do")
        + again.stderr.count("run finished earlier, nothing to do")
        == 2
    )
    assert summaries(sweep_dir) == first
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # no checkpoint, log or export rewritten


def test_job_directories_stay_one_short_path_component_with_path_values_and_long_overrides(tmp_path, processes):
    sweep = ["sweep_name=paths", *JOB, "paths.data_dir=/data/imagenet,/data/" + "x" * 300]
    multirun(processes, tmp_path, *sweep)
    sweep_dir = tmp_path / "multirun" / "paths"
    jobs = sorted(summaries(sweep_dir))
    assert len(jobs) == 2 and all(len(name.encode()) <= MAX_DIRNAME for name in jobs), jobs
    assert any("paths.data_dir=_data_imagenet" in name for name in jobs)
    assert job_dirname("a=" + "x" * 300) != job_dirname("a=" + "x" * 299 + "y")  # hashed, so still unique
    again = multirun(processes, tmp_path, *sweep)  # the same names on a re-launch: both jobs are found finished
    assert (again.stdout + again.stderr).count("run finished earlier, nothing to do") == 2


@pytest.mark.slow
def test_interrupted_job_resumes(tmp_path, processes):
    """A job killed after its first checkpoint continues from it when the sweep is re-launched."""
    sweep = [
        "sweep_name=killed",
        *JOB,
        "trainer.limit_train_batches=null",
        "trainer.max_epochs=2",
        "dataset.train_size=64",
        "checkpoint.every_n_train_steps=1",
    ]
    running = multirun(processes, tmp_path, *sweep, wait=False)
    sweep_dir = tmp_path / "multirun" / "killed"
    deadline = time.monotonic() + 120
    while not list(sweep_dir.glob("*/checkpoints/*/last.ckpt")) and running.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.05)
    processes.kill(running)
    interrupted = next(sweep_dir.glob("*/checkpoints/*/last.ckpt")).parents[2]
    assert not (interrupted / "summary.json").is_file(), "the job finished before the kill; the test needs it cut"

    again = multirun(processes, tmp_path, *sweep)
    assert "resumes from " + str(interrupted) in again.stdout + again.stderr
    assert [p for p in sweep_dir.iterdir() if p.is_dir()] == [interrupted]  # no second directory for the job
    assert json.loads((interrupted / "summary.json").read_text())["global_step"] == 2 * 64 // 8


@pytest.mark.slow
def test_optuna_multi_objective_sweep_writes_pareto_front(tmp_path, processes):
    multirun(
        processes,
        tmp_path,
        "sweep_name=opt",
        *JOB,
        "reducer=evo_vit",
        "hydra/sweeper=optuna",
        "hydra.sweeper.n_trials=2",
        "reducer.keep_ratio=interval(0.3,0.9)",
    )
    sweep_dir = tmp_path / "multirun" / "opt"
    pareto = json.loads((sweep_dir / "pareto.json").read_text())
    assert pareto["n_trials"] == 2 and pareto["objectives"] == {"val/acc1": "maximize", "model/gmacs": "minimize"}
    runs = {s["run_dir"]: s for s in summaries(sweep_dir).values()}
    assert len(runs) == 2 and 1 <= len(pareto["front"]) <= 2
    for point in pareto["front"]:  # each front point is a finished run, with that run's numbers
        run = runs[point["run_dir"]]
        assert point["values"] == {"val/acc1": run["val/acc1"], "model/gmacs": run["model/gmacs"]}
        assert run["reducer_knobs"]["keep_ratio"] == pytest.approx(point["params"]["reducer.keep_ratio"], abs=0.01)
    dominated = [
        a
        for a in runs.values()
        for b in runs.values()
        if b["val/acc1"] >= a["val/acc1"]
        and b["model/gmacs"] <= a["model/gmacs"]
        and (b["val/acc1"], b["model/gmacs"]) != (a["val/acc1"], a["model/gmacs"])
    ]
    assert len(pareto["front"]) == len(runs) - len(dominated)


@pytest.mark.slow
def test_ddp_jobs_of_a_serial_sweep_each_write_one_directory(tmp_path, processes):
    """Two 2-process DDP jobs one after the other in one sweep process: each job's ranks train that job (not the
    sweep again), into its directory alone, and the second job is not confused by the first one's process group."""
    multirun(processes, tmp_path, "sweep_name=ddp", *JOB, "trainer=ddp_cpu", "seed=1,2")
    done = summaries(tmp_path / "multirun" / "ddp")
    # JOB's 16 training images over 2 ranks of batch 8: one optimizer step per job.
    assert len(done) == 2 and all(s["global_step"] == 1 for s in done.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multirun"]  # no rank wrote an outputs/ run elsewhere
