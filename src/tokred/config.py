"""Where the Hydra configs live, how they are composed outside ``@hydra.main``, and up-front validation."""

from __future__ import annotations

import difflib
import errno
import hashlib
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tokred.reducers import reducer_config
from tokred.reducers.sit import check_teacher

GROUPS = ("backbone", "reducer", "dataset", "optim", "trainer", "logger", "callbacks", "experiment")
MAX_DIRNAME = 200  # under the 255-byte name limit of common filesystems


def job_dirname(overrides: str) -> str:
    """A multirun job's directory name from its overrides (``hydra.job.override_dirname``): one path component.

    Slashes in values (checkpoint or data paths) would nest directories, so they become ``_``; a name longer than
    MAX_DIRNAME keeps its start and ends with a hash of the whole, so it stays unique and the same on every launch
    (re-launched sweeps find their finished and interrupted jobs by this name).
    """
    name = overrides.replace("/", "_")
    if len(name.encode()) <= MAX_DIRNAME:
        return name
    digest = hashlib.sha1(overrides.encode()).hexdigest()[:12]
    return name.encode()[: MAX_DIRNAME - 13].decode(errors="ignore") + "-" + digest


# Referenced by conf/train.yaml (hydra.sweep.subdir); registered on import, which every tokred process (launcher
# workers included, as they unpickle the task function) does before Hydra resolves the job's directory.
OmegaConf.register_new_resolver("tokred.job_dirname", job_dirname, replace=True)


def conf_dir() -> Path:
    """``tokred/conf`` inside an installed wheel, else the repository's ``conf/`` (editable installs, checkouts)."""
    packaged = Path(__file__).resolve().parent / "conf"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "conf"


def group_choices(group: str) -> list[str]:
    """Config names of ``group``; files whose name starts with ``_`` are shared bases, not choices."""
    root = conf_dir() / group
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml") if not p.name.startswith("_"))


class ConfigError(ValueError):
    """A bad config value; the message names the key, the value and the valid choices or range."""


def null_groups(overrides: Sequence[str]) -> list[str]:
    """``logger=null`` / ``callbacks=null`` as Hydra spells "no entry from this group" (``~logger``): Hydra itself
    refuses ``<group>=null`` on the command line."""
    return [
        f"~{o.split('=', 1)[0]}" if re.fullmatch(r"\w+=null", o) and o.split("=", 1)[0] in GROUPS else o
        for o in overrides
    ]


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
        raise ConfigError(
            f"backbone.img_size={img} is not divisible by the patch size {patch}; "
            f"use a multiple of {patch}, e.g. {img // patch * patch}"
        )
    if "img_size" in cfg.dataset and int(cfg.dataset.img_size) != img:
        raise ConfigError(f"dataset.img_size={cfg.dataset.img_size} differs from backbone.img_size={img}")
    batch = int(cfg.dataset.batch_size)
    if batch < 1:
        raise ConfigError(f"dataset.batch_size={batch} must be >= 1")
    aug = cfg.dataset.get("aug") or {}
    if (aug.get("mixup", 0) or aug.get("cutmix", 0)) and batch % 2:
        raise ConfigError(
            f"dataset.batch_size={batch} must be even with mixup/cutmix (timm pairs each image with "
            f"another); use {batch + 1}, or set dataset.aug.mixup=0 dataset.aug.cutmix=0"
        )
    if "train_size" in cfg.dataset and int(cfg.dataset.train_size) < batch:
        raise ConfigError(
            f"dataset.train_size={cfg.dataset.train_size} is smaller than dataset.batch_size={batch}; "
            "training drops incomplete batches, so no step would run: lower the batch size"
        )
    every = cfg.get("checkpoint", {}).get("every_n_train_steps", 0)
    if int(every) < 0:
        raise ConfigError(f"checkpoint.every_n_train_steps={every} must be >= 0 (0: save at epoch ends only)")
    if float(cfg.optim.lr) <= 0:
        raise ConfigError(f"optim.lr={cfg.optim.lr} must be > 0")
    if cfg.optim.get("scheduler", "cosine") not in ("cosine", "constant"):
        raise ConfigError(f"optim.scheduler={cfg.optim.scheduler!r}; choose one of: cosine, constant")
    try:
        reducer_config(cfg.reducer)
        if "ckpt_path" in cfg:  # tokred-train's config; tokred-flops and the benchmark build models, train none
            check_teacher(cfg)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _flat_keys(cfg: Any, prefix: str = "") -> list[str]:
    if not isinstance(cfg, dict):
        return [prefix[:-1]]
    return [k for key, value in cfg.items() for k in _flat_keys(value, f"{prefix}{key}.")] or [prefix[:-1]]


def _compose(overrides: Sequence[str], config_name: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides), return_hydra_config=False)


def _value_overrides(overrides: Sequence[str]) -> list[tuple[str, str]]:
    """(key, override) of the ``key=value`` overrides that set a value rather than choose a config group."""
    pairs = []
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        if "=" in override and key not in GROUPS and not key.startswith("hydra"):
            pairs.append((key, override))
    return pairs


