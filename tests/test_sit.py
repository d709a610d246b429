"""SiT (issue 5): TSM maths, token schedule, gradients, FLOPs on DeiT-S, budgets, knobs, distillation, export."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
from dataclasses import asdict
from types import SimpleNamespace

import pytest
import timm
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import FAST, run_cli
from tokred.backbones import CheckpointError, create_backbone, freeze, read_state_dict
from tokred.cli import train as train_cli
from tokred.cli.flops import measure
from tokred.config import ConfigError, compose_config, validate
from tokred.data.synthetic import ShapesDataset
from tokred.export import load_deployable
from tokred.flops import counted_gmacs
from tokred.reducers import reducer_config
from tokred.reducers.sit import Config, SiT, TokenSlimming, forward_with_token_maps, stage_tokens
from tokred.training.optim import build_optimizer, build_param_groups, build_scheduler, step_scheduler
from tokred.training.phases import load_phase
from tokred.training.run import build_model, train


def sit(vit, **knobs) -> SiT:
    return SiT(vit, Config(**knobs))


# ---------------------------------------------------------------- TSM and schedule
def test_tsm_output_tokens_are_convex_combinations_of_the_inputs():
    torch.manual_seed(0)
    tsm = TokenSlimming(dim=32, n_out=5)
    with torch.no_grad():  # away from the near-uniform init, so the check is not trivially met
        tsm.mlp.fc2.weight.normal_(0, 1.0)
        tsm.scale.fill_(3.0)
    x = torch.randn(2, 16, 32)
    weights = tsm.weights(x)
    assert weights.shape == (2, 16, 5)
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(2, 5))  # over the inputs ...
    assert not torch.allclose(weights.sum(dim=2), torch.ones(2, 16))  # ... not over the outputs
    torch.testing.assert_close(tsm(x), weights.transpose(1, 2) @ x)


def test_keep_schedule_floors_like_the_paper():
    assert stage_tokens(196, 4, 0.5) == [196, 98, 49, 24]
    assert stage_tokens(324, 4, 0.5) == [324, 162, 81, 40]


def test_token_counts_per_block_follow_the_schedule(make_vit):
    model = sit(make_vit(depth=12)).eval()  # 16 patches: 16 -> 8 -> 4 -> 2 over [6, 2, 2, 2]
    seen = {}
    for i, tsm in model.tsms.items():
        tsm.register_forward_hook(lambda mod, args, out, i=i: seen.__setitem__(i, (args[0].shape[1], out.shape[1])))
    logits, maps = forward_with_token_maps(model.vit, torch.randn(2, 3, 32, 32), model.tsms)
    assert logits.shape == (2, 5)
    assert [m.shape[1] for m in maps] == [16] * 5 + [8, 8, 4, 4, 2, 2, 2]  # counted after the TSM ending a stage
    assert seen == {"5": (16, 8), "7": (8, 4), "9": (4, 2)}  # the CLS token never enters a TSM
    assert model.cost().tokens_per_block == [17] * 6 + [9] * 2 + [5] * 2 + [3] * 2
    assert sorted(model.rtsms, key=int) == [str(i) for i in range(5, 12)]  # spec: 7 RTSMs, blocks 5-11


@pytest.mark.parametrize("variant", [{}, {"init_values": 1e-2}, {"qk_norm": True}])
def test_one_stage_is_the_plain_backbone_and_slimming_keeps_timm_features(make_vit, variant):
    images = torch.randn(3, 3, 32, 32)
    vit = make_vit(**variant)
    model = sit(vit, stage_blocks=[4]).eval()
    assert len(model.tsms) == 0 and len(model.rtsms) == 0
    torch.testing.assert_close(model(images), vit(images))
    slim = sit(make_vit(**variant), stage_blocks=[1, 1, 1, 1]).eval()
    logits = slim(images)
    assert logits.shape == (3, 5) and torch.isfinite(logits).all()


def test_tsm_scale_both_mlp_layers_and_the_rtsms_get_gradients(make_vit):
    # float64: through three stacked TSMs of a random tiny model the last one's gradients are ~1e-18, which float32
    # can round to exactly 0 for some seeds; the test is about which parameters the losses reach, not their size.
    model = sit(make_vit(), stage_blocks=[1, 1, 1, 1]).double().train()
    teacher = freeze(model.build_teacher())
    _, terms = model.losses(torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.arange(4), F.cross_entropy, teacher)
    assert set(terms) == {"ce", "token_mse", "kl"}
    sum(terms.values()).backward()
    assert len(model.tsms) == 3 and len(model.rtsms) == 4
    for tsm in model.tsms.values():
        for p in (tsm.scale, tsm.mlp.fc1.weight, tsm.mlp.fc2.weight, tsm.norm.weight):
            assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.rtsms.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_losses_without_a_teacher_say_where_it_comes_from(make_vit):
    with pytest.raises(ValueError, match="build_teacher"):
        sit(make_vit(), stage_blocks=[1, 1, 1, 1]).losses(
            torch.randn(1, 3, 32, 32), torch.zeros(1, dtype=torch.long), F.cross_entropy
        )


def test_rtsms_learn_at_5x_with_decay_and_the_tsm_scale_is_decayed(make_vit):
    model = sit(make_vit(), stage_blocks=[1, 1, 1, 1])
    groups = {g["name"]: g for g in build_param_groups(model, 1e-3, 0.05)}
    assert groups["rtsm"]["lr"] == pytest.approx(5e-3) and groups["rtsm"]["weight_decay"] == 0.05
    assert {id(p) for p in groups["rtsm"]["params"]} == {id(p) for p in model.rtsms.parameters()}
    assert any(p is model.tsms["0"].scale for p in groups["decay"]["params"])  # as the official code does


# ---------------------------------------------------------------- FLOPs and budgets
@pytest.mark.parametrize(
    "overrides, gmacs, tokens",
    [
        (
            ["backbone=deit_small", "reducer=sit", "reducer.stage_blocks=[6,2,2,2]"],
            3.00,
            [197] * 6 + [99, 99, 50, 50, 25, 25],
        ),
        (["experiment=sit_deit_s_aggressive"], 1.15, [197, 99, 50] + [25] * 9),
    ],
)
def test_deit_small_gmacs_match_the_spec(overrides, gmacs, tokens):
    row = measure(overrides)
    assert row["tokens_per_block"] == tokens
    assert row["gmacs_analytic"] == pytest.approx(gmacs, rel=0.03)
    assert row["gmacs_counted"] == pytest.approx(row["gmacs_analytic"], rel=0.02)
    assert row["params_m"] - 22.05 == pytest.approx(0.26, abs=0.01)  # DeiT-S + 3 TSMs; no RTSM left (1.4 M each)


def test_a_3_gmacs_budget_on_deit_small_picks_the_s_style_split():
    vit = create_backbone(compose_config(["backbone=deit_small"], "flops").backbone, 1000)
    model = sit(vit, target_gmacs=3.0)
    assert (model.stage_blocks, model.keep_ratio) == ([6, 2, 2, 2], 0.5)


@pytest.mark.parametrize(
    "budget, ratio_moves",
    [
        ("reducer.target_ratio=0.5", False),  # reachable by a stage split at keep_ratio 0.5
        ("reducer.target_ratio=0.9", True),  # more than the mildest split costs: keep_ratio is raised
        ("reducer.target_gmacs=0.015", True),  # less than the most aggressive split: keep_ratio is lowered
    ],
)
def test_budget_targets_land_within_3_percent_from_the_config_alone(budget, ratio_moves):
    cfg = compose_config(["backbone=deit_tiny_cpu", "reducer=sit", budget], "flops")
    model = build_model(cfg, 10)
    deploy = model.deployable()
    target = model.target_gmacs()
    assert model.cost().gmacs == pytest.approx(target, rel=0.03)
    assert counted_gmacs(deploy, 64) == pytest.approx(model.cost().gmacs, rel=0.02)
    assert (model.keep_ratio != 0.5) == ratio_moves
    assert model.knobs()["stage_blocks"] == model.stage_blocks and sum(model.stage_blocks) == 12


def test_structure_rebuilds_a_different_split_for_its_state_dict(make_vit):
    images = torch.randn(2, 3, 32, 32)
    source = sit(make_vit(), stage_blocks=[2, 1, 1], keep_ratio=0.6).eval()
    target = sit(make_vit(), stage_blocks=[1, 1, 1, 1])
    target.load_structure(json.loads(json.dumps(source.structure())))
    target.load_state_dict(source.state_dict())
    torch.testing.assert_close(target.eval()(images), source(images))


# ---------------------------------------------------------------- knobs
@pytest.mark.parametrize(
    "knobs, fragment",
    [
        ({"stage_blocks": []}, "reducer.stage_blocks"),
        ({"stage_blocks": [6, 0, 4, 2]}, "reducer.stage_blocks"),
        ({"keep_ratio": 0.0}, "reducer.keep_ratio"),
        ({"keep_ratio": 1.5}, "reducer.keep_ratio"),
        ({"token_weight": -1.0}, "reducer.token_weight"),
        ({"kd_weight": -0.5}, "reducer.kd_weight"),
        ({"kd_temperature": 0.0}, "reducer.kd_temperature"),
        ({"rtsm_lr_mult": 0.0}, "reducer.rtsm_lr_mult"),
        ({"teacher": " "}, "reducer.teacher"),
        ({"stage_blcks": [6, 2, 2, 2]}, "valid knobs"),
        ({"target_ratio": 0.5, "target_gmacs": 2.0}, "not both"),
    ],
)
def test_bad_knobs_are_rejected_naming_the_knob(knobs, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        reducer_config({"name": "sit", **knobs})


def test_the_yaml_mirrors_the_config_defaults():
    assert OmegaConf.to_container(compose_config(["reducer=sit"]).reducer) == asdict(Config())


@pytest.mark.parametrize(
    "knobs, fragment",
    [
        (
            {},
            "reducer.stage_blocks=[6, 2, 2, 2] sums to 12 but the backbone has 4 blocks; make it sum to 4, "
            "e.g. [1, 1, 1, 1]",
        ),
        ({"stage_blocks": [1] * 5}, "reducer.stage_blocks has 5 stages but the backbone has only 4 blocks"),
        ({"stage_blocks": [1, 1, 1, 1], "keep_ratio": 0.1}, "reducer.keep_ratio=0.1 leaves no tokens in stage 2"),
    ],
)
def test_knobs_that_do_not_fit_the_backbone_fail_at_construction(make_vit, knobs, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        sit(make_vit(), **knobs)


def test_a_missing_teacher_fails_when_training_starts_not_when_rebuilding(make_vit, tmp_path):
    # Export rebuilds the model from a config that still names the teacher: construction must not read it.
    model = sit(make_vit(), stage_blocks=[1, 1, 1, 1], teacher=str(tmp_path / "missing.ckpt"))
    with pytest.raises(CheckpointError, match="does not exist"):
        model.build_teacher()


@pytest.mark.parametrize(
    "fix",
    [
        None,
        "reducer.teacher=t.ckpt",
        "backbone.pretrained=true",
        "backbone.checkpoint=w.pth",
        "reducer.allow_random_teacher=true",
    ],
)
def test_a_random_teacher_is_refused_in_one_line_unless_a_teacher_weights_or_the_opt_in_are_given(fix):
    cfg = compose_config(["experiment=sit_deit_s", *([fix] if fix else [])])
    if fix:
        validate(cfg)
        return
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    message = str(err.value)
    assert "\n" not in message and "randomly initialised teacher" in message
    assert all(
        k in message
        for k in (
            "reducer.teacher=",
            "backbone.pretrained=true",
            "backbone.checkpoint=",
            "reducer.allow_random_teacher=true",
        )
    )
    validate(compose_config(["reducer=sit"], "flops"))  # counting FLOPs trains nothing: no teacher needed


def test_the_train_cli_refuses_a_random_teacher_before_writing_a_run(capsys, tmp_path):
    code, _, err = run_cli(train_cli.main, capsys, "reducer=sit", f"paths.root={tmp_path}")
    assert code == 2 and "reducer.allow_random_teacher=true" in err and len(err.strip().splitlines()) == 1
    assert not [p for p in (tmp_path / "outputs").rglob("*") if p.is_file()]  # no run directory left behind


def test_the_rtsms_follow_the_official_schedule_from_5x_the_lr_down_to_min_lr(make_vit):
    # Official main.py adjust_learning_rate at the start of each of the 125 + 10 epochs: cos = (1 + cos(pi e/125))/2,
    # RTSMs min + cos (5 lr - min), the rest min + cos (lr - min), both exactly min_lr from epoch 125 on.
    cfg = compose_config(["experiment=sit_deit_s"])
    optim, lr = dict(cfg.optim), 4e-4
    model = sit(make_vit(), stage_blocks=[1, 1, 1, 1])
    optimizer = build_optimizer(model, optim, lr)
    scheduler = build_scheduler(optimizer, optim, int(cfg.trainer.max_epochs), 7)
    groups = {g["name"]: g for g in optimizer.param_groups}
    for epoch in range(135):
        cos = 0.5 * (1 + math.cos(math.pi * epoch / 125))
        rtsm, rest = (1e-5, 1e-5) if epoch >= 125 else (1e-5 + cos * (5 * lr - 1e-5), 1e-5 + cos * (lr - 1e-5))
        assert groups["rtsm"]["lr"] == pytest.approx(rtsm, rel=1e-12), epoch
        assert groups["decay"]["lr"] == groups["no_decay"]["lr"] == pytest.approx(rest, rel=1e-12), epoch
        step_scheduler(scheduler, optim, epoch, 7 * (epoch + 1))
    assert groups["rtsm"]["lr"] == 1e-5


# ---------------------------------------------------------------- distillation
def test_distilling_on_the_built_in_dataset_lowers_token_mse_and_kl(make_vit):
    data = ShapesDataset(64, 32, num_classes=5, seed=0)
    images, labels = torch.stack([data[i][0] for i in range(64)]), torch.as_tensor(data.labels)
    model = sit(make_vit(), stage_blocks=[1, 1, 1, 1])
    teacher = freeze(model.build_teacher())
    # An untrained teacher pools with near-uniform attention, i.e. over the mean token, which the near-uniform TSM
    # preserves: unlike a pretrained one it barely changes when slimmed. Noise stands in for that gap.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.vit.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))

    def terms() -> dict[str, float]:
        model.eval()
        with torch.no_grad():
            _, values = model.losses(images[:32], labels[:32], F.cross_entropy, teacher)
        model.train()
        return {k: v.item() for k, v in values.items()}

    optimizer = build_optimizer(model, {"weight_decay": 0.05}, lr=1e-3)
    before = terms()
    for step in range(20):
        batch = torch.arange(16 * step, 16 * step + 16) % 64
        _, values = model.losses(images[batch], labels[batch], F.cross_entropy, teacher)
        optimizer.zero_grad()
        sum(values.values()).backward()
        optimizer.step()
    after = terms()
    assert after["token_mse"] < 0.5 * before["token_mse"]
    assert after["kl"] < 0.5 * before["kl"]


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """The issue's workflow: a `none` baseline, then `reducer=sit reducer.teacher=<its best.ckpt>`."""
    root = tmp_path_factory.mktemp("sit")

    def run(name: str, *overrides: str):
        cfg = compose_config([*FAST, f"paths.root={root}", "optim.warmup_epochs=0", *overrides])
        cfg.paths.output_dir = str(root / name)
        return cfg, train(cfg)

    run("baseline", "trainer.max_epochs=1")  # only its checkpoint is needed
    teacher = root / "baseline" / "checkpoints" / "train" / "best.ckpt"
    cfg, summary = run("sit", "reducer=sit", f"reducer.teacher={teacher}")
    return SimpleNamespace(cfg=cfg, summary=summary, run_dir=root / "sit", teacher=teacher)


