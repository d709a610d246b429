"""DynamicViT (issue 15): prediction modules, Gumbel masks in training vs top-k pruning at inference, the four loss
terms and the frozen teacher, FLOPs with the predictors counted, budgets, phases, a fine-tuning run and its export."""

from __future__ import annotations

import csv
import math
import re
from dataclasses import asdict
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import save_file

from tokred.backbones import create_backbone, freeze
from tokred.cli.flops import measure
from tokred.config import ConfigError, compose_config, validate
from tokred.export import load_deployable
from tokred.flops import count_params, counted_gmacs
from tokred.reducers import create_reducer
from tokred.reducers.base import TokenReducer
from tokred.reducers.dynamicvit import (
    Config,
    DynamicViT,
    additive_mask,
    connection,
    keep_counts,
    policy_softmax,
    ratio_loss,
    token_distillation,
)
from tokred.training.optim import build_param_groups
from tokred.training.phases import read_phase
from tokred.training.run import build_model, train

LOCS = [1, 2, 3]  # the 4-block tiny ViT: one prediction module before each block after the first


def dyn(vit, **knobs) -> DynamicViT:
    return create_reducer({"name": "dynamicvit", "pruning_loc": LOCS, **knobs}, vit)


def images(b: int = 3) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(b, 3, 32, 32)


def peaked(vit, factor: float = 3.0):
    """Scale the attention logits of a random ViT so attention, and what masking changes, is far from uniform."""
    with torch.no_grad():
        for blk in vit.blocks:
            blk.attn.qkv.weight.mul_(factor)
    return vit


