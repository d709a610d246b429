"""Top-K and EViT (issue 15): selection and fusion against a written-out reference, keep counts, the keep-rate
warm-up, FLOPs at the papers' points, budgets, token maps, fine-tuned and training-free runs with their exports."""

from __future__ import annotations

import copy
import functools
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import save_file

from tokred.backbones import create_backbone
from tokred.config import ConfigError, compose_config, validate
from tokred.export import load_deployable
from tokred.flops import counted_gmacs
from tokred.pruning import attention_with_cls_row, fuse_dropped, gather_kept, head_mean_scores, prune, select_top, track
from tokred.reducers import create_reducer
from tokred.reducers import topk as topk_module
from tokred.reducers.base import TokenReducer
from tokred.reducers.evit import Config as EViTConfig
from tokred.reducers.evit import EViT, keep_rate_schedule
from tokred.reducers.topk import Config as TopKConfig
from tokred.reducers.topk import keep_count
from tokred.training.run import build_model, train
from tokred.vit_ops import classify, embed, gather_tokens

METHODS = ["topk", "evit"]


def reducer(vit, name, **knobs):
    return create_reducer({"name": name, **knobs}, vit)


def images(b: int = 3, size: int = 32) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(b, 3, size, size)


def peaked(vit):
    """Sharper attention than at init, so CLS attention differs clearly between tokens and images."""
    with torch.no_grad():
        for blk in vit.blocks:
            blk.attn.qkv.weight.mul_(8)
    return vit


# ---------------------------------------------------------------- the reference: spec §1-§4 written out


def reference_block(blk, x: torch.Tensor, k: int | None, fuse: bool, normalize: bool = False) -> torch.Tensor:
    """One timm block with explicit attention and per-image Python loops over the tokens: full attention, then keep
    the k patches with the highest head-mean CLS attention (descending), fuse the rest with their raw weights."""
    b, n, c = x.shape
    attn = blk.attn
    heads = attn.num_heads
    q, kk, v = attn.qkv(blk.norm1(x)).view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    a = (attn.q_norm(q) @ attn.k_norm(kk).transpose(-2, -1) * attn.scale).softmax(dim=-1)  # (B, H, N, N)
    x = x + blk.ls1(attn.proj(attn.norm((a @ v).transpose(1, 2).reshape(b, n, c))))
    if k is None:
        return x + blk.ls2(blk.mlp(blk.norm2(x)))
    out = []
    for i in range(b):
        score = a[i, :, 0, 1:].mean(dim=0)
        order = sorted(range(n - 1), key=lambda j: -float(score[j]))
        keep, drop = order[:k], order[k:]
        tokens = [x[i, 0]] + [x[i, 1 + j] for j in keep]
        if fuse and drop:
            weights = score[drop] / (score[drop].sum() if normalize else 1)
            tokens.append(sum(w * x[i, 1 + j] for w, j in zip(weights, drop)))
        y = torch.stack(tokens)
        out.append(y + blk.ls2(blk.mlp(blk.norm2(y))))
    return torch.stack(out)


def reference_logits(model, x: torch.Tensor, fuse: bool, normalize: bool = False) -> torch.Tensor:
    tokens = embed(model.vit, x)
    for blk, k in zip(model.vit.blocks, model.plan(model.cfg.keep_rate)):
        tokens = reference_block(blk, tokens, k, fuse, normalize)
    return classify(model.vit, tokens)


@pytest.mark.parametrize("variant", [{}, {"init_values": 0.1, "qk_norm": True}], ids=["deit", "layerscale+qknorm"])
@pytest.mark.parametrize(
    "name, knobs",
    [
        ("topk", {}),
        ("topk", {"count_mode": "relative_ceil"}),
        ("evit", {}),
        ("evit", {"fuse_normalize": True}),
        ("evit", {"fuse": False}),
        ("evit", {"count_mode": "absolute_floor", "keep_rate": 0.5}),
    ],
    ids=["topk", "topk-relative", "evit", "evit-normalized", "evit-nofuse", "evit-absolute"],
)
def test_forward_matches_the_written_out_reference_in_float64(make_vit, variant, name, knobs):
    model = reducer(peaked(make_vit(depth=8, **variant)), name, locations=[1, 3, 5], **knobs).double().eval()
    x = images(2).double()
    fuse = name == "evit" and knobs.get("fuse", True)
    with torch.no_grad():
        torch.testing.assert_close(
            model(x), reference_logits(model, x, fuse, knobs.get("fuse_normalize", False)), atol=1e-10, rtol=1e-10
        )


