"""ONNX export: every registered reducer's deployable model runs in onnxruntime as in PyTorch (at any batch size), the
one that cannot be exported says why, and ``tokred-eval export=onnx`` writes a model onnxruntime loads."""

from __future__ import annotations

import importlib.util
import json

import pytest
import timm
import torch

from conftest import FAST, peaked, run_cli
from tokred.cli import eval as eval_cli
from tokred.export import OnnxExportError, export_onnx, onnx_session, save_deployable
from tokred.reducers import available_reducers, create_reducer

IMG = 64
# The tiny backbone cut to 4 of its 12 blocks: export time grows with the graph (ToMe's 12-block graph takes 30 s of
# CPU in the ONNX optimiser alone), and 4 blocks hold every reducer's multi-location/multi-stage logic.
BACKBONE = {
    "name": "deit_tiny_cpu",
    "model": "deit_tiny_cpu_patch8_64",
    "img_size": IMG,
    "patch_size": 8,
    "kwargs": {"depth": 4},
}
# The default knobs but where they name blocks past the 4th, and where the default cannot build on the untrained
# backbone (as conftest's TINY_REDUCER): ATS's K must fit 65 tokens, SiT refuses a random teacher unless told.
KNOBS = {
    "ats": {"num_tokens": 24},
    "dynamicvit": {"pruning_loc": [1, 2]},
    "evit": {"locations": [1, 2]},
    "evo_vit": {"start_layer": 2},
    "sit": {"stage_blocks": [1, 1, 1, 1], "allow_random_teacher": True},
    "topk": {"locations": [1, 2]},
}
# Reducers whose forward cannot be one static graph, and the reason their export names.
NOT_EXPORTABLE = {"ats": "how many tokens it keeps depends on each image"}


@pytest.fixture
def onnxruntime():
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    return pytest.importorskip("onnxruntime")


def deployable(reducer: str) -> torch.nn.Module:
    """``reducer`` at its default (pre-search) structure on the 4-block backbone; sharpened attention, so that
    score-based choices are far from ties and cannot flip between two runtimes' rounding."""
    torch.manual_seed(0)
    vit = peaked(timm.create_model(BACKBONE["model"], num_classes=10, **BACKBONE["kwargs"]))
    return create_reducer({"name": reducer, **KNOBS.get(reducer, {})}, vit).deployable().eval()


@pytest.mark.parametrize("reducer", available_reducers())
def test_every_reducer_runs_in_onnxruntime_as_in_pytorch(reducer, onnxruntime):
    model = deployable(reducer)
    if reducer in NOT_EXPORTABLE:
        with pytest.raises(OnnxExportError) as err:
            onnx_session(model, IMG)
        message = str(err.value)
        assert f"reducer={reducer} cannot be exported to ONNX" in message and NOT_EXPORTABLE[reducer] in message
        assert "\n" not in message
        return
    run = onnx_session(model, IMG)
    torch.manual_seed(1)
    for batch in (1, 3):  # exported at batch 2: the batch size is free
        images = torch.randn(batch, 3, IMG, IMG)
        with torch.no_grad():
            expected = model(images)
        torch.testing.assert_close(run(images), expected, atol=1e-4, rtol=1e-4)


class Ranks(torch.nn.Module):
    """Stable argsorts, both ways, of rounded values: many ties, which only a stable sort orders by index."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(()))  # the export takes its device from the parameters

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        scores = images.flatten(1).round()
        return torch.cat(
            [scores.argsort(dim=-1, descending=True, stable=True), scores.argsort(dim=-1, stable=True)], -1
        )


def test_stable_sorts_stay_stable_in_onnxruntime(onnxruntime):
    images = 2 * torch.randn(3, 3, 4, 4)
    torch.testing.assert_close(onnx_session(Ranks(), 4)(images), Ranks()(images), rtol=0, atol=0)


def test_tokred_eval_writes_an_onnx_model_and_refuses_other_formats(tmp_path, capsys, onnxruntime):
    model = deployable("none")
    save_deployable(model, tmp_path / "export", {"backbone": BACKBONE, "reducer": {"name": "none"}})
    args = [f"ckpt_path={tmp_path / 'export'}", *FAST, f"paths.root={tmp_path}"]
    code, out, err = run_cli(eval_cli.main, capsys, *args, "export=onnx")
    assert code == 0, err[-2000:]
    written = json.loads(out.strip().splitlines()[-1])["onnx"]
    session = onnxruntime.InferenceSession(written, providers=["CPUExecutionProvider"])
    images = torch.randn(2, 3, IMG, IMG)
    (logits,) = session.run(["logits"], {"images": images.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logits), model(images), atol=1e-4, rtol=1e-4)

    code, _, err = run_cli(eval_cli.main, capsys, *args, "export=tflite")
    assert code == 2 and err.strip().splitlines()[-1] == (
        "tokred-eval: error: export=tflite: the one export format is onnx (export=onnx; null: none)"
    )


def test_missing_onnx_packages_and_old_torch_are_one_line_errors(monkeypatch):
    model = deployable("none")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "onnxruntime" else find_spec(name))
    with pytest.raises(OnnxExportError, match=r"^ONNX export needs onnxruntime: pip install 'tokred\[onnx\]'$"):
        onnx_session(model, IMG)
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)

    def export_of_torch_2_4(model, args, f=None, export_params=True, verbose=False):  # no dynamo=
        raise AssertionError("not to be called")

    monkeypatch.setattr(torch.onnx, "export", export_of_torch_2_4)
    with pytest.raises(OnnxExportError, match=r"needs torch>=2\.6, this is torch .* \(pip install -U torch\)$"):
        export_onnx(model, "unused.onnx", IMG)
