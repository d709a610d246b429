"""ATS (issue 15): deterministic inverse-transform sampling, adaptive per-image counts with padding, the per-image
cost model against the FLOP counter, budgets, the paper's operating point, training-free and fine-tuned runs."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import timm
import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from conftest import peaked
from tokred.config import ConfigError, compose_config, validate
from tokred.export import load_deployable
from tokred.flops import counted_gmacs, cpu_attention_formulas
from tokred.reducers import ats as ats_module
from tokred.reducers import create_reducer
from tokred.reducers.ats import Config, _nearest, sample_tokens, significance
from tokred.reducers.base import TokenReducer
from tokred.training.run import build_model, train


def ats(vit, **knobs):
    return create_reducer({"name": "ats", **knobs}, vit).eval()


def images(b: int = 4) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(b, 3, 32, 32)


def kept_sets(model, x) -> list[list[set[int]]]:
    """Per block, per image, the original patches the block computes."""
    return [[set(torch.nonzero(v.flatten()).flatten().tolist()) for v in m.values] for m in model.token_maps(x)]


def per_image_counted_macs(model, x) -> list[float]:
    """torch's FLOP counter on each image alone, in MACs."""
    macs = []
    for image in x:
        counter = FlopCounterMode(display=False, custom_mapping=cpu_attention_formulas())
        with torch.no_grad(), counter:
            model(image[None])
        macs.append(counter.get_total_flops() / 2)
    return macs


# ---------------------------------------------------------------- the sampler


@pytest.mark.parametrize("n, k", [(16, 8), (16, 12), (16, 16), (196, 108), (196, 50)])
def test_uniform_scores_keep_k_distinct_tokens(n, k):
    scores = torch.full((3, n), 1.0 / n)
    kept, count = sample_tokens(scores, k - 1)
    assert count.tolist() == [k - 1] * 3  # K - 1 patch tokens + CLS = K
    assert all(len(set(row.tolist())) == k - 1 for row in kept)


def test_uniform_scores_with_more_grid_points_than_tokens_drop_only_the_lowest():
    # The release (K = 197 at 197 tokens): 196 grid points over 196 candidates keep 195; the lowest-ranked is missing.
    n = 196
    kept, count = sample_tokens(torch.full((2, n), 1.0 / n), n)
    assert count.tolist() == [n - 1] * 2
    assert 0 not in kept[0].tolist()  # ties sort stably, so candidate 0 ranks lowest


def test_one_hot_and_near_one_hot_scores():
    n = 196
    one_hot = torch.zeros(1, n)
    one_hot[0, 42] = 1
    kept, count = sample_tokens(one_hot, n)
    assert count.tolist() == [1] and kept[0, 0] == 42
    near = torch.full((1, n), 1e-6)
    near[0, 42] = 1 - (n - 1) * 1e-6
    assert sample_tokens(near, n)[1].tolist() == [3]  # the official code keeps 3 here too (spec §11.5)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("r", [1, 7, 30, 107, 196])
def test_count_never_exceeds_the_grid_and_the_top_token_is_kept(seed, r):
    generator = torch.Generator().manual_seed(seed)
    scores = (torch.randn(8, 60, generator=generator) * (1 + seed)).softmax(dim=1)
    valid = torch.arange(60) < torch.randint(2, 61, (8, 1), generator=generator)
    scores = scores * valid
    scores = scores / scores.sum(1, keepdim=True)
    kept, count = sample_tokens(scores, r, valid)
    assert (count >= 1).all() and (count <= valid.sum(1).clamp(max=r)).all()
    for row, c, s, v in zip(kept, count, scores, valid):
        chosen = row[:c]
        assert v[chosen].all() and len(set(chosen.tolist())) == c  # real, distinct candidates
        assert chosen[-1] == s.argmax()  # ascending significance: the top one comes last
        assert torch.equal(s[chosen], s[chosen].sort().values)


def test_binary_search_picks_what_the_official_argmin_picks():
    # The official mapping is argmin_r |y - cdf_r| (first index on ties); ties, repeated values and padding (-inf).
    generator = torch.Generator().manual_seed(0)
    for _ in range(100):
        n, r = (int(torch.randint(1, 40, (1,), generator=generator)) for _ in range(2))
        cdf = (torch.randint(0, 6, (4, n), generator=generator) / 5).sort(dim=1).values
        cdf = cdf.masked_fill(torch.arange(n) < torch.randint(0, n, (4, 1), generator=generator), -torch.inf)
        y = torch.randint(0, 11, (4, r), generator=generator) / 10
        assert torch.equal(_nearest(cdf, y), (y.unsqueeze(2) - cdf.unsqueeze(1)).abs().argmin(dim=2))