@pytest.mark.parametrize("variant", [{}, {"init_values": 0.1, "qk_norm": True}], ids=["deit", "layerscale+qknorm"])
@pytest.mark.parametrize("name, mode", [(m, c) for m in METHODS for c in ("relative_ceil", "absolute_floor")])
def test_keep_rate_one_gives_the_baselines_logits(make_vit, variant, name, mode):
    vit = make_vit(depth=12, **variant)
    x = images()
    with torch.no_grad():
        expected = vit(x)
    model = reducer(vit, name, keep_rate=1.0, count_mode=mode).eval()
    assert model.cost().tokens_per_block == [17] * 12  # no pruning, no fused token
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(model.deployable()(x), expected, atol=1e-6, rtol=1e-5)
        model.train().on_train_epoch_start(0, 10)  # training path (and EViT's warm-up hook) too
        torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-5)


def test_reduction_changes_the_output(make_vit):
    x = images()
    for name in METHODS:
        model = reducer(make_vit(depth=12), name).eval()
        with torch.no_grad():
            assert not torch.allclose(model(x), model.vit(x), atol=1e-4)


# ---------------------------------------------------------------- mechanics in tokred.pruning


def test_selection_keeps_the_top_k_in_descending_score_and_their_complement():
    torch.manual_seed(0)
    scores = torch.rand(2, 100, dtype=torch.float64)
    sel = select_top(scores, 30)
    for i in range(2):
        ranked = sorted(range(100), key=lambda j: -float(scores[i, j]))
        assert sel.keep[i].tolist() == ranked[:30]
        assert sel.drop[i].tolist() == ranked[30:]
    assert select_top(scores, 30, order="index").keep.tolist() == sel.keep.sort(dim=1).values.tolist()
    x = torch.randn(2, 101, 8, dtype=torch.float64)
    kept = gather_kept(x, sel)
    assert torch.equal(kept[:, 0], x[:, 0])  # CLS first, never a candidate
    for i in range(2):
        assert torch.equal(kept[i, 1:], x[i, 1 + sel.keep[i]])


def test_fused_token_is_the_attention_weighted_sum_of_the_dropped_tokens():
    torch.manual_seed(0)
    x = torch.randn(2, 101, 8, dtype=torch.float64)
    scores = torch.rand(2, 100, dtype=torch.float64).softmax(dim=1) * 0.9  # CLS->CLS holds the other 0.1
    reduced, sel = prune(x, scores, 40, fuse=True)
    assert reduced.shape == (2, 42, 8)  # [CLS, 40 kept, fused]
    for i in range(2):
        drop = sel.drop[i]
        weights = scores[i, drop]
        assert weights.sum() < 1  # the official weights are not renormalised
        expected = (weights[:, None] * x[i, 1 + drop]).sum(dim=0)
        torch.testing.assert_close(reduced[i, -1], expected, atol=1e-12, rtol=1e-12)
        # normalised: exactly the attention-weighted mean of the dropped tokens
        mean = (weights[:, None] * x[i, 1 + drop]).sum(dim=0) / weights.sum()
        torch.testing.assert_close(fuse_dropped(x, scores, sel, normalize=True)[i, 0], mean, atol=1e-12, rtol=1e-12)
    single, _ = prune(x, scores, 99, fuse=True)  # one dropped token j gives a_j * x_j, not x_j
    j = int(select_top(scores, 99).drop[0, 0])
    torch.testing.assert_close(single[0, -1], scores[0, j] * x[0, 1 + j])
    assert prune(x, scores, 100, fuse=True)[0].shape == (2, 101, 8)  # nothing dropped: no fused token


