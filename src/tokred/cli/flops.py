"""``tokred-flops [overrides]``: analytic and counted GMACs, params and tokens per block of a configured model.

Prints a table, then one JSON line (the last line) for scripts.
"""

from __future__ import annotations

import json
import sys

from tokred.config import compose_config, fail, print_help, validate, wants_help
from tokred.flops import count_params, counted_gmacs
from tokred.training.run import build_model


def measure(overrides: list[str]) -> dict:
    cfg = compose_config(overrides, config_name="flops")
    validate(cfg)
    model = build_model(cfg, int(cfg.num_classes))
    cost = model.cost()
    deploy = model.deployable()
    return {
        "backbone": cfg.backbone.model,
        "reducer": cfg.reducer.name,
        "img_size": int(cfg.backbone.img_size),
        "gmacs_analytic": round(cost.gmacs, 4),
        "gmacs_counted": round(counted_gmacs(deploy, int(cfg.backbone.img_size)), 4),
        "params_m": round(count_params(deploy) / 1e6, 4),
        "tokens_per_block": cost.tokens_per_block,
    }


def main() -> None:
    if wants_help(sys.argv[1:]):
        print_help("tokred-flops", "flops")
        return
    try:
        row = measure(sys.argv[1:])
    except ValueError as err:
        fail("tokred-flops", err)
    width = max(len(k) for k in row)
    for key, value in row.items():
        print(f"{key:<{width}}  {value}")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