def test_an_image_samples_the_same_alone_and_padded():
    generator = torch.Generator().manual_seed(0)
    scores = (torch.randn(1, 20, generator=generator) * 2).softmax(dim=1)
    alone, n_alone = sample_tokens(scores, 12)
    padded = torch.cat([scores, torch.zeros(1, 5)], dim=1)
    valid = torch.arange(25) < 20
    together, n_together = sample_tokens(padded, 12, valid[None])
    assert n_alone == n_together and torch.equal(alone[0, :n_alone], together[0, :n_together])


def test_scores_are_a_distribution_over_real_patches_and_equivariant():
    generator = torch.Generator().manual_seed(0)
    row = torch.randn(2, 3, 9, generator=generator).softmax(dim=-1)
    v = torch.randn(2, 3, 9, 4, generator=generator)
    valid = torch.tensor([[True] * 9, [True] * 6 + [False] * 3])
    s = significance(row, v, valid)
    torch.testing.assert_close(s.sum(1), torch.ones(2))
    assert (s[1, 5:] == 0).all() and (s[0] > 0).all()  # CLS is not a candidate; padding scores 0
    perm = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(8, generator=generator)])
    torch.testing.assert_close(significance(row[:, :, perm], v[:, :, perm])[0], significance(row, v)[0][perm[1:] - 1])
    per_head = significance(row, v, value_norm="per_head")
    torch.testing.assert_close(per_head.sum(1), torch.ones(2))
    assert not torch.allclose(per_head, significance(row, v))


# ---------------------------------------------------------------- the model


@pytest.mark.parametrize("variant", [{}, {"init_values": 0.1, "qk_norm": True}], ids=["deit", "layerscale+qknorm"])
def test_no_ats_block_gives_the_baseline(make_vit, variant):
    vit = make_vit(depth=4, **variant)
    x = images()
    expected = vit(x)
    model = ats(vit, blocks=[])
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model.deployable()(x), expected, atol=1e-5, rtol=1e-4)
    assert model.cost().gmacs == pytest.approx(TokenReducer.cost(model).gmacs, rel=1e-9)


@pytest.mark.parametrize("variant", [{}, {"init_values": 0.1, "qk_norm": True}], ids=["deit", "layerscale+qknorm"])
def test_ats_blocks_that_sample_every_token_give_the_baseline(make_vit, monkeypatch, variant):
    # Spec §11.1: sampling forced to keep every candidate; every ATS-block computation (scores, gathers, sampled
    # query rows over all keys) must then equal timm's blocks.
    vit = make_vit(depth=4, **variant)
    x = images()
    expected = vit(x)
    n = vit.patch_embed.num_patches

    def keep_all(scores, r, valid=None):
        b = scores.shape[0]
        return torch.arange(n).expand(b, n), torch.full((b,), n)

    monkeypatch.setattr(ats_module, "sample_tokens", keep_all)
    with torch.no_grad():
        torch.testing.assert_close(ats(vit, blocks=[0, 2, 3])(x), expected, atol=1e-5, rtol=1e-4)


def test_k_at_the_token_count_is_not_a_no_op(make_vit):
    # The release setting (K = all tokens): duplicate removal alone still drops the lowest-scoring patch at the first
    # ATS block of every image (spec pitfall 6), so "no reduction" is blocks=[].
    model = ats(make_vit(depth=4), num_tokens=17, blocks=[1])
    counts = [m.values.flatten(1).sum(1) for m in model.token_maps(images())]
    assert (counts[0] == 16).all() and (counts[1] <= 15).all()


def test_uniform_attention_and_equal_values_keep_exactly_k_tokens(make_vit):
    vit = make_vit(depth=4)
    c = vit.embed_dim
    with torch.no_grad():  # block 1: q = k = 0 (uniform attention), v = the same vector for every token
        vit.blocks[1].attn.qkv.weight.zero_()
        vit.blocks[1].attn.qkv.bias.zero_()
        vit.blocks[1].attn.qkv.bias[2 * c :] = 1.0
    for k in (8, 11, 16):
        model = ats(vit, num_tokens=k, blocks=[1])
        sets = kept_sets(model, images())
        assert [len(s) for s in sets[1]] == [k - 1] * 4  # + CLS = K
        assert sets[1][0] == sets[1][1]  # the same tokens in every image: the scores are identical