def test_evit_fuses_the_blocks_own_cls_attention_inside_the_model(make_vit):
    """The token set entering the location block's MLP (caught at norm2) is [CLS, kept in descending attention,
    sum_j a_j x_j over the dropped tokens], a_j from the explicit attention matrix of that block. (The logits alone
    cannot see the order: attention is permutation-equivariant.)"""
    model = reducer(peaked(make_vit(depth=4)), "evit", locations=[1]).double().eval()
    x = images(2).double()
    blk = model.vit.blocks[1]
    caught = {}
    blk.norm2.register_forward_pre_hook(lambda m, args: caught.setdefault("mlp_in", args[0]))
    with torch.no_grad():
        model(x)
        h = model.vit.blocks[0](embed(model.vit, x))  # the location block's input
        q, kk, _ = blk.attn.qkv(blk.norm1(h)).view(2, 17, 3, 2, -1).permute(2, 0, 3, 1, 4)
        a = (q @ kk.transpose(-2, -1) * blk.attn.scale).softmax(dim=-1)[:, :, 0, 1:].mean(dim=1)
        after_attention = h + blk.attn(blk.norm1(h))
    k = 12  # ceil(0.7 * 16)
    mlp_in = caught["mlp_in"]
    assert mlp_in.shape == (2, 1 + k + 1, 32)
    for i in range(2):
        ranked = a[i].argsort(descending=True)
        keep, drop = ranked[:k], ranked[k:]
        rows = [0, *(keep + 1).tolist()]  # CLS, then the kept patches, highest attention first
        torch.testing.assert_close(mlp_in[i, : 1 + k], after_attention[i, rows], atol=1e-12, rtol=1e-12)
        expected = (a[i, drop, None] * after_attention[i, 1 + drop]).sum(dim=0)
        torch.testing.assert_close(mlp_in[i, -1], expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("variant", [{}, {"qk_norm": True}], ids=["deit", "qknorm"])
def test_cls_row_beside_fused_attention_is_row_zero_of_the_full_map(make_vit, variant):
    vit = make_vit(**variant)
    blk = vit.blocks[0]
    x = embed(vit, images(2))
    with torch.no_grad():
        after, row = attention_with_cls_row(blk, x)
        q, kk, _ = blk.attn.qkv(blk.norm1(x)).view(2, 17, 3, 2, -1).permute(2, 0, 3, 1, 4)
        full = (blk.attn.q_norm(q) @ blk.attn.k_norm(kk).transpose(-2, -1) * blk.attn.scale).softmax(dim=-1)
        torch.testing.assert_close(row, full[:, :, 0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(after, x + blk.attn(blk.norm1(x)), atol=1e-6, rtol=1e-5)
    assert head_mean_scores(row).shape == (2, 16)


def test_tracking_follows_patches_into_kept_and_fused_tokens():
    scores = torch.tensor([[0.1, 0.4, 0.3, 0.2]])
    sel = select_top(scores, 2)  # keeps candidates 1, 2 (in that order), drops 3, 0
    where = torch.arange(4).view(1, 4)
    assert track(where, sel, fused=True).tolist() == [[2, 0, 1, 2]]
    gone = track(where, sel, fused=False)
    assert gone.tolist() == [[-1, 0, 1, -1]]
    # next step over the 2 survivors: keep the second, drop the first; patches already gone stay gone
    assert track(gone, select_top(torch.tensor([[0.1, 0.9]]), 1), fused=False).tolist() == [[-1, -1, 0, -1]]


# ---------------------------------------------------------------- keep counts and the warm-up


def test_relative_ceil_has_evits_float_parity():
    # EViT's ceil(keep_rate * (N - 1)) on Python floats: 0.55 * 100 = 55.00000000000001 -> 56, not 55.
    assert keep_count("relative_ceil", 0.55, 100, 196, 0) == 56
    # The spec also lists 0.7 x 10 -> 8, but 0.7 * 10 is exactly 7.0 in float64 (and float32), so EViT keeps 7.
    assert keep_count("relative_ceil", 0.7, 10, 196, 0) == 7
    assert [keep_count("absolute_floor", 0.7, 196, 196, i) for i in range(3)] == [137, 96, 67]


# Tokens leaving the three location blocks of a 224-px DeiT (CLS and the fused token included), spec §2.
COUNTS = [
    ("evit", {}, 0.9, [179, 163, 148]),
    ("evit", {}, 0.8, [159, 129, 105]),
    ("evit", {}, 0.7, [140, 100, 72]),
    ("evit", {}, 0.6, [120, 74, 46]),
    ("evit", {}, 0.5, [100, 52, 28]),
    ("evit", {"fuse": False}, 0.9, [178, 161, 145]),
    ("evit", {"fuse": False}, 0.7, [139, 98, 69]),
    ("evit", {"fuse": False}, 0.5, [99, 50, 26]),
    ("topk", {}, 0.9, [177, 159, 143]),
    ("topk", {}, 0.7, [138, 97, 68]),
    ("topk", {}, 0.5, [99, 50, 25]),
    ("topk", {}, 0.25, [50, 13, 4]),
    ("evit", {"count_mode": "absolute_floor"}, 0.9, [178, 160, 144]),
    ("evit", {"count_mode": "absolute_floor"}, 0.7, [139, 98, 69]),
    ("evit", {"count_mode": "absolute_floor"}, 0.25, [51, 14, 5]),
]


@pytest.mark.parametrize("name, knobs, rate, leaving", COUNTS)
def test_token_counts_follow_the_spec_table(make_vit, name, knobs, rate, leaving):
    model = reducer(make_vit(img_size=224, patch_size=16, depth=12), name, keep_rate=rate, **knobs)
    a, b, c = leaving
    assert model.cost().tokens_per_block == [197] * 3 + [a] * 3 + [b] * 3 + [c] * 3


def test_forward_shapes_follow_the_plan(make_vit):
    model = reducer(make_vit(img_size=224, patch_size=16, depth=12), "evit").eval()
    with torch.no_grad():
        tokens, size = model.forward_tokens(images(1, 224))
    assert tokens.shape[1] == 72 and size.shape == (1, 72, 1)


def test_keep_rate_warmup_follows_the_official_schedule():
    # rho0 0.7, start 10 and 100 epochs of cosine (the from-scratch run_code.sh), sampled at epoch starts (spec §5)
    at = lambda e: keep_rate_schedule(0.7, e, 10, 100)
    assert [at(e) for e in range(10)] == [1.0] * 10
    assert at(35) == pytest.approx(0.956, abs=5e-4)
    assert at(60) == pytest.approx(0.85, abs=1e-9)
    assert at(85) == pytest.approx(0.744, abs=5e-4)
    assert all(at(e) == 0.7 for e in (110, 200, 299))
    assert all(at(e) > at(e + 1) for e in range(10, 109))
    assert [keep_rate_schedule(0.7, e, 10, 0) for e in (9, 10)] == [1.0, 0.7]  # main.py defaults: a step
    assert keep_rate_schedule(0.7, 0, 0, 0) == 0.7  # finetune.sh: rho0 from the first step


def test_evit_trains_at_the_scheduled_rate_and_evaluates_at_keep_rate(make_vit):
    model = reducer(make_vit(depth=12), "evit", keep_warmup_start=0.0333, keep_warmup_epochs=0.3333)
    x = images(2)
    counts = {}
    for epoch in (0, 9, 10, 35, 60, 110, 299):
        model.train().on_train_epoch_start(epoch, 300)
        counts[epoch] = model.forward_tokens(x)[0].shape[1]
        assert model._train_rate == pytest.approx(keep_rate_schedule(0.7, epoch, 10, 100))
    assert counts[0] == counts[9] == counts[10] == 17  # rate 1 (epoch 10: the cosine's start): nothing pruned
    assert counts[35] == 17  # 0.956: ceil(0.956 * 16) = 16 keeps every patch
    assert counts[60] == 14 > counts[110] == counts[299] == 10  # 0.85: 14, 13, 12 kept; 0.7: 12, 10, 8 (+ CLS, fused)
    model.on_train_epoch_start(0, 300)
    with torch.no_grad():
        assert model.eval().forward_tokens(x)[0].shape[1] == 10  # evaluation ignores the warm-up: keep_rate's count
    assert model.cost().tokens_per_block[-1] == 10


# ---------------------------------------------------------------- gradients and batches


@pytest.mark.parametrize("name", METHODS)
def test_training_backward_reaches_every_parameter(make_vit, name):
    model = reducer(make_vit(depth=8, init_values=0.1), name, locations=[1, 3, 5]).train()
    logits, terms = model.losses(images(), torch.arange(3) % 5, F.cross_entropy)
    assert set(terms) == {"ce"}
    terms["ce"].backward()
    starved = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not starved


def test_only_the_fused_token_carries_gradient_through_the_scores(make_vit):
    """With the residual stream detached, EViT's fused token still reaches the block's qkv through a_j; Top-K's kept
    tokens do not: its scores only yield indices."""
    blk = make_vit().blocks[1]
    x = torch.randn(2, 17, 32)
    after, row = attention_with_cls_row(blk, x)
    scores = head_mean_scores(row)
    sel = select_top(scores, 8)
    assert not gather_kept(after.detach(), sel).requires_grad
    fuse_dropped(after.detach(), scores, sel).pow(2).sum().backward()
    assert blk.attn.qkv.weight.grad is not None and blk.attn.qkv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", METHODS)
def test_selection_is_per_image_and_independent_of_the_batch(make_vit, name):
    model = reducer(peaked(make_vit(depth=12)), name).eval()
    x = images(4)
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(4)])
        maps = model.token_maps(x)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    chosen = maps[3].values.flatten(1)
    assert not torch.equal(chosen[0], chosen[1])


# ---------------------------------------------------------------- token maps


def test_topk_kept_maps_shrink_and_count_k_at_each_location(make_vit):
    model = reducer(peaked(make_vit(depth=12)), "topk").deployable()
    maps = model.token_maps(images())
    assert {m.kind for m in maps} == {"kept"}
    counts = [m.values.flatten(1).sum(1).tolist() for m in maps]
    assert counts == [[16.0] * 3] * 3 + [[11.0] * 3] * 3 + [[7.0] * 3] * 3 + [[5.0] * 3] * 3  # floor(0.7^i * 16)
    assert all((later.values <= earlier.values).all() for earlier, later in zip(maps, maps[1:]))


def test_evit_assignment_maps_point_every_patch_at_its_token(make_vit):
    model = reducer(peaked(make_vit(depth=12)), "evit").deployable()
    x = images()
    maps = model.token_maps(x)
    assert {m.kind for m in maps} == {"assignment"}
    tokens = model.cost().tokens_per_block
    for m, n in zip(maps, tokens):
        # every patch is carried by one of the n - 1 non-CLS tokens, and every such token carries some patch
        assert all(sorted(row.unique().tolist()) == list(range(n - 1)) for row in m.values.flatten(1))
    # At the first location (block 3): 12 patches keep their own token 0..11, the other 4 share the fused token 12.
    for row in maps[3].values.flatten(1):
        assert sorted(row.tolist()) == list(range(12)) + [12] * 4
    # The fused token is always last: the patches it carries are exactly those no kept token carries.
    with torch.no_grad():
        reduced, size = model.forward_tokens(x)
    assert reduced.shape[1] == tokens[-1]
    # Its size (what size-weighted pooling uses) counts the patches it carries, re-fused ones included; CLS is 1.
    carried = torch.stack([torch.bincount(row, minlength=tokens[-1] - 1) for row in maps[-1].values.flatten(1)])
    torch.testing.assert_close(size[:, 1:, 0], carried.float())
    assert (size[:, 0] == 1).all() and (carried.sum(dim=1) == 16).all() and carried[:, -1].gt(1).all()


# ---------------------------------------------------------------- FLOPs and budgets


@pytest.mark.parametrize(
    "name, knobs, paper",
    [
        ("evit", [], 3.029),
        ("evit", ["reducer.keep_rate=0.5"], 2.309),
        ("evit", ["reducer.fuse=false"], 2.997),
        ("topk", [], 2.980),
        ("topk", ["reducer.keep_rate=0.25"], 1.699),
    ],
)
def test_deit_small_gmacs_match_the_spec_and_the_counter(name, knobs, paper):
    model = build_model(compose_config(["backbone=deit_small", f"reducer={name}", *knobs], config_name="flops"), 1000)
    assert model.cost().gmacs == pytest.approx(paper, abs=6e-4)
    if not knobs:  # the papers' points; every variant is counted on the tiny backbone below
        assert counted_gmacs(model.deployable(), 224) == pytest.approx(model.cost().gmacs, rel=0.02)


@pytest.mark.parametrize(
    "name, knobs",
    [
        ("topk", {}),
        ("topk", {"count_mode": "relative_ceil", "keep_rate": 0.4}),
        ("evit", {}),
        ("evit", {"fuse": False}),
        ("evit", {"fuse_normalize": True, "locations": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]}),
    ],
)
def test_analytic_cost_equals_the_counter_for_every_variant(make_vit, name, knobs):
    model = reducer(make_vit(img_size=224, patch_size=16, depth=12), name, **knobs)
    assert counted_gmacs(model.deployable(), 224) == pytest.approx(model.cost().gmacs, rel=1e-6)


