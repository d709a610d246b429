"""tokred.analysis: the similarity measures against known cases and hand values, and tokred-analyze end to end."""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch

import tokred
from conftest import peaked
from tokred.analysis import (
    assignment_nmi,
    attention_agreement,
    attention_scores,
    kept_iou,
    kept_set,
    linear_cka,
    partition,
    recorded_dataset,
    spearman,
    top_k_mask,
)
from tokred.cli.analyze import main
from tokred.reducers.base import TokenMap


# ------------------------------------------------------------------------------------------------ kept-set IoU
def test_kept_iou_known_cases():
    a = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    b = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    # identical -> 1, disjoint -> 0, two empty sets -> 1 (identical)
    assert kept_iou(a, b).tolist() == [1.0, 0.0, 1.0]
    # {0,1,2} vs {1,2,3}: |{1,2}| / |{0,1,2,3}| = 2/4; maps on a (2, 3) grid are flattened per image
    x = torch.tensor([[[1, 1, 1], [0, 0, 0]]])
    y = torch.tensor([[[0, 1, 1], [1, 0, 0]]])
    assert kept_iou(x, y).tolist() == [0.5]


# ------------------------------------------------------------------------------------------------ NMI
def test_assignment_nmi_known_cases():
    labels = torch.tensor([[0, 0, 1, 1, 2, 2], [5, 5, 5, 9, 9, 9]])
    assert assignment_nmi(labels, labels).tolist() == pytest.approx([1.0, 1.0])
    # the same partition under other ids: 1
    renamed = torch.tensor([[7, 7, 3, 3, 0, 0], [1, 1, 1, 0, 0, 0]])
    assert assignment_nmi(labels, renamed).tolist() == pytest.approx([1.0, 1.0])
    # independent partitions: {01|23} vs {02|13} -> I = 0
    assert assignment_nmi(torch.tensor([[0, 0, 1, 1]]), torch.tensor([[0, 1, 0, 1]])).item() == pytest.approx(0.0)
    # one group against any split: I = 0 -> 0; one group against one group: 1 by convention
    assert assignment_nmi(torch.tensor([[3, 3, 3, 3]]), torch.tensor([[0, 0, 1, 2]])).item() == pytest.approx(0.0)
    assert assignment_nmi(torch.tensor([[3, 3, 3, 3]]), torch.tensor([[1, 1, 1, 1]])).item() == 1.0


def test_assignment_nmi_by_hand():
    # A = {01|23}, B = {012|3}, n = 4, natural logs:
    #   H(A) = ln 2 = 0.693147;  H(B) = -(3/4 ln 3/4 + 1/4 ln 1/4) = 0.562335
    #   cells (A, B): (0,0) 2 patches, (1,0) 1, (1,1) 1; p_a = 1/2, 1/2; p_b = 3/4, 1/4
    #   I = 1/2 ln((1/2)/(1/2*3/4)) + 1/4 ln((1/4)/(1/2*3/4)) + 1/4 ln((1/4)/(1/2*1/4))
    #     = 0.143841 - 0.101366 + 0.173287 = 0.215762
    #   NMI (arithmetic) = I / ((H(A) + H(B)) / 2) = 0.215762 / 0.627741 = 0.343712
    nmi = assignment_nmi(torch.tensor([[0, 0, 1, 1]]), torch.tensor([[0, 0, 0, 1]])).item()
    assert nmi == pytest.approx(0.343712, abs=1e-6)
    with pytest.raises(ValueError, match="different shapes"):
        assignment_nmi(torch.zeros(1, 4), torch.zeros(1, 5))


def test_token_maps_read_both_ways():
    # an assignment map (EViT: kept patches their own token 0..2, the dropped ones fused into token 3): its kept set
    # is the patches alone in their group; a kept map's partition: kept patches alone, the dropped ones together
    fused = TokenMap(0, "assignment", torch.tensor([[[0, 3], [1, 3]], [[3, 3], [2, 2]]]))
    assert kept_set(fused).tolist() == [[True, False, True, False], [False, False, False, False]]
    kept = TokenMap(0, "kept", torch.tensor([[[1.0, 0.0], [1.0, 0.0]]]))
    assert partition(kept).tolist() == [[0, 4, 2, 4]]
    # the same choice in both forms: same partition
    assert assignment_nmi(partition(kept), fused.values[:1]).item() == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------ CKA