@pytest.mark.parametrize(
    "knobs",
    [
        {},
        {"num_tokens": 9},
        {"num_tokens": 12, "blocks": [0, 2]},
        {"num_tokens": 10, "grid_size": "per_current_T"},
        {"value_norm": "per_head"},
    ],
    ids=["release", "K9", "K12-gaps", "per_current_T", "per_head"],
)
def test_kept_count_never_exceeds_k_and_pruned_tokens_never_return(make_vit, knobs):
    model = ats(peaked(make_vit(depth=6)), **knobs)
    k = knobs.get("num_tokens", 17)
    maps = model.token_maps(images(6))
    ats_blocks = knobs.get("blocks", [3, 4, 5])
    for m in maps:
        counts = m.values.flatten(1).sum(1)
        assert m.kind == "kept" and (counts >= 1).all()
        if m.block in ats_blocks:
            assert (counts <= k - 1).all()
    assert all((later.values <= earlier.values).all() for earlier, later in zip(maps, maps[1:]))
    # Adaptive: the images keep different numbers of tokens, and the cost model's mean is their mean.
    last = maps[-1].values.flatten(1).sum(1)
    assert len(set(last.tolist())) > 1
    tokens = model.cost(images(6)).tokens_per_block
    assert [m.values.flatten(1).sum(1).mean().item() + 1 for m in maps] == pytest.approx(tokens)


@pytest.mark.parametrize("knobs", [{"num_tokens": 10}, {"num_tokens": 12, "blocks": [1]}], ids=["every", "single"])
def test_an_image_gets_the_same_tokens_and_logits_alone_and_in_a_padded_batch(make_vit, knobs):
    model = ats(peaked(make_vit(depth=6)), **knobs)
    x = images(5)
    batch_sets = kept_sets(model, x)
    assert len({len(s) for s in batch_sets[-1]}) > 1  # counts differ, so the batch was padded
    with torch.no_grad():
        batch_logits = model(x)
        for i in range(5):
            torch.testing.assert_close(model(x[i : i + 1])[0], batch_logits[i], atol=1e-5, rtol=1e-4)
            assert [sets[0] for sets in kept_sets(model, x[i : i + 1])] == [sets[i] for sets in batch_sets]


def test_sampling_is_deterministic_and_the_same_in_train_and_eval(make_vit):
    model = ats(peaked(make_vit(depth=6)), num_tokens=10)
    x = images()
    trace = lambda: [p.clone() for p in _patch_trace(model, x)]  # noqa: E731
    first = trace()
    assert all(torch.equal(a, b) for a, b in zip(first, trace()))
    with torch.no_grad():
        logits = model(x)
        torch.testing.assert_close(model(x), logits, atol=0, rtol=0)
        model.train()
        assert all(torch.equal(a, b) for a, b in zip(first, trace()))
        torch.testing.assert_close(model(x), logits, atol=1e-6, rtol=1e-5)  # no dropout / drop-path in this ViT


def _patch_trace(model, x) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    with torch.no_grad():
        model._tokens(x, lambda i, patch, valid: out.append(patch if valid is None else patch.where(valid[:, 1:], -1)))
    return out


def test_gradients_reach_every_parameter(make_vit):
    model = ats(make_vit(depth=4, init_values=0.1), num_tokens=9, blocks=[1, 2]).train()
    logits, terms = model.losses(images(), torch.arange(4) % 5, torch.nn.functional.cross_entropy)
    sum(terms.values()).backward()
    starved = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not starved


# ---------------------------------------------------------------- cost