def test_presets_hit_the_papers_operating_points():
    for preset, name, gmacs in (("evit_deit_s", "evit", 3.03), ("topk_deit_s", "topk", 2.98)):
        cfg = compose_config([f"experiment={preset}", "backbone.pretrained=false"], config_name="flops")
        assert cfg.reducer.name == name and cfg.backbone.model == "deit_small_patch16_224"
        assert build_model(cfg, 1000).cost().gmacs == pytest.approx(gmacs, abs=0.005)


def test_evit_base_gmacs_match_the_spec():
    model = build_model(compose_config(["backbone=deit_base", "reducer=evit"], config_name="flops"), 1000)
    assert model.cost().gmacs == pytest.approx(11.610, abs=6e-4)  # DeiT-B, 0.7 with fusion (spec §11.7)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("backbone, size", [("deit_tiny_cpu", 64), ("deit_small", 224)])
@pytest.mark.parametrize("ratio", [0.5, 0.65])
def test_budget_lands_within_one_percent_below_the_target(name, backbone, size, ratio):
    cfg = compose_config([f"backbone={backbone}", f"reducer={name}", f"reducer.target_ratio={ratio}"], "flops")
    model = build_model(cfg, 1000)
    target = ratio * TokenReducer.cost(model).gmacs  # the unreduced backbone
    assert 0.99 * target <= model.cost().gmacs <= target
    assert model.knobs()["keep_rate"] != 0.7
    if backbone == "deit_tiny_cpu":
        assert counted_gmacs(model.deployable(), size) == pytest.approx(model.cost().gmacs, rel=0.02)


