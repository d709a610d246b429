"""Issue 2's spine: parity of the `none` wrapper, FLOPs against the papers, config validation, a training run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tokred.backbones import create_backbone
from tokred.config import ConfigError, check_group_overrides, compose_config, validate
from tokred.flops import count_params, counted_gmacs, cpu_attention_formulas
from tokred.io import PER_IMAGE, read_per_image
from tokred.reducers import available_reducers, create_reducer, reducer_config
from tokred.training.run import build_model, train


@pytest.mark.parametrize("variant", [{}, {"init_values": 1e-2}, {"qk_norm": True}, {"qkv_bias": False}])
def test_none_reducer_gives_the_unwrapped_models_logits(make_vit, variant):
    vit = make_vit(**variant)
    images = torch.randn(3, 3, 32, 32)
    expected = vit(images)
    model = create_reducer({"name": "none"}, vit).eval()
    assert torch.equal(model(images), expected)
    assert torch.equal(model.deployable()(images), expected)


@pytest.mark.parametrize("backbone, paper_gmacs", [("deit_tiny", 1.25), ("deit_small", 4.60), ("deit_base", 17.56)])
def test_baseline_gmacs_match_the_papers(backbone, paper_gmacs):
    cfg = compose_config([f"backbone={backbone}"], config_name="flops")
    model = build_model(cfg, 1000)
    analytic = model.cost().gmacs
    assert analytic == pytest.approx(paper_gmacs, rel=0.01)
    assert counted_gmacs(model, 224) == pytest.approx(analytic, rel=0.02)


def test_cpu_fused_attention_is_counted_once_with_the_standard_formula():
    # Every torch in the supported window: the CPU flash kernel gets 2 * B * H * Lq * Lk * (E_qk + E_v) FLOPs, not 0
    # (torch 2.14 crashed on a doubly wrapped formula; torch 2.4 ignored one given to register_flop_formula).
    from torch.nn.functional import scaled_dot_product_attention
    from torch.utils.flop_counter import FlopCounterMode

    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 4)
    with FlopCounterMode(display=False, custom_mapping=cpu_attention_formulas()) as counter:
        scaled_dot_product_attention(q, k, v)
    assert counter.get_total_flops() == 2 * 2 * 3 * 5 * 7 * (8 + 4)


def test_block_cost_charges_the_mlp_on_the_tokens_it_sees():
    # A block that reduces between attention and MLP (ToMe, Top-K, EViT): 10 tokens attend, 6 go through the MLP.
    from tokred.flops import BlockCost

    d, hidden = 8, 32
    attention = 10 * d * 3 * d + 10 * 10 * 2 * d + 10 * d * d  # qkv, the two matmuls, proj
    block = BlockCost(10, 10, d, d, d, hidden, n_mlp=6)
    assert block.macs() == attention + 2 * 6 * d * hidden
    assert BlockCost.dense(10, d, hidden).macs() == attention + 2 * 10 * d * hidden


def test_deit_small_has_22m_params():
    vit = create_backbone(compose_config(["backbone=deit_small"], "flops").backbone, 1000)
    assert count_params(vit) / 1e6 == pytest.approx(22.05, abs=0.01)


def test_tokred_flops_prints_a_json_last_line(processes):
    done = processes.run([sys.executable, "-m", "tokred.cli.flops", "backbone=deit_tiny_cpu"], timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    row = json.loads(out.strip().splitlines()[-1])
    assert {"gmacs_analytic", "gmacs_counted", "params_m", "tokens_per_block"} <= set(row)
    assert row["tokens_per_block"] == [65] * 12
    assert row["gmacs_analytic"] == pytest.approx(row["gmacs_counted"], rel=0.02)


@pytest.mark.parametrize(
    "override, names",
    [
        ("reducer=bogus", ["reducer", "none"]),
        ("backbone=vit_huge", ["backbone", "deit_small"]),
        ("dataset=imagenet22k", ["dataset", "synthetic"]),
    ],
)
def test_unknown_group_choice_is_one_line_naming_the_choices(override, names):
    with pytest.raises(ConfigError) as err:
        check_group_overrides([override])
    message = str(err.value)
    assert "\n" not in message and all(n in message for n in names)


def test_cli_rejects_unknown_choice_with_exit_2(processes):
    proc = processes.run([sys.executable, "-m", "tokred.cli.train", "reducer=bogus"], timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "choose one of" in proc.stderr


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["backbone.img_size=60"], "divisible by the patch size"),
        (["optim.lr=-1"], "optim.lr"),
        (["optim.scheduler=linear"], "cosine, constant"),
        (["+reducer.keep=3"], "valid knobs"),
    ],
)
def test_invalid_values_are_rejected_up_front(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        validate(compose_config(overrides))


def test_every_registered_reducer_has_a_config_file():
    for name in available_reducers():
        assert reducer_config(compose_config([f"reducer={name}"]).reducer).name == name


def test_a_short_run_learns_and_writes_its_artifacts(run_cfg):
    cfg = run_cfg(
        "trainer.max_epochs=3",
        "trainer.limit_train_batches=6",
        "dataset.train_size=96",
        "optim.lr=2e-3",
        "optim.warmup_epochs=0",
    )
    summary = train(cfg)
    run_dir = cfg.paths.output_dir
    metrics = open(f"{run_dir}/csv/metrics.csv").read().splitlines()
    header = metrics[0].split(",")
    losses = [
        float(r.split(",")[header.index("train/loss")]) for r in metrics[1:] if r.split(",")[header.index("train/loss")]
    ]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert summary["model/gmacs"] == pytest.approx(0.0973, rel=0.01)
    assert json.load(open(f"{run_dir}/summary.json"))["reducer"] == "none"
    # one right/wrong per image evaluated (trainer.limit_val_batches=1: 16 of the 32 validation images), and their
    # means are the summary's top-1
    per_image = read_per_image(Path(run_dir) / PER_IMAGE)
    assert {split: len(v) for split, v in per_image.items()} == {"val": 16, "test": 32}
    for split, right in per_image.items():
        assert sum(right) / len(right) == pytest.approx(summary[f"{split}/acc1"])
    from tokred.export import load_deployable

    assert load_deployable(f"{run_dir}/export")(torch.randn(2, 3, 64, 64)).shape == (2, 10)
