"""Seeds folded into configurations: means, intervals, paired tests and the separation criterion against hand values,
and tokred-report end to end on seeded runs with per-image results."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from tokred.benchmark.aggregate import group_runs, mark_significance, paired_p, separation
from tokred.benchmark.report import configurations
from tokred.cli import report as report_cli
from tokred.io import PER_IMAGE, write_per_image
from tokred.stats import bootstrap_interval, mcnemar


def run(reducer: str, top1: float, seed: int | None, correct: list[bool] | None = None, **extra) -> dict:
    return {
        "backbone": "deit_tiny_cpu",
        "dataset": "synthetic",
        "reducer": reducer,
        "point": "baseline" if reducer == "none" else "r=0.50",
        "kind": "baseline" if reducer == "none" else "trained",
        "target_ratio": None if reducer == "none" else 0.5,
        "gmacs": 0.1 if reducer == "none" else 0.05,
        "top1": top1,
        "top5": None,
        "seed": seed,
        "split": "test",
        "run_dir": f"/runs/{reducer}/{seed}",
        "_correct": correct,
        **extra,
    }


def hits(right: int, n: int = 100) -> list[bool]:
    return [True] * right + [False] * (n - right)


def test_seeds_of_one_configuration_give_the_mean_and_the_t_interval():
    (group,) = group_runs([run("tome", 94.0, 2), run("tome", 90.0, 0), run("tome", 92.0, 1)])
    # mean 92, sample SD 2, t(0.975, 2) = 4.302653: half-width 4.302653 * 2 / sqrt(3) = 4.9683
    assert group["top1"] == 92.0 and group["top1_sd"] == 2.0 and group["n_runs"] == 3
    assert group["top1_lo"] == pytest.approx(92 - 4.9683, abs=1e-3)
    assert group["top1_hi"] == pytest.approx(92 + 4.9683, abs=1e-3)
    assert group["interval"] == "t, 3 seeds"
    assert group["seeds"] == [0, 1, 2] and group["run_dir"] == "/runs/tome/0"  # the first seed is the one timed


def test_a_single_run_gets_the_bootstrap_interval_over_its_images():
    correct = hits(90, 300)
    (group,) = group_runs([run("tome", 30.0, 0, correct)])
    _, lo, hi = bootstrap_interval(correct)
    assert (group["top1_lo"], group["top1_hi"]) == (round(100 * lo, 3), round(100 * hi, 3))
    assert group["interval"] == "bootstrap, 1 run" and group["top1_sd"] is None
    (bare,) = group_runs([run("tome", 30.0, 0)])
    assert bare["top1_lo"] is None and bare["interval"] is None  # no per-image file: no interval made up


def test_paired_p_pools_the_discordant_images_of_seed_paired_runs():
    # seed 0: a right on 6 images b misses; seed 1: 4 more. Pooled b=10, c=0: p = 2 / 2^10.
    a = group_runs([run("a", 0, 0, hits(50)), run("a", 0, 1, hits(54))])[0]
    b = group_runs([run("b", 0, 1, hits(50)), run("b", 0, 0, hits(44))])[0]
    assert paired_p(a, b) == pytest.approx(2 / 2**10)
    assert paired_p(a, b) == pytest.approx(mcnemar(hits(50) + hits(54), hits(44) + hits(50)))
    other_seeds = group_runs([run("c", 0, 5, hits(50)), run("c", 0, 6, hits(50))])[0]
    assert paired_p(a, other_seeds) is None  # nothing seen on the same images: no test
    lone_a, lone_b = group_runs([run("a", 0, None, hits(60)), run("b", 0, None, hits(50))])
    assert paired_p(lone_a, lone_b) == pytest.approx(2 / 2**10)  # two single runs pair with each other
    # a baseline the seeds share (one run, seed 0) pairs with each seed of a: b=10 + 4 = 14 discordant images, c=0
    (shared,) = group_runs([run("none", 0, 0, hits(44))])
    assert paired_p(a, shared) == pytest.approx(mcnemar(hits(50) + hits(54), hits(44) + hits(44)))
    assert paired_p(a, shared) == pytest.approx(2 / 2**16) == paired_p(shared, a)


def test_the_best_at_a_budget_is_marked_and_differences_within_noise_are_not_ranked():
    best = [run("tome", 60.0, s, hits(60)) for s in (0, 1)]
    close = [run("evit", 59.0, s, hits(59)) for s in (0, 1)]  # 2 discordant images: p = 0.5
    far = [run("topk", 40.0, s, hits(40)) for s in (0, 1)]  # 40 discordant images, all one way
    base = [run("none", 70.0, s, hits(70)) for s in (0, 1)]
    groups = group_runs([*base, *best, *close, *far])
    (record,) = mark_significance(groups)
    by = {g["reducer"]: g for g in groups}
    assert by["tome"]["vs_best"] == "best" and by["tome"]["p_vs_best"] is None
    assert by["evit"]["vs_best"] == "within noise" and by["evit"]["p_vs_best"] == 0.5
    assert by["topk"]["vs_best"] == "below" and by["topk"]["p_vs_best"] == pytest.approx(2 / 2**40, rel=1e-2)
    assert by["tome"]["p_vs_baseline"] == pytest.approx(2 / 2**20, rel=1e-2)
    assert by["none"]["p_vs_baseline"] is None and by["none"]["vs_best"] is None
    # spread 20 points, every SD 0: the task separates them
    assert record["spread"] == 20.0 and record["max_seed_sd"] == 0.0 and record["holds"] is True


@pytest.mark.parametrize(
    "spreads, holds",
    [([[60, 62, 61], [50, 52, 51]], True), ([[60, 64, 56], [55, 58, 61]], False), ([[60], [50]], None)],
)
def test_separation_needs_a_spread_over_three_seed_sds(spreads, holds):
    bucket = group_runs([run(name, top1, s) for name, values in zip("ab", spreads) for s, top1 in enumerate(values)])
    record = separation(bucket, ("deit_tiny_cpu", "synthetic"), 0.5)
    assert record["holds"] is holds
    if holds is not None:
        sds = [math.sqrt(sum((v - sum(x) / len(x)) ** 2 for v in x) / (len(x) - 1)) for x in spreads]
        assert record["max_seed_sd"] == pytest.approx(max(sds), abs=1e-3)
        assert record["spread"] == pytest.approx(abs(sum(spreads[0]) - sum(spreads[1])) / 3, abs=1e-3)


def _seeded_runs(root: Path) -> None:
    """Three seeds of a baseline and two reducers at r=0.5, each with its per-image results on 200 images."""
    for seed in (0, 1, 2):
        for reducer, right in (("none", 180), ("tome", 176 + seed), ("topk", 120 + 2 * seed)):
            run_dir = root / f"seed{seed}" / reducer / ("baseline" if reducer == "none" else "r0.5")
            run_dir.mkdir(parents=True)
            knobs = {} if reducer == "none" else {"target_ratio": 0.5}
            summary = {
                "backbone": "deit_tiny_cpu",
                "dataset": "synthetic_hard",
                "reducer": reducer,
                "reducer_knobs": knobs,
                "seed": seed,
                "model/gmacs": 0.4 if reducer == "none" else 0.2,
                "val/acc1": right / 200,
                "test/acc1": right / 200,
            }
            (run_dir / "summary.json").write_text(json.dumps(summary))
            write_per_image(run_dir / PER_IMAGE, {"val": hits(right, 200), "test": hits(right, 200)})


def test_report_folds_seeds_into_intervals_paired_tests_and_error_bars(tmp_path, capsys):
    _seeded_runs(tmp_path / "runs")
    report_cli.main([f"runs_dir={tmp_path / 'runs'}", "speed=false", f"out_dir={tmp_path}", "machine=m"])
    out = tmp_path / "m"
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert [(r["reducer"], r["n_runs"]) for r in rows] == [("none", "3"), ("tome", "3"), ("topk", "3")]
    tome = next(r for r in rows if r["reducer"] == "tome")
    assert float(tome["top1"]) == pytest.approx(100 * 177 / 200) and tome["vs_best"] == "best"
    assert float(tome["top1_sd"]) == pytest.approx(0.5)  # 88.0, 88.5, 89.0
    assert len(list(csv.DictReader((out / "compare_runs.csv").open()))) == 9
    data = json.loads((out / "compare.json").read_text())
    assert not [k for key in ("rows", "configurations") for row in data[key] for k in row if k.startswith("_")]
    (record,) = data["separation"]
    assert record["best"] == "tome" and record["worst"] == "topk" and record["holds"] is True
    md = (out / "compare.md").read_text()
    assert "the task separates them" in md and "below (p=" in md and "[87.26, 89.74] t" in md
    assert (out / "compare_top1_vs_gmacs.png").stat().st_size > 0


def test_a_row_kept_from_a_report_that_predates_the_test_split_reads_as_validation(tmp_path):
    _seeded_runs(tmp_path / "runs")
    args = [f"runs_dir={tmp_path / 'runs'}", "speed=false", f"out_dir={tmp_path}", "machine=m"]
    report_cli.main(args)
    earlier = tmp_path / "m" / "compare.json"
    data = json.loads(earlier.read_text())
    old = {**data["rows"][-1], "run_dir": "/elsewhere/sit/r0.5", "reducer": "sit", "split": None}
    earlier.write_text(json.dumps({**data, "rows": [*data["rows"], old]}))
    report_cli.main(args)  # merges the kept row back in (it crashed on its null split)
    rows = list(csv.DictReader((tmp_path / "m" / "compare.csv").open()))
    assert next(r for r in rows if r["reducer"] == "sit")["split"] == "val"


def test_a_replicate_whose_baseline_learned_nothing_is_left_out_of_the_configurations():
    chance = "top-1 10.5% is chance level for 10 classes"
    runs = [
        run("none", 99.0, 0),
        run("none", 10.5, 1, degenerate=chance),
        run("none", 98.0, 2),
        run("tome", 97.0, 0),
        run("tome", 11.0, 1, degenerate=chance),
        run("tome", 95.0, 2),
    ]
    groups, _, left_out = configurations(runs)
    tome = next(g for g in groups if g["reducer"] == "tome")
    assert tome["seeds"] == [0, 2] and tome["top1"] == 96.0  # seed 1 measured the failed baseline, not ToMe
    assert left_out == [f"seed 1 of deit_tiny_cpu on synthetic (2 runs): its baseline is degenerate ({chance})"]
    # With no healthy baseline to set against it, nothing is left out: the degenerate marks say it instead.
    alone = [r for r in runs if r["seed"] == 1]
    groups, _, left_out = configurations(alone)
    assert left_out == [] and [g["seeds"] for g in groups] == [[1], [1]]
