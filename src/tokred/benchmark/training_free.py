"""``tokred-compare mode=training_free``: accuracy against GMACs and throughput of every training-free reducer over its
budget, applied to one trained baseline without any training -- the ToMe paper's style of figure, in minutes.

Each reducer that declares itself training-free (:func:`tokred.reducers.is_training_free`) wraps the baseline's own
weights at every ``target_ratio`` of the curve; the reducer's budget solver turns the ratio into its knob (ToMe's r,
Top-K/EViT's keep rate, ATS's K), so all curves share their x positions. Accuracy is ``tokred-eval``'s
(:func:`tokred.training.run.evaluate`) on the validation and, where there is one, the test split; every model is timed
in one interleaved run with the baseline (:mod:`tokred.benchmark.timing`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

from tokred.benchmark.outputs import Column, fmt, md_table, plt, write_csv, write_json, write_text
from tokred.benchmark.timing import SpeedSettings, machine_info, measure_speed, prepare, setup, steps_per_model
from tokred.config import compose_config
from tokred.data import build_datamodule
from tokred.export import load_deployable
from tokred.io import atomic_write
from tokred.reducers import available_reducers, create_reducer, is_training_free

COLUMNS = [
    "reducer",
    "target_ratio",
    "knob",
    "gmacs",
    "gmacs_ratio",
    "top1",
    "test_top1",
    "throughput",
    "throughput_iqr_pct",
    "speedup",
    "error",
]
KNOBS = {"tome": "r_list", "topk": "keep_rate", "evit": "keep_rate", "ats": "num_tokens"}


def _knob(model: nn.Module) -> str:
    """The reducer's own budget knob as its budget solver set it, for the table."""
    name = KNOBS.get(model.name)
    if name == "r_list":
        return f"r={sum(model.schedule)} merged"  # ToMe's per-block schedule, as the total merged
    value = getattr(model.cfg, name, None) if name else None
    text = "–" if value is None else f"{name}={value:.3g}" if isinstance(value, float) else f"{name}={value}"
    blocks = getattr(model.cfg, "blocks", None)  # ATS: where sampling starts, when its budget solver moved it
    return text + (f" from block {min(blocks)}" if blocks else "")


def curve_reducers(cfg: DictConfig) -> list[str]:
    """The reducers the curve covers: ``cfg.reducers`` (or every registered one) that are training-free."""
    names = list(cfg.reducers) if cfg.reducers else available_reducers()
    return [n for n in names if n != "none" and is_training_free(n)]


