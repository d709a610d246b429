"""``tokred-benchmark``'s work: every backbone x registered reducer, at the papers' operating points and at matched
budgets, costed (params, analytic and counted GMACs) and timed in one interleaved run per backbone.

The rows to measure come from ``conf/benchmark.yaml``: ``operating_points.<reducer>`` lists each reducer's paper
configurations (override lists plus the papers' reported GMACs and top-1); a registered reducer without an entry is
measured at its default config. Matched-budget rows add ``reducer.target_ratio=<b>`` for every ``budgets`` entry:
the reducer sets its own knob to meet it, the harness only reads back what it achieved.

Each row is also timed and costed as it trains (:func:`training_setup`, :func:`train_cost`): the reducer in the
last phase of its pipeline, its own loss terms with its frozen teacher, AdamW over its parameter groups.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from tokred.backbones import freeze
from tokred.benchmark.outputs import (
    Column,
    fmt,
    md_table,
    merge_rows,
    scatter_plot,
    write_csv,
    write_json,
    write_text,
)
from tokred.benchmark.timing import (
    SpeedSettings,
    machine_info,
    measure_speed,
    measure_train_speed,
    prepare,
    setup,
    steps_per_model,
    train_step,
    train_steps_per_model,
)
from tokred.benchmark.wandb_log import log_rows
from tokred.config import ConfigError, compose_config, group_choices, validate
from tokred.flops import train_cost
from tokred.reducers import available_reducers, reducer_class
from tokred.reducers.base import TokenReducer
from tokred.training.module import soft_cross_entropy
from tokred.training.optim import build_optimizer, effective_lr
from tokred.training.run import build_model, model_stats

# A row whose speed-up over `none` is below this share of its GMACs reduction is flagged in the tables.
SPEEDUP_FLAG = 0.85
# Matched-budget rows further than this from the requested GMACs are flagged (the reducers promise 3%).
BUDGET_TOLERANCE_PCT = 3.0


@dataclass
class Entry:
    """One row to measure: a backbone x reducer configuration."""

    backbone: str
    reducer: str
    point: str  # short label: the operating point's name or "r=0.50"
    kind: str  # baseline | operating_point | matched_budget
    overrides: list[str] = field(default_factory=list)
    target_ratio: float | None = None
    paper_gmacs: float | None = None
    paper_top1: float | None = None

    @property
    def key(self) -> str:
        return f"{self.backbone}/{self.reducer}/{self.point}"


def _paper(point: Mapping[str, Any], backbone: str, what: str) -> float | None:
    value = (point.get("paper") or {}).get(backbone, {}).get(what)
    return None if value is None else float(value)


def plan(cfg: DictConfig) -> list[Entry]:
    """The rows of a benchmark run, baseline first per backbone; raises ConfigError on unknown names."""
    known = group_choices("backbone")
    for backbone in cfg.backbones:
        if backbone not in known:
            raise ConfigError(f"unknown backbone {backbone!r} in backbones; choose from: {', '.join(known)}")
    reducers = list(cfg.reducers) if cfg.reducers else available_reducers()
    for name in reducers:
        reducer_class(name)  # one-line ValueError listing the registered reducers
    points = OmegaConf.to_container(cfg.operating_points, resolve=True) or {}
    entries = []
    for backbone in cfg.backbones:
        base = (points.get("none") or [{}])[0]
        entries.append(
            Entry(
                backbone,
                "none",
                base.get("label", "baseline"),
                "baseline",
                [],
                paper_gmacs=_paper(base, backbone, "gmacs"),
                paper_top1=_paper(base, backbone, "top1"),
            )
        )
        for name in reducers:
            if name == "none":
                continue
            for point in points.get(name) or [{"label": "default", "overrides": []}]:
                overrides = [*point.get("overrides", []), *(point.get("backbone_overrides") or {}).get(backbone, [])]
                entries.append(
                    Entry(
                        backbone,
                        name,
                        point["label"],
                        "operating_point",
                        overrides,
                        paper_gmacs=_paper(point, backbone, "gmacs"),
                        paper_top1=_paper(point, backbone, "top1"),
                    )
                )
            for ratio in cfg.budgets:
                entries.append(
                    Entry(
                        backbone,
                        name,
                        f"r={float(ratio):.2f}",
                        "matched_budget",
                        [f"reducer.target_ratio={float(ratio)}"],
                        target_ratio=float(ratio),
                    )
                )
    keys = [e.key for e in entries]
    for key in {k for k in keys if keys.count(k) > 1}:
        raise ConfigError(
            f"two benchmark rows are both {key!r}; give the operating points of that reducer distinct "
            "labels in conf/benchmark.yaml (r=<budget> labels are taken by the matched budgets)"
        )
    return entries


@dataclass
class Trainee:
    """A row's reducer in its main training phase (:func:`training_setup`), its frozen teacher and its config."""

    model: TokenReducer
    teacher: nn.Module | None
    cfg: DictConfig


