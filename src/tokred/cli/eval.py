"""``tokred-eval ckpt_path=<...> [dataset=...] [overrides]``: top-1, top-5, GMACs and params of a trained model;
``tokred-eval backbone=<name> backbone.pretrained=true|backbone.checkpoint=<file> reducer=<name> [knobs]``: the same
for a training-free reducer applied to a backbone's own weights, with no tokred training at all.

``ckpt_path`` may be a Lightning checkpoint (``checkpoints/<phase>/{best,last}.ckpt``), a phase snapshot
(``phases/<phase>.pt``), an export directory (``export/``, from :mod:`tokred.export`) or a run directory (its
``export/``). The model is rebuilt from what the checkpoint records; weights load with ``weights_only=True`` or from
safetensors. Prints a table and, last, one JSON line; logs to the configured logger and writes ``eval.json``.

``export=onnx`` also writes the model as ``model.onnx`` next to ``eval.json`` (:func:`tokred.export.export_onnx`, needs
``pip install 'tokred[onnx]'``), before evaluating it: a model that cannot be exported fails at once.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from tokred.backbones import CheckpointError, create_backbone
from tokred.cli.train import USER_ERRORS
from tokred.config import (
    ConfigError,
    check_overrides,
    conf_dir,
    discard_refused_run,
    fail,
    hydra_flags,
    null_groups,
    quiet_libraries,
)
from tokred.data import build_datamodule
from tokred.export import export_onnx, load_deployable
from tokred.io import atomic_write_json
from tokred.reducers import create_reducer, is_training_free
from tokred.reducers.base import TokenReducer
from tokred.training.loggers import build_logger, own_wandb_service
from tokred.training.phases import read_phase
from tokred.training.run import build_model, evaluate, model_meta, model_stats


def _rebuild(
    meta: dict[str, Any], structure: dict[str, Any], state: dict[str, torch.Tensor], path: Path
) -> TokenReducer:
    model = create_reducer(meta["reducer"], create_backbone(meta["backbone"], int(meta["num_classes"])))
    model.load_structure(structure)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(
            f"{path} does not match the model it describes ({str(err).splitlines()[0]}); "
            "is it damaged? Evaluate the run's export/ directory instead"
        ) from None
    return model.deployable()


def load_checkpoint(path: str | Path) -> tuple[TokenReducer, dict[str, Any]]:
    """The deployable model stored at ``path`` and its metadata (backbone, reducer, num_classes)."""
    path = Path(path).expanduser()
    if path.is_dir() and not (path / "config.json").is_file() and (path / "export" / "config.json").is_file():
        path = path / "export"
    if path.is_dir():
        config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
        return load_deployable(path), {k: config.get(k) for k in ("backbone", "reducer", "num_classes")}
    if not path.is_file():
        raise CheckpointError(
            f"ckpt_path={path} does not exist; pass a run directory, its export/, a phases/*.pt "
            "or a checkpoints/*/*.ckpt file"
        )
    try:
        payload = read_phase(path) if path.suffix == ".pt" else torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"cannot read {path} ({type(err).__name__}); it is truncated or not a tokred "
            "checkpoint: evaluate the run's export/ directory instead"
        ) from None
    meta = payload.get("tokred") if isinstance(payload, dict) else None
    if not meta:
        raise CheckpointError(
            f"{path} records no tokred model config (not written by tokred-train); evaluate an "
            "export/ directory, or load the weights with backbone.checkpoint in tokred-train"
        )
    if path.suffix == ".pt":
        return _rebuild(meta, payload["structure"], payload["state_dict"], path), meta
    # Lightning checkpoints hold the TokredModule's tensors: the model's under "model.", plus any teacher's.
    state = {k[len("model.") :]: v for k, v in payload["state_dict"].items() if k.startswith("model.")}
    return _rebuild(meta, payload.get("tokred_structure", {}), state, path), meta


def _row(summary: dict[str, Any]) -> str:
    width = max(len(k) for k in summary)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in summary.items())


def apply_training_free(cfg: DictConfig, num_classes: int) -> tuple[TokenReducer, dict[str, Any]]:
    """``cfg.reducer`` applied to ``cfg.backbone``'s pretrained or given weights, deployable, and its metadata."""
    name, backbone = cfg.reducer.name, cfg.backbone.name
    if not is_training_free(name):
        raise ConfigError(
            f"reducer={name} needs training before it can be evaluated; run tokred-train "
            f"backbone={backbone} reducer={name} backbone.checkpoint=<weights>, then tokred-eval "
            "ckpt_path=<its run directory> (training-free: none, tome, topk, evit, ats)"
        )
    if not cfg.backbone.pretrained and not cfg.backbone.checkpoint:
        raise ConfigError(
            f"backbone={backbone} has no weights to evaluate; pass backbone.pretrained=true (timm's) "
            "or backbone.checkpoint=<file>"
        )
    if cfg.backbone.get("reset_head"):
        raise ConfigError("backbone.reset_head=true would evaluate a random classifier head; drop it")
    model = build_model(cfg, num_classes)
    trained_for = model.vit.pretrained_cfg.get("num_classes") if cfg.backbone.pretrained else num_classes
    if trained_for != num_classes:  # timm swaps in a random head of the requested size
        raise ConfigError(
            f"backbone={backbone}'s pretrained head has {trained_for} classes but dataset "
            f"{cfg.dataset.name} has {num_classes}; evaluate on the dataset it was trained on"
        )
    return model.deployable(), model_meta(cfg, num_classes)


