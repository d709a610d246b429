"""``tokred-benchmark [--config-name=NAME] [overrides]``: cost and speed of every backbone x registered reducer
(conf/benchmark.yaml, or a preset built on it such as conf/benchmark_gpu.yaml).

Writes experiments/results/<machine>/benchmark.{csv,json,md} and PNG plots, prints the markdown table. Exits 1
(after writing everything) when a row could not be built, listing why.
"""

from __future__ import annotations

import shlex
import sys

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException
from tqdm import tqdm

from tokred.benchmark.harness import run_benchmark, write_results
from tokred.config import compose_config, fail, print_help, wants_help


def main() -> None:
    args = sys.argv[1:]
    command = shlex.join(["tokred-benchmark", *args])
    config_name = "benchmark"
    if args and args[0].startswith("--config-name="):
        config_name = args.pop(0).split("=", 1)[1]
    if wants_help(args):
        print_help("tokred-benchmark", config_name)
        return
    try:
        cfg = compose_config(args, config_name=config_name)
        machine, rows, failed = run_benchmark(
            cfg, progress=lambda total: tqdm(total=total, desc="benchmark", unit="step", dynamic_ncols=True)
        )
        paths = write_results(cfg, machine, rows, failed, command)
    except ValueError as err:
        fail("tokred-benchmark", err)
    except (HydraException, OmegaConfBaseException) as err:  # e.g. a key that conf/benchmark.yaml does not have
        fail("tokred-benchmark", ValueError(f"{str(err).strip().splitlines()[0]} (keys: see conf/benchmark.yaml)"))
    print(paths[2].read_text())
    print("wrote " + ", ".join(str(p) for p in paths))
    if failed:
        for row in failed:
            print(
                f"tokred-benchmark: not measured: {row['backbone']} {row['reducer']} {row['point']}: {row['error']}",
                file=sys.stderr,
            )
        sys.exit(1)


if __name__ == "__main__":
    main()
