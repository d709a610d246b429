#!/usr/bin/env bash
# make benchmark-gpu: conf/benchmark_gpu.yaml eager, then compiled, on one GPU; results in
# experiments/results/<gpu>/benchmark.{csv,json,md}. Extra arguments are overrides for both runs, e.g.
#   experiments/benchmark_gpu.sh backbones=[deit_tiny,deit_small]
# Exits non-zero when either run failed or left a row unmeasured, after running both.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
status=0
for compile in false true; do
	"$BIN/tokred-benchmark" --config-name=benchmark_gpu compile=$compile "$@" || status=1
done
exit $status