def test_linear_cka_invariances_and_hand_value():
    torch.manual_seed(0)
    x = torch.randn(50, 8)
    q, _ = torch.linalg.qr(torch.randn(8, 8))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, x @ q) == pytest.approx(1.0)  # orthogonal transform
    assert linear_cka(x, 3.7 * x) == pytest.approx(1.0)  # isotropic scaling
    assert linear_cka(x, x + 5.0) == pytest.approx(1.0)  # centring removes offsets
    assert linear_cka(x, x[:, :3]) < 1.0  # not invariant to dropping directions
    # one feature each: CKA = squared Pearson r. x = (1, 2, 3) -> (-1, 0, 1); y = (1, 0, 2) -> (0, -1, 1):
    #   (x.y)^2 / (|x|^2 |y|^2) = 1 / (2 * 2) = 0.25
    assert linear_cka(torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([[1.0], [0.0], [2.0]])) == pytest.approx(0.25)
    # features with no linear relation (X^T Y = 0 after centring): 0
    a = torch.tensor([[1.0], [-1.0], [0.0], [0.0]])
    b = torch.tensor([[0.0], [0.0], [1.0], [-1.0]])
    assert linear_cka(a, b) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="same inputs"):
        linear_cka(torch.randn(5, 2), torch.randn(6, 2))


# ------------------------------------------------------------------------------------------------ Spearman
def test_spearman_known_cases_and_ties():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)  # monotone, not linear
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties share their mean rank: x ranks (1, 2.5, 2.5, 4), y ranks (1, 3, 2, 4); centred (-1.5, 0, 0, 1.5) and
    # (-1.5, 0.5, -0.5, 1.5): r = 4.5 / sqrt(4.5 * 5) = 0.948683
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(0.948683, abs=1e-6)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))  # nothing to rank
    with pytest.raises(ValueError, match=">= 2 values"):
        spearman([1], [2])


# ------------------------------------------------------------------------------------------------ attention agreement
def test_top_k_mask_per_image_counts():
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.9], [0.4, 0.3, 0.2, 0.1]])
    assert top_k_mask(scores, torch.tensor([2, 1])).tolist() == [
        [False, True, False, True],
        [True, False, False, False],
    ]


def test_topk_keeps_exactly_the_baselines_cls_top_k(make_vit):
    # Top-K on the baseline's own weights chooses by that CLS row at its first pruning block: agreement 1 there,
    # and not before (no reduction) -- the equivalence the analysis rests on
    vit = peaked(make_vit())
    images = torch.randn(6, 3, 32, 32)
    topk = tokred.patch(vit, "topk", keep_rate=0.5, locations=[1, 2]).eval()
    agreement = attention_agreement(topk.token_maps(images), attention_scores(vit, images))
    assert agreement["iou"][0] is None
    assert agreement["iou"][1] == pytest.approx(1.0)
    # the 8 patches of 16 the CLS attends to least: disjoint from its top 8
    lowest = top_k_mask(-attention_scores(vit, images)[1], torch.full((6,), 8)).float().view(6, 4, 4)
    assert attention_agreement([TokenMap(1, "kept", lowest)], attention_scores(vit, images))["iou"] == [0.0]


# ------------------------------------------------------------------------------------------------ tokred-analyze
TINY_DATA = {
    "name": "synthetic",
    "num_classes": 10,
    "train_size": 2,
    "val_size": 8,
    "test_size": 0,
    "img_size": 64,
    "seed": 0,
    "batch_size": 8,
    "num_workers": 0,
    "aug": {"hflip": 0.0, "mixup": 0.0, "cutmix": 0.0},
}


