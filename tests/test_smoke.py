"""Every registered reducer end to end through the installed console scripts, as a fresh install runs them:
``tokred-flops``, a one-epoch ``tokred-train`` (every phase of the method), Lightning's ``load_from_checkpoint`` of
its last checkpoint, ``tokred-eval`` of the run and one
``tokred-benchmark`` row. ``make test-oldest`` runs these (marker ``smoke``) on the oldest supported versions."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

import tokred
from conftest import FAST, TINY_REDUCER
from tokred.reducers import available_reducers
from tokred.training.module import TokredModule

SCRIPTS = Path(sys.executable).parent
# What tokred-eval must share with the run to see the same validation images.
EVAL = [o for o in FAST if o.startswith(("dataset.", "trainer.limit_val_batches"))]


@pytest.mark.slow
@pytest.mark.smoke
@pytest.mark.parametrize("reducer", available_reducers())
def test_every_reducer_runs_end_to_end_from_the_console_scripts(reducer, tmp_path, processes):
    env = {**os.environ, "TOKRED_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def run(script: str, *args: str) -> str:
        done = processes.run([str(SCRIPTS / script), *args], timeout=300, env=env, cwd=tmp_path)
        assert done.returncode == 0, f"{script} {' '.join(args)}:\n{done.stderr[-3000:]}"
        return done.stdout

    def last_json(stdout: str) -> dict:
        return json.loads(stdout.strip().splitlines()[-1])

    flops = last_json(run("tokred-flops", "backbone=deit_tiny_cpu", f"reducer={reducer}"))
    assert flops["gmacs_counted"] == pytest.approx(flops["gmacs_analytic"], rel=0.02)

    run(
        "tokred-train",
        *FAST,
        "trainer.max_epochs=1",
        "visualize.every_n_epochs=1",
        f"reducer={reducer}",
        *TINY_REDUCER.get(reducer, []),
    )
    (run_dir,) = (tmp_path / "outputs" / reducer / "deit_tiny_cpu").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "failed_steps" not in summary and list((run_dir / "token_maps").glob("*.png"))
    assert summary["model/gmacs_counted"] == pytest.approx(summary["model/gmacs"], rel=0.02)

    # Lightning's own loader rebuilds every reducer (searched structure included) from the checkpoint alone.
    last = max(run_dir.glob("checkpoints/*/last.ckpt"), key=lambda p: p.stat().st_mtime)
    loaded = TokredModule.load_from_checkpoint(last, map_location="cpu").model.deployable()
    images = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(loaded(images), tokred.load(run_dir / "export")(images), atol=1e-5, rtol=1e-4)

    evaluated = last_json(run("tokred-eval", f"ckpt_path={run_dir}", *EVAL, f"hydra.run.dir={tmp_path / 'eval'}"))
    assert evaluated["val/acc1"] == pytest.approx(summary["val/acc1"])
    assert evaluated["model/gmacs"] == pytest.approx(summary["model/gmacs"], abs=1e-4)

    run(
        "tokred-benchmark",
        "backbones=[deit_tiny_cpu]",
        f"reducers=[{reducer}]",
        "budgets=[]",
        "batch_size=2",
        "warmup=1",
        "repeats=2",
        "latency_repeats=1",
        f"out_dir={tmp_path / 'bench'}",
        "machine=smoke",
    )
    rows = json.loads((tmp_path / "bench/smoke/benchmark.json").read_text())["rows"]
    assert {row["reducer"] for row in rows} == {"none", reducer}
    assert all(row["throughput"] > 0 and not row.get("error") for row in rows)
