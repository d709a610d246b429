"""Which reducer runs on which backbone: every registered reducer x the timm ViTs people fine-tune, untrained, at a
small image size. A cell is "ok" when the reducer builds, runs a forward pass, its analytic GMACs equal the counted
ones and its deployable export loads back to the same logits; otherwise it must be a deliberate one-line
:class:`UnsupportedBackbone` error. The README's support matrix is this test's output: a new reducer or backbone
enters it automatically, and the test fails when the README is stale (``make support-matrix`` rewrites it).
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import pytest
import timm
import torch

import tokred
from tokred.flops import counted_gmacs
from tokred.reducers import available_reducers
from tokred.vit_ops import UnsupportedBackbone

README = Path(__file__).resolve().parents[1] / "README.md"
MARKERS = ("<!-- support-matrix:start -->", "<!-- support-matrix:end -->")

# timm name -> (label, what is special). 96 px with 16-px patches, 84 px with 14-px ones: 36 patches each.
BACKBONES = {
    "deit_small_patch16_224": "DeiT-S",
    "deit_base_patch16_224": "DeiT-B",
    "vit_base_patch16_224": "ViT-B (AugReg)",
    "deit3_small_patch16_224": "DeiT-III-S (LayerScale)",
    "vit_small_patch14_dinov2": "DINOv2-S",
    "vit_base_patch16_clip_224": "CLIP ViT-B (pre-norm)",
    "vit_small_patch14_reg4_dinov2": "DINOv2-S + 4 registers",
    "deit_small_distilled_patch16_224": "DeiT-S distilled (dist token)",
    "vit_medium_patch16_gap_256": "ViT-M GAP (no CLS, avg pool)",
    "vit_base_patch16_siglip_224": "SigLIP ViT-B (no CLS, attention pool)",
}
# Knobs that make every reducer actually reduce 36 patches (defaults are set for 196).
KNOBS: dict[str, dict] = {"ats": {"num_tokens": 20}, "patch_slimming": {"target_ratio": 0.6}}


def img_size(backbone: str) -> int:
    return 84 if "patch14" in backbone else 96


# Every model at width 192 with 3 heads: what a reducer must handle (prefix tokens, pooling, LayerScale, pre-norm,
# 12 blocks for the methods' block schedules) is the architecture, not the width, and the Base models at full width
# would make this the slowest file of the suite.
WIDTH = {"embed_dim": 192, "num_heads": 3}


@functools.cache
def _untrained(backbone: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(backbone, img_size=img_size(backbone), num_classes=10, **WIDTH).eval()


@functools.cache
def cell(reducer: str, backbone: str) -> str:
    """``ok`` or the reducer's one-line rejection; any other failure propagates (and fails the test)."""
    import copy
    import tempfile

    vit = copy.deepcopy(_untrained(backbone))
    try:
        model = tokred.patch(vit, reducer, **KNOBS.get(reducer, {}))
    except UnsupportedBackbone as err:
        return f"rejected: {err}"
    model = model.deployable()
    size = img_size(backbone)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    analytic, counted = model.cost().gmacs, counted_gmacs(model, size)
    assert analytic == pytest.approx(counted, rel=5e-3), f"{reducer} on {backbone}: analytic {analytic} != {counted}"
    with tempfile.TemporaryDirectory() as tmp:
        tokred.save(model, tmp, backbone_kwargs=WIDTH)
        loaded = tokred.load(tmp)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), logits)
    return "ok"


@pytest.mark.parametrize("backbone", list(BACKBONES))
@pytest.mark.parametrize("reducer", available_reducers())
def test_cell_is_ok_or_a_one_line_rejection(reducer, backbone):
    result = cell(reducer, backbone)
    if result != "ok":
        message = result.removeprefix("rejected: ")
        assert "\n" not in message and f"reducer={reducer}" in message and len(message) < 300, message


def matrix_markdown() -> str:
    """The README table: one row per backbone, one column per reducer; rejections as numbered footnotes."""
    reducers = available_reducers()
    notes: list[str] = []
    rows = []
    for backbone, label in BACKBONES.items():
        cells = []
        for reducer in reducers:
            result = cell(reducer, backbone)
            if result == "ok":
                cells.append("ok")
                continue
            # One footnote per distinct reason: the message without the backbone-specific tail.
            reason = re.sub(r"; backbone .*", "", result.removeprefix("rejected: "))
            if reason not in notes:
                notes.append(reason)
            cells.append(f"no ({notes.index(reason) + 1})")
        rows.append(f"| `{backbone}` | {label} | " + " | ".join(cells) + " |")
    header = "| timm backbone | what it is | " + " | ".join(reducers) + " |"
    rule = "|---|---|" + "---|" * len(reducers)
    footnotes = [f"{i + 1}. {note}" for i, note in enumerate(notes)]
    return "\n".join([header, rule, *rows, "", *footnotes]).rstrip() + "\n"


def test_readme_shows_the_current_matrix():
    table = matrix_markdown()
    text = README.read_text()
    start, end = (text.index(m) for m in MARKERS)
    current = text[start + len(MARKERS[0]) : end].strip("\n") + "\n"
    if os.environ.get("TOKRED_UPDATE_README"):
        README.write_text(text[: start + len(MARKERS[0])] + "\n" + table + text[end:])
        return
    assert current == table, "README support matrix is stale: run `make support-matrix` and commit README.md"