def pruned_run(model: DynamicViT, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
    """Eval-mode logits, final-norm kept tokens and the original indices each block computes."""
    orders: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        tokens = model.vit.norm(model._pruned_tokens(x, lambda i, order: orders.__setitem__(i, order)))
    return model.vit.forward_head(tokens), tokens, orders


def decisions_of(orders: dict[int, torch.Tensor]):
    """A ``decide`` for the training forward that keeps exactly the tokens the pruned forward kept at each stage."""

    def decide(stage: int, log_probs: torch.Tensor) -> torch.Tensor:
        keep = torch.zeros(log_probs.shape[:2])
        return keep.scatter_(1, orders[LOCS[stage]], 1.0)

    return decide


# ---------------------------------------------------------------- parity and the train/eval equivalence


@pytest.mark.parametrize(
    "variant",
    [{}, {"init_values": 0.1, "qk_norm": True}, {"qkv_bias": False}],
    ids=["deit", "layerscale+qknorm", "no-qkv-bias"],
)
def test_keep_ratio_one_gives_the_baseline_logits(make_vit, variant):
    vit = make_vit(**variant)
    x = images()
    with torch.no_grad():
        expected = vit(x)
        model = dyn(vit, keep_ratio=1.0).eval()
        assert model.cost().tokens_per_block == [17] * 4
        # Every token kept, in keep-score order: CLS pooling does not see the permutation.
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model.deployable()(x), expected, atol=1e-5, rtol=1e-4)
        all_kept = lambda stage, log_probs: torch.ones(log_probs.shape[:2])
        torch.testing.assert_close(model._masked_forward(x, all_kept)[0], expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("keep_ratio", [0.5, 0.7])
@pytest.mark.parametrize("variant", [{}, {"init_values": 0.1, "qk_norm": True}], ids=["deit", "layerscale+qknorm"])
def test_masked_training_equals_pruned_inference_with_the_same_hard_masks(make_vit, keep_ratio, variant):
    model = dyn(peaked(make_vit(**variant)), keep_ratio=keep_ratio).eval()
    x = images()
    logits, kept_tokens, orders = pruned_run(model, x)
    model.train()
    with torch.no_grad():
        train_logits, patch_tokens, decisions = model._masked_forward(x, decisions_of(orders))
    torch.testing.assert_close(train_logits, logits, atol=1e-4, rtol=1e-4)
    # The tokens the pruned model kept to the end have the same features in the full-length masked run.
    torch.testing.assert_close(
        patch_tokens.gather(1, orders[3].unsqueeze(-1).expand(-1, -1, 32)), kept_tokens[:, 1:], atol=1e-4, rtol=1e-4
    )
    assert [d.sum(1).tolist() for d in decisions] == [[k] * 3 for k in keep_counts(16, keep_ratio, 3)]
    # The masks are what makes them agree: without them the full-length run sees the dropped tokens.
    with torch.no_grad():
        unmasked = model._masked_forward(x, lambda stage, log_probs: torch.ones(log_probs.shape[:2]))[0]
    assert not torch.allclose(unmasked, logits, atol=1e-3)


def test_channel_zero_is_keep_in_training_and_at_inference(make_vit, monkeypatch):
    # Official checkpoints score "keep" in channel 0 (spec fact 2): a first prediction module that is certain about
    # a known token set must keep exactly that set both ways.
    model = dyn(make_vit(), keep_ratio=0.5)
    favoured = [3, 7, 11, 15, 0, 5, 9, 13]  # int(16 * 0.5) = 8 tokens

    def certain(x: torch.Tensor, alive: torch.Tensor | None = None) -> torch.Tensor:
        keep = torch.full(x.shape[:2], -50.0)
        keep[:, favoured] = 0.0
        return torch.stack([keep, -50.0 - keep], dim=-1)  # log-probabilities (keep, drop)

    monkeypatch.setattr(model.score_predictor[0], "forward", certain)
    _, _, orders = pruned_run(model.eval(), images())
    assert all(set(image.tolist()) == set(favoured) for image in orders[1])
    _, _, decisions = model.train()._masked_forward(images())
    assert all(set(image.nonzero().flatten().tolist()) == set(favoured) for image in decisions[0])


def official_softmax(a: list[float], g: list[float], eps: float = 1e-6) -> list[float]:
    """Spec §3.3 written out for one row: (exp(a_j - M) g_j + eps / T) / (sum_k exp(a_k - M) g_k + eps)."""
    m = max(a)
    s = sum(math.exp(x - m) * gj for x, gj in zip(a, g))
    return [(math.exp(x - m) * gj + eps / len(a)) / (s + eps) for x, gj in zip(a, g)]


def test_the_masked_softmax_is_the_official_formula_and_hides_dropped_keys_from_all_but_themselves():
    keep = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    allowed = connection(keep)
    # G_ij = m_j + (1 - m_j) [i = j] (spec §3.3, the official code): every query sees the kept keys and itself.
    policy = torch.cat([torch.ones(2, 1), keep], dim=1)  # CLS first, always kept
    visible = (policy[:, None, :] == 1) | torch.eye(5, dtype=torch.bool)
    assert allowed.shape == (2, 1, 5, 5) and torch.equal(allowed[:, 0] == 1, visible)
    torch.manual_seed(0)
    calm = torch.randn(2, 1, 5, 5, dtype=torch.float64)
    dominated = calm.clone()
    dominated[:, :, :, 2] += 25.0  # a dropped key far above the kept ones: the official rows go ~uniform (§11.2)
    for logits in (calm, dominated):
        weights = policy_softmax(logits, allowed)[:, 0]
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 5, dtype=torch.float64))
        for b in range(2):
            for i in range(5):
                expected = torch.tensor(official_softmax(logits[b, 0, i].tolist(), allowed[b, 0, i].tolist()))
                torch.testing.assert_close(weights[b, i], expected.double(), rtol=1e-5, atol=0)
    assert policy_softmax(calm, allowed)[:, 0][~visible].max() < 1e-5  # the eps leak, eps / T / (S + eps), only
    assert policy_softmax(calm.half(), allowed).dtype == torch.float16  # computed in float32, cast back


def test_the_sdpa_mask_hides_dropped_keys_from_every_query_but_their_own():
    keep = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    bias = additive_mask(connection(keep))
    assert bias.shape == (2, 1, 5, 5)
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 5, 5) * 3
    logits[:, :, :, 2] += 25.0  # a dropped key far above the kept ones must not take over (spec §11.2)
    weights = (logits + bias).softmax(dim=-1)[:, 0]
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 5))
    policy = torch.cat([torch.ones(2, 1), keep], dim=1)  # CLS first, always kept
    # G_ij = m_j + (1 - m_j) [i = j] (spec §3.3, the official code): every query sees the kept keys and itself.
    visible = (policy[:, None, :] == 1) | torch.eye(5, dtype=torch.bool)
    assert weights[~visible].max() < 1e-8
    assert torch.equal(bias[:, :, :, 0], torch.zeros(2, 1, 5))  # the CLS column is never masked
    for b in range(2):
        for i in range(5):
            expected = logits[b, 0, i][visible[b, i]].softmax(dim=-1)
            torch.testing.assert_close(weights[b, i][visible[b, i]], expected, atol=1e-7, rtol=1e-6)