def test_the_distillation_run_slims_and_logs_its_terms(distilled):
    assert distilled.summary["model/tokens_per_block"] == [65] * 6 + [33] * 2 + [17] * 2 + [9] * 2
    with open(distilled.run_dir / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/token_mse")]
    assert len(rows) == 4
    for name in ("train/ce", "train/token_mse", "train/kl"):
        assert all(math.isfinite(float(r[name])) for r in rows)
    assert float(rows[-1]["train/token_mse"]) < float(rows[0]["train/token_mse"])


def test_the_student_starts_from_the_baseline_checkpoint(distilled):
    baseline = {k.removeprefix("model.vit."): v for k, v in read_state_dict(distilled.teacher).items()}
    model = build_model(distilled.cfg, 10)
    tsms = {k: v.clone() for k, v in model.tsms.state_dict().items()}
    teacher = model.build_teacher()
    assert all(torch.equal(v, baseline[k]) for k, v in teacher.state_dict().items())
    model.phases()[0].run(None)
    assert all(torch.equal(v, baseline[k]) for k, v in model.vit.state_dict().items())
    assert all(torch.equal(v, tsms[k]) for k, v in model.tsms.state_dict().items())  # TSMs stay freshly initialised


def test_the_export_drops_rtsms_and_teacher_and_runs_without_them(distilled, tmp_path):
    export = tmp_path / "export"
    shutil.copytree(distilled.run_dir / "export", export)
    keys = set(load_file(export / "model.safetensors"))
    assert any(k.startswith("tsms.") for k in keys)
    assert not any(k.startswith("rtsms.") or "teacher" in k for k in keys)
    config = json.loads((export / "config.json").read_text())
    assert config["reducer"]["teacher"] == str(distilled.teacher)
    config["reducer"]["teacher"] = str(tmp_path / "gone.ckpt")  # rebuilding must never read the teacher
    (export / "config.json").write_text(json.dumps(config))
    deploy = load_deployable(export)
    trained = build_model(distilled.cfg, 10)
    load_phase(trained, distilled.run_dir / "phases" / "train.pt")
    images = torch.randn(2, 3, 64, 64)
    logits = deploy(images)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 10)
    torch.testing.assert_close(logits, trained.deployable()(images))