@pytest.mark.parametrize(
    "knobs", [{"num_tokens": 10}, {"num_tokens": 12, "blocks": [0, 2]}, {"grid_size": "per_current_T", "num_tokens": 9}]
)
def test_analytic_cost_equals_the_counter_on_every_image(make_vit, knobs):
    model = ats(peaked(make_vit(depth=6)), **knobs)
    x = images(5)
    counted = per_image_counted_macs(model, x)
    assert model.image_macs(x).tolist() == counted  # exact, image by image
    assert len(set(counted)) > 1
    assert model.cost(x).macs == pytest.approx(sum(counted) / len(counted), rel=1e-12)
    # A padded batch executes more than the per-image mean: its largest count per block.
    counter = FlopCounterMode(display=False, custom_mapping=cpu_attention_formulas())
    with torch.no_grad(), counter:
        model(x)
    assert counter.get_total_flops() / 2 / len(x) > model.cost(x).macs
    # The default cost is the mean over the seeded reference images, the FLOP counter's kind of input.
    assert model.cost().gmacs == pytest.approx(counted_gmacs(model.deployable(), 32), rel=0.02)
    assert model.cost().gmacs == model.cost().gmacs


def test_cost_model_reproduces_the_specs_constant_count_profiles(monkeypatch):
    # Spec §6.1: DeiT-S with n tokens from block index 3 on. Forced top-(n - 1) sampling; the spec's figures charge
    # the full Q K^T (all rows), ours only the rows that run (sampled queries + the CLS score row).
    def top(scores, r, valid=None):
        kept = scores.argsort(dim=1)[:, -r:]
        return kept, torch.full((scores.shape[0],), r)

    monkeypatch.setattr(ats_module, "sample_tokens", top)
    cfg = compose_config(["backbone=deit_small", "reducer=ats", "reducer.blocks=[3]", "reducer.cost_images=1"], "flops")
    for n, spec in ((108, 3.047), (99, 2.896)):
        cfg.reducer.num_tokens = n
        model = build_model(cfg, 1000)
        unsampled_qk = (197 - n) * 197 * 384 - 197 * 384  # the spec's full Q K^T minus our CLS row
        assert model.cost().macs + unsampled_qk == pytest.approx(spec * 1e9, abs=1.5e6)


def test_paper_operating_point_matches_the_spec():
    torch.manual_seed(0)
    cfg = compose_config(["experiment=ats_deit_s", "backbone.pretrained=false", "reducer.cost_images=4"], "flops")
    model = build_model(cfg, 1000)
    cost = model.cost()
    # Spec / README: ~2.9 GMACs (mean over images), bounded by 3.047 for K = 108 from block 3 on.
    assert cost.gmacs == pytest.approx(2.9, rel=0.02) and cost.gmacs < 3.047
    assert cost.tokens_per_block[:3] == [197] * 3 and max(cost.tokens_per_block[3:]) <= 108


@pytest.mark.parametrize("ratio", [0.5, 0.65])
def test_budget_lands_within_one_percent_below_the_target(ratio):
    cfg = compose_config(
        ["backbone=deit_tiny", "reducer=ats", f"reducer.target_ratio={ratio}", "reducer.cost_images=2"], "flops"
    )
    model = build_model(cfg, 1000)
    target = ratio * TokenReducer.cost(model).gmacs
    assert -0.01 <= (model.cost().gmacs - target) / target <= 0
    assert 8 <= model.knobs()["num_tokens"] < 197 and "mean per image" in model.knobs()["gmacs_over"]


def test_unreachable_budget_names_the_range(make_vit):
    with pytest.raises(ValueError, match="out of reach by num_tokens alone"):
        ats(make_vit(depth=8), target_ratio=0.2)
    with pytest.raises(ValueError, match="reducer.blocks is empty"):
        ats(make_vit(depth=8), target_ratio=0.5, blocks=[])


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


def prefix_images(img_size: int, b: int = 4) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(b, 3, img_size, img_size)


@pytest.mark.parametrize("name, img_size", PREFIX_BACKBONES, ids=[n for n, _ in PREFIX_BACKBONES])
def test_every_prefix_layout_samples_counts_exactly_and_keeps_the_baseline_at_the_neutral_setting(
    name, img_size, monkeypatch
):
    vit = prefix_vit(name, img_size)
    x = prefix_images(img_size)
    with torch.no_grad():
        expected = vit(x)
        torch.testing.assert_close(ats(vit, blocks=[])(x), expected, atol=1e-4, rtol=1e-4)
    model = ats(vit, num_tokens=12, blocks=[1, 2, 3])
    counted = per_image_counted_macs(model, x)
    # Exact per image (scores' q.K^T and the pooling included); cost() is their mean over the reference images.
    assert model.image_macs(x).tolist() == counted
    prefix = vit.num_prefix_tokens
    assert max(model.cost(x).tokens_per_block[1:]) <= 12 and min(model.cost(x).tokens_per_block) > prefix
    assert vit.has_class_token or len(set(counted)) > 1  # the CLS-free batches below are padded
    with torch.no_grad():
        logits = model(x)
        for i in range(len(x)):  # padding (counts differ per image) never reaches the scores or the pooling
            torch.testing.assert_close(model(x[i : i + 1])[0], logits[i], atol=1e-4, rtol=1e-4)
    n = vit.patch_embed.num_patches  # sampling forced to keep every patch: every ATS computation is timm's block

    def keep_all(scores, r, valid=None):
        return torch.arange(n).expand(scores.shape[0], n), torch.full((scores.shape[0],), n)

    monkeypatch.setattr(ats_module, "sample_tokens", keep_all)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name, img_size", PREFIX_BACKBONES[1:3], ids=["registers", "distilled"])