def test_the_mask_gradient_stays_bounded_when_a_dropped_key_dominates_its_row():
    # The key patch of synthetic_hard draws CLS's attention by a wide margin; dropping it must not blow up the
    # gradient that reaches the predictors through the mask (an additive log(G + 1e-20) SDPA mask gave ~exp(gap),
    # 1e13-1e16 gradient norms in training). The official formula saturates at ~1/eps.
    keep = torch.tensor([[1.0, 0.0, 1.0]], requires_grad=True)
    logits = torch.zeros(1, 1, 4, 4)
    logits[..., 2] = 40.0  # the dropped key, 40 above every other logit
    weights = policy_softmax(logits, connection(keep))
    (weights[0, 0, 0] * torch.tensor([1.0, 0.0, -1.0, 0.0])).sum().backward()  # CLS's pull toward key 2
    grad = keep.grad.abs().max().item()
    assert 1e4 < grad <= 1.0 / 1e-6  # large (dropping the dominant key matters), yet bounded by 1 / eps


def test_both_masked_softmaxes_agree_on_calm_attention(make_vit):
    exact, sdpa = dyn(make_vit(), keep_ratio=0.5).train(), dyn(make_vit(), keep_ratio=0.5, masked_softmax="sdpa")
    sdpa.load_state_dict(exact.state_dict())
    sdpa.train()
    decisions = torch.Generator().manual_seed(3)

    def fixed(stage: int, log_probs: torch.Tensor) -> torch.Tensor:  # the same masks for both
        return (torch.rand(log_probs.shape[:2], generator=decisions.manual_seed(stage)) < 0.6).float()

    logits_exact, tokens_exact, _ = exact._masked_forward(images(), fixed)
    logits_sdpa, tokens_sdpa, _ = sdpa._masked_forward(images(), fixed)
    # a random ViT's attention is calm (no dropped key 14 above the kept ones): the eps terms are all that differ
    torch.testing.assert_close(logits_sdpa, logits_exact, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tokens_sdpa, tokens_exact, atol=1e-4, rtol=1e-4)
    assert not torch.equal(logits_sdpa, dyn(make_vit(), keep_ratio=0.5).eval()(images()))  # masks took effect


def test_masks_are_hierarchical_and_keep_cls(make_vit):
    model = dyn(make_vit(), keep_ratio=0.5).train()
    torch.manual_seed(0)
    _, _, decisions = model._masked_forward(images())
    assert len(decisions) == 3 and all(d.shape == (3, 16) for d in decisions)
    for earlier, later in zip(decisions, decisions[1:]):
        assert (later <= earlier).all()
    assert set(torch.cat(decisions).unique().tolist()) <= {0.0, 1.0}
    allowed = connection(decisions[-1])
    assert (allowed[:, 0, :, 0] == 1).all()  # every query sees CLS


def test_an_image_that_drops_every_patch_keeps_the_batch_finite(make_vit):
    model = dyn(make_vit(), keep_ratio=0.5).train()

    def drop_image_0_then_sample(stage: int, log_probs: torch.Tensor) -> torch.Tensor:
        if stage == 0:
            return torch.ones(log_probs.shape[:2]).index_fill_(0, torch.tensor([0]), 0.0)
        return F.gumbel_softmax(log_probs, hard=True)[..., 0]  # later stages pool over image 0's empty set

    logits, tokens, decisions = model._masked_forward(images(), drop_image_0_then_sample)
    assert torch.isfinite(logits).all() and torch.isfinite(tokens).all()
    assert all(torch.isfinite(d).all() for d in decisions) and decisions[-1][0].sum() == 0


def test_inference_keeps_a_fixed_count_per_image_chosen_per_image(make_vit):
    model = dyn(peaked(make_vit()), keep_ratio=0.5).eval()
    _, tokens, orders = pruned_run(model, images())
    assert [tuple(orders[i].shape) for i in range(4)] == [(3, 16), (3, 8), (3, 4), (3, 2)]
    assert tokens.shape == (3, 3, 32)
    for earlier, later in zip([orders[i] for i in range(3)], [orders[i] for i in range(1, 4)]):
        assert all(set(b.tolist()) <= set(a.tolist()) for a, b in zip(earlier, later))
    assert not torch.equal(orders[1][0].sort().values, orders[1][1].sort().values)  # per image, not a schedule
    maps = model.token_maps(images())
    assert {m.kind for m in maps} == {"kept"} and [m.block for m in maps] == [0, 1, 2, 3]
    assert [int(m.values[0].sum()) for m in maps] == [16, 8, 4, 2]
    kept = torch.zeros(3, 16).scatter_(1, orders[2], 1.0)
    assert torch.equal(maps[2].values.flatten(1), kept)