@hydra.main(config_path=str(conf_dir()), config_name="eval", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    quiet_libraries(bool(cfg.get("verbose", False)))
    onnx_path = None
    try:
        if cfg.export not in (None, "onnx"):
            raise ConfigError(f"export={cfg.export}: the one export format is onnx (export=onnx; null: none)")
        if cfg.ckpt_path is None:  # training-free: main() made sure a backbone was chosen
            datamodule = build_datamodule(cfg.dataset)
            model, meta = apply_training_free(cfg, datamodule.num_classes)
        else:
            model, meta = load_checkpoint(cfg.ckpt_path)
            with open_dict(cfg):
                cfg.backbone = meta["backbone"]
                cfg.reducer = meta["reducer"]
            datamodule = build_datamodule(cfg.dataset)
        if datamodule.num_classes != int(meta["num_classes"]):
            raise CheckpointError(
                f"{cfg.ckpt_path} has a {meta['num_classes']}-class head but dataset {cfg.dataset.name} has "
                f"{datamodule.num_classes} classes; evaluate it on the dataset it was trained on"
                + (f" (dataset={meta['dataset']})" if meta.get("dataset") else "")
            )
        out_dir = Path(cfg.paths.output_dir)
        if cfg.export == "onnx" and rank_zero_only.rank == 0:  # DDP ranks would each write the same file
            onnx_path = export_onnx(model, out_dir / "model.onnx", int(cfg.backbone.img_size))
        logger = build_logger(cfg.get("logger"), out_dir)
        if logger is not None:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        metrics = evaluate(model, datamodule, cfg, out_dir, logger)
    except USER_ERRORS as err:
        discard_refused_run()
        fail("tokred-eval", err)
    stats = model_stats(model, int(cfg.backbone.img_size))
    summary = {
        "ckpt_path": str(cfg.ckpt_path) if cfg.ckpt_path else None,
        "backbone": meta["backbone"]["name"],
        "reducer": meta["reducer"]["name"],
        "reducer_knobs": meta["reducer"],
        "dataset": cfg.dataset.name,
        "val/acc1": metrics.get("val/acc1"),
        "val/acc5": metrics.get("val/acc5"),
        "test/acc1": metrics.get("test/acc1"),
        "test/acc5": metrics.get("test/acc5"),
        "model/gmacs": round(stats["model/gmacs"], 4),
        "model/gmacs_counted": round(stats["model/gmacs_counted"], 4),
        "model/params_m": round(stats["model/params_m"], 4),
        "onnx": str(onnx_path) if onnx_path else None,
    }
    if logger is not None:
        logger.finish(summary)
    if rank_zero_only.rank == 0:
        atomic_write_json(out_dir / "eval.json", summary)
        print(_row(summary))
        print(f"wrote {out_dir / 'eval.json'}")
        print(json.dumps(summary), flush=True)
    return summary["val/acc1"]


def main() -> None:
    sys.argv[1:] = null_groups(sys.argv[1:])  # logger=null -> ~logger, which Hydra accepts
    own_wandb_service()
    try:
        args = sys.argv[1:]
        check_overrides(args, "eval")
        from_checkpoint = any(a.startswith("ckpt_path=") for a in args)
        model_keys = [a.split("=", 1)[0] for a in args if a.lstrip("+~").startswith(("backbone", "reducer"))]
        if hydra_flags(args):
            pass
        elif from_checkpoint and model_keys:
            raise ConfigError(
                f"{model_keys[0]}: with ckpt_path the model comes from the checkpoint; drop "
                f"{model_keys[0]}, or drop ckpt_path to apply a training-free reducer to a backbone"
            )
        elif not from_checkpoint and not any(k == "backbone" for k in model_keys):
            raise CheckpointError(
                "tokred-eval needs a model: ckpt_path=<run dir | export/ | phases/<phase>.pt | "
                "checkpoints/<phase>/best.ckpt>, or backbone=<name> backbone.pretrained=true "
                "reducer=<training-free reducer>"
            )
    except USER_ERRORS as err:
        fail("tokred-eval", err)
    _hydra_main()


if __name__ == "__main__":
    main()
