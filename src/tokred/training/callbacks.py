"""The ``callbacks`` config group (conf/callbacks/) built into Lightning callbacks, and the error handling shared with
the ``logger`` group: config entries with a ``_target_``, built with Hydra's instantiate."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback

from tokred.config import ConfigError

T = TypeVar("T")


def _one_line(err: BaseException) -> str:
    return re.sub(r"\s+", " ", str(err)).strip() or type(err).__name__


def instantiated(where: str, make: Callable[[], T]) -> T:
    """``make()``: Hydra's instantiate of the config entry at ``where`` (``callbacks.<name>``, ``logger``), or a call
    of what it built. A failure becomes one :class:`ConfigError` line naming the entry and the fix; a missing optional
    package is named with the library's own ``pip install`` hint."""
    try:
        return make()
    except InstantiationException as wrapped:
        if str(wrapped).startswith("Error locating target"):
            raise ConfigError(
                f"{where}._target_ cannot be imported ({_one_line(wrapped.__cause__ or wrapped)}); "
                "give the full dotted path of an installed class or function"
            ) from None
        err = wrapped.__cause__ or wrapped
    except (ImportError, TypeError, ValueError) as raw:  # from calling a partial, or a class built outside Hydra
        err = raw
    if isinstance(err, ConfigError):
        raise err from None
    if isinstance(err, ImportError):
        raise ConfigError(f"{where} needs a package that is not installed: {_one_line(err)}") from None
    raise ConfigError(f"{where} cannot be built ({type(err).__name__}: {_one_line(err)}); fix its keys") from None


def build_callbacks(cfg: Mapping[str, Any] | None, dirpath: Path | None = None) -> list[Callback]:
    """The callbacks of ``cfg`` (``cfg.callbacks``: ``{name: {_target_: ..., <arguments>}}``), in config order.

    An entry with ``_partial_: true`` is a factory of a fit's callbacks that need the phase's checkpoint directory
    (tokred's checkpoints; a user's own ModelCheckpoint): it is called with ``dirpath`` as its first argument (that
    of ModelCheckpoint and of :func:`tokred.training.phases.checkpoint_callbacks`), and left out when there is no
    ``dirpath`` (an evaluation). An entry may build one callback or a list of them; a null entry is off.
    """
    callbacks: list[Callback] = []
    for name, entry in (cfg or {}).items():
        if entry is None:
            continue
        where = f"callbacks.{name}"
        if not isinstance(entry, Mapping) or "_target_" not in entry:
            raise ConfigError(
                f"{where} has no _target_; give the class to build ({where}._target_=<dotted path>) "
                f"or drop the entry with ~{where}"
            )
        if entry.get("_partial_", False):
            if dirpath is None:
                continue
            # instantiated() calls each lambda at once, inside this iteration (hence the noqa: B023)
            factory = instantiated(where, lambda: instantiate(entry, _convert_="all"))  # noqa: B023
            built = instantiated(where, lambda: factory(dirpath))  # noqa: B023
        else:
            built = instantiated(where, lambda: instantiate(entry, _convert_="all"))  # noqa: B023
        for callback in built if isinstance(built, list) else [built]:
            if not isinstance(callback, Callback):
                raise ConfigError(
                    f"{where}._target_={entry['_target_']} built a {type(callback).__name__}, not a Lightning Callback"
                )
            callbacks.append(callback)
    return callbacks


def batch_size(batch: tuple[Any, Any]) -> int:
    """Images in an (images, labels) batch: ThroughputMonitor's ``batch_size_fn``."""
    return len(batch[0])


class TrainThroughput(Callback):
    """Training images per second over the fit's training batches only (forward, backward, optimiser step; not the
    validation, data-loader start-up or checkpoint writes between them): ``train/img_s`` in the run's summary, the
    number the benchmark's training rows predict. Host clock per batch; on a GPU the queue is bounded, so over a
    fit's many batches the sum tracks the device time without a synchronisation per step."""

    def __init__(self) -> None:
        self.images = 0
        self.seconds = 0.0
        self._start = 0.0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.seconds += time.perf_counter() - self._start
        self.images += len(batch[0]) * trainer.world_size

    @property
    def img_s(self) -> float | None:
        return self.images / self.seconds if self.seconds > 0 else None
