"""Shared fixtures: tiny timm ViTs and composed configs that train in seconds on 2 CPU cores."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from tokred.config import compose_config

# `make test` runs two xdist workers on the two cores: one torch thread each, or they fight over the cores.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Balance ``make test``'s two workers (``--dist loadgroup``). Each file is one group, so its module-scoped
    fixtures are built once, except the console-script smoke tests: independent subprocess runs of ~25 s each, one
    group per test so both workers share them. Groups are handed out in collection order, so the heaviest files go
    first (a subprocess-driven ``slow`` test weighs as 20 quick ones): a long file collected last would run alone
    while the other worker idles."""
    weight: dict[Path, int] = {}
    for item in items:
        weight[item.path] = weight.get(item.path, 0) + (20 if item.get_closest_marker("slow") else 1)
        item.add_marker(pytest.mark.xdist_group(item.nodeid if item.get_closest_marker("smoke") else item.path.name))
    # sort is stable: tests keep their order inside a file, and the order is the same in every worker
    items.sort(key=lambda item: -weight[item.path])


# Overrides that make any tokred-train config finish in seconds: few, small images, 2 epochs of 2 steps.
FAST = [
    "dataset.train_size=64",
    "dataset.val_size=32",
    "dataset.batch_size=16",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "logger=csv",
]

# The reducers' own searches are not Lightning fits (fast_dev_run does not shorten them), and paper GMACs targets
# are out of reach of the tiny backbone: scaled down the way conf/compare.yaml scales them.
TINY_REDUCER = {
    "patch_slimming": [
        "reducer.target_gmacs=null",
        "reducer.score_images=16",
        "reducer.cache_images=32",
        "reducer.holdout_images=16",
        "reducer.block_epochs=1",
        "reducer.bisect_searches=1",
        "reducer.group_size=32",
        "reducer.epsilon=0.5",
        "reducer.finetune_epochs=1",
    ],
    "vit_slim": ["reducer.search_epochs=1"],
    "dynamicvit": ["reducer.freeze_backbone_epochs=1"],
    "ats": ["reducer.num_tokens=null"],  # the presets' K = 108 is for 197 tokens; the tiny backbone has 65
    "sit": ["reducer.allow_random_teacher=true"],  # the tiny backbone starts untrained and no teacher is given
}


def tiny_vit(**kwargs) -> VisionTransformer:
    """A 4-block, 32-px, 16-token timm ViT (DeiT layout) for unit tests; ``kwargs`` override the defaults."""
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=5)
    torch.manual_seed(0)
    return VisionTransformer(**{**args, **kwargs}).eval()


def run_cli(main, capsys, *args: str) -> tuple[int, str, str]:
    """Run a console script's ``main`` in-process; returns (exit code, stdout, stderr)."""
    sys_argv = sys.argv
    sys.argv = ["tokred", *args]
    code = 0
    try:
        main()
    except SystemExit as exit_:
        code = exit_.code
    finally:
        sys.argv = sys_argv
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(autouse=True)
def _isolated_outputs(tmp_path_factory, monkeypatch):
    """No test writes into the repository or the user's wandb directories, and wandb never goes online."""
    root = tmp_path_factory.mktemp("env")
    monkeypatch.setenv("TOKRED_ROOT", str(root))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(root / "wandb"))


def peaked(vit: VisionTransformer) -> VisionTransformer:
    """Sharpen the attention of a random ViT, so score-based choices differ between images."""
    with torch.no_grad():
        for blk in vit.blocks:
            blk.attn.qkv.weight.mul_(8)
    return vit


@pytest.fixture
def make_vit():
    return tiny_vit


@pytest.fixture
def run_cfg(tmp_path):
    """``run_cfg(*overrides)``: the train config for a fast run writing into a fresh tmp directory."""

    def compose(*overrides: str):
        cfg = compose_config([*FAST, f"paths.root={tmp_path}", *overrides])
        cfg.paths.output_dir = str(tmp_path / "run")
        return cfg

    return compose


class Processes:
    """Starts a test's subprocesses each in its own process group and kills every group when the test ends, passed,
    failed or timed out: a CLI run's children (DDP ranks, sweep jobs, wandb services) go with it, where
    ``subprocess.run(timeout=...)`` would kill only the direct child and leave the ranks running."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []

    def start(self, args: list[str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(args, start_new_session=True, **kwargs)
        self.started.append(proc)
        return proc

    def run(self, args: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
        """Like ``subprocess.run(args, capture_output=True, text=True, timeout=timeout)``, group killed after."""
        proc = self.start(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
        try:
            out, err = proc.communicate(timeout=timeout)
        finally:
            self.kill(proc)
        return subprocess.CompletedProcess(args, proc.returncode, out, err)

    @staticmethod
    def kill(proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the group outlives its leader while any child is left
        except ProcessLookupError:
            pass
        proc.wait()

    def kill_all(self) -> None:
        for proc in self.started:
            self.kill(proc)


@pytest.fixture
def processes():
    """Start subprocesses through this (``processes.run`` / ``processes.start``); none survives the test."""
    started = Processes()
    yield started
    started.kill_all()
