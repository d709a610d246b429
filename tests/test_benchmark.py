"""The benchmark harness, the comparison report and the compare driver, on tiny models (no timing asserts)."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from tokred.benchmark import compare, harness
from tokred.benchmark.outputs import pareto_front
from tokred.cli import benchmark as benchmark_cli
from tokred.cli import report as report_cli
from tokred.config import compose_config
from tokred.export import save_deployable
from tokred.flops import cpu_attention_formulas, train_cost
from tokred.reducers import available_reducers
from tokred.reducers.base import TokenReducer
from tokred.training.run import build_model

REDUCERS = [r for r in available_reducers() if r != "none"]
BUDGETS = [0.5, 0.65]
TINY_TIMING = ["batch_size=2", "warmup=1", "repeats=2", "iters=1", "latency_repeats=1", "train_batch_size=2"]


def bench_cfg(tmp_path: Path, *overrides: str):
    return compose_config(
        ["backbones=[deit_tiny_cpu]", *TINY_TIMING, f"out_dir={tmp_path}", "machine=test", *overrides],
        config_name="benchmark",
    )


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """One harness run over every registered reducer (operating points + both budgets) and its written files."""
    out = tmp_path_factory.mktemp("bench")
    cfg = bench_cfg(out)
    machine, rows, failed = harness.run_benchmark(cfg)
    paths = harness.write_results(cfg, machine, rows, failed, "tokred-benchmark (test)")
    return rows, failed, paths


def test_harness_covers_every_registered_reducer(bench):
    rows, failed, _ = bench
    assert failed == []
    assert {r["reducer"] for r in rows} == set(available_reducers())
    for name in REDUCERS:
        kinds = [r["kind"] for r in rows if r["reducer"] == name]
        assert "operating_point" in kinds
        assert (
            sorted(r["target_ratio"] for r in rows if r["reducer"] == name and r["kind"] == "matched_budget") == BUDGETS
        )


def test_harness_rows_are_well_formed(bench):
    rows, _, _ = bench
    base = next(r for r in rows if r["kind"] == "baseline")
    assert base["reducer"] == "none" and base["speedup"] == 1 and base["gmacs_ratio"] == 1
    for row in rows:
        for key in ("params_m", "gmacs", "gmacs_counted", "throughput", "latency_ms", "train_gmacs", "train_img_s"):
            assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] > 0, (row["point"], key)
        assert row["peak_mem_mb"] is None or row["peak_mem_mb"] >= 0
        assert row["device"] == "cpu" and row["device_name"] and row["threads"] >= 1 and row["torch"] and row["timm"]
        assert row["speedup"] == pytest.approx(row["throughput"] / base["throughput"], rel=1e-3)
        assert row["gmacs_ratio"] == pytest.approx(base["gmacs"] / row["gmacs"], rel=1e-3)
        assert row["slow"] == (row["kind"] != "baseline" and row["speedup_per_gmacs_ratio"] < harness.SPEEDUP_FLAG)
        assert row["train_speedup"] == pytest.approx(row["train_img_s"] / base["train_img_s"], rel=1e-3)
        assert row["train_gmacs_ratio"] == pytest.approx(base["train_gmacs"] / row["train_gmacs"], rel=1e-3)
        assert row["train_speedup_per_gmacs_ratio"] == pytest.approx(
            row["train_speedup"] / row["train_gmacs_ratio"], rel=1e-3
        )
        assert row["train_batch_size"] == 2
        assert len(json.loads(row["tokens_per_block"])) == 12  # deit_tiny_cpu's depth
        assert json.loads(row["knobs"])["name"] == row["reducer"]
        if row["kind"] == "matched_budget":
            assert row["target_gmacs"] == pytest.approx(row["target_ratio"] * base["gmacs"], rel=1e-3)


def test_harness_writes_tables_and_plots(bench):
    rows, _, paths = bench
    names = {p.name for p in paths}
    assert {"benchmark.csv", "benchmark.json", "benchmark.md", "benchmark_gmacs_vs_throughput.png"} <= names
    with paths[0].open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and set(harness.COLUMNS) == set(table[0])
    written = json.loads(paths[1].read_text())["rows"]
    assert all(row.pop("measured") for row in written), "each row says when it was measured"
    assert written == json.loads(json.dumps(rows))
    md = paths[2].read_text()
    for row in rows:
        assert f"| {row['reducer']} | {row['point']}" in md
    assert "speed-up ÷ ratio" in md and "GMACs ratio" in md
    for header in ("train GMACs", "train GMACs ratio", "train img/s", "train speed-up", "train speed-up ÷ ratio"):
        assert f"| {header} |" in md
    png = next(p for p in paths if p.name == "benchmark_gmacs_vs_throughput.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def trainee(reducer: str) -> tuple[harness.Trainee, int]:
    """The model of ``reducer``'s first benchmark row on the tiny backbone as it trains, and its image size."""
    cfg = bench_cfg(Path("unused"), f"reducers=[{reducer}]", "budgets=[]")
    entry = next(e for e in harness.plan(cfg) if e.reducer == reducer)
    _, built, stats = harness.build(entry)
    return built, stats["img_size"]


