"""``tokred-report``'s work: gather the ``summary.json`` of every training run under a directory, fold the runs that
differ only in their seed into one configuration (mean top-1, 95 % interval, paired tests:
:mod:`tokred.benchmark.aggregate`), time one exported model per configuration with the benchmark harness, and plot
accuracy (with its interval) against GMACs and throughput with the Pareto front marked.

Top-1 here is what ``tokred-train`` measured on the run's test split, else its validation split (not a paper figure);
the runs' own ``export/`` directories are what gets timed, the ``none`` run of the same backbone being the speed-up
baseline.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from tokred.benchmark.aggregate import (
    SPEED,
    describe,
    failed_replicates,
    group_runs,
    mark_significance,
    public,
    replicate_key,
)
from tokred.benchmark.outputs import (
    Column,
    fmt,
    md_table,
    merge_rows,
    pareto_front,
    scatter_plot,
    write_csv,
    write_json,
    write_text,
)
from tokred.benchmark.timing import (
    SpeedSettings,
    machine_info,
    measure_speed,
    prepare,
    resolve_device,
    setup,
    steps_per_model,
)
from tokred.benchmark.wandb_log import log_rows
from tokred.export import load_deployable
from tokred.io import PER_IMAGE, read_per_image
from tokred.reducers import reducer_class

REQUIRED = ("backbone", "reducer", "model/gmacs", "val/acc1")

# <name>_runs.csv: one row per training run
RUN_COLUMNS = [
    "backbone",
    "dataset",
    "reducer",
    "point",
    "seed",
    "kind",
    "target_ratio",
    "params_m",
    "gmacs",
    "gmacs_counted",
    "top1",
    "top5",
    "split",
    *SPEED,
    "knobs",
    "degenerate",
    "run_dir",
    "measured",
]
# <name>.csv: one row per configuration (its runs over seeds folded into one), the markdown table's rows
COLUMNS = [
    "backbone",
    "dataset",
    "reducer",
    "point",
    "kind",
    "target_ratio",
    "n_runs",
    "seeds",
    "params_m",
    "gmacs",
    "gmacs_counted",
    "gmacs_ratio",
    "top1",
    "top1_lo",
    "top1_hi",
    "interval",
    "top1_sd",
    "top5",
    "split",
    "p_vs_baseline",
    "vs_best",
    "p_vs_best",
    "pareto_gmacs",
    "throughput",
    "throughput_iqr_pct",
    "speedup",
    "latency_ms",
    "peak_mem_mb",
    "pareto_throughput",
    "knobs",
    "degenerate",
    "run_dir",
    "run_dirs",
    "measured",
    "machine",
    "device_name",
    "threads",
    "torch",
    "timm",
    "batch_size",
    "precision",
    "compile",
]


class ReportError(ValueError):
    """A runs directory the report cannot use; the one-line message names the file and the fix."""


def _label(reducer: str, knobs: dict[str, Any]) -> str:
    """Short name of a run's configuration: its budget, else the knobs that differ from the reducer's defaults."""
    if reducer == "none":
        return "baseline"
    if knobs.get("target_ratio") is not None:
        return f"r={float(knobs['target_ratio']):.2f}"
    if knobs.get("target_gmacs") is not None:
        return f"{float(knobs['target_gmacs']):.3g} GMACs"
    try:
        defaults = asdict(reducer_class(reducer).Config())
    except ValueError:  # a run of a reducer this checkout does not have: no defaults to compare with
        defaults = {}
    # Checkpoint paths (a teacher, an init checkpoint) say where weights came from, not what was built.
    changed = [
        f"{k}={v}"
        for k, v in knobs.items()
        if k in defaults and v != defaults[k] and not (isinstance(v, str) and "/" in v)
    ]
    return " ".join(changed) or "default"


def _load(path: Path, runs_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReportError(
            f"{path} is not a readable JSON file ({err}); delete it or re-run that training run"
        ) from None
    missing = [k for k in REQUIRED if k not in data] if isinstance(data, dict) else list(REQUIRED)
    if missing:
        raise ReportError(
            f"{path} lacks {', '.join(missing)}, so it is no finished tokred-train summary; re-run that "
            f"run (tokred-train resumes it) or move it out of {runs_dir}"
        )
    knobs = data.get("reducer_knobs") or {}
    # The held-out test split where the run has one (the best checkpoint was chosen on validation), else validation.
    split = "test" if data.get("test/acc1") is not None else "val"
    acc5 = data.get(f"{split}/acc5")
    per_image = path.parent / PER_IMAGE
    try:
        correct = read_per_image(per_image).get(split) if per_image.is_file() else None
    except ValueError as err:
        raise ReportError(str(err)) from None
    return {
        "backbone": data["backbone"],
        "dataset": data.get("dataset"),
        "reducer": data["reducer"],
        "point": _label(data["reducer"], knobs),
        "seed": data.get("seed"),
        "kind": "baseline" if data["reducer"] == "none" else "trained",
        "target_ratio": knobs.get("target_ratio"),
        "params_m": data.get("model/params_m"),
        "gmacs": float(data["model/gmacs"]),
        "gmacs_counted": data.get("model/gmacs_counted"),
        "top1": round(100 * float(data[f"{split}/acc1"]), 2),
        "top5": None if acc5 is None else round(100 * float(acc5), 2),
        "split": split,
        "knobs": json.dumps(knobs, default=str),
        "degenerate": "; ".join(data.get("degenerate") or []),
        "run_dir": str(path.parent),  # where it is now; the summary's own run_dir may be another machine's path
        "_correct": correct,  # per image of the split: top-1 right (paired tests, bootstrap intervals)
    }


def on_front(rows: Sequence[dict[str, Any]], x: str, higher_x_better: bool, include_degenerate: bool) -> set[int]:
    """Indices of ``rows`` on the top-1 vs ``x`` Pareto front; degenerate runs (no patch tokens left, chance-level
    top-1) only compete when ``include_degenerate``, as their low cost would otherwise win the front for nothing."""
    candidates = [i for i, r in enumerate(rows) if include_degenerate or not r.get("degenerate")]
    front = pareto_front([rows[i][x] for i in candidates], [rows[i]["top1"] for i in candidates], higher_x_better)
    return {candidates[i] for i in front}


def load_runs(runs_dir: Path) -> list[dict[str, Any]]:
    """One row per ``summary.json`` under ``runs_dir`` (recursively), sorted by backbone, reducer, GMACs and seed."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise ReportError(
            f"runs directory {runs_dir} does not exist; pass the directory `make compare` or "
            "`tokred-train -m` wrote (e.g. multirun/compare)"
        )
    # <run>.old-<time>: a finished run that `sweep.rerun=changed` set aside before training the job again
    paths = sorted(
        p for p in runs_dir.rglob("summary.json") if not any(".old-" in part for part in p.relative_to(runs_dir).parts)
    )
    if not paths:
        raise ReportError(
            f"no summary.json under {runs_dir}; every finished tokred-train run writes "
            "<run_dir>/summary.json: run `make compare` or tokred-train first, or pass their directory"
        )
    runs = [_load(p, runs_dir) for p in paths]
    runs.sort(key=lambda r: (r["backbone"], r["reducer"] != "none", r["reducer"], -r["gmacs"], r["seed"] or 0))
    return runs


