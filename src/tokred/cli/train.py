"""``tokred-train [overrides]``: train a backbone x reducer x dataset, every phase of the reducer's pipeline.

User errors (bad config, missing or broken data, unusable checkpoints, a diverging loss) print one line,
``tokred-train: error: ...``, naming the fix.
"""

from __future__ import annotations

import errno
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, open_dict, read_write

from tokred.backbones import CheckpointError
from tokred.config import (
    ConfigError,
    check_overrides,
    check_writable,
    conf_dir,
    discard_refused_run,
    fail,
    hydra_flags,
    null_groups,
    quiet_libraries,
    runs_root,
    validate,
)
from tokred.data import DatasetError
from tokred.training.loggers import own_wandb_service
from tokred.training.module import NonFiniteLossError
from tokred.training.phases import RunInterrupted, find_resume
from tokred.training.run import IncompleteRunError, train

USER_ERRORS = (ConfigError, CheckpointError, DatasetError, ValueError, FileNotFoundError)
# A full disk or quota, a file system gone read-only, lost permissions, a write torch could not finish (EIO).
WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def report(summary: dict[str, Any]) -> str:
    """What a finished run prints: accuracy, cost, and where everything is."""
    return "\n".join(
        [
            f"val top-1 {_percent(summary['val/acc1'])} (best epoch {_percent(summary['val/acc1_best'])}), "
            f"top-5 {_percent(summary['val/acc5'])}"
            + (
                f"; held-out test top-1 {_percent(summary['test/acc1'])}, top-5 {_percent(summary['test/acc5'])}"
                if summary.get("test/acc1") is not None
                else ""
            )
            + f"; {summary['model/gmacs']:.3f} GMACs, {summary['model/params_m']:.2f} M params",
            f"run directory: {summary['run_dir']} (summary.json, export/)",
            f"checkpoints:   {summary['checkpoints']} (continue with: tokred-train <same overrides> "
            f"ckpt_path={summary['run_dir']})",
            f"logs:          {summary['logs']}",
        ]
    )


@contextmanager
def _multirun_job() -> Iterator[None]:
    """Make a multirun job's DDP ranks run this job, and leave no DDP state behind for the next job of the sweep.

    Lightning starts ranks > 0 as ``sys.argv`` plus ``hydra.run.dir=<HydraConfig run.dir>``; in a multirun those are
    the sweep's command line (``-m`` and every sweep value) and a directory that is not the job's, so each rank would
    launch the sweep anew and write elsewhere (lightning-hydra-template #393): point both at this job. Lightning also
    leaves its process group and rank variables (LOCAL_RANK, MASTER_PORT, ...) in this process, which would make the
    next job of a serial sweep believe its ranks already exist: both are cleared when the job ends.
    """
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        yield
        return
    sys.argv[1:] = list(hydra_cfg.overrides.task)
    with open_dict(hydra_cfg), read_write(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    environ = dict(os.environ)
    try:
        yield
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)


@hydra.main(config_path=str(conf_dir()), config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> dict[str, Any]:
    quiet_libraries(bool(cfg.get("verbose", False)))
    threads = torch_threads(cfg)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        validate(cfg)
        with _multirun_job():
            summary = train(cfg)
    except USER_ERRORS as err:
        discard_refused_run()
        fail("tokred-train", err)
    except NonFiniteLossError as err:
        fail("tokred-train", err, code=1)
    except IncompleteRunError as err:
        if rank_zero_only.rank == 0:
            print(report(err.summary), flush=True)
        fail("tokred-train", err, code=1)
    except OSError as err:
        if err.errno not in WRITE_ERRORS:
            raise
        fail(
            "tokred-train",
            f"cannot write {err.filename or 'a file'} ({err.strerror}); free space, or pass "
            f"paths.root=<another disk>; what was written before is intact (resume with "
            f"ckpt_path={cfg.paths.output_dir})",
        )
    except RunInterrupted as err:
        fail(
            "tokred-train",
            f"interrupted by {err}; resume with: tokred-train <same overrides> ckpt_path={cfg.paths.output_dir}",
            code=128 + err.signum,
        )
    except KeyboardInterrupt:
        fail(
            "tokred-train",
            "interrupted outside a fit (finished phases and search progress are kept); resume with: "
            f"tokred-train <same overrides> ckpt_path={cfg.paths.output_dir}",
            code=130,
        )
    if rank_zero_only.rank == 0:
        print(report(summary), flush=True)
    # The whole summary is the job's return value: sweepers pick their objectives from it (the Optuna sweeper's
    # `objectives`, e.g. val/acc1 and model/gmacs).
    return summary


def torch_threads(cfg: DictConfig) -> int | None:
    """``threads``, or, unset, each process's share of the cores when one machine runs several CPU processes
    (``trainer=ddp_cpu``): torch's default of one thread per core in every process oversubscribes the cores, which
    ran 5x slower than one thread each on 2 busy cores. None: torch's default."""
    if cfg.get("threads") is not None:
        return int(cfg.threads)
    trainer = cfg.trainer
    devices = trainer.get("devices", 1)
    if str(trainer.get("accelerator", "cpu")) == "cpu" and isinstance(devices, int) and devices > 1:
        return max(1, (os.cpu_count() or 1) // devices)
    return None


def _quote(value: Any) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def launch_overrides(args: list[str]) -> list[str]:
    """Overrides that make Hydra write a resumed or multi-process run into one directory.

    ``ckpt_path=last`` / a run directory: Hydra's run directory becomes that run's (its own config files go to
    ``.hydra/resume-<time>/`` so the original ones stay). Several SLURM tasks: one directory named after the job
    step instead of one timestamped directory per task. Lightning's own DDP launcher passes ``hydra.run.dir`` to the
    processes it starts, which therefore keep it. Ranks other than 0 write no files of Hydra's (config, log file).
    """
    extra: list[str] = []
    chosen = any(a.startswith("hydra.run.dir=") for a in args)
    ckpt = next((a.split("=", 1)[1] for a in reversed(args) if a.startswith("ckpt_path=")), None)
    if not chosen and ckpt not in (None, "", "null"):
        run_dir, file = find_resume(ckpt, runs_root(args))
        extra.append(f"ckpt_path={_quote(file or run_dir)}")
        if run_dir is not None:
            stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
            extra += [f"hydra.run.dir={_quote(run_dir)}", f"hydra.output_subdir=.hydra/resume-{stamp}"]
    elif not chosen and int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
        step = f"{os.environ['SLURM_JOB_ID']}.{os.environ.get('SLURM_STEP_ID', '0')}"
        extra.append(f"hydra.run.dir={_quote(runs_root(args) / f'slurm-{step}')}")
    if int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or os.environ.get("LOCAL_RANK") or 0) > 0:
        extra += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
    return args + extra


def main() -> None:
    sys.argv[1:] = null_groups(sys.argv[1:])  # logger=null -> ~logger, which Hydra accepts
    own_wandb_service()
    if hydra_flags(sys.argv[1:]):
        _hydra_main()
        return
    try:
        check_overrides(sys.argv[1:], "train")
        if not any(a in ("-m", "--multirun") for a in sys.argv[1:]):
            check_writable(runs_root(sys.argv[1:]))
        sys.argv[1:] = launch_overrides(sys.argv[1:])
    except USER_ERRORS as err:
        fail("tokred-train", err)
    _hydra_main()


if __name__ == "__main__":
    main()
