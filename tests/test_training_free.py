"""Training-free evaluation: a reducer applied to a backbone's own weights, with no tokred checkpoint."""

from __future__ import annotations

import json

import pytest
import timm
from safetensors.torch import save_file

from conftest import FAST, run_cli
from tokred.cli import eval as eval_cli
from tokred.reducers import available_reducers, is_training_free

DATA = [o for o in FAST if o.startswith("dataset.")]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A deit_tiny_cpu checkpoint as a user brings one (plain timm state dict in safetensors)."""
    path = tmp_path_factory.mktemp("weights") / "vit.safetensors"
    vit = timm.create_model("deit_tiny_cpu_patch8_64", num_classes=10)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    return path


def evaluate(capsys, tmp_path, *args):
    code, out, err = run_cli(eval_cli.main, capsys, *DATA, f"paths.root={tmp_path}", "logger=csv", *args)
    return code, (json.loads(out.strip().splitlines()[-1]) if code == 0 else None), err


def test_a_training_free_reducer_evaluates_on_given_weights(weights, tmp_path, capsys):
    model = ["backbone=deit_tiny_cpu", f"backbone.checkpoint={weights}"]
    code, plain, err = evaluate(capsys, tmp_path, *model)
    assert code == 0, err[-2000:]
    code, neutral, err = evaluate(capsys, tmp_path, *model, "reducer=tome", "reducer.r=0")
    assert code == 0, err[-2000:]
    code, merged, err = evaluate(capsys, tmp_path, *model, "reducer=tome", "reducer.target_ratio=0.5")
    assert code == 0, err[-2000:]
    assert plain["ckpt_path"] is None and plain["reducer"] == "none"
    assert neutral["val/acc1"] == plain["val/acc1"] and neutral["model/gmacs"] == pytest.approx(plain["model/gmacs"])
    assert merged["reducer"] == "tome" and merged["reducer_knobs"]["target_ratio"] == 0.5
    assert 0.49 * plain["model/gmacs"] <= merged["model/gmacs"] <= 0.5 * plain["model/gmacs"]


def test_the_training_free_reducers_are_declared():
    assert {r for r in available_reducers() if is_training_free(r)} == {"none", "tome", "topk", "evit", "ats"}


@pytest.mark.parametrize(
    "args, fragment",
    [
        (
            ["backbone=deit_tiny_cpu", "reducer=sit"],
            "reducer=sit needs training before it can be evaluated; run tokred-train",
        ),
        (["backbone=deit_tiny_cpu", "reducer=tome"], "no weights to evaluate; pass backbone.pretrained=true"),
        (["reducer=tome"], "tokred-eval needs a model"),
        (["ckpt_path=/somewhere", "reducer=tome"], "with ckpt_path the model comes from the checkpoint"),
        (["backbone=deit_small", "backbone.pretrained=true"], "pretrained head has 1000 classes but dataset synthetic"),
    ],
)
def test_training_free_bad_input_is_one_line(args, fragment, tmp_path, capsys, monkeypatch):
    # timm's weights would be downloaded: its loader is stubbed (the head check comes after it)
    monkeypatch.setattr(timm.models._builder, "load_pretrained", lambda *a, **k: None)
    code, _, err = evaluate(capsys, tmp_path, *args)
    line = err.strip().splitlines()[-1]
    assert code == 2 and line.startswith("tokred-eval: error: ") and fragment in line, err[-2000:]


def test_compare_draws_the_training_free_curves_from_one_baseline(tmp_path, monkeypatch):
    """tokred-compare mode=training_free: no training beyond the (here: given) baseline; one row per reducer and
    budget, each at or just under its budget, the baseline's accuracy at ratio 1, and both plots."""
    import csv

    import tokred
    from tokred.benchmark import compare
    from tokred.config import compose_config

    runs = tmp_path / "runs"
    baseline = runs / "none" / "baseline"
    tokred.save(tokred.patch(timm.create_model("deit_tiny_cpu_patch8_64", num_classes=10), "none"), baseline / "export")
    (baseline / "summary.json").write_text("{}")  # the baseline step counts as done
    cfg = compose_config(
        [
            "mode=training_free",
            f"runs_dir={runs}",
            "reducers=[tome,topk,sit]",  # sit needs training: not on the curve
            "training_free.ratios=[0.5,0.8]",
            "training_free.speed.batch_size=4",
            "training_free.speed.repeats=1",
            f"report.out_dir={tmp_path / 'results'}",
            "report.machine=here",
            "train=[" + ",".join(f"'{o}'" for o in ["backbone=deit_tiny_cpu", "dataset=synthetic", *DATA]) + "]",
        ],
        config_name="compare",
    )
    monkeypatch.setattr("sys.argv", ["tokred-compare", "mode=training_free"])
    assert compare.run(cfg) == []
    out = tmp_path / "results" / "here"
    with open(out / "training_free.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["reducer"], float(r["target_ratio"])) for r in rows] == [
        ("none", 1.0),
        ("tome", 0.5),
        ("tome", 0.8),
        ("topk", 0.5),
        ("topk", 0.8),
    ]
    base = float(rows[0]["gmacs"])
    for row in rows[1:]:
        assert 0.99 * float(row["target_ratio"]) <= float(row["gmacs"]) / base <= float(row["target_ratio"])
        assert 0 <= float(row["top1"]) <= 100 and float(row["throughput"]) > 0
    assert rows[1]["knob"].startswith("r=") and rows[3]["knob"].startswith("keep_rate=")
    assert (out / "training_free_top1_vs_gmacs.png").stat().st_size > 10_000
    assert (out / "training_free_top1_vs_throughput.png").is_file()
    assert "tokred-compare mode=training_free" in (out / "training_free.md").read_text()
