"""Standalone deployable checkpoints: ``config.json`` + ``model.safetensors``.

The directory holds everything needed to rebuild the deployable model (backbone config, reducer config and
searched structure) and its tensors in safetensors, so loading it never unpickles anything and needs no training code
or teacher.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from tokred.backbones import CheckpointError, create_backbone
from tokred.io import atomic_write, atomic_write_json
from tokred.reducers.base import TokenReducer

FORMAT_VERSION = 1


def save_deployable(model: TokenReducer, directory: Path, cfg: Mapping[str, Any]) -> Path:
    """Write ``model.deployable()`` to ``directory``; files are replaced atomically."""
    deploy = model.deployable()
    config = {
        "format_version": FORMAT_VERSION,
        "backbone": {**cfg["backbone"], "pretrained": False, "checkpoint": None},
        "reducer": cfg["reducer"],
        "num_classes": deploy.vit.num_classes,
        "structure": deploy.structure(),
    }
    tensors = {k: v.detach().contiguous().cpu() for k, v in deploy.state_dict().items()}
    atomic_write(directory / "model.safetensors", lambda p: save_file(tensors, str(p)))
    atomic_write_json(directory / "config.json", config)
    return directory


def load_deployable(directory: str | Path) -> nn.Module:
    """Rebuild an exported model in eval mode."""
    from tokred.reducers import create_reducer  # the registry imports every reducer; only needed here

    directory = Path(directory)
    config_path, weights_path = directory / "config.json", directory / "model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise CheckpointError(
            f"{str(directory)!r} is not an exported tokred model (needs config.json and "
            "model.safetensors; export one with tokred-train, it writes <run_dir>/export)"
        )
    config = json.loads(config_path.read_text())
    vit = create_backbone(config["backbone"], config["num_classes"])
    model = create_reducer(config["reducer"], vit)
    model.load_structure(config["structure"])
    deploy = model.deployable()
    try:
        deploy.load_state_dict(load_file(str(weights_path)))
    except RuntimeError as err:
        raise CheckpointError(
            f"{str(weights_path)!r} does not match its config.json ({str(err).splitlines()[0]})"
        ) from None
    return deploy.eval()