def test_prefix_tokens_pass_every_ats_block_and_are_never_candidates(name, img_size, monkeypatch):
    model = ats(prefix_vit(name, img_size), num_tokens=10, blocks=[1, 2, 3])
    prefix = model.vit.num_prefix_tokens
    block, seen = ats_module.ATS._ats_block, []

    def checked(self, blk, x, valid):
        y, rows, valid_out = block(self, blk, x, valid)
        seen.append(rows)
        return y, rows, valid_out

    monkeypatch.setattr(ats_module.ATS, "_ats_block", checked)
    with torch.no_grad():
        model(prefix_images(img_size))
    assert len(seen) == 3
    for rows in seen:
        assert (rows[:, :prefix] == torch.arange(prefix)).all() and (rows[:, prefix:] >= prefix).all()


def test_sampling_ignores_the_register_columns_of_the_cls_row(monkeypatch):
    # Huge attention on the registers must not change which patches are sampled: they are no candidates, and the
    # patches' scores are renormalised among themselves.
    name, img_size = PREFIX_BACKBONES[1]
    model = ats(prefix_vit(name, img_size), num_tokens=10, blocks=[1, 2, 3])
    x = prefix_images(img_size)
    expected = kept_sets(model, x)
    scoring = ats_module.scoring_attention

    def register_heavy(*args):
        row = scoring(*args).clone()
        row[:, :, 1:5] *= 1e4
        return row / row.sum(dim=-1, keepdim=True)

    monkeypatch.setattr(ats_module, "scoring_attention", register_heavy)
    assert kept_sets(model, x) == expected
    # Scores are those of the row with the register columns removed (a one-prefix layout).
    generator = torch.Generator().manual_seed(0)
    row, v = torch.randn(2, 3, 12, generator=generator).softmax(dim=-1), torch.randn(2, 3, 12, 4, generator=generator)
    without = [0, *range(5, 12)]
    torch.testing.assert_close(significance(row, v, num_prefix=5), significance(row[:, :, without], v[:, :, without]))


def test_without_cls_tokens_are_scored_by_the_attention_they_receive(make_vit, monkeypatch):
    vit = peaked(make_vit(depth=4, class_token=False, global_pool="avg"))
    called = []
    received = ats_module.scoring_attention

    def spy(attn, q, k, has_cls, valid=None):
        called.append(has_cls)
        return received(attn, q, k, has_cls, valid)

    monkeypatch.setattr(ats_module, "scoring_attention", spy)
    with torch.no_grad():
        ats(vit, num_tokens=9, blocks=[1, 2])(images(1))
    assert called == [False, False]


def test_a_k_within_the_prefix_is_rejected(make_vit):
    with pytest.raises(ValueError, match="leaves no patch token beside the backbone's 8 prefix tokens"):
        ats(make_vit(depth=4, reg_tokens=7), num_tokens=8)


# ---------------------------------------------------------------- knobs


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("reducer.num_tokens=4", "reducer.num_tokens=4 must be >= 8"),
        ("reducer.blocks=[4,3]", "distinct 0-based blocks in increasing order"),
        ("reducer.blocks=[-1]", "distinct 0-based blocks"),
        ("reducer.grid_size=full", "choose one of: release, per_current_T"),
        ("reducer.value_norm=l1", "choose one of: full, per_head"),
        ("reducer.cost_images=0", "reducer.cost_images=0 must be >= 1"),
        ("reducer.finetune_epochs=-1", "reducer.finetune_epochs=-1 must be >= 0"),
        ("+reducer.keep_rate=0.5", "valid knobs"),
    ],
)
def test_bad_knobs_are_rejected_in_one_line(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]")) as err:
        validate(compose_config(["reducer=ats", override]))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "knobs, fragment",
    [
        ({"blocks": [3, 8]}, "below the backbone depth 4"),
        ({"num_tokens": 18}, "exceeds the backbone's 17 input tokens"),
    ],
)
def test_knobs_that_do_not_fit_the_backbone_are_rejected(make_vit, knobs, fragment):
    with pytest.raises(ValueError, match=fragment):
        ats(make_vit(depth=4), **knobs)
    with pytest.raises(ValueError, match="every block from index 3 on"):
        ats(make_vit(depth=3))