def test_train_gmacs_is_three_forwards_without_a_teacher(bench):
    built, _ = trainee("none")
    assert built.teacher is None
    assert train_cost(built.model, None)["train_gmacs"] == 3 * built.model.cost().gmacs
    base = next(r for r in bench[0] if r["kind"] == "baseline")
    assert base["train_gmacs"] == pytest.approx(3 * base["gmacs"], abs=2e-6)  # both rounded to 6 decimals


@pytest.mark.parametrize("reducer", ["dynamicvit", "sit"])
def test_a_teacher_adds_exactly_its_forward(reducer):
    built, _ = trainee(reducer)
    assert built.teacher is not None and not any(p.requires_grad for p in built.teacher.parameters())
    with_teacher, without = train_cost(built.model, built.teacher), train_cost(built.model, None)
    # Both teachers are the unreduced backbone: its forward is the dense cost of the student's own ViT.
    assert with_teacher["teacher"] == TokenReducer.cost(built.model).gmacs
    assert with_teacher["train_gmacs"] == 3 * without["train_forward"] + with_teacher["teacher"]
    assert without["teacher"] == 0


@pytest.mark.parametrize("reducer", available_reducers())
def test_train_forward_cost_matches_what_runs(reducer):
    """The analytic training forward (model + teacher) against torch's FLOP count of one train-mode ``losses``."""
    built, img = trainee(reducer)
    cost = train_cost(built.model, built.teacher)
    images, targets = torch.randn(2, 3, img, img), torch.randint(1000, (2,))
    counter = FlopCounterMode(display=False, custom_mapping=cpu_attention_formulas())
    with counter:
        built.model.losses(images, targets, F.cross_entropy, built.teacher)
    counted = counter.get_total_flops() / 2 / 2 / 1e9
    assert counted == pytest.approx(cost["train_forward"] + cost["teacher"], rel=0.02)


def test_gpu_preset_plans_every_reducer_at_its_operating_points():
    cfg = compose_config(["compile=true"], config_name="benchmark_gpu")
    assert (cfg.batch_size, cfg.train_batch_size, cfg.precision, cfg.device) == (256, 256, "bf16", "cuda")
    assert cfg.warmup >= 2 and cfg.latency_repeats == 0 and cfg.out_dir == "experiments/results"
    entries = harness.plan(cfg)
    assert {e.reducer for e in entries} == set(available_reducers())
    assert {e.kind for e in entries} == {"baseline", "operating_point"}
    assert [e.key for e in entries if e.reducer == "sit"] == ["deit_small/sit/mild", "deit_small/sit/aggressive"]


