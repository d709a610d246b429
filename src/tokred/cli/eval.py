"""``tokred-eval ckpt_path=<...> [dataset=...] [overrides]``: top-1, top-5, GMACs and params of a trained model.

``ckpt_path`` may be a Lightning checkpoint (``checkpoints/<phase>/{best,last}.ckpt``), a phase snapshot
(``phases/<phase>.pt``), an export directory (``export/``, from :mod:`tokred.export`) or a run directory (its
``export/``). The model is rebuilt from what the checkpoint records; weights load with ``weights_only=True`` or from
safetensors. Prints a table and, last, one JSON line; logs to the configured logger and writes ``eval.json``.
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
from tokred.config import check_overrides, conf_dir, discard_refused_run, fail, hydra_flags, quiet_libraries
from tokred.data import build_datamodule
from tokred.export import load_deployable
from tokred.io import atomic_write_json
from tokred.reducers import create_reducer
from tokred.reducers.base import TokenReducer
from tokred.training.loggers import build_logger, own_wandb_service
from tokred.training.phases import read_phase
from tokred.training.run import evaluate, model_stats


def _rebuild(meta: dict[str, Any], structure: dict[str, Any], state: dict[str, torch.Tensor],
             path: Path) -> TokenReducer:
    model = create_reducer(meta["reducer"], create_backbone(meta["backbone"], int(meta["num_classes"])))
    model.load_structure(structure)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{path} does not match the model it describes ({str(err).splitlines()[0]}); "
                              "is it damaged? Evaluate the run's export/ directory instead") from None
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
        raise CheckpointError(f"ckpt_path={path} does not exist; pass a run directory, its export/, a phases/*.pt "
                              "or a checkpoints/*/*.ckpt file")
    try:
        payload = read_phase(path) if path.suffix == ".pt" else torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot read {path} ({type(err).__name__}); it is truncated or not a tokred "
                              "checkpoint: evaluate the run's export/ directory instead") from None
    meta = payload.get("tokred") if isinstance(payload, dict) else None
    if not meta:
        raise CheckpointError(f"{path} records no tokred model config (not written by tokred-train); evaluate an "
                              "export/ directory, or load the weights with backbone.checkpoint in tokred-train")
    if path.suffix == ".pt":
        return _rebuild(meta, payload["structure"], payload["state_dict"], path), meta
    # Lightning checkpoints hold the TokredModule's tensors: the model's under "model.", plus any teacher's.
    state = {k[len("model."):]: v for k, v in payload["state_dict"].items() if k.startswith("model.")}
    return _rebuild(meta, payload.get("tokred_structure", {}), state, path), meta


def _row(summary: dict[str, Any]) -> str:
    width = max(len(k) for k in summary)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in summary.items())


@hydra.main(config_path=str(conf_dir()), config_name="eval", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    quiet_libraries(bool(cfg.get("verbose", False)))
    try:
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
        logger = build_logger(cfg.get("logger"), out_dir)
        if logger is not None:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        metrics = evaluate(model, datamodule, cfg, out_dir, logger)
    except USER_ERRORS as err:
        discard_refused_run()
        fail("tokred-eval", err)
    stats = model_stats(model, int(cfg.backbone.img_size))
    summary = {
        "ckpt_path": str(cfg.ckpt_path), "backbone": meta["backbone"]["name"], "reducer": meta["reducer"]["name"],
        "dataset": cfg.dataset.name, "val/acc1": metrics.get("val/acc1"), "val/acc5": metrics.get("val/acc5"),
        "model/gmacs": round(stats["model/gmacs"], 4), "model/gmacs_counted": round(stats["model/gmacs_counted"], 4),
        "model/params_m": round(stats["model/params_m"], 4),
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
    own_wandb_service()
    try:
        check_overrides(sys.argv[1:], "eval")
        if not hydra_flags(sys.argv[1:]) and not any(a.startswith("ckpt_path=") for a in sys.argv[1:]):
            raise CheckpointError("ckpt_path is required: tokred-eval ckpt_path=<run dir | export/ | phases/<phase>.pt | "
                                  "checkpoints/<phase>/best.ckpt>")
    except USER_ERRORS as err:
        fail("tokred-eval", err)
    _hydra_main()


if __name__ == "__main__":
    main()
