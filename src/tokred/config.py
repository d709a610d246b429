"""Where the Hydra configs live, how they are composed outside ``@hydra.main``, and up-front validation."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import NoReturn, Sequence

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from tokred.reducers import reducer_config

GROUPS = ("backbone", "reducer", "dataset", "optim", "trainer", "logger", "experiment")


def conf_dir() -> Path:
    """``tokred/conf`` inside an installed wheel, else the repository's ``conf/`` (editable installs, checkouts)."""
    packaged = Path(__file__).resolve().parent / "conf"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "conf"


def group_choices(group: str) -> list[str]:
    root = conf_dir() / group
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


class ConfigError(ValueError):
    """A bad config value; the message names the key, the value and the valid choices or range."""


def check_group_overrides(overrides: Sequence[str]) -> None:
    """Reject ``group=unknown`` before Hydra prints a multi-line error: one line naming the valid choices."""
    for override in overrides:
        match = re.fullmatch(r"\+?(\w+)=([\w/.-]+)", override)
        if match and match.group(1) in GROUPS:
            group, choice = match.groups()
            if choice != "null" and choice not in group_choices(group):
                raise ConfigError(f"unknown {group} {choice!r}; choose one of: {', '.join(group_choices(group))}")


def validate(cfg: DictConfig) -> None:
    """Check values Hydra cannot: cross-field consistency and ranges. Raises :class:`ConfigError`."""
    img, patch = int(cfg.backbone.img_size), int(cfg.backbone.patch_size)
    if img % patch:
        raise ConfigError(f"backbone.img_size={img} is not divisible by the patch size {patch}; "
                          f"use a multiple of {patch}, e.g. {img // patch * patch}")
    if "img_size" in cfg.dataset and int(cfg.dataset.img_size) != img:
        raise ConfigError(f"dataset.img_size={cfg.dataset.img_size} differs from backbone.img_size={img}")
    for key in ("batch_size",):
        if int(cfg.dataset[key]) < 1:
            raise ConfigError(f"dataset.{key}={cfg.dataset[key]} must be >= 1")
    if float(cfg.optim.lr) <= 0:
        raise ConfigError(f"optim.lr={cfg.optim.lr} must be > 0")
    if cfg.optim.get("scheduler", "cosine") not in ("cosine", "constant"):
        raise ConfigError(f"optim.scheduler={cfg.optim.scheduler!r}; choose one of: cosine, constant")
    try:
        reducer_config(cfg.reducer)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def compose_config(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """The config ``tokred-train <overrides>`` would run, without starting a run (tests, tokred-flops)."""
    check_group_overrides(overrides)
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides), return_hydra_config=False)


def fail(program: str, err: BaseException) -> NoReturn:
    print(f"{program}: error: {err}", file=sys.stderr)
    sys.exit(2)