def test_unreachable_budget_names_the_range(make_vit):
    with pytest.raises(ValueError, match="out of reach by keep_rate"):
        reducer(make_vit(depth=12), "evit", target_ratio=0.2)


# ---------------------------------------------------------------- knobs and presets


@pytest.mark.parametrize(
    "name, override, fragment",
    [
        ("topk", "reducer.keep_rate=0", "reducer.keep_rate=0.0 must be in (0, 1]"),
        ("evit", "reducer.keep_rate=1.2", "reducer.keep_rate"),
        ("topk", "reducer.locations=[6,3]", "distinct 0-based blocks in increasing order"),
        ("evit", "reducer.locations=[]", "reducer.locations"),
        ("topk", "reducer.count_mode=ceil", "choose one of: relative_ceil, absolute_floor"),
        ("evit", "reducer.finetune_epochs=-1", "reducer.finetune_epochs=-1 must be >= 0"),
        ("evit", "reducer.fuse_normalize=true reducer.fuse=false", "needs reducer.fuse=true"),
        ("evit", "reducer.keep_warmup_start=1.5", "reducer.keep_warmup_start"),
        ("evit", "reducer.keep_warmup_start=0.5 reducer.keep_warmup_epochs=0.6", "never reaches the keep_rate"),
        ("topk", "+reducer.fuse=true", "valid knobs"),
    ],
)
def test_bad_knobs_are_rejected_in_one_line(name, override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")) as err:
        validate(compose_config([f"reducer={name}", *override.split()]))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "knobs, fragment",
    [
        ({"locations": [3, 12]}, "below the backbone depth 12"),
        ({"keep_rate": 0.1}, "keeps no patch token at block 6"),  # floor(0.1^2 * 16) = 0
    ],
)
def test_knobs_that_do_not_fit_the_backbone_are_rejected(make_vit, knobs, fragment):
    with pytest.raises(ValueError, match=fragment):
        reducer(make_vit(depth=12), "topk", **knobs)