# ---------------------------------------------------------------- losses, gradients, teacher


def test_ratio_loss_is_zero_at_the_target_share_and_weighted_in_the_total(make_vit, monkeypatch):
    n, rho = 16, 0.5
    exact = [torch.zeros(4, n).index_fill_(1, torch.arange(k), 1.0) for k in keep_counts(n, rho, 3)]  # 8, 4, 2
    assert ratio_loss(exact, rho).item() == 0.0
    off = [exact[0], exact[1], torch.zeros(4, n)]  # stage 3 keeps nothing instead of 1/8
    assert ratio_loss(off, rho).item() == pytest.approx(rho**6)
    model = dyn(make_vit(), keep_ratio=rho, ratio_weight=2.0).train()
    teacher = freeze(model.build_teacher())
    monkeypatch.setattr(
        model,
        "_masked_forward",
        lambda x: DynamicViT._masked_forward(model, x, lambda s, lp: exact[s][:, : lp.shape[1]][:3]),
    )
    _, terms = model.losses(images(), torch.arange(3), F.cross_entropy, teacher)
    assert set(terms) == {"ce", "ratio", "kl", "token_mse"} and terms["ratio"].item() == 0.0
    monkeypatch.setattr(
        model, "_masked_forward", lambda x: DynamicViT._masked_forward(model, x, lambda s, lp: off[s][:3])
    )
    _, terms = model.losses(images(), torch.arange(3), F.cross_entropy, teacher)
    assert terms["ratio"].item() == pytest.approx(2.0 / 3 * rho**6)


def test_distillation_terms_vanish_when_nothing_is_dropped(make_vit, monkeypatch):
    model = dyn(make_vit(), keep_ratio=0.5).train()
    teacher = freeze(model.build_teacher())
    monkeypatch.setattr(
        model, "_masked_forward", lambda x: DynamicViT._masked_forward(model, x, lambda s, lp: torch.ones(lp.shape[:2]))
    )
    logits, terms = model.losses(images(), torch.arange(3), F.cross_entropy, teacher)
    assert terms["kl"].item() == pytest.approx(0.0, abs=1e-6)
    assert terms["token_mse"].item() == pytest.approx(0.0, abs=1e-10)
    torch.testing.assert_close(terms["ce"], F.cross_entropy(logits, torch.arange(3)))


def test_token_distillation_ignores_dropped_positions():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 6, 4), torch.randn(2, 6, 4)
    keep = torch.tensor([[1.0, 0, 1, 0, 0, 1], [0, 1, 1, 0, 0, 0]])
    loss = token_distillation(student, teacher, keep)
    mask = keep.bool()
    torch.testing.assert_close(loss, ((student - teacher)[mask] ** 2).mean())
    perturbed = student.clone()
    perturbed[~mask] += 100.0
    torch.testing.assert_close(token_distillation(perturbed, teacher, keep), loss)
    assert token_distillation(student, teacher, torch.zeros(2, 6)).item() == 0.0


@pytest.mark.parametrize("through", ["attention", "ratio"])
def test_gradients_reach_every_predictor_through_the_gumbel_samples(make_vit, through):
    # float64: the last module's gradient through the masked attention is small; float32 could round it to 0.
    # keep_ratio 0.6: no rho**s is a multiple of 1/16, so no stage's ratio error can be exactly 0 (a zero gradient).
    model = dyn(make_vit(init_values=0.1), keep_ratio=0.6).double().train()
    teacher = freeze(model.build_teacher())
    weights = {"attention": dict(ratio_weight=0.0), "ratio": dict(kl_weight=0.0, token_weight=0.0)}[through]
    for knob, value in weights.items():
        setattr(model.cfg, knob, value)
    torch.manual_seed(0)
    _, terms = model.losses(images().double(), torch.arange(3), F.cross_entropy, teacher)
    loss = terms["ratio"] if through == "ratio" else terms["ce"] + terms["kl"]
    loss.backward()
    starved = [n for n, p in model.score_predictor.named_parameters() if p.grad is None or not p.grad.any()]
    assert not starved
    assert all(p.grad is None for p in teacher.parameters())