@pytest.mark.parametrize("ratio", BUDGETS)
@pytest.mark.parametrize("reducer", REDUCERS)
def test_matched_budget_within_3_percent(reducer, ratio):
    """At the benchmark's own resolution (DeiT-Ti, 224 px): each reducer meets the requested share of the GMACs."""
    cfg = compose_config(["backbone=deit_tiny", f"reducer={reducer}", f"reducer.target_ratio={ratio}"], "flops")
    model = build_model(cfg, int(cfg.num_classes))
    requested = ratio * TokenReducer.cost(model).gmacs  # the unreduced backbone, as the reducers resolve the ratio
    achieved = model.cost().gmacs
    assert abs(achieved - requested) / requested <= 0.03, f"{reducer}: {achieved:.4f} GMACs for {requested:.4f}"


def test_failed_row_is_reported_not_hidden(tmp_path, monkeypatch, capsys):
    real_build = harness.build

    def build(entry):
        if entry.kind == "matched_budget":
            raise ValueError("target out of reach (test)")
        return real_build(entry)

    monkeypatch.setattr(harness, "build", build)
    reducer = REDUCERS[0]
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "tokred-benchmark",
            "backbones=[deit_tiny_cpu]",
            *TINY_TIMING,
            f"reducers=[{reducer}]",
            "budgets=[0.5]",
            f"out_dir={tmp_path}",
            "machine=test",
        ],
    )
    with pytest.raises(SystemExit) as exit_info:
        benchmark_cli.main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert f"not measured: deit_tiny_cpu {reducer} r=0.50: ValueError: target out of reach (test)" in err
    assert "## Not measured" in (tmp_path / "test" / "benchmark.md").read_text()
    with (tmp_path / "test" / "benchmark.csv").open() as f:
        errors = [r["error"] for r in csv.DictReader(f)]
    assert errors.count("ValueError: target out of reach (test)") == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["nonsense=1"], "nonsense"),
        (["backbones=[deit_huge]"], "unknown backbone 'deit_huge'"),
        (["reducers=[bogus]"], "unknown reducer 'bogus'"),
        (["precision=fp8"], "precision='fp8'; choose one of: fp32, bf16, fp16"),
    ],
)
def test_benchmark_config_errors_are_one_line(args, message, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["tokred-benchmark", *args])
    with pytest.raises(SystemExit) as exit_info:
        benchmark_cli.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and err.count("\n") == 1


def test_pareto_front():
    # (GMACs, top-1): the 2nd is dominated by the 3rd (cheaper and better); the 4th ties the cheapest.
    gmacs, top1 = [4.6, 3.5, 3.0, 1.2, 1.2], [79.8, 78.0, 79.4, 70.0, 65.0]
    assert sorted(pareto_front(gmacs, top1, higher_x_better=False)) == [0, 2, 3]
    throughput = [100.0, 120.0, 150.0, 300.0, 280.0]
    assert sorted(pareto_front(throughput, top1, higher_x_better=True)) == [0, 2, 3]


# ------------------------------------------------------------------------------------------------------ report
RUNS = [  # (reducer, target_ratio, val/acc1): evo_vit is dominated by sit (cheaper and more accurate)
    ("none", None, 0.90),
    ("sit", 0.5, 0.86),
    ("evo_vit", 0.65, 0.80),
]