@pytest.mark.parametrize("name, config", [("topk", TopKConfig), ("evit", EViTConfig)])
def test_yaml_mirrors_the_config_defaults(name, config):
    assert OmegaConf.to_container(compose_config([f"reducer={name}"]).reducer) == asdict(config())


def test_presets_compose_their_recipes():
    evit = compose_config(["experiment=evit_deit_s", "dataset=imagenet"])
    validate(evit)
    assert (evit.reducer.keep_rate, list(evit.reducer.locations), evit.reducer.fuse) == (0.7, [3, 6, 9], True)
    assert evit.trainer.max_epochs == 30 and evit.reducer.keep_warmup_epochs == 0
    assert evit.dataset.batch_size * evit.trainer.devices == 2048
    assert (evit.optim.lr, evit.optim.lr_batch, evit.optim.min_lr, evit.optim.weight_decay) == (2e-5, 512, 2e-6, 1e-6)
    topk = compose_config(["experiment=topk_deit_s", "dataset=imagenet"])
    validate(topk)
    assert (topk.reducer.keep_rate, topk.reducer.count_mode) == (0.7, "absolute_floor")
    assert topk.trainer.max_epochs == 30 and (topk.optim.lr, topk.optim.lr_batch) == (1e-3, 1024)


# ---------------------------------------------------------------- end to end


