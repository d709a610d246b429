"""``tokred-report runs_dir=DIR [overrides]``: the accuracy comparison of trained runs (table, Pareto plots, wandb).

Reads every ``summary.json`` under ``runs_dir``, times the runs' exported models (``speed=false`` skips that) and
writes ``<out_dir>/<machine>/<name>.{csv,json,md}`` and ``<name>_top1_vs_{gmacs,throughput}.png``. Keys and their
defaults: ``conf/report.yaml`` (``tokred-report --help`` prints it).
"""

from __future__ import annotations

import shlex
import sys

from omegaconf import OmegaConf

from tokred.benchmark.report import report_from_config
from tokred.config import ConfigError, compose_config, fail, print_help, wants_help


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if wants_help(args):
        print_help("tokred-report", "report")
        return
    try:
        bare = next((a for a in args if "=" not in a), None)
        if bare is not None:  # the argparse form of earlier releases: tokred-report DIR
            raise ConfigError(f"{bare!r} is not a key=value override; write runs_dir={bare}")
        cfg = compose_config(args, config_name="report")
        if OmegaConf.is_missing(cfg, "runs_dir"):
            raise ConfigError(
                "runs_dir is not set; pass runs_dir=<directory of training runs>, "
                "e.g. tokred-report runs_dir=multirun/compare"
            )
        paths = report_from_config(cfg, command=shlex.join(["tokred-report", *args]))
    except ValueError as err:  # ConfigError, ReportError, bad timing options, an unloadable export (CheckpointError)
        fail("tokred-report", err)
    paths.show()


if __name__ == "__main__":
    main()
