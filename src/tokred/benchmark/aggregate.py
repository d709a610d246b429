"""From training runs to the configurations a comparison ranks: runs that differ only in their seed form one row
with the mean top-1 and a 95 % interval, and paired tests on the same test images say which differences are real.

- Interval: the Student t interval of the mean over seeds (:func:`tokred.stats.t_interval`); a configuration with one
  run gets the bootstrap interval over its evaluation images instead (:func:`tokred.stats.bootstrap_interval`).
- Paired tests (exact McNemar, :func:`tokred.stats.mcnemar`) of each configuration against its backbone's baseline and
  against the best configuration at the same budget. Runs are paired by seed (seed ``s`` of one method against seed
  ``s`` of the other, which saw the same images), and the discordant images of all pairs are pooled; a single run
  (a baseline the seeds share, or one run of unknown seed) pairs with every run of the other. A configuration whose
  difference from the best has p >= ``alpha`` is "within noise" of it: the report marks it instead of ranking it.
- Separation: at each budget, the spread between the best and the worst configuration against three times the largest
  seed standard deviation (issue 18's criterion for a task that tells the methods apart).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tokred.stats import bootstrap_interval, mcnemar, t_interval

# Per-run fields that are the same for every seed of a configuration (the first run's are shown).
SHARED = (
    "backbone",
    "dataset",
    "reducer",
    "point",
    "kind",
    "target_ratio",
    "params_m",
    "gmacs_counted",
    "split",
    "knobs",
    "run_dir",
)
# The speed columns, measured on one run per configuration (the architecture, not the seed, sets the speed).
SPEED = (
    "throughput",
    "throughput_iqr_pct",
    "speedup",
    "latency_ms",
    "peak_mem_mb",
    "machine",
    "device_name",
    "threads",
    "torch",
    "timm",
    "batch_size",
    "precision",
    "compile",
)


def config_key(run: dict[str, Any]) -> tuple:
    return (run["backbone"], run.get("dataset"), run["reducer"], run["point"])


def _by_seed(run: dict[str, Any]) -> tuple:
    return (run.get("seed") is None, run.get("seed") or 0, run["run_dir"])


def replicate_key(run: dict[str, Any]) -> tuple:
    """A run's replicate: its backbone, dataset and seed (a seeded comparison trains one baseline per replicate)."""
    return (run["backbone"], run.get("dataset"), run.get("seed"))


def failed_replicates(runs: Sequence[dict[str, Any]]) -> dict[tuple, str]:
    """``(backbone, dataset, seed)`` -> why, for the replicates whose ``none`` baseline is degenerate (e.g. a
    chance-level top-1) while another seed's baseline of the same backbone and dataset is not: every run of such a
    replicate started from a model that learned nothing, so it measures the failed baseline, not its method."""
    baselines = [r for r in runs if r["reducer"] == "none" and r.get("seed") is not None]
    healthy = {(r["backbone"], r.get("dataset")) for r in baselines if not r.get("degenerate")}
    return {
        replicate_key(r): r["degenerate"]
        for r in baselines
        if r.get("degenerate") and (r["backbone"], r.get("dataset")) in healthy
    }


def group_runs(runs: Sequence[dict[str, Any]], confidence: float = 0.95) -> list[dict[str, Any]]:
    """One row per configuration (backbone, dataset, reducer, point), in the order of ``runs``' first occurrences:
    top-1 and top-5 means, top-1's sample SD over seeds, its interval (``top1_lo``/``top1_hi``, ``interval`` says
    which), the seeds and run directories; ``_runs`` keeps the members for :func:`mark_significance`."""
    members: dict[tuple, list[dict[str, Any]]] = {}
    for run in runs:
        members.setdefault(config_key(run), []).append(run)
    groups = []
    for group in members.values():
        group = sorted(group, key=_by_seed)
        first = group[0]
        top1 = [r["top1"] for r in group]
        top5 = [r["top5"] for r in group if r.get("top5") is not None]
        row = {k: first.get(k) for k in SHARED} | {k: first.get(k) for k in SPEED}
        mean, half = t_interval(top1, confidence)
        row |= {
            "n_runs": len(group),
            "seeds": [r.get("seed") for r in group],
            "run_dirs": [r["run_dir"] for r in group],
            "gmacs": float(np.mean([r["gmacs"] for r in group])),
            "top1": round(mean, 3),
            "top1_runs": top1,
            "top1_sd": round(float(np.std(top1, ddof=1)), 3) if len(group) > 1 else None,
            "top5": round(float(np.mean(top5)), 3) if top5 else None,
            "degenerate": "; ".join(dict.fromkeys(r["degenerate"] for r in group if r.get("degenerate"))),
            "_runs": group,
        }
        correct = first.get("_correct")
        if half is not None:
            row |= {
                "top1_lo": round(mean - half, 3),
                "top1_hi": round(mean + half, 3),
                "interval": f"t, {len(group)} seeds",
            }
        elif correct is not None:
            _, lo, hi = bootstrap_interval(correct, confidence)
            row |= {"top1_lo": round(100 * lo, 3), "top1_hi": round(100 * hi, 3), "interval": "bootstrap, 1 run"}
        else:
            row |= {"top1_lo": None, "top1_hi": None, "interval": None}
        groups.append(row)
    return groups