def test_the_teacher_is_the_initial_backbone_and_gets_no_gradient(make_vit):
    model = dyn(make_vit(), keep_ratio=0.5).train()
    teacher = model.build_teacher()  # deliberately not frozen: losses() alone must keep gradients away from it
    initial = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert all(torch.equal(v, model.vit.state_dict()[k]) for k, v in initial.items())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _, terms = model.losses(images(), torch.arange(3), F.cross_entropy, teacher.eval())
    sum(terms.values()).backward()
    optimizer.step()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, initial[k]) for k, v in teacher.state_dict().items())
    assert not torch.equal(model.vit.blocks[0].mlp.fc1.weight, initial["blocks.0.mlp.fc1.weight"])


def test_losses_without_a_teacher_say_where_it_comes_from(make_vit):
    with pytest.raises(ValueError, match="build_teacher"):
        dyn(make_vit()).train().losses(images(), torch.arange(3), F.cross_entropy)


# ---------------------------------------------------------------- phases and optimiser groups


def test_phases_freeze_the_backbone_then_train_it_at_a_hundredth_of_the_lr(make_vit):
    model = dyn(make_vit())
    predictors, finetune = model.phases()
    assert (predictors.name, predictors.epochs, predictors.optim) == ("predictors", 5, {"warmup_epochs": 5})
    assert (finetune.name, finetune.epochs, finetune.optim) == ("finetune", None, {"warmup_epochs": 0})
    predictor_ids = {id(p) for p in model.score_predictor.parameters()}

    model.enter_phase("predictors")
    groups = build_param_groups(model, 1e-3, 0.05)
    assert {id(p) for g in groups for p in g["params"]} == predictor_ids
    assert all(g["lr"] == 1e-3 for g in groups)

    model.enter_phase("finetune")
    groups = {g["name"]: g for g in build_param_groups(model, 1e-3, 0.05)}
    assert groups["backbone"]["lr"] == pytest.approx(1e-5) and groups["backbone"]["weight_decay"] == 0.05
    assert groups["backbone_no_decay"]["lr"] == pytest.approx(1e-5) and groups["backbone_no_decay"]["weight_decay"] == 0
    optimised = {id(p) for g in groups.values() for p in g["params"]}
    frozen = {id(model.vit.pos_embed), id(model.vit.cls_token)}
    assert optimised == {id(p) for p in model.parameters()} - frozen
    assert {id(p) for g in ("decay", "no_decay") for p in groups[g]["params"]} == predictor_ids
    assert [p.name for p in dyn(make_vit(), freeze_backbone_epochs=0, finetune_epochs=3).phases()] == ["finetune"]


# ---------------------------------------------------------------- FLOPs, params, budgets


def shapes_only(backbone: str):
    """A timm backbone on the meta device: its analytic cost and parameter count without building its weights."""
    with torch.device("meta"):
        return create_backbone(compose_config([f"backbone={backbone}"], "flops").backbone, 1000)


def test_the_paper_point_on_deit_small_matches_the_spec_analytic_and_counted():
    row = measure(["backbone=deit_small", "reducer=dynamicvit"])  # the defaults are the paper's rho 0.7 at 3, 6, 9
    assert row["tokens_per_block"] == [197] * 3 + [138] * 3 + [97] * 3 + [68] * 3
    assert row["gmacs_analytic"] == pytest.approx(2.981, abs=5e-4)  # 2.878 + 0.103 for the prediction modules
    assert row["gmacs_counted"] == pytest.approx(row["gmacs_analytic"], rel=1e-3)
    assert round(row["params_m"] * 1e6) == pytest.approx(22_774_414, abs=100)


@pytest.mark.parametrize(
    "backbone, keep_ratio, gmacs, tokens, params",
    [
        ("deit_small", 0.5, 2.229, [197] * 3 + [99] * 3 + [50] * 3 + [25] * 3, 22_774_414),
        ("deit_base", 0.7, 11.476, [197] * 3 + [138] * 3 + [97] * 3 + [68] * 3, 89_452_846),
    ],
)
def test_other_operating_points_match_the_spec(backbone, keep_ratio, gmacs, tokens, params):
    model = create_reducer({"name": "dynamicvit", "keep_ratio": keep_ratio}, shapes_only(backbone))
    assert model.cost().tokens_per_block == tokens
    assert model.cost().gmacs == pytest.approx(gmacs, abs=5e-4)
    assert count_params(model) == params