def build(entry: Entry) -> tuple[nn.Module, Trainee, dict[str, Any]]:
    """The deployable model of ``entry`` (ImageNet's 1000 classes, like tokred-flops), the model as it trains, and
    their cost figures."""
    cfg = compose_config([f"backbone={entry.backbone}", f"reducer={entry.reducer}", *entry.overrides], "flops")
    validate(cfg)
    model = build_model(cfg, int(cfg.num_classes))
    img_size = int(cfg.backbone.img_size)
    stats = model_stats(model, img_size)
    deployable = model.deployable()
    teacher = training_setup(model, deployable)
    return (
        deployable,
        Trainee(model, teacher, cfg),
        {
            "model": cfg.backbone.model,
            "img_size": img_size,
            "params_m": round(stats["model/params_m"], 4),
            "gmacs": round(stats["model/gmacs"], 6),
            "gmacs_counted": round(stats["model/gmacs_counted"], 6),
            "train_gmacs": round(train_cost(model, teacher)["train_gmacs"], 6),
            "tokens_per_block": json.dumps(stats["model/tokens_per_block"]),
            "knobs": json.dumps(model.knobs(), default=str),
        },
    )


def training_setup(model: TokenReducer, deployable: nn.Module) -> nn.Module | None:
    """Put ``model`` in its main training phase, the last of its pipeline, and return its frozen teacher (or None).

    The phases before it (searches, extractions) need data and are not run: the structure they hand the last phase
    is the one the model deploys with, restored as a resumed run restores a finished phase's snapshot (ViT-Slim
    re-trains its extraction at the budget; for every other reducer the structure is already the deployed one).
    The teacher is built as a training fit builds it, from the backbone as it is (SiT without ``reducer.teacher``:
    the untrained backbone, which only a training run refuses).
    """
    model.load_structure(deployable.structure())
    model.enter_phase(model.phases()[-1].name)
    model.train()
    teacher = model.build_teacher()
    return freeze(teacher) if teacher is not None else None


def train_steps(
    trainees: Mapping[str, Trainee], settings: SpeedSettings, device: torch.device
) -> dict[str, tuple[Callable[[torch.Tensor], None], int]]:
    """``{key: (training step, img_size)}``: each row's model on ``device`` with AdamW over its parameter groups
    (the optimiser settings of its last phase), trained on random labels with its own loss terms."""
    if settings.compile:
        # Every row's step compiles the same function (``terms`` below) over another model; dynamo keeps one cache
        # per code object and runs it eagerly past the recompile limit (8), which would time later rows uncompiled.
        config = torch._dynamo.config
        limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.6
        setattr(config, limit, max(getattr(config, limit), 8 * len(trainees)))
    steps = {}
    for key, trainee in trainees.items():
        model, teacher, cfg = trainee.model.to(device), trainee.teacher, trainee.cfg
        if teacher is not None:
            teacher.to(device)
        optim = OmegaConf.to_container(cfg.optim, resolve=True) | model.phases()[-1].optim
        optimizer = build_optimizer(model, optim, effective_lr(optim, settings.train_batch_size))
        targets = torch.randint(int(cfg.num_classes), (settings.train_batch_size,), device=device)
        criterion = partial(soft_cross_entropy, label_smoothing=float(optim.get("label_smoothing", 0.0)))

        def terms(images: torch.Tensor, model=model, targets=targets, criterion=criterion, teacher=teacher) -> dict:
            return model.losses(images, targets, criterion, teacher)[1]

        steps[key] = (train_step(terms, optimizer, settings, device), int(cfg.backbone.img_size))
    return steps


