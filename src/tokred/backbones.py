"""Backbones: stock timm VisionTransformers built by ``timm.create_model``, plus local checkpoint loading.

``deit_tiny_cpu_patch8_64`` is registered with timm here so it is created exactly like the real DeiTs: a DeiT-shaped
model (12 blocks, CLS token, pre-norm) narrow enough to train on a laptop CPU on 64-px images.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import resample_abs_pos_embed
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

# timm looks up a module-level `default_cfgs` when registering; no weights are published for this model.
default_cfgs = generate_default_cfgs(
    {
        "deit_tiny_cpu_patch8_64.untrained": {
            "num_classes": 10,
            "input_size": (3, 64, 64),
            "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }
)


@register_model
def deit_tiny_cpu_patch8_64(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    if pretrained:
        raise ValueError("deit_tiny_cpu has no pretrained weights; train it (make train) or set backbone.checkpoint")
    args = dict(img_size=64, patch_size=8, embed_dim=96, depth=12, num_heads=3, mlp_ratio=4.0)
    return build_model_with_cfg(VisionTransformer, "deit_tiny_cpu_patch8_64", pretrained, **{**args, **kwargs})


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the requested backbone; the message says how to fix it."""


def create_backbone(cfg: Mapping[str, Any], num_classes: int) -> VisionTransformer:
    """Build ``cfg.model`` with ``num_classes`` outputs and, if given, load ``cfg.checkpoint``."""
    name = cfg["model"]
    if name not in timm.list_models() and name not in timm.list_models(pretrained=True):
        raise ValueError(f"backbone.model={name!r} is not a timm model; see timm.list_models('*deit*')")
    kwargs = dict(cfg.get("kwargs") or {})
    model = timm.create_model(
        name,
        pretrained=bool(cfg.get("pretrained", False)),
        num_classes=num_classes,
        img_size=cfg["img_size"],
        drop_path_rate=cfg.get("drop_path_rate", 0.0),
        **kwargs,
    )
    if not isinstance(model, VisionTransformer):
        raise ValueError(
            f"backbone.model={name!r} is a {type(model).__name__}; tokred reducers need a timm "
            "VisionTransformer (ViT/DeiT/DeiT-III family)"
        )
    if cfg.get("checkpoint"):
        load_backbone_checkpoint(model, cfg["checkpoint"], reset_head=bool(cfg.get("reset_head", False)))
    return model


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a torch checkpoint, loaded without unpickling arbitrary objects."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; pass an existing .safetensors/.pth/.ckpt file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r} ({type(err).__name__}: {str(err).splitlines()[0]}); "
            "is it corrupt or truncated? Re-download or re-export it"
        ) from None
    for key in ("state_dict", "model", "model_state"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"checkpoint {str(path)!r} holds no state_dict of tensors")
    return obj


def _strip_prefixes(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Map keys of tokred/Lightning/DDP checkpoints (``model.vit.``, ``module.``) onto timm's names."""
    for prefix in ("model.vit.", "vit.", "model.", "module."):
        if not any(k in expected for k in state) and any(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def load_backbone_checkpoint(model: VisionTransformer, path: str | Path, reset_head: bool = False) -> None:
    expected = model.state_dict()
    state = _strip_prefixes(read_state_dict(path), set(expected))
    if "pos_embed" in state and state["pos_embed"].shape != expected["pos_embed"].shape:
        grid = model.patch_embed.grid_size
        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"], new_size=grid, num_prefix_tokens=0 if model.no_embed_class else model.num_prefix_tokens
        )
    head_keys = [k for k in ("head.weight", "head.bias") if k in state]
    if reset_head:
        for k in head_keys:
            state.pop(k)
    elif head_keys and state["head.weight"].shape[0] != expected["head.weight"].shape[0]:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has a {state['head.weight'].shape[0]}-class head but the dataset has "
            f"{expected['head.weight'].shape[0]} classes; set backbone.reset_head=true to fine-tune with a new head"
        )
    missing = sorted(set(expected) - set(state) - ({"head.weight", "head.bias"} if reset_head else set()))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or mismatched:
        detail = "; ".join(
            f"{label}: {', '.join(keys[:4])}{' …' if len(keys) > 4 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
            if keys
        )
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not match backbone ({detail}); "
            "is it from another backbone? Set backbone=<the one it was trained with>"
        )
    model.load_state_dict(state, strict=not reset_head)


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode, no gradients: how teachers are held."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module