def test_paper_preset_is_the_spec_operating_point():
    cfg = compose_config(["experiment=dynamicvit_deit_s", "dataset=imagenet"])
    validate(cfg)
    assert (cfg.backbone.model, cfg.reducer.name) == ("deit_small_patch16_224", "dynamicvit")
    assert (cfg.reducer.keep_ratio, list(cfg.reducer.pruning_loc)) == (0.7, [3, 6, 9])
    assert cfg.reducer.freeze_backbone_epochs + cfg.reducer.finetune_epochs == 30
    assert cfg.dataset.batch_size * cfg.trainer.devices == 1024 and (cfg.optim.lr, cfg.optim.lr_batch) == (1e-3, 1024)
    assert cfg.backbone.drop_path_rate == 0.0 and cfg.dataset.aug.mixup == 0.8
    model = create_reducer(cfg.reducer, shapes_only("deit_small"))
    assert model.cost().gmacs == pytest.approx(2.981, abs=5e-4)  # specs README: 2.981 GMACs, top-1 79.3
    assert count_params(model) == 22_774_414


@pytest.mark.parametrize(
    "knobs",
    [
        {"keep_ratio": 0.5, "pruning_loc": LOCS},
        {"keep_ratio": 0.35, "pruning_loc": [0, 2]},
        {"keep_ratio": 0.9, "pruning_loc": [3]},
    ],
)
def test_analytic_cost_matches_the_counter(make_vit, knobs):
    model = create_reducer({"name": "dynamicvit", **knobs}, make_vit(depth=4))
    assert counted_gmacs(model.deployable(), 32) == pytest.approx(model.cost().gmacs, rel=1e-3)


@pytest.mark.parametrize("budget", [{"target_ratio": 0.5}, {"target_ratio": 0.65}, {"target_gmacs": 3.0}])
def test_budgets_on_deit_small_land_within_one_percent_below_the_target(budget):
    model = create_reducer({"name": "dynamicvit", **budget}, shapes_only("deit_small"))
    target = budget.get("target_gmacs") or budget.get("target_ratio", 0) * 4.599
    assert model.target_gmacs() == pytest.approx(target, rel=1e-3)
    assert 0.99 * model.target_gmacs() <= model.cost().gmacs <= model.target_gmacs()
    assert model.knobs()["keep_ratio"] == model.cfg.keep_ratio != 0.7


@pytest.mark.parametrize("budget", ["target_ratio=0.5", "target_ratio=0.65"])
def test_budgets_on_the_cpu_backbone_land_below_the_target_as_counted_and_rebuilt(budget):
    cfg = compose_config(["backbone=deit_tiny_cpu", "reducer=dynamicvit", f"reducer.{budget}"], "flops")
    model = build_model(cfg, 10)
    target = float(budget.split("=")[1]) * TokenReducer.cost(model).gmacs
    achieved = model.cost().gmacs
    assert model.target_gmacs() == pytest.approx(target) and 0.99 * target <= achieved <= target
    assert counted_gmacs(model.deployable(), 64) == pytest.approx(achieved, rel=1e-3)
    rebuilt = build_model(cfg, 10)  # an export is rebuilt from the same config: the same ratio comes back
    rebuilt.load_structure(model.structure())
    assert rebuilt.cfg.keep_ratio == model.cfg.keep_ratio


def test_unreachable_budgets_say_what_is_reachable(make_vit):
    with pytest.raises(ValueError, match="below what DynamicViT reaches"):
        dyn(make_vit(depth=12), pruning_loc=[3, 6, 9], target_ratio=0.2)
    # Near one token per stage a single count moves the cost by more than 1%: refused rather than missed.
    with pytest.raises(ValueError, match=r"between two keep counts of DynamicViT \(0.03937 and 0.04"):
        create_reducer({"name": "dynamicvit", "target_ratio": 0.41}, shapes_only("deit_tiny_cpu"))