def _relative(rows: list[dict[str, Any]]) -> None:
    """Fill each row's figures relative to the baseline of its backbone (measured in the same interleaved run)."""
    base = next(r for r in rows if r["kind"] == "baseline")
    for row in rows:
        row["gmacs_ratio"] = round(base["gmacs"] / row["gmacs"], 4)
        row["speedup"] = round(row["throughput"] / base["throughput"], 4)
        row["speedup_per_gmacs_ratio"] = round(row["speedup"] / row["gmacs_ratio"], 4)
        row["latency_speedup"] = (
            round(base["latency_ms"] / row["latency_ms"], 4) if row["latency_ms"] and base["latency_ms"] else None
        )
        row["slow"] = row["kind"] != "baseline" and row["speedup_per_gmacs_ratio"] < SPEEDUP_FLAG
        row["train_gmacs_ratio"] = round(base["train_gmacs"] / row["train_gmacs"], 4)
        timed = row.get("train_img_s") is not None and base.get("train_img_s") is not None
        row["train_speedup"] = round(row["train_img_s"] / base["train_img_s"], 4) if timed else None
        row["train_speedup_per_gmacs_ratio"] = (
            round(row["train_speedup"] / row["train_gmacs_ratio"], 4) if timed else None
        )
        if row["target_ratio"] is not None:
            target = row["target_ratio"] * base["gmacs"]
            row["target_gmacs"] = round(target, 6)
            row["budget_error_pct"] = round(100 * (row["gmacs"] - target) / target, 2)