def paired_p(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    """Exact McNemar p of two configurations over their seed-paired runs' pooled per-image results; None when no
    pair has per-image results on the same images. A configuration with a single run (e.g. the baseline a
    ``shared_baseline`` comparison trains once) pairs with every run of the other."""
    runs_a, runs_b = a["_runs"], b["_runs"]
    if len(runs_a) == 1 or len(runs_b) == 1:
        pairs = [(ra, rb) for ra in runs_a for rb in runs_b]
    else:
        seeds_b = {r.get("seed"): r for r in runs_b if r.get("seed") is not None}
        pairs = [(r, seeds_b[r["seed"]]) for r in runs_a if r.get("seed") in seeds_b]
    pairs = [
        (ra["_correct"], rb["_correct"])
        for ra, rb in pairs
        if ra.get("_correct") is not None
        and rb.get("_correct") is not None
        and len(ra["_correct"]) == len(rb["_correct"])
        and ra.get("split") == rb.get("split")
    ]
    if not pairs:
        return None
    return mcnemar([c for ca, _ in pairs for c in ca], [c for _, cb in pairs for c in cb])


def mark_significance(groups: list[dict[str, Any]], alpha: float = 0.05) -> list[dict[str, Any]]:
    """Per backbone and dataset: ``p_vs_baseline`` (against the ``none`` configuration) and, among the configurations
    at one budget (``target_ratio``), ``vs_best`` = "best", "within noise" (p >= ``alpha``) or "below"; returns the
    separation records of the budgets (:func:`separation`)."""
    records = []
    for scope in dict.fromkeys((g["backbone"], g.get("dataset")) for g in groups):
        sub = [g for g in groups if (g["backbone"], g.get("dataset")) == scope]
        baseline = next((g for g in sub if g["reducer"] == "none"), None)
        for g in sub:
            g["p_vs_baseline"] = None if baseline is None or g is baseline else _round_p(paired_p(g, baseline))
            g["vs_best"], g["p_vs_best"] = None, None
        for budget in sorted({g["target_ratio"] for g in sub if g["target_ratio"] is not None}):
            bucket = [g for g in sub if g["target_ratio"] == budget and g["reducer"] != "none"]
            if len(bucket) < 2:
                continue
            best = max(bucket, key=lambda g: g["top1"])
            best["vs_best"] = "best"
            for g in bucket:
                if g is best:
                    continue
                g["p_vs_best"] = _round_p(paired_p(g, best))
                if g["p_vs_best"] is not None:
                    g["vs_best"] = "within noise" if g["p_vs_best"] >= alpha else "below"
            records.append(separation(bucket, scope, budget))
    return records


def separation(bucket: Sequence[dict[str, Any]], scope: tuple, budget: float) -> dict[str, Any]:
    """Whether the methods at one budget are told apart: spread of mean top-1 (best - worst) > 3 x the largest seed
    SD among them. ``holds`` is None when some configuration has fewer than two seeds (no SD to compare with)."""
    best = max(bucket, key=lambda g: g["top1"])
    worst = min(bucket, key=lambda g: g["top1"])
    sds = [g["top1_sd"] for g in bucket]
    max_sd = None if any(sd is None for sd in sds) else max(sds)
    spread = round(best["top1"] - worst["top1"], 3)
    return {
        "backbone": scope[0],
        "dataset": scope[1],
        "target_ratio": budget,
        "best": best["reducer"],
        "worst": worst["reducer"],
        "spread": spread,
        "max_seed_sd": max_sd,
        "holds": None if max_sd is None else bool(spread > 3 * max_sd),
        "configurations": len(bucket),
    }


def _round_p(p: float | None) -> float | None:
    # three significant digits keep small p-values readable (4.2e-05), not rounded to 0
    return None if p is None else float(f"{p:.3g}") if p > 0 else 0.0


def public(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` without the working fields (``_runs``, ``_correct``) that stay out of result files."""
    return {k: v for k, v in row.items() if not k.startswith("_")}


def describe(record: dict[str, Any]) -> str:
    """One sentence on a separation record, for the report."""
    head = (
        f"At r={record['target_ratio']:.2f} on {record['backbone']}: {record['spread']:.2f} points between the best "
        f"({record['best']}) and the worst ({record['worst']}) of {record['configurations']} configurations"
    )
    if record["holds"] is None:
        return head + "; no seed SD to compare with (some have a single run)."
    verdict = "the task separates them" if record["holds"] else "within 3 seed SDs: the task does not separate them"
    return head + f", 3 × the largest seed SD = {3 * record['max_seed_sd']:.2f}: {verdict}."
