"""tokred.patch / save / load, and the README's example, which is executed as written (without the download)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import timm
import torch

import tokred

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    section = README.read_text().split("### From Python, on your own model", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "pretrained=True" in code
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(code.replace("pretrained=True", "pretrained=False"), namespace)  # noqa: S102 - our own README
    assert "2.71 GMACs" in capsys.readouterr().out
    x = torch.randn(2, 3, 224, 224)
    torch.testing.assert_close(namespace["same"](x), namespace["fast"](x))


def test_patch_shares_the_weights_and_leaves_the_model_working():
    vit = timm.create_model("deit_tiny_cpu_patch8_64", num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    before = vit(x)
    patched = tokred.patch(vit, "topk", keep_rate=1.0).eval()
    assert patched.vit is vit
    assert {p.data_ptr() for p in vit.parameters()} <= {p.data_ptr() for p in patched.parameters()}
    torch.testing.assert_close(patched(x), before)  # keep rate 1 is the neutral setting
    torch.testing.assert_close(vit(x), before)


def test_patch_refuses_what_it_cannot_patch():
    vit = timm.create_model("deit_tiny_cpu_patch8_64", num_classes=10)
    with pytest.raises(ValueError, match="unknown reducer 'tomee'"):
        tokred.patch(vit, "tomee")
    with pytest.raises(ValueError, match="valid knobs"):
        tokred.patch(vit, "tome", rr=3)
    with pytest.raises(TypeError, match="timm VisionTransformer"):
        tokred.patch(torch.nn.Linear(2, 2), "tome")