def test_yaml_mirrors_the_config_defaults_and_the_preset_composes():
    assert OmegaConf.to_container(compose_config(["reducer=ats"]).reducer) == asdict(Config())
    cfg = compose_config(["experiment=ats_deit_s", "dataset=imagenet"])
    validate(cfg)
    assert cfg.backbone.model == "deit_small_patch16_224" and cfg.reducer.num_tokens == 108
    assert list(cfg.reducer.blocks) == list(range(3, 12)) and cfg.trainer.max_epochs == 30


# ---------------------------------------------------------------- end to end

RUN = ["reducer=ats", "reducer.num_tokens=40", "reducer.cost_images=4"]


def test_a_fine_tuning_run_writes_summary_and_export_that_reloads_to_the_same_logits(run_cfg):
    cfg = run_cfg(*RUN)
    summary = train(cfg)
    run_dir = cfg.paths.output_dir
    assert summary["global_step"] == 4 and summary["reducer_knobs"]["num_tokens"] == 40
    assert summary["model/gmacs"] == pytest.approx(summary["model/gmacs_counted"], rel=0.02)
    assert summary["model/gmacs"] < 0.0973 * 0.75  # deit_tiny_cpu unreduced: 0.0973
    exported = load_deployable(f"{run_dir}/export")
    payload = torch.load(f"{run_dir}/phases/finetune.pt", weights_only=True)
    trained = build_model(cfg, 10)
    trained.load_structure(payload["structure"])
    trained.load_state_dict(payload["state_dict"])
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), trained.eval()(x))


def test_training_free_budget_run_evaluates_and_exports_the_backbone_with_the_searched_k(run_cfg):
    cfg = run_cfg("reducer=ats", "reducer.target_ratio=0.6", "reducer.cost_images=2", "reducer.finetune_epochs=0")
    summary = train(cfg)
    run_dir = cfg.paths.output_dir
    assert summary["global_step"] == 0 and summary["val/acc1"] is not None
    payload = torch.load(f"{run_dir}/phases/finetune.pt", weights_only=True)
    exported = load_deployable(f"{run_dir}/export")
    # The exported weights are the backbone's, untouched: ATS has no parameters of its own.
    assert set(exported.state_dict()) == set(payload["state_dict"])
    assert all(torch.equal(exported.state_dict()[k], v) for k, v in payload["state_dict"].items())
    # The rebuild takes K from the structure, whatever its own search on fresh weights gave.
    assert exported.cfg.num_tokens == summary["reducer_knobs"]["num_tokens"] == payload["structure"]["num_tokens"]


def test_a_budget_beyond_block_3s_reach_moves_the_first_ats_block(make_vit):
    # On a peaked (trained-like) model ATS keeps few distinct tokens even at the largest K, so from block 3 it cannot
    # cost more than a fraction of the backbone: a larger budget starts sampling later, and says where.
    vit = peaked(make_vit(depth=12))
    full = TokenReducer.cost(ats(vit)).gmacs
    reach = ats(vit, num_tokens=vit.patch_embed.num_patches + 1)
    high = reach.cost(reach.reference_images()).gmacs
    target = (high + full) / 2
    assert high < 0.99 * target, "the peaked model must leave block 3's window below the target"
    model = ats(vit, target_gmacs=target)
    assert model.cfg.blocks and min(model.cfg.blocks) > 3 and model.cfg.blocks == list(range(min(model.cfg.blocks), 12))
    assert 0.97 * target <= model.cost(model.reference_images()).gmacs <= target
    with pytest.raises(ValueError, match="out of reach by num_tokens alone"):  # explicit blocks are kept as given
        ats(vit, target_gmacs=target, blocks=list(range(3, 12)))
