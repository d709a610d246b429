"""``tokred-compare [overrides]`` (``make compare``): per seed a baseline and the reducer sweeps from it, then the
report.

The grid is ``conf/compare.yaml``. Each step is a real ``tokred-train`` process, the sweeps Hydra multiruns over
``reducer.target_ratio``, so what the comparison ran is exactly what a user can re-run by hand (``dry_run=true``
prints the commands). Run directories are deterministic (``<runs_dir>/none/baseline``,
``<runs_dir>/<reducer>/r<budget>``, each under ``<runs_dir>/seed<seed>/`` when ``seeds`` lists several; with
``shared_baseline`` only the first seed has a baseline, and every seed's sweeps start from it): a re-launch
skips runs that wrote their ``summary.json`` and lets ``tokred-train`` resume the interrupted ones from their
checkpoints. ``mode=training_free`` trains (or reuses) the first seed's baseline only and draws every training-free
reducer's accuracy curve over its budget from it (:mod:`tokred.benchmark.training_free`).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tokred.benchmark.report import report_from_config
from tokred.benchmark.training_free import run_training_free
from tokred.config import compose_config, fail, print_help, wants_help
from tokred.reducers import available_reducers, reducer_class


@dataclass
class Step:
    """One tokred-train invocation: the baseline (a single run) or one reducer's multirun over the budgets."""

    name: str
    seed: int
    args: list[str]
    run_dirs: list[Path]  # the runs it produces; all of them holding a summary.json means the step is done
    baseline: Path  # the baseline run it starts from (the baseline step: its own run)

    @property
    def done(self) -> bool:
        return all((d / "summary.json").is_file() for d in self.run_dirs)

    @property
    def is_baseline(self) -> bool:
        return self.run_dirs == [self.baseline]

    def command(self) -> list[str]:
        return [sys.executable, "-m", "tokred.cli.train", *self.args]


def baseline_dir(runs_dir: Path) -> Path:
    return runs_dir / "none" / "baseline"


def seed_dir(runs_dir: Path, seeds: list[int], seed: int) -> Path:
    """Where one seed's baseline and sweeps go: ``runs_dir`` itself when the comparison has one seed (the layout of
    single-seed comparisons), else ``runs_dir/seed<seed>``."""
    return runs_dir if len(seeds) == 1 else runs_dir / f"seed{seed}"