def configurations(
    runs: Sequence[dict[str, Any]], include_degenerate: bool = False
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    """The runs folded into configurations (:func:`~tokred.benchmark.aggregate.group_runs`) with GMACs ratios,
    Pareto fronts and paired tests marked, the budgets' separation records, and what was left out: the replicates
    whose baseline is degenerate (:func:`~tokred.benchmark.aggregate.failed_replicates`)."""
    failed = failed_replicates(runs)
    kept = [r for r in runs if replicate_key(r) not in failed]
    left_out = [
        f"seed {key[2]} of {key[0]} on {key[1]} ({sum(replicate_key(r) == key for r in runs)} runs): "
        f"its baseline is degenerate ({why})"
        for key, why in failed.items()
    ]
    groups = group_runs(kept)
    mark_fronts(groups, include_degenerate)
    return groups, mark_significance(groups), left_out


def measure_runs(
    runs: list[dict[str, Any]],
    settings: SpeedSettings,
    progress: Callable[[int], Any] | None = None,
) -> dict[str, Any]:
    """Time the exported model of one run per configuration (its first seed: the seeds share the architecture),
    interleaved per backbone; fills that run's speed columns and returns the machine."""
    device = setup(settings)
    machine = machine_info(device)
    timed = [group["_runs"][0] for group in group_runs(runs)]
    bar = progress(len(timed) * steps_per_model(settings)) if progress else None

    def tick(name: str) -> None:
        if bar is not None:
            bar.update(1)

    for backbone in dict.fromkeys(r["backbone"] for r in timed):
        sub = [r for r in timed if r["backbone"] == backbone]
        models: dict[str, tuple[Callable[[torch.Tensor], Any], int]] = {}
        for row in sub:
            model = load_deployable(Path(row["run_dir"]) / "export")  # CheckpointError names the fix
            models[row["run_dir"]] = (prepare(model, settings, device), int(model.vit.patch_embed.img_size[0]))
        speeds = measure_speed(models, settings, device, tick)
        base = next((speeds[r["run_dir"]] for r in sub if r["reducer"] == "none"), None)
        for row in sub:
            speed = speeds[row["run_dir"]]
            row.update(
                throughput=round(speed.throughput, 3),
                throughput_iqr_pct=round(speed.throughput_iqr_pct, 2),
                latency_ms=None if speed.latency_ms is None else round(speed.latency_ms, 3),
                peak_mem_mb=None if speed.peak_mem_mb is None else round(speed.peak_mem_mb, 1),
                speedup=round(speed.throughput / base.throughput, 4) if base else None,
                **{k: machine[k] for k in ("machine", "device_name", "threads", "torch", "timm")},
                batch_size=settings.batch_size,
                precision=settings.precision,
                compile=settings.compile,
            )
    if bar is not None:
        bar.close()
    return machine


def _interval(r: dict[str, Any]) -> str:
    if r.get("top1_lo") is None:
        return "–"
    return f"[{r['top1_lo']:.2f}, {r['top1_hi']:.2f}] {'t' if r['interval'].startswith('t') else 'boot'}"


def _vs_best(r: dict[str, Any]) -> str:
    if r.get("vs_best") is None:
        return "–"
    if r["vs_best"] == "best":
        return "best"
    return f"{'≈ best' if r['vs_best'] == 'within noise' else 'below'} (p={r['p_vs_best']:.2g})"


MD_COLUMNS: list[Column] = [
    ("reducer", lambda r: r["reducer"]),
    # .get: rows kept from a report written before a column existed lack it
    ("point", lambda r: r["point"] + (f" ⚠ degenerate: {r['degenerate']}" if r.get("degenerate") else "")),
    ("runs", lambda r: str(r.get("n_runs", 1))),
    ("params (M)", lambda r: fmt(r["params_m"], ".2f")),
    ("GMACs", lambda r: fmt(r["gmacs"], ".4f")),
    ("GMACs ratio", lambda r: "–" if r["gmacs_ratio"] is None else f"{r['gmacs_ratio']:.2f}×"),
    ("top-1 (%)", lambda r: f"{r['top1']:.2f}" + (" ◆" if r["pareto_gmacs"] else "")),
    ("95 % interval", _interval),
    ("seed SD", lambda r: fmt(r.get("top1_sd"), ".2f")),
    ("vs baseline", lambda r: "–" if r.get("p_vs_baseline") is None else f"p={r['p_vs_baseline']:.2g}"),
    ("vs best at budget", _vs_best),
    ("top-5 (%)", lambda r: fmt(r["top5"], ".2f")),
    ("split", lambda r: r.get("split", "val")),
    (
        "img/s",
        lambda r: (
            "–"
            if r.get("throughput") is None
            else f"{r['throughput']:.1f} ±{r['throughput_iqr_pct']:.0f}%" + (" ◆" if r["pareto_throughput"] else "")
        ),
    ),
    ("speed-up", lambda r: "–" if r.get("speedup") is None else f"{r['speedup']:.2f}×"),
    ("latency bs1 (ms)", lambda r: fmt(r.get("latency_ms"), ".1f")),
    ("measured", lambda r: r.get("measured") or "–"),
    ("run", lambda r: f"`{r['run_dir']}`" + (f" (+{r['n_runs'] - 1} seeds)" if r.get("n_runs", 1) > 1 else "")),
]


@dataclass
class ReportPaths:
    csv: Path
    json: Path
    md: Path
    plots: list[Path]
    runs_csv: Path
    rows: list[dict[str, Any]]  # the configurations, as in the table

    def show(self) -> None:
        """Print the markdown table and where every file went."""
        print(self.md.read_text())
        print("wrote " + ", ".join(str(p) for p in [self.csv, self.runs_csv, self.json, self.md, *self.plots]))


def mark_fronts(rows: list[dict[str, Any]], include_degenerate: bool = False) -> None:
    """Per backbone: GMACs ratio to its baseline and the top-1 vs GMACs / vs throughput Pareto fronts."""
    for backbone in {r["backbone"] for r in rows}:
        sub = [r for r in rows if r["backbone"] == backbone]
        base = next((r for r in sub if r["reducer"] == "none"), None)
        front = on_front(sub, "gmacs", False, include_degenerate)
        timed = [r for r in sub if r.get("throughput") is not None]
        fast = {id(timed[i]) for i in on_front(timed, "throughput", True, include_degenerate)}
        for i, row in enumerate(sub):
            row["gmacs_ratio"] = round(base["gmacs"] / row["gmacs"], 4) if base else None
            row["pareto_gmacs"] = i in front
            row["pareto_throughput"] = id(row) in fast


def write_report(
    runs: list[dict[str, Any]],
    runs_dir: Path,
    out: Path,
    name: str,
    machine: dict[str, Any] | None,
    settings: SpeedSettings | None,
    command: str,
    include_degenerate: bool = False,
) -> ReportPaths:
    """``<name>.{csv,json,md}`` (one row per configuration), ``<name>_runs.csv`` (per run) and
    ``<name>_top1_vs_{gmacs,throughput}.png`` under ``out``; runs already in an earlier ``<name>.json`` there that
    this report does not cover are kept (by run directory)."""
    runs = merge_rows(out / f"{name}.json", runs, key=lambda r: (r.get("run_dir"),))
    # Rows kept from a report written before runs had a test split carry split null: they were measured on validation.
    runs = [{**r, "split": r.get("split") or "val"} for r in runs]
    rows, records, left_out = configurations(runs, include_degenerate)
    timed = machine is not None and settings is not None
    speed_line = (
        f"Throughput: exported models (one per configuration), batch {settings.batch_size}, {settings.precision}, "
        f"median of {settings.repeats} interleaved rounds on {machine['device_name']} ({machine['threads']} "
        f"threads), torch {machine['torch']}; speed-up vs the `none` run of the same backbone."
        if timed
        else "Throughput not measured (speed=false)."
    )
    datasets = sorted({str(r["dataset"]) for r in rows})
    lines = [
        f"# tokred comparison: {', '.join(datasets)}",
        "",
        f"{len(runs)} runs under `{runs_dir}`, {len(rows)} configurations (runs that differ only in their seed form "
        f"one). Top-1/top-5: measured by tokred-train on {', '.join(datasets)} (not paper figures), on the held-out "
        "test split where the run has one, else on the validation split that also chose its checkpoint (column "
        "split); the mean over seeds. 95 % interval: Student t over the seeds (t), or for a single run the bootstrap "
        "over its images (boot). vs baseline / vs best at budget: exact McNemar test on the same images, seed "
        "paired with seed (a single run, e.g. a baseline the seeds share, with each); ≈ best: p >= 0.05, a "
        "difference within noise, not a ranking. GMACs: analytic, per image. ◆: on the Pareto front (mean top-1 "
        "vs GMACs, resp. vs throughput) of its backbone; ⚠ degenerate "
        "runs (no patch token left in some block, or chance-level top-1) are left off the front unless "
        f"include_degenerate=true. {speed_line} Regenerate: `{command}`.",
    ]
    if left_out:
        lines += ["", f"Left out of the configurations (their rows stay in `{name}_runs.csv`):", ""]
        lines += [f"- {line}" for line in left_out]
    if records:
        lines += ["", "Separation (spread of the mean top-1 at one budget vs 3 × the largest seed SD):", ""]
        lines += [f"- {describe(record)}" for record in records]
    for backbone in dict.fromkeys(r["backbone"] for r in rows):
        lines += ["", f"## {backbone}", "", md_table([r for r in rows if r["backbone"] == backbone], MD_COLUMNS)]
    paths = ReportPaths(
        out / f"{name}.csv", out / f"{name}.json", out / f"{name}.md", [], out / f"{name}_runs.csv", rows
    )
    write_csv(paths.csv, rows, COLUMNS)
    write_csv(paths.runs_csv, runs, RUN_COLUMNS)
    write_json(
        paths.json,
        {
            "runs_dir": str(runs_dir),
            "machine": machine,
            "command": command,
            "settings": settings.as_dict() if settings else None,
            "rows": [public(r) for r in runs],  # per run: what a later report merges with (by run directory)
            "configurations": [public(r) for r in rows],
            "separation": records,
            "left_out": left_out,
        },
    )
    write_text(paths.md, "\n".join(lines) + "\n")
    splits = " / ".join(sorted({r.get("split", "val") for r in rows}))
    label = f"{splits} top-1 on {', '.join(datasets)} (%), mean and 95 % interval"
    for x, axis, unit, pareto in (
        ("gmacs", "GMACs", " (analytic)", "lower_x"),
        ("throughput", "throughput", " (img/s)", "higher_x"),
    ):
        path = out / f"{name}_top1_vs_{x}.png"
        if scatter_plot(
            path,
            rows,
            x,
            "top1",
            xlabel=axis + unit,
            ylabel=label,
            title=f"trained runs: top-1 vs {axis}",
            pareto=pareto,
            interval=("top1_lo", "top1_hi"),
        ):
            paths.plots.append(path)
    return paths


def log_report(paths: ReportPaths, project: str, run_name: str, machine: dict[str, Any] | None) -> str:
    """The report's configurations as a wandb.Table with top-1 vs GMACs / throughput scatters and the PNGs."""
    rows = [public(r) for r in paths.rows]
    scatters = [("gmacs", "top1", "top-1 vs GMACs")]
    if any(r.get("throughput") is not None for r in rows):
        scatters.append(("throughput", "top1", "top-1 vs throughput"))
    return log_rows(
        rows,
        COLUMNS,
        scatters,
        project=project,
        name=run_name,
        job_type="report",
        config=machine or {},
        images={p.stem: p for p in paths.plots},
    )


def make_report(
    runs_dir: Path,
    out_dir: Path,
    *,
    settings: SpeedSettings | None,
    machine_name: str | None = None,
    name: str = "compare",
    wandb_project: str | None = None,
    command: str = "tokred-report",
    progress: Callable[[int], Any] | None = None,
    include_degenerate: bool = False,
) -> ReportPaths:
    """The whole report: load the runs, time them (``settings=None``: don't), write the files, log to wandb if
    ``wandb_project`` is given. Files go to ``<out_dir>/<machine_name or the device's machine slug>/``."""
    runs = load_runs(runs_dir)
    machine = measure_runs(runs, settings, progress) if settings is not None else None
    slug = machine_name or (machine or machine_info(resolve_device("auto")))["machine"]
    paths = write_report(runs, runs_dir, Path(out_dir) / slug, name, machine, settings, command, include_degenerate)
    if wandb_project:
        print(f"wandb run: {log_report(paths, wandb_project, f'{name}-{slug}', machine)}")
    return paths


def report_from_config(cfg: Mapping[str, Any], command: str) -> ReportPaths:
    """:func:`make_report` as a composed ``conf/report.yaml`` asks (tokred-report, tokred-compare's last step)."""
    return make_report(
        Path(cfg["runs_dir"]),
        Path(cfg["out_dir"]),
        machine_name=cfg["machine"],
        name=cfg["name"],
        settings=SpeedSettings.from_mapping(cfg) if cfg["speed"] else None,
        wandb_project=cfg["wandb_project"] if cfg["wandb"] else None,
        command=command,
        progress=lambda total: tqdm(total=total, desc="timing runs", unit="step", dynamic_ncols=True),
        include_degenerate=bool(cfg["include_degenerate"]),
    )