def test_presets_carry_the_papers_recipe():
    for name, split in (("sit_deit_s", [6, 2, 2, 2]), ("sit_deit_s_aggressive", [1, 1, 1, 9])):
        cfg = compose_config([f"experiment={name}"])
        assert (cfg.backbone.name, cfg.reducer.name, list(cfg.reducer.stage_blocks)) == ("deit_small", "sit", split)
        assert cfg.trainer.max_epochs == 135 and cfg.optim.cooldown_epochs == 10 and cfg.optim.warmup_epochs == 0
        assert cfg.optim.per_epoch and (cfg.optim.lr, cfg.optim.lr_batch, cfg.optim.weight_decay) == (2e-4, 512, 0.05)


# ---------------------------------------------------------------- prefix tokens, CLS-free backbones (issue 16)
# timm name -> image size giving 16 patches. Built untrained at 4 blocks of width 48: what is tested is the layout
# (prefix tokens, pooling, distilled head, registers, LayerScale, attention pool), not the size.
LAYOUTS = {
    "deit_small_patch16_224": 64,
    "deit_base_patch16_224": 64,
    "vit_base_patch16_224": 64,
    "deit3_small_patch16_224": 64,
    "vit_small_patch14_dinov2": 56,
    "vit_base_patch16_clip_224": 64,
    "vit_small_patch14_reg4_dinov2": 56,  # CLS + 4 registers
    "deit_small_distilled_patch16_224": 64,  # CLS + distillation token, two heads
    "vit_medium_patch16_gap_256": 64,  # no CLS, average pooling
    "vit_base_patch16_siglip_224": 64,  # no CLS, attention pooling
}


