"""Reducer registry.

Every module in this package that defines a :class:`TokenReducer` subclass decorated with :func:`register_reducer`
is imported on first use, so a new method is one new file here plus ``conf/reducer/<name>.yaml``.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from tokred.reducers.base import ParamGroup, Phase, ReducerConfig, TokenReducer, TrainingFreeConfig

__all__ = [
    "Phase",
    "ParamGroup",
    "ReducerConfig",
    "TokenReducer",
    "available_reducers",
    "create_reducer",
    "is_training_free",
    "register_reducer",
    "reducer_class",
]

_REGISTRY: dict[str, type[TokenReducer]] = {}


def register_reducer(cls: type[TokenReducer]) -> type[TokenReducer]:
    if not cls.name:
        raise TypeError(f"{cls.__qualname__} needs a class attribute `name`")
    _REGISTRY[cls.name] = cls
    return cls


def _import_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


def available_reducers() -> list[str]:
    _import_all()
    return sorted(_REGISTRY)


def reducer_class(name: str) -> type[TokenReducer]:
    _import_all()
    if name not in _REGISTRY:
        raise ValueError(f"unknown reducer {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def is_training_free(name: str) -> bool:
    """Whether reducer ``name`` applies to a trained backbone as it is: its config declares it by deriving from
    :class:`TrainingFreeConfig` (``none`` trivially is)."""
    cls = reducer_class(name)
    return cls.name == "none" or issubclass(cls.Config, TrainingFreeConfig)


def reducer_config(cfg: Mapping[str, Any] | DictConfig) -> ReducerConfig:
    """Validate a reducer config against the reducer's dataclass: unknown knobs, wrong types, bad values."""
    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    cls = reducer_class(plain.get("name", "none"))
    schema = OmegaConf.structured(cls.Config)
    try:
        return OmegaConf.to_object(OmegaConf.merge(schema, plain))
    except OmegaConfBaseException as err:  # unknown knob or wrong type; omegaconf's message is multi-line
        first = str(err).strip().splitlines()[0]
        knob = f"reducer.{err.full_key}: " if getattr(err, "full_key", None) else ""
        raise ValueError(f"reducer={cls.name}: {knob}{first} (valid knobs: {', '.join(schema.keys())})") from None
    except ValueError as err:  # a range check in the reducer's Config.__post_init__
        raise ValueError(f"reducer={cls.name}: {err}") from None


def create_reducer(cfg: Mapping[str, Any] | DictConfig, vit: nn.Module) -> TokenReducer:
    """Wrap a stock timm VisionTransformer with the reducer ``cfg.name`` configured by ``cfg``."""
    config = reducer_config(cfg)
    return reducer_class(config.name)(vit, config)
