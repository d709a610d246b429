"""tokred without its command line: apply a reducer to a timm ViT you already hold, save it, load it back.

vit = timm.create_model("deit_small_patch16_224", pretrained=True)
fast = tokred.patch(vit, "tome", r=13).eval()      # runs ToMe on vit's own weights
tokred.save(fast, "deit_s_tome")                    # config.json + model.safetensors, as tokred-train exports
same = tokred.load("deit_s_tome")
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from timm.models.vision_transformer import VisionTransformer
from torch import nn

from tokred.export import load_deployable, save_deployable
from tokred.reducers import create_reducer
from tokred.reducers.base import TokenReducer


def patch(model: VisionTransformer, reducer: str, **knobs: Any) -> TokenReducer:
    """``model`` run through ``reducer`` (a registered name) with the given knobs (``conf/reducer/<name>.yaml``).

    The reducer wraps ``model`` itself: weights are shared, nothing is copied, and ``model`` still works unpatched.
    Training-free methods (tome, topk, evit, ats) are ready to evaluate; the others are in the state their pipeline
    starts from (``tokred-train`` runs their searches and fine-tuning).
    """
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"tokred.patch needs a timm VisionTransformer, got {type(model).__name__}")
    return create_reducer({"name": reducer, **knobs}, model)


def save(model: TokenReducer, directory: str | Path, backbone_kwargs: dict[str, Any] | None = None) -> Path:
    """Write ``model``'s deployable form to ``directory`` (what :func:`load` and ``tokred-eval`` read).

    The backbone is recorded by its timm architecture name and image size. A model built with architecture keyword
    arguments beyond timm's registered defaults (``timm.create_model(name, embed_dim=192)``) needs them passed as
    ``backbone_kwargs`` for :func:`load` to rebuild it; without them loading fails with a shape-mismatch error.
    """
    vit = model.vit
    backbone = {
        "name": vit.pretrained_cfg["architecture"],
        "model": vit.pretrained_cfg["architecture"],
        "img_size": int(vit.patch_embed.img_size[0]),
        "patch_size": int(vit.patch_embed.patch_size[0]),
        "kwargs": dict(backbone_kwargs or {}),
    }
    config = {"backbone": backbone, "reducer": asdict(model.cfg)}
    return save_deployable(model, Path(directory), config)


def load(directory: str | Path) -> nn.Module:
    """The model exported to ``directory`` (by :func:`save` or ``tokred-train``'s ``<run_dir>/export``), in eval
    mode; loading reads safetensors and JSON only."""
    return load_deployable(directory)
