"""``tokred-train [overrides]``: train a backbone x reducer x dataset, every phase of the reducer's pipeline."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from tokred.backbones import CheckpointError
from tokred.config import ConfigError, check_group_overrides, conf_dir, fail, validate
from tokred.training.run import train

log = logging.getLogger("tokred")
USER_ERRORS = (ConfigError, CheckpointError, ValueError, FileNotFoundError)


@hydra.main(config_path=str(conf_dir()), config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    try:
        validate(cfg)
        summary = train(cfg)
    except USER_ERRORS as err:
        fail("tokred-train", err)
    acc = summary.get("val/acc1")
    log.info("done: val top-1 %s, %.3f GMACs, %.2f M params", "n/a" if acc is None else f"{100 * acc:.2f}%",
             summary["model/gmacs"], summary["model/params_m"])
    log.info("run directory: %s (checkpoints/, export/, summary.json)", summary["run_dir"])
    return acc  # Hydra sweepers (Optuna) optimise the returned value


def main() -> None:
    try:
        check_group_overrides(sys.argv[1:])
    except ConfigError as err:
        fail("tokred-train", err)
    _hydra_main()


if __name__ == "__main__":
    main()