def measure_curve(cfg: DictConfig, baseline_export: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows of the curve (the baseline first) and the machine they were timed on."""
    curve = cfg.training_free
    base = load_deployable(baseline_export)
    vit = base.vit
    eval_cfg = compose_config(
        [*cfg.train, "logger=null", "callbacks=none", "+trainer.enable_progress_bar=false"], config_name="eval"
    )
    datamodule = build_datamodule(eval_cfg.dataset)
    from tokred.training.run import evaluate  # the training stack, imported only when a curve is measured

    points: list[tuple[dict[str, Any], nn.Module | None]] = [
        ({"reducer": "none", "target_ratio": 1.0, "knob": "–"}, base)
    ]
    for name in curve_reducers(cfg):
        overrides = OmegaConf.to_container(curve.knobs[name], resolve=True) if name in curve.knobs else {}
        for ratio in curve.ratios:
            row: dict[str, Any] = {"reducer": name, "target_ratio": float(ratio)}
            try:
                model = create_reducer({"name": name, **overrides, "target_ratio": float(ratio)}, vit).deployable()
                row["knob"] = _knob(model)
                points.append((row, model))
            except ValueError as err:  # a budget the method cannot reach on this model: a gap in its curve
                points.append(({**row, "error": str(err).splitlines()[0]}, None))
    with tempfile.TemporaryDirectory() as tmp:
        for row, model in tqdm(points, desc="training-free: accuracy", unit="model"):
            if model is None:
                continue
            metrics = evaluate(model, datamodule, eval_cfg, Path(tmp))
            row.update(
                gmacs=round(model.cost().gmacs, 5),
                top1=round(100 * metrics["val/acc1"], 2),
                test_top1=round(100 * metrics["test/acc1"], 2) if "test/acc1" in metrics else None,
            )
    settings = SpeedSettings.from_mapping(curve.speed)
    device = setup(settings)
    img = int(vit.patch_embed.img_size[0])
    timed = {i: (prepare(m, settings, device), img) for i, (_, m) in enumerate(points) if m is not None}
    with tqdm(total=len(timed) * steps_per_model(settings), desc="training-free: speed", unit="step") as bar:
        speeds = measure_speed(timed, settings, device, lambda _: bar.update(1))
    rows = [row for row, _ in points]
    for i, speed in speeds.items():
        rows[i].update(throughput=round(speed.throughput, 2), throughput_iqr_pct=round(speed.throughput_iqr_pct, 1))
    for row in rows:
        if row.get("gmacs"):
            row["gmacs_ratio"] = round(rows[0]["gmacs"] / row["gmacs"], 4)
            row["speedup"] = round(row["throughput"] / rows[0]["throughput"], 4)
    return rows, {**machine_info(device), **settings.as_dict()}


def curve_plot(path: Path, rows: Sequence[dict[str, Any]], x: str, xlabel: str, title: str) -> None:
    """One line per reducer through its budgets, the baseline as a star: accuracy against ``x``."""
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    cmap = plt.get_cmap("tab10")
    reducers = list(dict.fromkeys(r["reducer"] for r in rows if r["reducer"] != "none"))
    for i, name in enumerate(reducers):
        pts = sorted((r[x], r["top1"]) for r in rows if r["reducer"] == name and r.get("top1") is not None)
        ax.plot(*zip(*pts), marker="o", ms=4, color=cmap(i % 10), label=name)
    base = rows[0]
    ax.scatter([base[x]], [base["top1"]], marker="*", s=160, color="black", zorder=4, label="none (baseline)")
    ax.set(title=title, xlabel=xlabel, ylabel="top-1 (%), validation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=150))
    plt.close(fig)


MD_COLUMNS: list[Column] = [
    ("reducer", lambda r: r["reducer"]),
    ("target ratio", lambda r: fmt(r["target_ratio"], ".2f")),
    ("knob (solved)", lambda r: r.get("knob") or "–"),
    ("GMACs", lambda r: fmt(r.get("gmacs"), ".4f")),
    ("GMACs ratio", lambda r: "–" if r.get("gmacs_ratio") is None else f"{r['gmacs_ratio']:.2f}×"),
    ("val top-1 (%)", lambda r: fmt(r.get("top1"), ".2f")),
    ("test top-1 (%)", lambda r: fmt(r.get("test_top1"), ".2f")),
    (
        "img/s",
        lambda r: "–" if r.get("throughput") is None else f"{r['throughput']:.0f} ±{r['throughput_iqr_pct']:.0f}%",
    ),
    ("speed-up", lambda r: "–" if r.get("speedup") is None else f"{r['speedup']:.2f}×"),
    ("note", lambda r: r.get("error") or ""),
]


def write_curve(rows: list[dict[str, Any]], info: dict[str, Any], out: Path, name: str, command: str) -> list[Path]:
    """``<name>.{csv,json,md}`` and ``<name>_top1_vs_{gmacs,throughput}.png`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.{ext}" for ext in ("csv", "json", "md")]
    write_csv(paths[0], rows, COLUMNS)
    write_json(paths[1], {"machine": info, "command": command, "rows": rows})
    backbone = rows[0].get("backbone", "the baseline")
    lines = [
        f"# Training-free reducers on {backbone}",
        "",
        "Every training-free reducer applied to the trained baseline's own weights, no training, at each share of its "
        "GMACs (`target_ratio`; the reducer solves its own knob). Top-1 from tokred-eval's evaluation; throughput: "
        f"batch {info['batch_size']}, {info['precision']}, median of {info['repeats']} interleaved rounds on "
        f"{info['device_name']} ({info['threads'] or torch.get_num_threads()} threads), torch {info['torch']}. "
        f"Regenerate: `{command}`.",
        "",
        md_table(rows, MD_COLUMNS),
        "",
    ]
    write_text(paths[2], "\n".join(lines))
    for x, xlabel in (("gmacs", "GMACs per image (analytic)"), ("throughput", "throughput (img/s)")):
        path = out / f"{name}_top1_vs_{x}.png"
        curve_plot(path, rows, x, xlabel, f"training-free reducers on {backbone}: top-1 vs {x}")
        paths.append(path)
    return paths


def run_training_free(cfg: DictConfig, baseline_export: Path, command: str) -> list[Path]:
    """Measure the curve from ``baseline_export`` and write it to ``<report.out_dir>/<machine>/``; ``command`` is
    what regenerates it, for the table's header."""
    rows, info = measure_curve(cfg, baseline_export)
    backbone = next((o.split("=", 1)[1] for o in cfg.train if o.startswith("backbone=")), "the baseline")
    for row in rows:
        row["backbone"] = backbone
    machine = cfg.report.machine or info["machine"]
    return write_curve(rows, info, Path(cfg.report.out_dir) / machine, cfg.training_free.name, command)