def write_run(run_dir: Path, reducer: str, ratio: float | None, acc1: float, export: bool) -> None:
    """A finished tokred-train run as the report sees it: summary.json (+ export/) with test-chosen accuracies."""
    overrides = ["backbone=deit_tiny_cpu", f"reducer={reducer}"] + ([f"reducer.target_ratio={ratio}"] if ratio else [])
    cfg = compose_config(overrides, "flops")
    model = build_model(cfg, 10)
    cost = model.cost()
    if export:
        save_deployable(model, run_dir / "export", OmegaConf.to_container(cfg, resolve=True))
    summary = {
        "backbone": "deit_tiny_cpu",
        "backbone_model": cfg.backbone.model,
        "reducer": reducer,
        "reducer_knobs": model.knobs(),
        "dataset": "synthetic",
        "model/gmacs": cost.gmacs,
        "model/gmacs_counted": cost.gmacs,
        "model/params_m": 1.4,
        "val/acc1": acc1,
        "val/acc5": 1.0,
        "run_dir": "/elsewhere/run",
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").write_text(json.dumps(summary))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for i, (reducer, ratio, acc1) in enumerate(RUNS):
        write_run(root / reducer / str(i), reducer, ratio, acc1, export=True)
    return root


def test_report_turns_runs_into_table_and_plots(runs, tmp_path, capsys):
    out = tmp_path / "results"
    report_cli.main(
        [f"runs_dir={runs}", f"out_dir={out}", "machine=test", "batch_size=2", "repeats=1", "latency_repeats=1"]
    )
    assert "wrote" in capsys.readouterr().out
    with (out / "test" / "compare.csv").open() as f:
        table = {r["reducer"]: r for r in csv.DictReader(f)}
    assert set(table) == {"none", "sit", "evo_vit"}
    assert {k: table[k]["pareto_gmacs"] for k in table} == {"none": "True", "sit": "True", "evo_vit": "False"}
    assert table["sit"]["point"] == "r=0.50" and table["none"]["point"] == "baseline"
    assert float(table["sit"]["top1"]) == 86.0 and float(table["none"]["speedup"]) == 1.0
    assert all(float(r["throughput"]) > 0 for r in table.values())
    assert Path(table["sit"]["run_dir"]) == runs / "sit" / "1"  # where the run is now, not the summary's old path
    md = (out / "test" / "compare.md").read_text()
    assert "| sit | r=0.50 |" in md and "86.00 ◆" in md and "80.00 ◆" not in md
    for plot in ("compare_top1_vs_gmacs.png", "compare_top1_vs_throughput.png"):
        assert (out / "test" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_report_on_other_runs_keeps_the_earlier_rows(runs, tmp_path, capsys):
    out = tmp_path / "results"
    report = [f"out_dir={out}", "machine=test", "speed=false"]
    report_cli.main([f"runs_dir={runs / 'sit'}", *report])
    report_cli.main([f"runs_dir={runs / 'evo_vit'}", *report])
    rows = json.loads((out / "test" / "compare.json").read_text())["rows"]
    assert {r["reducer"] for r in rows} == {"sit", "evo_vit"} and all(r["measured"] for r in rows)
    capsys.readouterr()


def test_report_skips_runs_set_aside_by_a_rerun(tmp_path, capsys):
    write_run(tmp_path / "runs" / "sit" / "r0.5", "sit", 0.5, 0.86, export=False)
    write_run(tmp_path / "runs" / "sit" / "r0.5.old-2026-12-02_10-00-00", "sit", 0.5, 0.70, export=False)
    report_cli.main([f"runs_dir={tmp_path / 'runs'}", f"out_dir={tmp_path / 'results'}", "machine=test", "speed=false"])
    rows = json.loads((tmp_path / "results" / "test" / "compare.json").read_text())["rows"]
    assert [r["top1"] for r in rows] == [86.0]
    capsys.readouterr()


def test_report_prefers_the_held_out_test_split(tmp_path, capsys):
    write_run(tmp_path / "runs" / "sit", "sit", 0.5, 0.86, export=False)
    summary = json.loads((tmp_path / "runs" / "sit" / "summary.json").read_text())
    (tmp_path / "runs" / "sit" / "summary.json").write_text(json.dumps(summary | {"test/acc1": 0.81, "test/acc5": 0.9}))
    write_run(tmp_path / "runs" / "evo_vit", "evo_vit", 0.5, 0.84, export=False)
    report_cli.main([f"runs_dir={tmp_path / 'runs'}", f"out_dir={tmp_path / 'results'}", "machine=test", "speed=false"])
    rows = {r["reducer"]: r for r in json.loads((tmp_path / "results" / "test" / "compare.json").read_text())["rows"]}
    assert (rows["sit"]["top1"], rows["sit"]["top5"], rows["sit"]["split"]) == (81.0, 90.0, "test")
    assert (rows["evo_vit"]["top1"], rows["evo_vit"]["split"]) == (84.0, "val")
    assert "| 90.00 | test |" in (tmp_path / "results" / "test" / "compare.md").read_text()
    capsys.readouterr()


def test_report_logs_wandb_table_offline(runs, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    report_cli.main(
        [f"runs_dir={runs}", f"out_dir={tmp_path / 'results'}", "machine=test", "speed=false", "wandb=true"]
    )
    tables = list((tmp_path / "wandb").glob("offline-run-*/files/media/table/rows_*.table.json"))
    assert len(tables) == 1
    logged = json.loads(tables[0].read_text())
    assert len(logged["data"]) == len(RUNS) and "top1" in logged["columns"] and "gmacs" in logged["columns"]


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no summary.json under"),
        ("{", "is not a readable JSON file"),
        ('{"backbone": "deit_tiny_cpu", "reducer": "none"}', "lacks model/gmacs, val/acc1"),
    ],
)
def test_report_bad_runs_dir_is_one_line(content, message, tmp_path, capsys):
    if content is not None:
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "summary.json").write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        report_cli.main([f"runs_dir={tmp_path}", "speed=false", f"out_dir={tmp_path / 'results'}"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "results").exists()


# ------------------------------------------------------------------------------------------------------ compare
def test_compare_chains_sweeps_onto_the_baseline(tmp_path):
    cfg = compose_config([f"runs_dir={tmp_path}"], config_name="compare")
    OmegaConf.set_struct(cfg, False)
    (tmp_path / "sit" / "r0.5").mkdir(parents=True)
    (tmp_path / "sit" / "r0.5" / "summary.json").write_text("{}")
    steps = {s.name: s for s in compare.plan(cfg)}
    per_budget = {"ats r=0.5", "ats r=0.65"}
    assert list(steps)[0] == "baseline" and set(steps) == {"baseline", *REDUCERS} - {"ats"} | per_budget
    baseline = steps["baseline"]
    assert "reducer=none" in baseline.args and f"hydra.run.dir={tmp_path / 'none' / 'baseline'}" in baseline.args
    ckpt = f"'{tmp_path / 'none' / 'baseline' / 'export' / 'model.safetensors'}'"
    for name, step in steps.items():
        if name == "baseline" or name.startswith("ats"):
            continue
        assert step.args[0] == "-m" and f"reducer={name}" in step.args
        assert not any("${" in a for a in step.args if not a.startswith("hydra.sweep.subdir="))  # all resolved
        assert step.run_dirs == [tmp_path / name / f"r{b}" for b in BUDGETS]
    assert f"reducer.teacher={ckpt}" in steps["sit"].args
    assert "reducer.target_ratio=0.65" in steps["sit"].args  # r=0.5 finished already: only 0.65 is left to run
    assert f"backbone.checkpoint={ckpt}" in steps["vit_slim"].args
    assert f"backbone.checkpoint={ckpt}" in steps["patch_slimming"].args
    assert not any(a.startswith("backbone.checkpoint=") for a in steps["evo_vit"].args)  # from scratch
    assert "trainer.max_epochs=10" in steps["evo_vit"].args and "trainer.max_epochs=10" in baseline.args
    assert not baseline.done and not steps["sit"].done
    ats = [step for name, step in steps.items() if name.startswith("ats")]  # budget_overrides: a multirun per budget
    assert [s.run_dirs for s in ats] == [[tmp_path / "ats" / f"r{b}"] for b in BUDGETS]
    assert "reducer.blocks=[5,6,7,8,9,10,11]" in ats[0].args and "reducer.target_ratio=0.5" in ats[0].args


def test_compare_with_seeds_replicates_baseline_and_sweeps_per_seed(tmp_path):
    cfg = compose_config([f"runs_dir={tmp_path}", "seeds=[0,1]", "reducers=[sit]"], config_name="compare")
    OmegaConf.set_struct(cfg, False)
    steps = {s.name: s for s in compare.plan(cfg)}
    assert list(steps) == ["baseline seed=0", "sit seed=0", "baseline seed=1", "sit seed=1"]
    for seed in (0, 1):
        root = tmp_path / f"seed{seed}"
        baseline, sit = steps[f"baseline seed={seed}"], steps[f"sit seed={seed}"]
        assert f"seed={seed}" in baseline.args and f"seed={seed}" in sit.args
        assert baseline.run_dirs == [root / "none" / "baseline"]
        assert sit.run_dirs == [root / "sit" / f"r{b}" for b in BUDGETS]
        # each seed's reducer starts from that seed's baseline
        assert f"reducer.teacher='{root / 'none' / 'baseline' / 'export' / 'model.safetensors'}'" in sit.args


def test_compare_with_a_shared_baseline_trains_it_once_and_starts_every_seed_from_it(tmp_path):
    overrides = [f"runs_dir={tmp_path}", "seeds=[3,1]", "reducers=[sit,evo_vit]", "shared_baseline=true"]
    cfg = compose_config(overrides, config_name="compare")
    OmegaConf.set_struct(cfg, False)
    steps = {s.name: s for s in compare.plan(cfg)}
    assert list(steps) == ["baseline seed=3", "sit seed=3", "evo_vit seed=3", "sit seed=1", "evo_vit seed=1"]
    shared = tmp_path / "seed3" / "none" / "baseline"
    assert steps["baseline seed=3"].run_dirs == [shared] and steps["baseline seed=3"].is_baseline
    for seed in (3, 1):
        sit = steps[f"sit seed={seed}"]
        assert sit.baseline == shared and not sit.is_baseline and f"seed={seed}" in sit.args
        assert f"reducer.teacher='{shared / 'export' / 'model.safetensors'}'" in sit.args
        assert sit.run_dirs == [tmp_path / f"seed{seed}" / "sit" / f"r{b}" for b in BUDGETS]


@pytest.mark.parametrize(
    "extra, expected",
    [
        ([], [("baseline", "seed=0"), ("topk", "seed=0"), ("baseline", "seed=1")]),
        (["seeds=[1,0]", "shared_baseline=true"], [("baseline", "seed=1")]),  # no seed's sweep from it
    ],
)
def test_compare_skips_the_sweeps_of_a_seed_whose_baseline_learned_nothing(extra, expected, tmp_path, monkeypatch):
    overrides = [f"runs_dir={tmp_path}", "seeds=[0,1]", "reducers=[topk]", *extra]
    cfg = compose_config(overrides, config_name="compare")
    OmegaConf.set_struct(cfg, False)
    ran = []

    def fake_train(command: list[str]):  # writes what tokred-train would: a summary per run, seed 1 at chance
        seed = next(a for a in command if a.startswith("seed="))
        baseline = next((a.split("=", 1)[1] for a in command if a.startswith("hydra.run.dir=")), None)
        ran.append(("baseline" if baseline else "topk", seed))
        dirs = [Path(baseline)] if baseline else [tmp_path / seed.replace("=", "") / "topk" / f"r{b}" for b in BUDGETS]
        for run_dir in dirs:
            run_dir.mkdir(parents=True, exist_ok=True)
            reasons = ["top-1 10.5% is chance level for 10 classes"] if baseline and seed == "seed=1" else []
            (run_dir / "summary.json").write_text(json.dumps({"degenerate": reasons}))
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(compare.subprocess, "run", fake_train)
    monkeypatch.setattr(compare, "report_from_config", lambda *a, **k: type("P", (), {"show": lambda self: None})())
    failed = compare.run(cfg)
    assert ran == expected  # no sweep from seed 1's baseline
    assert len(failed) == 1 and failed[0].startswith("baseline seed=1 (the baseline is degenerate (top-1 10.5%")
    assert "train longer" in failed[0]
    ran.clear()
    assert compare.run(cfg) == failed and ran == []  # a re-launch checks the finished baseline again


@pytest.mark.parametrize("seeds", ["[]", "[1,1]"])
def test_compare_refuses_an_empty_or_repeated_seed_list(seeds, tmp_path):
    cfg = compose_config([f"runs_dir={tmp_path}", f"seeds={seeds}"], config_name="compare")
    with pytest.raises(ValueError, match="distinct integers"):
        compare.plan(cfg)


def test_the_hard_preset_plans_three_seeded_replicates_of_valid_training_runs(tmp_path):
    cfg = compose_config([f"runs_dir={tmp_path}"], config_name="compare_hard")
    steps = compare.plan(cfg)
    assert [s.name for s in steps if s.name.startswith("baseline")] == [f"baseline seed={s}" for s in (0, 1, 2)]
    assert len(steps) == 3 * (1 + len(REDUCERS))  # per seed: the baseline and one sweep per reducer at the one budget
    for step in steps:
        # every step is a tokred-train command line whose overrides compose (a typo in a key fails here)
        args = [a for a in step.args if a != "-m" and not a.startswith("hydra.")]
        train_cfg = compose_config(args, config_name="train")
        assert train_cfg.dataset.name == "synthetic_hard" and train_cfg.backbone.img_size == 128
        assert not any(a.startswith("reducer.blocks=") for a in args)  # no 64-px ATS overrides


def test_onnxruntime_rows_time_the_export_and_a_reducer_it_cannot_express_is_a_failed_row(tmp_path):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    cfg = bench_cfg(tmp_path, "reducers=[topk,ats]", "budgets=[]", "runtime=onnxruntime", "train_batch_size=null")
    machine, rows, failed = harness.run_benchmark(cfg)
    assert [(r["reducer"], r["runtime"]) for r in rows] == [("none", "onnxruntime"), ("topk", "onnxruntime")]
    assert all(r["throughput"] > 0 and r["speedup"] > 0 for r in rows)
    (ats,) = failed
    assert ats["reducer"] == "ats" and "cannot be exported to ONNX" in ats["error"]
    # a torch run into the same files keeps the onnxruntime rows: the runtime is part of what a row measures
    harness.write_results(cfg, machine, rows, failed, "onnx")
    torch_cfg = bench_cfg(tmp_path, "reducers=[topk]", "budgets=[]", "train_batch_size=null")
    machine, torch_rows, _ = harness.run_benchmark(torch_cfg)
    harness.write_results(torch_cfg, machine, torch_rows, [], "torch")
    kept = json.loads((tmp_path / "test" / "benchmark.json").read_text())["rows"]
    assert sorted((r["reducer"], r["runtime"]) for r in kept) == [
        ("none", "onnxruntime"),
        ("none", "torch"),
        ("topk", "onnxruntime"),
        ("topk", "torch"),
    ]


@pytest.mark.parametrize(
    "overrides, fix",
    [
        (["precision=bf16"], "precision=fp32"),
        (["compile=true", "warmup=2"], "compile=false"),
        (["device=cuda"], "device=cpu"),
        ([], "train_batch_size=null"),
    ],
)
def test_onnxruntime_with_torch_only_settings_is_refused_naming_the_fix(overrides, fix, tmp_path):
    with pytest.raises(ValueError, match=f"runtime=onnxruntime .* add .*{fix}"):
        harness.run_benchmark(bench_cfg(tmp_path, "runtime=onnxruntime", *overrides))
