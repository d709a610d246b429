"""``tokred-analyze <run dirs | multirun dir> [key=value ...]``: token-choice and feature similarity of trained runs.

Runs every run's ``export/`` on the same validation images and writes ``analysis.{json,md}`` and heat maps
(:mod:`tokred.analysis`) next to the runs or into ``out_dir``. Keys and defaults: ``conf/analyze.yaml``
(``tokred-analyze --help`` prints it). Bad input prints one line, ``tokred-analyze: error: ...``.
"""

from __future__ import annotations

import shlex
import sys

from omegaconf import ListConfig

from tokred.analysis import analyze
from tokred.config import ConfigError, compose_config, fail, print_help, wants_help


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if wants_help(args):
        print_help("tokred-analyze", "analyze")
        return
    try:
        paths = [a for a in args if "=" not in a]  # runs as arguments, beside key=value overrides
        cfg = compose_config([a for a in args if "=" in a], config_name="analyze")
        if paths and cfg.runs is not None:
            raise ConfigError("runs are given twice (as arguments and as runs=); keep one")
        runs = paths or (list(cfg.runs) if isinstance(cfg.runs, ListConfig) else [cfg.runs] if cfg.runs else [])
        if not runs:
            raise ConfigError(
                "no runs given; pass run directories or a multirun directory, e.g. tokred-analyze multirun/compare"
            )
        written = analyze(cfg, [str(r) for r in runs], command=shlex.join(["tokred-analyze", *args]))
    except ValueError as err:  # ConfigError, CheckpointError, DatasetError: one line naming the fix
        fail("tokred-analyze", err)
    print(written[1].read_text())
    print("wrote " + ", ".join(str(p) for p in written), flush=True)


if __name__ == "__main__":
    main()
