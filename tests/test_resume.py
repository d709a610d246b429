"""Resume and re-launch: a killed search goes on by every documented route, a resume refuses other inputs, and a
re-launched finished run is compared with its stored config hash and tokred's version."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import FAST, TINY_REDUCER, run_cli
from tokred.backbones import create_backbone
from tokred.cli import train as train_cli
from tokred.config import ConfigError, compose_config
from tokred.training import phases
from tokred.training.run import train

NO_MAPS = "visualize.every_n_epochs=0"


def files(directory: Path, hydra: bool = True) -> dict[str, bytes]:
    """Every file's bytes; ``hydra=False``: but for what Hydra writes on every launch (its config copy, the log)."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and (hydra or not (p.suffix == ".log" or ".hydra" in p.parts))
    }


def log_text(run_dir: Path) -> str:
    return "".join(p.read_text() for p in run_dir.glob("*.log"))


# ------------------------------------------------------------------------------------------------ a killed search
def _search_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "phases/search/search_0/progress.pt", map_location="cpu", weights_only=True)["state"]


@pytest.mark.slow
def test_a_killed_search_resumes_at_its_last_finished_layer_by_both_routes(tmp_path, processes, capsys):
    args = [*FAST, f"paths.root={tmp_path}", "reducer=patch_slimming", *TINY_REDUCER["patch_slimming"], NO_MAPS]
    runs = tmp_path / "outputs/patch_slimming/deit_tiny_cpu"
    run = processes.start(
        [sys.executable, "-m", "tokred.cli.train", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.monotonic() + 300
    while not list(runs.glob("*/phases/search/search_0/progress.pt")):  # the first layer is searched
        assert run.poll() is None and time.monotonic() < deadline, "the search never saved a layer"
        time.sleep(0.02)
    processes.kill(run)  # SIGKILL, mid-search
    (run_dir,) = runs.iterdir()
    killed = _search_state(run_dir)["layers"]
    depth = 12  # deit_tiny_cpu: the search chooses the tokens of blocks 10 .. 0 (block 11 keeps CLS alone)
    assert 1 <= len(killed) < depth - 1 and not list(run_dir.glob("checkpoints/*/*.ckpt"))
    copy = tmp_path / "elsewhere/copied_run"
    shutil.copytree(run_dir, copy)

    for route, directory in (("last", run_dir), (str(copy), copy)):
        code, _, err = run_cli(train_cli.main, capsys, *args, f"ckpt_path={route}")
        assert code == 0, err
        resumed = f"resuming the search at epsilon 0.5 after block {depth - 1 - len(killed)}"
        assert resumed in log_text(directory), route
        state = _search_state(directory)
        assert state["done"] and len(state["layers"]) == depth - 1
        assert state["layers"][: len(killed)] == killed, "the layers searched before the kill are kept, not redone"
        assert (directory / "summary.json").is_file()
    assert list(runs.iterdir()) == [run_dir], "no route started a new run directory"


# ------------------------------------------------------------------------------------------------ changed inputs
def test_a_resume_on_another_backbone_checkpoint_is_refused_and_a_moved_one_accepted(run_cfg, tmp_path):
    weights = tmp_path / "baseline.pth"
    vit = create_backbone(compose_config([]).backbone, 10)
    torch.save(vit.state_dict(), weights)
    cfg = run_cfg("trainer.max_epochs=1", NO_MAPS, f"backbone.checkpoint={weights}")
    train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    moved = tmp_path / "moved/baseline.pth"
    moved.parent.mkdir()
    shutil.copy(weights, moved)
    # Another baseline trained into the same file: same path, other weights.
    torch.save({k: v + 0.01 for k, v in vit.state_dict().items()}, weights)
    before = files(run_dir)

    def resume(path: Path | str):
        return run_cfg("trainer.max_epochs=1", NO_MAPS, f"backbone.checkpoint={path}", f"ckpt_path={run_dir}")

    with pytest.raises(
        ConfigError,
        match=rf"trained on other inputs: backbone\.checkpoint {weights} \(sha256 "
        rf"\w+\) \(now {weights} \(sha256 \w+\)\); restore them",
    ) as refused:
        train(resume(weights))
    assert "\n" not in str(refused.value) and "new run directory" in str(refused.value)
    with pytest.raises(ConfigError, match=rf"backbone\.checkpoint {weights} \(sha256 \w+\) \(now none\)"):
        train(resume("null"))
    assert files(run_dir) == before, "a refused resume changes nothing in the run"

    # The original weights moved to another folder: the same input, so the run goes on.
    assert train(resume(moved))["run_dir"] == str(run_dir)
    assert json.loads((run_dir / "run_config.json").read_text())["backbone"]["checkpoint"] == str(moved)


def _image_folder(root: Path) -> Path:
    for split, per_class in (("train", 8), ("val", 4)):
        for cls in ("ant", "bee"):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                colour = (i * 30, 200 if cls == "ant" else 0, 0)
                Image.new("RGB", (64, 64), colour).save(root / split / cls / f"{i}.png")
    return root


def test_a_resume_on_other_dataset_files_is_refused(tmp_path):
    root = _image_folder(tmp_path / "images")
    cfg = compose_config(
        [
            "dataset=imagefolder",
            f"dataset.root={root}",
            "dataset.batch_size=4",
            "dataset.num_workers=0",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=1",
            "trainer.limit_val_batches=1",
            "logger=csv",
            NO_MAPS,
            f"paths.root={tmp_path}",
        ]
    )
    cfg.paths.output_dir = str(tmp_path / "run")
    train(cfg)
    cfg.ckpt_path = str(tmp_path / "run")
    # Relabelled in place: an image moved from one class folder to the other, same folder, same counts.
    os.rename(root / "train/ant/0.png", root / "train/bee/8.png")
    with pytest.raises(
        ConfigError,
        match=r"trained on other inputs: a dataset of 2 classes, 16 training and 8 "
        r"validation images \(now the same counts, but other files or labels\)",
    ):
        train(cfg)
    os.rename(root / "train/bee/8.png", root / "train/ant/0.png")
    assert train(cfg)["dataset"] == "imagefolder"  # restored: the run goes on


# ------------------------------------------------------------------------------------------------ re-launched runs
def test_a_relaunched_finished_run_is_compared_with_its_config_hash_and_tokred_version(run_cfg, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="tokred")
    cfg = run_cfg("trainer.max_epochs=1", NO_MAPS)
    train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    stored = json.loads((run_dir / "summary.json").read_text())
    record = json.loads((run_dir / "run_config.json").read_text())["_tokred"]
    assert record["version"] == phases.tokred_version() and len(record["config_hash"]) == 16
    before = files(run_dir)

    # Where things go and how they are logged do not change the result: the stored one is it.
    same = train(run_cfg("trainer.max_epochs=1", NO_MAPS, "verbose=true", "checkpoint.every_n_train_steps=1"))
    assert same == stored and "run finished earlier, nothing to do" in caplog.text

    stale = train(run_cfg("trainer.max_epochs=1", NO_MAPS, "optim.lr=0.0005"))
    assert stale == {**stored, "stale": ["optim.lr=0.001 (now 0.0005)"]}
    assert "since then optim.lr=0.001 (now 0.0005): returning its stored result marked stale" in caplog.text
    monkeypatch.setattr(phases, "tokred_version", lambda: "9.9.9")
    assert train(cfg)["stale"] == [f"tokred {record['version']} (now 9.9.9)"]
    assert files(run_dir) == before, "a skipped re-launch changes nothing in the run"

    with pytest.raises(ConfigError, match=r"sweep\.rerun='always'; choose one of: never, changed"):
        train(run_cfg("trainer.max_epochs=1", NO_MAPS, "sweep.rerun=always"))
    rerun = train(run_cfg("trainer.max_epochs=1", NO_MAPS, "optim.lr=0.0005", "sweep.rerun=changed"))
    assert "stale" not in rerun and "training it again (sweep.rerun=changed)" in caplog.text
    (old,) = run_dir.parent.glob("run.old-*")
    assert files(old) == before, "the earlier results are kept whole, beside the new run"
    assert json.loads((run_dir / "run_config.json").read_text())["optim"]["lr"] == 0.0005
    assert train(run_cfg("trainer.max_epochs=1", NO_MAPS, "optim.lr=0.0005")) == json.loads(
        (run_dir / "summary.json").read_text()
    )


@pytest.mark.slow
def test_a_relaunched_sweep_reruns_only_its_changed_jobs_and_only_when_asked(tmp_path, capsys):
    sweep = ["-m", *FAST, "trainer.max_epochs=1", NO_MAPS, f"paths.root={tmp_path}", "sweep_name=s", "seed=1,2"]
    code, _, err = run_cli(train_cli.main, capsys, *sweep)
    assert code == 0, err
    jobs = sorted(p for p in (tmp_path / "multirun/s").iterdir() if p.is_dir())
    assert len(jobs) == 2 and "seed=1" in jobs[0].name
    # A job trained when a preset or default was another (optim.lr 0.01): recorded as that launch would have.
    stored = json.loads((jobs[0] / "run_config.json").read_text())
    inputs = stored.pop("_tokred")["inputs"]
    stored["optim"]["lr"] = 0.01
    phases.record_config(OmegaConf.create(stored), jobs[0], inputs)
    before = files(jobs[0], hydra=False)

    def relaunch(*extra: str) -> list[str]:
        """Each job's log lines written by this launch."""
        seen = [len(log_text(job)) for job in jobs]
        code, _, err = run_cli(train_cli.main, capsys, *sweep, *extra)
        assert code == 0, err
        return [log_text(job)[n:] for job, n in zip(jobs, seen)]

    changed, unchanged = relaunch()
    assert "since then optim.lr=0.01 (now 0.001): returning its stored result marked stale" in changed
    assert "run finished earlier, nothing to do" in unchanged
    assert files(jobs[0], hydra=False) == before

    seen = len(log_text(jobs[0]))
    _, unchanged = relaunch("sweep.rerun=changed")
    assert "run finished earlier, nothing to do" in unchanged
    (old,) = jobs[0].parent.glob(f"{jobs[0].name}.old-*")  # sweep.rerun is no part of the job's directory name
    assert files(old, hydra=False) == before, "the earlier results are kept whole, beside the new run"
    assert json.loads((jobs[0] / "run_config.json").read_text())["optim"]["lr"] == 0.001
    # This launch's own files belong to the new run: Hydra's copy of its config, and its log from the move on.
    assert "sweep.rerun=changed" in (jobs[0] / ".hydra/overrides.yaml").read_text()
    assert "training it again" in log_text(jobs[0]) and "training it again" not in log_text(old)[seen:]