def test_a_short_finetune_warms_up_and_exports(run_cfg, monkeypatch):
    rates: list[tuple[int, float]] = []
    hook = EViT.on_train_epoch_start

    def record(self, epoch, max_epochs):
        hook(self, epoch, max_epochs)
        rates.append((epoch, self.keep_rate_now()))

    monkeypatch.setattr(EViT, "on_train_epoch_start", record)
    cfg = run_cfg("reducer=evit", "reducer.keep_warmup_start=0.5", "visualize.every_n_epochs=0")
    summary = train(cfg)
    assert rates == [(0, 1.0), (1, 0.7)]  # 2 epochs: the first at rate 1, then keep_rate
    run_dir = cfg.paths.output_dir
    assert summary["global_step"] == 4 and summary["val/acc1"] is not None
    assert summary["model/gmacs"] == pytest.approx(summary["model/gmacs_counted"], rel=0.02)
    assert summary["reducer_knobs"]["keep_rate"] == 0.7
    exported = load_deployable(f"{run_dir}/export")
    trained = build_model(cfg, int(cfg.dataset.num_classes))
    trained.load_state_dict(torch.load(f"{run_dir}/phases/finetune.pt", weights_only=True)["state_dict"])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), trained.eval()(x))


def test_training_free_run_applies_topk_to_the_backbone_weights(run_cfg, tmp_path):
    probe = run_cfg()
    vit = create_backbone(probe.backbone, int(probe.dataset.num_classes))
    weights = tmp_path / "baseline.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(weights))
    cfg = run_cfg(
        "reducer=topk", "reducer.finetune_epochs=0", f"backbone.checkpoint={weights}", "visualize.every_n_epochs=0"
    )
    summary = train(cfg)
    run_dir = cfg.paths.output_dir
    assert summary["global_step"] == 0 and summary["val/acc1"] is not None
    assert not list((tmp_path / "run").glob("checkpoints/*/*.ckpt"))  # no fit
    exported = load_deployable(f"{run_dir}/export")
    expected = reducer(vit, "topk").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), expected(x))


# ---------------------------------------------------------------- prefix tokens and CLS-free backbones (issue 16)

# Untrained timm backbones at a small size (16 patches each), cut to 4 blocks to stay fast: one CLS; CLS + 4
# registers; CLS + distillation token; no prefix with average pooling; no prefix with attention pooling.
BACKBONES = {
    "deit": ("deit_small_patch16_224", 64),
    "registers": ("vit_small_patch14_reg4_dinov2", 56),
    "distilled": ("deit_small_distilled_patch16_224", 64),
    "gap": ("vit_medium_patch16_gap_256", 64),
    "siglip": ("vit_base_patch16_siglip_224", 64),
}
VARIANTS = [("topk", {}), ("evit", {}), ("evit", {"fuse": False})]
LOCATIONS = [0, 1, 2]  # three pruning steps in the 4 blocks


@functools.cache
def _built(key: str) -> torch.nn.Module:
    model, size = BACKBONES[key]
    torch.manual_seed(0)
    return create_backbone({"model": model, "img_size": size, "kwargs": {"depth": 4}}, num_classes=10).eval()


def backbone(key: str):
    return copy.deepcopy(_built(key)), BACKBONES[key][1]