@pytest.fixture
def runs(tmp_path):
    """A multirun directory of two untrained 64-px runs, the baseline and Top-K, each with its export/ and the
    run_config.json that records its dataset."""
    root = tmp_path / "multirun"
    torch.manual_seed(0)
    vit = timm.create_model("deit_tiny_cpu_patch8_64", num_classes=10).eval()
    for name, knobs in (("none", {}), ("topk", {"keep_rate": 0.5})):
        tokred.save(tokred.patch(vit, name, **knobs), root / name / "export")
        (root / name / "run_config.json").write_text(json.dumps({"dataset": TINY_DATA}))
    (root / "none" / "summary.json").write_text(json.dumps({"val/acc1": 0.9, "test/acc1": 0.85}))
    return root


def test_analyze_end_to_end(runs, capsys):
    main([str(runs), "n=8", "n_boot=200"])
    out = capsys.readouterr().out
    assert "| none |" in out and "| topk@" not in out  # labels: the reducer, and its budget when one was set
    written = {p.name for p in runs.iterdir() if p.is_file()}
    assert written == {"analysis.json", "analysis.md", "analysis_similarity.png", "analysis_blocks.png"}
    result = json.loads((runs / "analysis.json").read_text())
    assert result["images"] == 8 and result["dataset"] == "synthetic" and result["baseline"] == "none"
    base, topk = result["runs"]
    assert (base["label"], topk["label"]) == ("none", "topk")
    # the run's own top-1 is its summary's, from the test split where it has one (as tokred-report reads it)
    assert (base["top1"], base["split"], topk["top1"]) == (0.85, "test", None)
    assert base["attention_iou"] is None and topk["diff_vs_baseline"] is not None
    assert 0 <= topk["mcnemar_p_vs_baseline"] <= 1
    # Top-K prunes at blocks 3, 6, 9 by the same model's CLS row: exact agreement at block 3, none before it
    assert topk["attention_iou_blocks"][:3] == [None, None, None]
    assert topk["attention_iou_blocks"][3] == pytest.approx(1.0)
    (pair,) = result["pairs"]
    assert 0 <= pair["cka"] <= 1 + 1e-9
    assert pair["iou"][:3] == [None, None, None]
    assert pair["iou"][3] == pytest.approx(32 / 64)  # half of the 64 patches kept, the baseline keeps all
    assert result["correlation"] == {"spearman": None, "n": 1, "top1_source": "images"}


def test_analyze_runs_given_one_by_one_with_a_dataset(runs, tmp_path, capsys):
    for run in ("none", "topk"):
        (runs / run / "run_config.json").unlink()
    exports = [str(runs / "topk" / "export"), str(runs / "none")]
    with pytest.raises(SystemExit) as exit_:
        main(exports)
    assert exit_.value.code == 2
    assert "records no dataset (no run_config.json); pass dataset=<name>" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(runs / "none")])
    assert "found 1 exported run; the analysis compares runs" in capsys.readouterr().err
    out_dir = tmp_path / "analysis"
    main(
        [
            *exports,
            "dataset=synthetic",
            "dataset.val_size=4",
            "dataset.train_size=2",
            "n=4",
            "n_boot=100",
            f"out_dir={out_dir}",
        ]
    )
    result = json.loads((out_dir / "analysis.json").read_text())
    assert [r["label"] for r in result["runs"]] == ["none", "topk"]  # the baseline leads
    assert result["images"] == 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "no runs given; pass run directories"),
        (["/nonexistent/runs"], "/nonexistent/runs does not exist"),
        (["n=0", "/nonexistent"], "n=0 must be >= 1"),
        (["runs=[a,b]", "c"], "runs are given twice"),
        (["nn=3", "x"], "'nn' is not a setting of tokred-analyze"),
    ],
)
def test_analyze_refuses_bad_input(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("tokred-analyze: error: ") and message in err and err.count("\n") == 1


def test_recorded_dataset_from_hydras_config(tmp_path):
    # runs without run_config.json: Hydra's copy of the config, interpolations resolved against the whole config
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text(
        "backbone: {img_size: 64}\ndataset: {name: synthetic, img_size: '${backbone.img_size}'}\n"
    )
    assert recorded_dataset(tmp_path) == {"name": "synthetic", "img_size": 64}
    assert recorded_dataset(tmp_path / "elsewhere") is None


def test_analyze_help(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: tokred-analyze") and "n_boot" in out
