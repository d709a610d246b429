"""Result files and plots shared by ``tokred-benchmark`` and ``tokred-report``; every file is written atomically."""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: plots are files, never windows
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot is imported)

from tokred.io import atomic_write, atomic_write_json  # noqa: E402

MARKERS = {"baseline": "*", "operating_point": "o", "matched_budget": "s", "trained": "o"}
KIND_LABELS = {
    "baseline": "baseline",
    "operating_point": "paper operating point",
    "matched_budget": "matched budget",
    "trained": "trained run",
}


def write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if row.get(k) is None else row.get(k) for k in columns} for row in rows)
    atomic_write(path, lambda p: p.write_text(buffer.getvalue()))


def write_json(path: Path, payload: Any) -> None:
    atomic_write_json(path, payload)


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def merge_rows(
    path: Path, rows: Sequence[dict[str, Any]], key: Callable[[dict[str, Any]], tuple]
) -> list[dict[str, Any]]:
    """``rows`` (stamped ``measured`` now) plus the rows of the earlier results file ``path`` whose key they do not
    re-measure: a run restricted to one reducer or one set of runs replaces its own rows only, never the rest."""
    now = time.strftime("%Y-%m-%d %H:%M")
    fresh = [{**row, "measured": now} for row in rows]
    try:
        earlier = json.loads(Path(path).read_text())
        earlier = [*earlier.get("rows", []), *earlier.get("failed", [])]
    except (OSError, ValueError, AttributeError):  # no earlier file, or not one of ours: nothing to keep
        earlier = []
    seen = {key(row) for row in fresh}
    return [*fresh, *(row for row in earlier if isinstance(row, dict) and key(row) not in seen)]


def fmt(value: Any, spec: str = ".3g") -> str:
    if value is None or value == "":
        return "–"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


Column = tuple[str, Callable[[dict[str, Any]], str]]


def md_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """A GitHub-markdown table; each column is (header, row -> cell text)."""
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row) for _, cell in columns) + " |" for row in rows]
    return "\n".join(lines)


def pareto_front(xs: Sequence[float], ys: Sequence[float], higher_x_better: bool) -> list[int]:
    """Indices of the points no other point beats on both axes (higher y is better; x per ``higher_x_better``)."""
    order = sorted(range(len(xs)), key=lambda i: (-xs[i] if higher_x_better else xs[i], -ys[i]))
    front, best = [], float("-inf")
    for i in order:
        if ys[i] > best:
            front.append(i)
            best = ys[i]
    return front


def _colors(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    names = sorted({r["reducer"] for r in rows} - {"none"})
    cmap = plt.get_cmap("tab10")
    return {"none": "black", **{n: cmap(i % 10) for i, n in enumerate(names)}}


def scatter_plot(
    path: Path,
    rows: Sequence[dict[str, Any]],
    x: str,
    y: str,
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    pareto: str | None = None,
    ideal: bool = False,
    label_key: str = "point",
    interval: tuple[str, str] | None = None,
) -> bool:
    """One panel per backbone, a colour per reducer, a marker per row kind; False (no file) if nothing to plot.

    ``pareto``: ``"lower_x"`` or ``"higher_x"`` marks the front of rows that no other row of the panel beats.
    ``ideal``: draws what y would be if it scaled as 1/x from the ``none`` row (throughput proportional to 1/GMACs).
    ``interval``: the (low, high) keys of an interval around y, drawn as an error bar where a row has them.
    """
    rows = [r for r in rows if r.get(x) is not None and r.get(y) is not None]
    if not rows:
        return False
    panels = sorted({r["backbone"] for r in rows})
    colors = _colors(rows)
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.6), squeeze=False)
    for ax, backbone in zip(axes[0], panels):
        sub = [r for r in rows if r["backbone"] == backbone]
        seen: set[tuple[str, str]] = set()
        labelled: list[tuple[float, float]] = []
        x_span = (max(r[x] for r in sub) - min(r[x] for r in sub)) or 1.0
        y_span = (max(r[y] for r in sub) - min(r[y] for r in sub)) or 1.0
        for r in sub:
            key = (r["reducer"], r["kind"])
            ax.scatter(
                r[x],
                r[y],
                color=colors[r["reducer"]],
                marker=MARKERS.get(r["kind"], "o"),
                s=90 if r["kind"] == "baseline" else 40,
                zorder=3,
                label=None if key in seen else f"{r['reducer']} ({KIND_LABELS.get(r['kind'], r['kind'])})",
            )
            seen.add(key)
            if interval is not None and r.get(interval[0]) is not None:
                ax.errorbar(
                    r[x],
                    r[y],
                    yerr=[[r[y] - r[interval[0]]], [r[interval[1]] - r[y]]],
                    fmt="none",
                    ecolor=colors[r["reducer"]],
                    elinewidth=1,
                    capsize=2,
                    zorder=2,
                )
            # Rows at equal budgets bunch up and their labels would print over each other: one label per spot
            # (colour and marker still tell the rows apart).
            spot = (r[x] / x_span, r[y] / y_span)
            if all(abs(spot[0] - u) > 0.06 or abs(spot[1] - v) > 0.05 for u, v in labelled):
                labelled.append(spot)
                ax.annotate(
                    str(r.get(label_key, "")), (r[x], r[y]), fontsize=6, xytext=(3, 3), textcoords="offset points"
                )
        if ideal:
            base = next((r for r in sub if r["reducer"] == "none"), None)
            if base is not None:
                lo, hi = min(r[x] for r in sub), max(r[x] for r in sub)
                grid = [lo + (hi - lo) * i / 50 for i in range(51)]
                ax.plot(
                    grid,
                    [base[y] * base[x] / g for g in grid],
                    ":",
                    color="grey",
                    zorder=1,
                    label="ideal: ∝ 1/GMACs from none",
                )
        if pareto and len(sub) > 1:
            front = sorted(
                (sub[i] for i in pareto_front([r[x] for r in sub], [r[y] for r in sub], pareto == "higher_x")),
                key=lambda r: r[x],
            )
            ax.step(
                [r[x] for r in front],
                [r[y] for r in front],
                where="pre" if pareto == "higher_x" else "post",
                color="grey",
                lw=1,
                zorder=2,
                label="Pareto front",
            )
            ax.scatter(
                [r[x] for r in front],
                [r[y] for r in front],
                s=140,
                facecolors="none",
                edgecolors="black",
                lw=1,
                zorder=4,
            )
        ax.set(title=f"{title}\n{backbone}", xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=150))
    plt.close(fig)
    return True