def small_backbone(name: str):
    torch.manual_seed(0)
    return timm.create_model(name, img_size=LAYOUTS[name], depth=4, embed_dim=48, num_heads=2, num_classes=7).eval()


def layout_images(name: str) -> torch.Tensor:
    return torch.randn(2, 3, LAYOUTS[name], LAYOUTS[name], generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_prefix_tokens_bypass_every_tsm_and_the_cost_is_counted(name):
    vit = small_backbone(name)
    prefix, images = vit.num_prefix_tokens, layout_images(name)
    model = sit(vit, stage_blocks=[1, 1, 1, 1]).eval()
    # Each block's input (its norm1 sees it) and the last block's output (the final norm sees it).
    inputs = []
    for blk in vit.blocks:
        blk.norm1.register_forward_hook(lambda mod, args, out: inputs.append(args[0]))
    vit.norm.register_forward_hook(lambda mod, args, out: inputs.append(args[0]))
    with torch.no_grad():
        logits = model(images)
        assert logits.shape == (2, 7) and torch.isfinite(logits).all()
        assert [x.shape[1] for x in inputs] == [prefix + n for n in (16, 8, 4, 2, 2)]
        for i, blk in enumerate(vit.blocks):
            out, following = blk(inputs[i]), inputs[i + 1]
            torch.testing.assert_close(following[:, :prefix], out[:, :prefix])  # passed through, untouched
            # The TSM aggregates the patch rows only: no prefix token is ever a candidate.
            patches = out[:, prefix:]
            torch.testing.assert_close(following[:, prefix:], model.tsms[str(i)](patches) if i < 3 else patches)
        assert [m.values.shape for m in model.token_maps(images)] == [(2, 4, 4)] * 4
    deploy = model.deployable()
    assert model.cost().gmacs == pytest.approx(counted_gmacs(deploy, LAYOUTS[name]), rel=1e-6)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_one_stage_gives_the_plain_timm_logits_on_every_layout(name):
    vit, images = small_backbone(name), layout_images(name)
    model = sit(vit, stage_blocks=[4]).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(images), vit(images), rtol=0, atol=0)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_distillation_trains_on_every_layout(name):
    images, labels = layout_images(name), torch.arange(2)
    plain = sit(small_backbone(name), stage_blocks=[4]).train()
    _, terms = plain.losses(images, labels, F.cross_entropy, freeze(plain.build_teacher()))
    # Unslimmed, the student is its teacher: the token maps (prefix excluded on both sides) and logits agree.
    assert terms["token_mse"].item() == 0 and terms["kl"].item() == pytest.approx(0, abs=1e-6)
    model = sit(small_backbone(name), stage_blocks=[1, 1, 1, 1]).train()
    _, terms = model.losses(images, labels, F.cross_entropy, freeze(model.build_teacher()))
    assert all(torch.isfinite(v) for v in terms.values()) and terms["token_mse"] > 0
    sum(terms.values()).backward()
    assert all(tsm.mlp.fc1.weight.grad.abs().sum() > 0 for tsm in model.tsms.values())
