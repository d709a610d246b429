"""``tokred-report RUNS_DIR``: the accuracy comparison of trained runs (table, Pareto plots, optional wandb).

Reads every ``summary.json`` under RUNS_DIR, times the runs' exported models (``--no-speed`` skips that) and writes
``<out-dir>/<machine>/<name>.{csv,json,md}`` and ``<name>_top1_vs_{gmacs,throughput}.png``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import typing
from dataclasses import fields
from pathlib import Path

from tqdm import tqdm

from tokred.benchmark.report import make_report
from tokred.benchmark.timing import PRECISIONS, SpeedSettings
from tokred.config import fail


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tokred-report", description="Accuracy comparison of trained runs: table, Pareto plots, optional wandb.")
    p.add_argument("runs_dir", type=Path, help="directory holding training runs (searched recursively)")
    p.add_argument("--out-dir", type=Path, default=Path("experiments/results"),
                   help="results root; files go to <out-dir>/<machine>/ (default: %(default)s)")
    p.add_argument("--machine", help="results folder name (default: derived from the device)")
    p.add_argument("--name", default="compare", help="file stem of the outputs (default: %(default)s)")
    p.add_argument("--no-speed", action="store_true", help="do not time the exported models")
    p.add_argument("--include-degenerate", action="store_true",
                   help="let degenerate runs (no patch token left, chance-level top-1) onto the Pareto front")
    p.add_argument("--wandb", action="store_true", help="also log a wandb.Table and scatter plots")
    p.add_argument("--wandb-project", default="tokred")
    # The timing options are SpeedSettings' fields, so the report and the benchmark share one protocol.
    defaults = SpeedSettings()
    hints = typing.get_type_hints(SpeedSettings)
    for f in fields(SpeedSettings):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if hints[f.name] is bool:
            p.add_argument(flag, action="store_true", help=f"timing: {f.name}")
        else:
            kind = str if hints[f.name] is str else int
            choices = list(PRECISIONS) if f.name == "precision" else None
            p.add_argument(flag, type=kind, default=default, choices=choices,
                           help=f"timing: {f.name} (default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    try:
        paths = make_report(
            args.runs_dir, args.out_dir, settings=None if args.no_speed else SpeedSettings.from_mapping(vars(args)),
            machine_name=args.machine, name=args.name, wandb_project=args.wandb_project if args.wandb else None,
            command=shlex.join(["tokred-report", *argv]),
            progress=lambda total: tqdm(total=total, desc="timing runs", unit="step", dynamic_ncols=True),
            include_degenerate=args.include_degenerate)
    except ValueError as err:  # ReportError, bad timing options, an unloadable export (CheckpointError)
        fail("tokred-report", err)
    paths.show()


if __name__ == "__main__":
    main()