def manual_scores(blk, x: torch.Tensor, num_prefix: int, has_cls: bool) -> torch.Tensor:
    """Candidate scores from the block's full attention map: head mean of the CLS row (row 0) or, without CLS, of the
    attention each key receives averaged over all queries; prefix columns left out."""
    b, n, c = x.shape
    q, k, _ = blk.attn.qkv(blk.norm1(x)).view(b, n, 3, blk.attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    a = (blk.attn.q_norm(q) @ blk.attn.k_norm(k).transpose(-2, -1) * blk.attn.scale).softmax(dim=-1)
    row = a[:, :, 0] if has_cls else a.mean(dim=2)
    return row.mean(dim=1)[:, num_prefix:]


def record_pruning(monkeypatch, model, boost_prefix: float = 0.0) -> list[dict]:
    """Record every pruning step of ``model``: the block input, its scoring row and its prune call. ``boost_prefix``
    is added to the prefix tokens' columns of the row, making them the most attended tokens by far."""
    steps: list[dict] = []
    real_row, real_prune = topk_module.attention_with_cls_row, model._prune

    def row(blk, x, has_cls=True):
        out, r = real_row(blk, x, has_cls)
        steps.append({"blk": blk, "x": x, "has_cls": has_cls})
        return out, torch.cat([r[..., : model.num_prefix] + boost_prefix, r[..., model.num_prefix :]], dim=-1)

    def prune_step(x, scores, k):
        out, selection = real_prune(x, scores, k)
        steps[-1].update(before=x, after=out, scores=scores, selection=selection, k=k)
        return out, selection

    monkeypatch.setattr(topk_module, "attention_with_cls_row", row)
    monkeypatch.setattr(model, "_prune", prune_step)
    return steps


@pytest.mark.parametrize("key", list(BACKBONES))
@pytest.mark.parametrize("name, knobs", VARIANTS, ids=["topk", "evit", "evit-nofuse"])
def test_every_backbone_runs_costs_as_counted_and_is_neutral_at_keep_rate_one(key, name, knobs):
    vit, size = backbone(key)
    x = images(2, size)
    with torch.no_grad():
        expected = vit(x)
        neutral = reducer(vit, name, keep_rate=1.0, locations=LOCATIONS, **knobs).eval()
        torch.testing.assert_close(neutral(x), expected, atol=1e-5, rtol=1e-5)  # distilled: both heads averaged
        model = reducer(vit, name, keep_rate=0.5, locations=LOCATIONS, **knobs).eval()
        assert model(x).shape == (2, 10) and torch.isfinite(model(x)).all()
    assert model.cost().tokens_per_block[-1] < neutral.cost().tokens_per_block[-1]
    assert counted_gmacs(model.deployable(), size) == pytest.approx(model.cost().gmacs, rel=1e-6)


@pytest.mark.parametrize("key", ["registers", "distilled", "gap", "siglip"])
@pytest.mark.parametrize("name, knobs", VARIANTS, ids=["topk", "evit", "evit-nofuse"])
def test_prefix_tokens_pass_and_the_cls_row_or_received_attention_scores(monkeypatch, key, name, knobs):
    vit, size = backbone(key)
    model = reducer(vit, name, keep_rate=0.5, locations=LOCATIONS, **knobs).eval()
    steps = record_pruning(monkeypatch, model)
    with torch.no_grad():
        model(images(2, size))
        assert len(steps) == 3
        p = vit.num_prefix_tokens
        for step in steps:
            assert step["has_cls"] == vit.has_class_token
            torch.testing.assert_close(step["scores"], manual_scores(step["blk"], step["x"], p, vit.has_class_token))
            before, after, keep = step["before"], step["after"], step["selection"].keep
            assert after.shape[1] == p + step["k"] + (name == "evit" and knobs.get("fuse", True))
            torch.testing.assert_close(after[:, :p], before[:, :p], atol=0, rtol=0)  # the prefix rows, as they were
            torch.testing.assert_close(after[:, p : p + step["k"]], gather_tokens(before[:, p:], keep), atol=0, rtol=0)


@pytest.mark.parametrize("name, knobs", VARIANTS, ids=["topk", "evit", "evit-nofuse"])
def test_the_ranking_ignores_the_register_columns(monkeypatch, name, knobs):
    """Registers attended far more than any patch change nothing: the kept set is the top k of the patch columns."""
    vit, size = backbone("registers")
    x = images(2, size)
    kept = {}
    for boost in (0.0, 10.0):
        model = reducer(vit, name, keep_rate=0.5, locations=LOCATIONS, **knobs).eval()
        steps = record_pruning(monkeypatch, model, boost_prefix=boost)
        with torch.no_grad():
            logits = model(x)
        kept[boost] = (logits, [s["selection"].keep for s in steps])
        for step in steps:  # the patch columns alone, computed without the registers
            top = manual_scores(step["blk"], step["x"], 5, True).topk(step["k"], dim=1).indices
            torch.testing.assert_close(step["selection"].keep, top)
    torch.testing.assert_close(kept[10.0][1], kept[0.0][1])
    torch.testing.assert_close(kept[10.0][0], kept[0.0][0])


@pytest.mark.parametrize("key", ["gap", "siglip"])
def test_evit_pools_the_fused_token_with_the_patches_it_stands_for(key):
    vit, size = backbone(key)
    model = reducer(vit, "evit", keep_rate=0.5, locations=LOCATIONS).eval()
    x = images(2, size)
    with torch.no_grad():
        tokens, sizes = model.forward_tokens(x)
        # No prefix: the tokens leaving the last block carry all 16 patches, the fused one (last) several.
        assert (sizes.sum(dim=1) == 16).all() and (sizes[:, -1] > 1).all()
        torch.testing.assert_close(model(x), classify(vit, tokens, sizes))
        assert not torch.allclose(model(x), classify(vit, tokens), atol=1e-4)  # weighting the fused token as one