def seeds_of(cfg: DictConfig) -> list[int]:
    seeds = [int(s) for s in cfg.seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds={seeds}: give one or more distinct integers, e.g. seeds=[0,1,2]")
    return seeds


def plan(cfg: DictConfig) -> list[Step]:
    """Per seed, the baseline step, then one sweep step per reducer, for budgets whose run has not finished yet.

    By default every seed is a whole replicate: its own baseline and sweeps from it, so the spread over seeds covers
    the baseline's training too. ``shared_baseline`` trains the first seed's baseline only and starts every seed's
    sweeps from it: the seeds then vary the reducers' training alone, as when one pretrained model is reduced.
    """
    seeds = seeds_of(cfg)
    reducers = list(cfg.reducers) if cfg.reducers else available_reducers()
    for name in reducers:
        reducer_class(name)  # one-line ValueError listing the registered reducers
    runs_dir = Path(cfg.runs_dir).resolve()
    steps = []
    for seed in seeds:
        root = seed_dir(runs_dir, seeds, seed)
        base = baseline_dir(seed_dir(runs_dir, seeds, seeds[0]) if cfg.shared_baseline else root)
        tag = "" if len(seeds) == 1 else f" seed={seed}"
        # The checkpoint path is quoted so Hydra reads it as one string whatever characters the path holds; the
        # sweeps' ${baseline_ckpt} resolve to this seed's baseline as they are read below.
        cfg.baseline_ckpt = f"'{base / 'export' / 'model.safetensors'}'"
        common = [*cfg.train, f"seed={seed}", f"logger={'wandb' if cfg.wandb else 'csv'}"]
        if base == baseline_dir(root):  # this seed trains a baseline of its own (always, unless shared)
            base_args = [*common, "reducer=none", *cfg.baseline, f"hydra.run.dir={base}"]
            steps.append(Step(f"baseline{tag}", seed, base_args, [base], base))
        for name in reducers:
            if name == "none":
                continue
            sweep = cfg.sweeps[name] if name in cfg.sweeps else cfg.default_sweep
            sweep_dir = root / name
            # Budgets with their own extra overrides (budget_overrides) get a multirun each; the others share one.
            extra = (cfg.get("budget_overrides") or {}).get(name) or {}
            groups: dict[tuple[str, ...], list[float]] = {}
            for budget in cfg.budgets:
                groups.setdefault(tuple(extra.get(str(float(budget)), [])), []).append(float(budget))
            for overrides, budgets in groups.items():
                # Hydra names a budget's directory r<target_ratio> (str of the float, as below).
                todo = [b for b in budgets if not (sweep_dir / f"r{b}" / "summary.json").is_file()]
                args = [
                    "-m",
                    *common,
                    f"reducer={name}",
                    *sweep,
                    *overrides,
                    f"reducer.target_ratio={','.join(str(b) for b in todo)}",
                    f"hydra.sweep.dir={sweep_dir}",
                    "hydra.sweep.subdir=r${reducer.target_ratio}",
                ]
                label = name if len(groups) == 1 else f"{name} r={','.join(str(b) for b in budgets)}"
                steps.append(Step(label + tag, seed, args, [sweep_dir / f"r{b}" for b in budgets], base))
    return steps


def baseline_unusable(run_dir: Path) -> str:
    """Why the sweeps cannot start from this finished baseline (its summary's ``degenerate`` reasons, e.g. a
    chance-level top-1), or an empty string."""
    summary = run_dir / "summary.json"
    reasons = json.loads(summary.read_text()).get("degenerate") if summary.is_file() else None
    return f"the baseline is degenerate ({'; '.join(reasons)})" if reasons else ""


def run(cfg: DictConfig) -> list[str]:
    """Run the plan (or print it with ``dry_run``), then the report; returns the names of the steps that failed.
    ``mode=training_free`` runs the baseline step only, then the training-free curves from it."""
    if cfg.mode not in ("train", "training_free"):
        raise ValueError(f"mode={cfg.mode!r}; choose train (the accuracy comparison) or training_free (curves)")
    steps = plan(cfg)
    if cfg.mode == "training_free":
        steps = steps[:1]  # the first seed's baseline
    failed, unusable = [], set()  # unusable: the baselines no sweep may start from
    for step in steps:
        if step.baseline in unusable:
            continue
        if step.done:
            print(f"tokred-compare: {step.name}: done already ({', '.join(str(d) for d in step.run_dirs)})")
        else:
            print(f"tokred-compare: {step.name}: {shlex.join(step.command())}", flush=True)
            if cfg.dry_run:
                continue
            if subprocess.run(step.command()).returncode != 0:
                if step.is_baseline:
                    raise RuntimeError(
                        "the baseline run failed (its error is printed above); every sweep starts from it, "
                        "so fix that first and re-run tokred-compare"
                    )
                failed.append(step.name)
        why = baseline_unusable(step.baseline) if step.is_baseline else ""
        if why:
            # A sweep from a baseline that learned nothing measures nothing (seed 1 of the first compare-hard run
            # stayed at chance for its 3 epochs); the other seeds go on.
            print(f"tokred-compare: {step.name}: {why}; skipping its sweeps", flush=True)
            failed.append(f"{step.name} ({why}: delete it and train longer, e.g. epochs=<more>, or use another seed)")
            unusable.add(step.baseline)
    if cfg.dry_run:
        return failed
    if cfg.mode == "training_free":
        if unusable:
            raise RuntimeError(f"no curves drawn: {failed[-1]}")
        command = shlex.join(["tokred-compare", *sys.argv[1:]])
        root = seed_dir(Path(cfg.runs_dir).resolve(), seeds_of(cfg), seeds_of(cfg)[0])
        paths = run_training_free(cfg, baseline_dir(root) / "export", command)
        print("wrote " + ", ".join(str(p) for p in paths))
        return failed
    command = shlex.join(["tokred-report", f"runs_dir={cfg.runs_dir}", f"name={cfg.report.name}"])
    paths = report_from_config(cfg.report, command=command)
    paths.show()
    return failed


def main() -> None:
    args = sys.argv[1:]
    config_name = "compare"
    if args and args[0].startswith("--config-name="):  # a preset built on conf/compare.yaml, e.g. compare_hard
        config_name = args.pop(0).split("=", 1)[1]
    if wants_help(args):
        print_help("tokred-compare", config_name)
        return
    try:
        cfg = compose_config(args, config_name=config_name)
        OmegaConf.set_struct(cfg, False)  # baseline_ckpt is filled in by plan()
        failed = run(cfg)
    except (ValueError, RuntimeError) as err:
        fail("tokred-compare", err)
    except (HydraException, OmegaConfBaseException) as err:
        fail("tokred-compare", ValueError(f"{str(err).strip().splitlines()[0]} (keys: see conf/compare.yaml)"))
    if failed:
        fail(
            "tokred-compare",
            RuntimeError(
                f"steps failed: {', '.join(failed)} (errors above); the report covers "
                "the runs that finished; re-run tokred-compare to resume the rest"
            ),
        )