# ---------------------------------------------------------------- knobs


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("reducer.keep_ratio=0", "reducer.keep_ratio=0.0 must be in (0, 1]"),
        ("reducer.keep_ratio=1.2", "reducer.keep_ratio=1.2"),
        ("reducer.pruning_loc=[]", "reducer.pruning_loc=[]"),
        ("reducer.pruning_loc=[6,3]", "increasing block indices"),
        ("reducer.pruning_loc=[-1,3]", "increasing block indices >= 0"),
        ("reducer.ratio_weight=-1", "reducer.ratio_weight=-1.0 must be >= 0"),
        ("reducer.kl_weight=-0.5", "reducer.kl_weight"),
        ("reducer.token_weight=-0.5", "reducer.token_weight"),
        ("reducer.backbone_lr_scale=-1", "reducer.backbone_lr_scale"),
        ("reducer.gumbel_tau=0", "reducer.gumbel_tau=0.0 must be > 0"),
        ("reducer.freeze_backbone_epochs=-1", "reducer.freeze_backbone_epochs"),
        ("+reducer.rho=0.7", "valid knobs"),
        ("reducer.finetune_epochs=0", "DynamicViT is not training-free"),
        ("reducer.masked_softmax=fused", "choose exact (the official formula, default) or sdpa"),
    ],
)
def test_bad_knobs_are_one_line_errors(override, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)) as err:
        validate(compose_config(["reducer=dynamicvit", override]))
    assert "\n" not in str(err.value)


def test_a_training_free_request_names_the_training_command(run_cfg):
    with pytest.raises(ValueError, match=re.escape("fine-tune with tokred-train reducer=dynamicvit")):
        train(run_cfg("reducer=dynamicvit", "reducer.finetune_epochs=0"))