def run_benchmark(
    cfg: DictConfig, progress: Callable[[int], Any] | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """Measure every planned row; returns (machine, measured rows, failed rows).

    ``progress(total)`` returns a tqdm-like bar (``update``, ``set_postfix_str``, ``close``), or pass None.
    A row that cannot be built (a budget out of a reducer's reach, a missing config) becomes a failed row with
    its error message instead of aborting the other rows; the baseline failing aborts the run.
    """
    settings = SpeedSettings.from_mapping(cfg)
    device = setup(settings)
    machine = machine_info(device)
    entries = plan(cfg)
    per_model = 1 + steps_per_model(settings) + train_steps_per_model(settings)  # +1: building and costing the row
    bar = progress(len(entries) * per_model) if progress else None

    def tick(name: str) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(name, refresh=False)

    context = {
        **machine,
        "batch_size": settings.batch_size,
        "precision": settings.precision,
        "compile": settings.compile,
        "runtime": settings.runtime,
        "train_batch_size": settings.train_batch_size,
    }
    rows, failed = [], []
    for backbone in cfg.backbones:
        models: dict[str, tuple[Callable[[torch.Tensor], Any], int]] = {}
        trainees: dict[str, Trainee] = {}
        measured: list[tuple[str, dict[str, Any]]] = []
        for entry in (e for e in entries if e.backbone == backbone):
            row = {
                **context,
                "backbone": entry.backbone,
                "reducer": entry.reducer,
                "point": entry.point,
                "kind": entry.kind,
                "overrides": " ".join(entry.overrides),
                "target_ratio": entry.target_ratio,
                "paper_gmacs": entry.paper_gmacs,
                "paper_top1": entry.paper_top1,
            }
            try:
                deployable, trainees[entry.key], stats = build(entry)
                prepared = prepare(deployable, settings, device)  # runtime=onnxruntime: the export may refuse
            except Exception as err:  # recorded, printed and turned into a non-zero exit by the CLI
                if entry.kind == "baseline":
                    raise
                failed.append({**row, "error": f"{type(err).__name__}: {str(err).strip().splitlines()[0]}"})
                if bar is not None:
                    bar.update(per_model)
                continue
            tick(entry.key)
            models[entry.key] = (prepared, stats["img_size"])
            measured.append((entry.key, {**row, **stats}))
        speeds = measure_speed(models, settings, device, tick)
        # The training pass holds every row's optimiser state: free the inference copies (and the loop's last
        # reference) first.
        models.clear()
        deployable = None
        train_speeds = {}
        if settings.train_batch_size is not None:
            train_speeds = measure_train_speed(train_steps(trainees, settings, device), settings, device, tick)
        trainees.clear()
        for key, row in measured:
            speed = speeds[key]
            row.update(
                throughput=round(speed.throughput, 3),
                throughput_iqr_pct=round(speed.throughput_iqr_pct, 2),
                latency_ms=None if speed.latency_ms is None else round(speed.latency_ms, 3),
                peak_mem_mb=None if speed.peak_mem_mb is None else round(speed.peak_mem_mb, 1),
                train_img_s=round(train_speeds[key].throughput, 3) if key in train_speeds else None,
                train_iqr_pct=round(train_speeds[key].throughput_iqr_pct, 2) if key in train_speeds else None,
            )
        _relative([row for _, row in measured])
        rows.extend(row for _, row in measured)
    if bar is not None:
        bar.close()
    return machine, rows, failed


def top1_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with a paper-reported top-1, as plot points (``top1`` = the paper's ImageNet figure)."""
    return [{**r, "top1": r["paper_top1"]} for r in rows if r.get("paper_top1") is not None]


COLUMNS = [
    "backbone",
    "model",
    "img_size",
    "reducer",
    "point",
    "kind",
    "overrides",
    "target_ratio",
    "target_gmacs",
    "budget_error_pct",
    "params_m",
    "gmacs",
    "gmacs_counted",
    "gmacs_ratio",
    "throughput",
    "throughput_iqr_pct",
    "speedup",
    "speedup_per_gmacs_ratio",
    "slow",
    "latency_ms",
    "latency_speedup",
    "peak_mem_mb",
    "train_gmacs",
    "train_gmacs_ratio",
    "train_img_s",
    "train_iqr_pct",
    "train_speedup",
    "train_speedup_per_gmacs_ratio",
    "paper_gmacs",
    "paper_top1",
    "tokens_per_block",
    "knobs",
    "batch_size",
    "train_batch_size",
    "precision",
    "compile",
    "runtime",
    "machine",
    "device",
    "device_name",
    "threads",
    "torch",
    "timm",
    "cuda",
    "python",
    "measured",
    "error",
]


def _point_cell(row: dict[str, Any]) -> str:
    error = row.get("budget_error_pct")
    if error is None:
        return row["point"]
    off = " ✗" if abs(error) > BUDGET_TOLERANCE_PCT else ""
    return f"{row['point']} ({error:+.1f}%{off})"


def _speedup_cell(row: dict[str, Any]) -> str:
    flag = " ⚠" if row["slow"] else ""
    return f"{row['speedup']:.2f}×{flag}"


MD_COLUMNS: list[Column] = [
    ("reducer", lambda r: r["reducer"]),
    ("point", _point_cell),
    ("params (M)", lambda r: fmt(r["params_m"], ".2f")),
    ("GMACs", lambda r: fmt(r["gmacs"], ".3f")),
    ("counted", lambda r: fmt(r["gmacs_counted"], ".3f")),
    ("paper", lambda r: fmt(r["paper_gmacs"], ".3g")),
    ("GMACs ratio", lambda r: f"{r['gmacs_ratio']:.2f}×"),
    ("img/s", lambda r: f"{r['throughput']:.1f} ±{r['throughput_iqr_pct']:.0f}%"),
    ("speed-up", _speedup_cell),
    ("speed-up ÷ ratio", lambda r: fmt(r["speedup_per_gmacs_ratio"], ".2f")),
    ("latency bs1 (ms)", lambda r: fmt(r["latency_ms"], ".1f")),
    ("peak mem (MB)", lambda r: fmt(r["peak_mem_mb"], ".0f")),
    # .get: rows kept from a benchmark written before training was timed lack these
    ("train GMACs", lambda r: fmt(r.get("train_gmacs"), ".3f")),
    ("train GMACs ratio", lambda r: fmt(r.get("train_gmacs_ratio"), ".2f")),
    (
        "train img/s",
        lambda r: "–" if r.get("train_img_s") is None else f"{r['train_img_s']:.1f} ±{r['train_iqr_pct']:.0f}%",
    ),
    ("train speed-up", lambda r: "–" if r.get("train_speedup") is None else f"{r['train_speedup']:.2f}×"),
    ("train speed-up ÷ ratio", lambda r: fmt(r.get("train_speedup_per_gmacs_ratio"), ".2f")),
    ("paper top-1", lambda r: fmt(r["paper_top1"], ".1f")),
    ("measured", lambda r: r.get("measured") or "–"),
]


def markdown(
    machine: dict[str, Any],
    settings: SpeedSettings,
    rows: list[dict[str, Any]],
    failed: list[dict[str, Any]],
    command: str,
) -> str:
    s = settings
    mem = (
        "CUDA max_memory_allocated above the pre-pass level"
        if machine["device"] == "cuda"
        else "rise of the process's peak resident set during one pass (Linux VmHWM)"
    )
    lines = [
        f"# tokred benchmark: {machine['device_name']} ({machine['threads']} threads)",
        "",
        f"torch {machine['torch']}, timm {machine['timm']}, python {machine['python']}"
        + (f", CUDA {machine['cuda']}" if machine["device"] == "cuda" else "")
        + f". Batch {s.batch_size}, {s.precision}, "
        + ("onnxruntime (the ONNX export, CPU); " if s.runtime == "onnxruntime" else "")
        + f"torch.compile {'on' if s.compile else 'off'}; "
        f"{s.warmup} warm-up pass(es), median of {s.repeats} interleaved rounds of {s.iters} pass(es); "
        f"latency: batch 1, median of {s.latency_repeats} rounds; "
        + (
            f"training: one AdamW step per pass at batch {s.train_batch_size}, timed the same way. "
            if s.train_batch_size
            else "training not timed. "
        )
        + "Untrained weights, random input. "
        f"Regenerate: `{command}`.",
        "",
        "*GMACs ratio* = baseline GMACs / row GMACs (the speed-up GMACs promise); *speed-up* = row img/s / baseline "
        f"img/s, both timed interleaved in this run. ⚠: speed-up below {SPEEDUP_FLAG} × GMACs ratio. "
        f"Matched-budget rows show the achieved GMACs' deviation from the requested budget (✗: over "
        f"{BUDGET_TOLERANCE_PCT:.0f}%). *paper*: the papers' reported GMACs / ImageNet top-1 at that operating "
        f"point, not measured here. Peak memory: {mem}, excluding weights. *train GMACs*: one training step per "
        "image, 3 × the forward of the model as it trains (DynamicViT: masked, on all tokens; SiT: + Reverse TSMs; "
        "Evo-ViT: + auxiliary head) + the forward of a frozen teacher (DynamicViT, SiT); *train speed-up*: training "
        "img/s over the baseline's, the reducer in the last phase of its pipeline with its own losses and teacher.",
    ]
    for backbone in dict.fromkeys(r["backbone"] for r in rows):
        sub = [r for r in rows if r["backbone"] == backbone]
        lines += ["", f"## {backbone} ({sub[0]['model']}, {sub[0]['img_size']} px)", "", md_table(sub, MD_COLUMNS)]
    slow = [r for r in rows if r["slow"]]
    if slow:
        lines += ["", f"### Speed-up below {SPEEDUP_FLAG} × GMACs ratio", ""]
        lines += [
            f"- {r['backbone']} {r['reducer']} {r['point']}: {r['speedup']:.2f}× measured vs "
            f"{r['gmacs_ratio']:.2f}× fewer GMACs ({r['speedup_per_gmacs_ratio']:.2f})"
            for r in slow
        ]
    if failed:
        lines += ["", "## Not measured", ""]
        lines += [f"- {r['backbone']} {r['reducer']} {r['point']} (`{r['overrides']}`): {r['error']}" for r in failed]
    return "\n".join(lines) + "\n"


def row_key(row: dict[str, Any]) -> tuple:
    """What a row measures: a re-measured row replaces the earlier row with this key, and only that one."""
    return tuple(
        row.get(k)
        for k in (
            "machine",
            "backbone",
            "reducer",
            "point",
            "target_ratio",
            "batch_size",
            "precision",
            "compile",
            "runtime",
        )
    )


def write_results(
    cfg: DictConfig, machine: dict[str, Any], rows: list[dict[str, Any]], failed: list[dict[str, Any]], command: str
) -> list[Path]:
    """benchmark.{csv,json,md} and the plots under ``<out_dir>/<machine>/``; returns the paths written."""
    settings = SpeedSettings.from_mapping(cfg)
    out = Path(cfg.out_dir) / (cfg.machine or machine["machine"])
    paths = [out / "benchmark.csv", out / "benchmark.json", out / "benchmark.md"]
    merged = merge_rows(paths[1], [*rows, *failed], row_key)
    rows, failed = [r for r in merged if not r.get("error")], [r for r in merged if r.get("error")]
    write_csv(paths[0], [*rows, *failed], COLUMNS)
    write_json(
        paths[1],
        {
            "machine": machine,
            "settings": settings.as_dict(),
            "budgets": list(cfg.budgets),
            "command": command,
            "rows": rows,
            "failed": failed,
        },
    )
    write_text(paths[2], markdown(machine, settings, rows, failed, command))
    paper = top1_rows(rows)
    plots = {
        "gmacs_vs_throughput": scatter_plot(
            out / "benchmark_gmacs_vs_throughput.png",
            rows,
            "gmacs",
            "throughput",
            xlabel="GMACs (analytic)",
            ylabel="throughput (img/s)",
            title=f"throughput vs GMACs, batch {settings.batch_size} {settings.precision}, {machine['device_name']}",
            ideal=True,
        ),
        "top1_vs_gmacs": scatter_plot(
            out / "benchmark_top1_vs_gmacs.png",
            paper,
            "gmacs",
            "top1",
            xlabel="GMACs (analytic, ours)",
            ylabel="paper-reported ImageNet top-1 (%)",
            title="paper top-1 vs GMACs",
            pareto="lower_x",
        ),
        "top1_vs_throughput": scatter_plot(
            out / "benchmark_top1_vs_throughput.png",
            paper,
            "throughput",
            "top1",
            xlabel="throughput (img/s, measured here)",
            ylabel="paper-reported ImageNet top-1 (%)",
            title="paper top-1 vs throughput",
            pareto="higher_x",
        ),
    }
    paths += [out / f"benchmark_{name}.png" for name, written in plots.items() if written]
    if cfg.wandb.enabled:
        log_rows(
            [*rows, *failed],
            COLUMNS,
            [
                ("gmacs", "throughput", "throughput vs GMACs"),
                ("gmacs", "paper_top1", "paper top-1 vs GMACs"),
                ("throughput", "paper_top1", "paper top-1 vs throughput"),
                ("train_gmacs", "train_img_s", "training throughput vs training GMACs"),
            ],
            project=cfg.wandb.project,
            name=cfg.wandb.name or f"benchmark-{machine['machine']}",
            job_type="benchmark",
            config={**machine, **settings.as_dict()},
            images={p.stem: p for p in paths if p.suffix == ".png"},
        )
    return paths