def compose_config(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """The config ``tokred-<command> <overrides>`` would run, without starting it (the CLIs' up-front check, tests).

    Hydra's and OmegaConf's multi-line errors (an unknown key, bad override syntax) become one-line ConfigErrors
    naming the closest valid keys, and a value of the wrong type for any key (``trainer.max_epochs=abc``) is refused
    naming the key, before anything runs.
    """
    overrides = null_groups(overrides)
    check_group_overrides(overrides)
    values = _value_overrides(overrides)
    try:
        cfg = _compose(overrides, config_name)
    except (HydraException, OmegaConfBaseException) as err:
        cause = err.__cause__ or err
        key = getattr(cause, "full_key", None) or next((k for k, _ in values if f"'{k}'" in str(err)), None)
        if key is None:
            raise ConfigError(
                f"cannot read the overrides ({str(err).strip().splitlines()[0]}); write key=value, "
                "quoting values that hold spaces or brackets"
            ) from None
        groups = [o for o in overrides if (o.lstrip("+~").split("=", 1)[0] in GROUPS)]
        known = _flat_keys(OmegaConf.to_container(_compose(groups, config_name)))
        close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(
            f"{key!r} is not a setting of tokred-{config_name}; {hint}(+{key}=... adds a new key)"
        ) from None
    typed = [(k, o) for k, o in values if isinstance(OmegaConf.select(cfg, k, throw_on_missing=False), str)]
    if typed:  # only a string can be a wrong type here; compare with the value it replaces
        defaults = _compose([o for o in overrides if o not in {o for _, o in typed}], config_name)
        for key, _ in typed:
            default = OmegaConf.select(defaults, key, throw_on_missing=False)
            if isinstance(default, (int, float)):
                value = OmegaConf.select(cfg, key)
                kind = "a boolean" if isinstance(default, bool) else "a number"
                raise ConfigError(f"{key}={value!r} must be {kind}, e.g. {key}={str(default).lower()}")
    return cfg


def wants_help(args: Sequence[str]) -> bool:
    return any(a in ("-h", "--help") for a in args)


def print_help(program: str, config_name: str) -> None:
    """``--help`` of the commands that compose their config directly: the usage line, then the config file itself,
    whose comments document every key."""
    print(f"usage: {program} [key=value ...]\n\nKeys and defaults (conf/{config_name}.yaml):\n")
    print((conf_dir() / f"{config_name}.yaml").read_text())


def hydra_flags(args: Sequence[str]) -> bool:
    """Whether a ``@hydra.main`` command line holds Hydra's own flags (``--help``, ``--cfg job``, ``--info`` ...):
    those print and exit inside Hydra, so the up-front checks of a run must let them through."""
    return any(a.startswith("-") and a not in ("-m", "--multirun") for a in args)


def check_overrides(args: Sequence[str], config_name: str) -> None:
    """A command line's overrides compose (see :func:`compose_config`); sweeps (``-m``) are checked per job, and
    Hydra's own flags (``--help``, ``--cfg job``, ``--info`` ...) are left to Hydra."""
    if hydra_flags(args):
        return
    if any(a in ("-m", "--multirun") for a in args):
        check_group_overrides(args)
        return
    compose_config([a for a in args if not a.lstrip("+~").startswith("hydra")], config_name)


def check_writable(directory: Path) -> None:
    """Fail with the fix, before Hydra creates the run directory (with a traceback), where runs cannot be written:
    a read-only file system, no permission, or a file in the way."""
    directory = Path(directory).absolute()
    existing = next(p for p in (directory, *directory.parents) if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "a file is in the way", str(existing))
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise ConfigError(
            f"cannot write runs under {directory}: {existing} is not writable ({err.strerror}); pass "
            "paths.root=<a writable directory> (or set TOKRED_ROOT)"
        ) from None


def runs_root(overrides: Sequence[str] = ()) -> Path:
    """The directory that holds the run directories of this config: the parent of ``hydra.run.dir``."""
    check_group_overrides(overrides)
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
    return Path(cfg.hydra.run.dir).parent


def discard_refused_run() -> None:
    """Remove what Hydra created for a run that was refused before it wrote anything: a fresh run directory holding
    only Hydra's config copy and log file, or the ``.hydra/resume-*`` copy a refused resume added to an existing run.
    Refused bad input must not leave empty run directories behind (or clutter a run it did not continue)."""
    if not HydraConfig.initialized():
        return
    hydra = HydraConfig.get()
    run_dir = Path(hydra.runtime.output_dir)
    if not run_dir.is_dir():
        return
    if {p.name for p in run_dir.iterdir()} <= {".hydra", f"{hydra.job.name}.log"}:
        shutil.rmtree(run_dir, ignore_errors=True)
    elif hydra.output_subdir and Path(hydra.output_subdir).name.startswith("resume-"):
        shutil.rmtree(run_dir / hydra.output_subdir, ignore_errors=True)
        log_file = run_dir / f"{hydra.job.name}.log"
        if log_file.is_file() and not log_file.stat().st_size:  # created by this launch: a run's own log has lines
            log_file.unlink()


def quiet_libraries(verbose: bool) -> None:
    """Keep Lightning's and wandb's per-fit notices (accelerator lines, sync hints) out of the output unless
    ``verbose=true``: each phase prints about ten of them, and they hide tokred's own lines."""
    level = logging.INFO if verbose else logging.WARNING
    for name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(level)
    if not verbose:
        os.environ.setdefault("WANDB_SILENT", "true")


def fail(program: str, err: BaseException | str, code: int = 2) -> NoReturn:
    """Print ``<program>: error: <message>`` (one line) and exit; 2 for bad input, 1 for a failed run."""
    message = str(err).strip()
    print(f"{program}: error: {message.splitlines()[0] if message else type(err).__name__}", file=sys.stderr)
    sys.exit(code)