@pytest.mark.parametrize(
    "knobs, fragment",
    [
        ({"pruning_loc": [3, 6, 9]}, "below the backbone depth 4"),
        ({"keep_ratio": 0.3}, "keeps no patch token in stage 3"),
    ],
)
def test_knobs_that_do_not_fit_the_backbone_fail_at_construction(make_vit, knobs, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        create_reducer({"name": "dynamicvit", "pruning_loc": LOCS, **knobs}, make_vit())


# ---------------------------------------------------------------- prefix tokens and CLS-free backbones (issue 16)

# One backbone per prefix/pooling layout of issue 16, untrained, 4 blocks, at a small size: (name, img_size).
PREFIX_BACKBONES = [
    ("deit_small_patch16_224", 64),  # CLS
    ("vit_small_patch14_reg4_dinov2", 56),  # CLS + 4 registers, LayerScale
    ("deit_small_distilled_patch16_224", 64),  # CLS + distillation token, two heads
    ("vit_medium_patch16_gap_256", 64),  # no CLS, average pooling
    ("vit_base_patch16_siglip_224", 64),  # no CLS, attention pooling
]


def prefix_vit(name: str, img_size: int):
    torch.manual_seed(0)
    # No grad: the FLOP counter cannot hook SigLIP's pooling latent expanded under no_grad.
    return peaked(timm.create_model(name, pretrained=False, img_size=img_size, depth=4)).eval().requires_grad_(False)


@pytest.mark.parametrize("name, img_size", PREFIX_BACKBONES, ids=[n for n, _ in PREFIX_BACKBONES])
def test_every_prefix_layout_prunes_patches_only_and_trains_as_it_infers(name, img_size, monkeypatch):
    vit = prefix_vit(name, img_size)
    torch.manual_seed(1)
    x = torch.randn(3, 3, img_size, img_size)
    prefix, n = vit.num_prefix_tokens, vit.patch_embed.num_patches
    with torch.no_grad():
        expected = vit(x)
        full = dyn(vit, keep_ratio=1.0).eval()  # neutral: every patch kept, in keep-score order
        torch.testing.assert_close(full(x), expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(full.train()._masked_forward(x, lambda s, lp: torch.ones(lp.shape[:2]))[0], expected)
    model = dyn(vit, keep_ratio=0.5).eval()
    assert model.cost().gmacs == pytest.approx(counted_gmacs(model.deployable(), img_size), rel=1e-6)
    assert model.cost().tokens_per_block == [prefix + k for k in [n, *keep_counts(n, 0.5, 3)]]
    seen = []  # the predictors see the patch tokens only, the prefix never (both forwards)
    for predictor in model.score_predictor:

        def spy(t, alive=None, forward=predictor.forward):
            seen.append(t.shape[1])
            return forward(t, alive)

        monkeypatch.setattr(predictor, "forward", spy)
    orders: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        tokens = model._pruned_tokens(x, lambda i, order: orders.__setitem__(i, order))
        logits = model(x)
        assert seen == [n, n // 2, n // 4] * 2 and tokens.shape[1] == prefix + n // 8
        # The pooling (CLS, both heads, average or attention) sees exactly the kept tokens in training too.
        train_logits = model.train()._masked_forward(x, decisions_of(orders))[0]
    torch.testing.assert_close(train_logits, logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name, img_size", PREFIX_BACKBONES[1:4], ids=["registers", "distilled", "gap"])
def test_distillation_reads_the_teachers_patch_tokens_and_prefix_embeddings_stay_frozen(name, img_size, monkeypatch):
    vit = prefix_vit(name, img_size).requires_grad_(True)
    model = dyn(vit, keep_ratio=0.5).train()
    teacher = freeze(model.build_teacher())
    monkeypatch.setattr(
        model, "_masked_forward", lambda x: DynamicViT._masked_forward(model, x, lambda s, lp: torch.ones(lp.shape[:2]))
    )
    torch.manual_seed(1)
    _, terms = model.losses(torch.randn(2, 3, img_size, img_size), torch.arange(2), F.cross_entropy, teacher)
    assert terms["kl"].item() == pytest.approx(0.0, abs=1e-6)
    assert terms["token_mse"].item() == pytest.approx(0.0, abs=1e-10)
    model.enter_phase("finetune")
    frozen = {name for name, p in model.vit.named_parameters() if not p.requires_grad}
    embeddings = ("cls_token", "reg_token", "dist_token")
    assert frozen == {"pos_embed", *(t for t in embeddings if getattr(vit, t, None) is not None)}


def test_the_yaml_mirrors_the_config_defaults():
    assert OmegaConf.to_container(compose_config(["reducer=dynamicvit"]).reducer) == asdict(Config())


# ---------------------------------------------------------------- end to end


# A 4-block deit_tiny_cpu (64 patches), prediction modules before blocks 1, 2, 3: 1 frozen + 2 joint epochs of 2 steps.
SMALL = ["+backbone.kwargs.depth=4", "reducer.pruning_loc=[1,2,3]"]


def test_a_fine_tuning_run_freezes_then_trains_and_exports(run_cfg, tmp_path):
    # The realistic start: a trained backbone file, which is also the teacher.
    start = tmp_path / "backbone.safetensors"
    base = create_backbone(compose_config(SMALL[:1]).backbone, 10)
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(start))
    initial = base.state_dict()
    cfg = run_cfg(
        "reducer=dynamicvit",
        *SMALL,
        "reducer.freeze_backbone_epochs=1",
        f"backbone.checkpoint={start}",
        "visualize.every_n_epochs=0",
    )
    summary = train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    assert summary["model/tokens_per_block"] == [65, 45, 32, 22]  # int(64 * 0.7 ** s) + CLS
    assert summary["model/gmacs_counted"] == pytest.approx(summary["model/gmacs"], rel=1e-3)
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/ratio")]
    assert len(rows) == 2 + 4  # every step logs its terms
    assert all(float(r["train/ratio"]) >= 0 and float(r["train/kl"]) >= 0 and r["train/token_mse"] for r in rows)

    after_frozen = read_phase(run_dir / "phases" / "predictors.pt")["state_dict"]
    after_joint = read_phase(run_dir / "phases" / "finetune.pt")["state_dict"]
    assert all(torch.equal(after_frozen[f"vit.{k}"], v) for k, v in initial.items())  # the backbone stayed put
    assert not torch.equal(
        after_frozen["score_predictor.0.in_conv.1.weight"],
        build_model(cfg, 10).state_dict()["score_predictor.0.in_conv.1.weight"],
    )
    assert not torch.equal(after_joint["vit.blocks.0.attn.qkv.weight"], initial["blocks.0.attn.qkv.weight"])
    for frozen in ("pos_embed", "cls_token"):
        assert torch.equal(after_joint[f"vit.{frozen}"], initial[frozen])

    exported = load_deployable(run_dir / "export")
    assert not any("teacher" in k for k in exported.state_dict())
    trained = build_model(cfg, 10)
    trained.load_state_dict(after_joint)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), trained.eval()(x))
