"""How alike are the reducers' token choices and features, and does choosing what the baseline attends to pay off?

``tokred-analyze`` runs every trained model (its ``export/``) on the same validation images and compares, per pair of
runs, what they keep (:func:`kept_iou`) and how they group patches (:func:`assignment_nmi`) block by block, and their
final pooled features (:func:`linear_cka`). Per run it measures how far its kept set agrees with the top-k of the
baseline model's CLS attention at the same block and count, and ranks that agreement against top-1
(:func:`spearman`). Top-1 on the analysed images comes with a bootstrap interval, and each run is paired with the
baseline on those images (paired bootstrap, exact McNemar: :mod:`tokred.stats`).

Token maps of every kind are read both ways: a kept / slow-path map is a partition (each kept patch its own group,
the dropped ones one group), and an assignment map has a kept set (the patches alone in their group: EViT's kept
patches exactly, ToMe's and SiT's unmerged ones).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: figures are files
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, OmegaConf, open_dict  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402
from torch import nn  # noqa: E402

from tokred.benchmark.outputs import fmt, md_table, write_json, write_text  # noqa: E402
from tokred.cli.visualize import unique_labels  # noqa: E402
from tokred.config import ConfigError  # noqa: E402
from tokred.data import build_datamodule  # noqa: E402
from tokred.export import load_deployable  # noqa: E402
from tokred.io import atomic_write  # noqa: E402
from tokred.pruning import head_mean_scores  # noqa: E402
from tokred.reducers.base import TokenMap  # noqa: E402
from tokred.stats import bootstrap_interval, mcnemar, paired_bootstrap  # noqa: E402
from tokred.vit_ops import embed, project_qkv, scoring_attention  # noqa: E402

MASK_KINDS = ("kept", "informative")


# ------------------------------------------------------------------------------------------------ similarity measures
def kept_iou(mask_a: torch.Tensor, mask_b: torch.Tensor) -> torch.Tensor:
    """Per image, the intersection over union |A & B| / |A | B| of two kept sets (B, ...) of bool; (B,) floats.
    Two empty sets are identical: 1."""
    a, b = mask_a.flatten(1).bool(), mask_b.flatten(1).bool()
    inter, union = (a & b).sum(1).double(), (a | b).sum(1).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def _compact(labels: torch.Tensor) -> torch.Tensor:
    """Per row of ``labels`` (B, P), the same partition with ids 0..(groups - 1), by sorting each row."""
    ordered, order = labels.sort(dim=1)
    new = torch.ones_like(ordered)
    new[:, 1:] = (ordered[:, 1:] != ordered[:, :-1]).long()
    return torch.empty_like(ordered).scatter_(1, order, new.cumsum(1) - 1)


def _group_sizes(ids: torch.Tensor) -> torch.Tensor:
    """Per element of compact ``ids`` (B, P), the size of its group."""
    counts = torch.zeros(ids.shape, dtype=torch.double, device=ids.device).scatter_add_(
        1, ids, torch.ones(ids.shape, dtype=torch.double, device=ids.device)
    )
    return counts.gather(1, ids)


def assignment_nmi(labels_a: torch.Tensor, labels_b: torch.Tensor) -> torch.Tensor:
    """Per image, the normalised mutual information of two partitions of its patches, (B, ...) integer ids; (B,).

    NMI = I(A; B) / ((H(A) + H(B)) / 2), the arithmetic-mean normalisation (Vinh, Epps & Bailey 2010; sklearn's
    default), 1 for the same partition whatever the ids, 0 for independent ones; two single-group partitions: 1.
    Each term is summed over patches rather than cells: with n_a, n_b, n_ab the sizes of a patch's groups and of
    their intersection, I = 1/n sum_i log(n n_ab / (n_a n_b)) and H(A) = -1/n sum_i log(n_a / n).
    """
    a, b = labels_a.flatten(1).long(), labels_b.flatten(1).long()
    if a.shape != b.shape:
        raise ValueError(f"partitions of different shapes {tuple(labels_a.shape)} and {tuple(labels_b.shape)}")
    ca, cb = _compact(a), _compact(b)
    n = a.shape[1]
    n_a, n_b, n_ab = _group_sizes(ca), _group_sizes(cb), _group_sizes(_compact(ca * n + cb))
    mutual = torch.log(n * n_ab / (n_a * n_b)).mean(1)
    h_a, h_b = -torch.log(n_a / n).mean(1), -torch.log(n_b / n).mean(1)
    both = h_a + h_b
    nmi = torch.where(both > 0, 2 * mutual / both.clamp(min=1e-300), torch.ones_like(both))
    return nmi.clamp(0, 1)  # rounding only


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear centred kernel alignment of two representations of the same n inputs, x (n, p) and y (n, q)
    (Kornblith et al., ICML 2019, eq. 5): ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on column-centred X, Y.
    Invariant to orthogonal transforms and isotropic scaling of either; 1 for the same features."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka needs (n, p) and (n, q) features of the same inputs, got {x.shape}, {y.shape}")
    x, y = x.double(), y.double()
    x, y = x - x.mean(0), y - y.mean(0)
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    return float(cross / (torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)))


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, tied values sharing the mean of their ranks."""
    ranks = np.empty(len(values))
    ranks[np.argsort(values, kind="stable")] = np.arange(1, len(values) + 1)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=ranks) / counts)[inverse]


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's r of the ranks (ties share their mean rank). NaN when either side is
    constant (no ranking to correlate)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise ValueError(f"spearman needs two equally long sequences of >= 2 values, got {x.shape} and {y.shape}")
    rx, ry = _ranks(x) - (len(x) + 1) / 2, _ranks(y) - (len(y) + 1) / 2
    norm = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / norm) if norm else math.nan


# ------------------------------------------------------------------------------------------------ reading token maps
def kept_set(token_map: TokenMap) -> torch.Tensor:
    """(B, P) bool: the patches a block computes as their own token (kept / slow path; in an assignment map, the
    patches alone in their group)."""
    values = token_map.values.flatten(1)
    if token_map.kind in MASK_KINDS:
        return values > 0.5
    return _group_sizes(_compact(values.long())) == 1


def partition(token_map: TokenMap) -> torch.Tensor:
    """(B, P) group ids: an assignment map's own; a kept map's kept patches one group each, the rest one group."""
    values = token_map.values.flatten(1)
    if token_map.kind not in MASK_KINDS:
        return values.long()
    own = torch.arange(values.shape[1], device=values.device).expand_as(values)
    return torch.where(values > 0.5, own, values.shape[1])


def reduces(token_map: TokenMap) -> bool:
    """Whether the block computes fewer tokens than patches for some image (a patch dropped, or merged)."""
    values = token_map.values.flatten(1)
    if token_map.kind in MASK_KINDS:
        return bool((values <= 0.5).any())
    groups = _compact(values.long()).amax(1) + 1
    return bool((groups < values.shape[1]).any())


def top_k_mask(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(B, P) bool: per image, its ``counts[b]`` highest ``scores`` (ties in sort order)."""
    order = scores.argsort(dim=1, descending=True)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order)
    )
    return rank < counts.unsqueeze(1)


@torch.no_grad()
def attention_scores(vit: VisionTransformer, images: torch.Tensor) -> list[torch.Tensor]:
    """Per block, the head-mean attention of the CLS query over the patches (B, P) in the unreduced forward (on a
    model without CLS token, the mean attention each patch receives: :func:`tokred.vit_ops.scoring_attention`).
    The blocks run as timm runs them; the row is recomputed from each block's own q and k beside it."""
    x = embed(vit, images)
    scores = []
    for blk in vit.blocks:
        q, k, _ = project_qkv(blk.attn, blk.norm1(x))
        scores.append(head_mean_scores(scoring_attention(blk.attn, q, k, vit.has_class_token), vit.num_prefix_tokens))
        x = blk(x)
    return scores


# ------------------------------------------------------------------------------------------------ observing runs
@dataclass
class Observation:
    """One run on the analysed images: per-block maps (over all images), pooled features, per-image correctness."""

    label: str
    run_dir: str
    reducer: str
    gmacs: float
    top1: float | None  # the run's own top-1 (summary.json), on its whole split; None without a summary
    split: str | None
    maps: list[TokenMap]
    features: torch.Tensor  # (N, D): the input of the classifier head
    correct: torch.Tensor  # (N,) bool
    attention: list[torch.Tensor] | None = None  # per block (N, P), the baseline's only


@torch.no_grad()
def observe(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int, attention: bool = False
) -> tuple[list[TokenMap], torch.Tensor, torch.Tensor, list[torch.Tensor] | None]:
    """Run ``model`` (eval mode) over ``images`` in batches: its token maps, the pooled features its head receives
    (a forward hook on ``vit.head``: no reducer's forward is touched), per-image correctness and, if asked, the
    CLS attention of its unreduced forward."""
    device = next(model.parameters()).device
    captured: list[torch.Tensor] = []
    hook = model.vit.head.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0].detach()))
    maps, features, correct, scores = [], [], [], []
    try:
        for start in range(0, len(images), batch_size):
            x, y = images[start : start + batch_size].to(device), labels[start : start + batch_size].to(device)
            captured.clear()
            correct.append((model(x).argmax(-1) == y).cpu())
            features.append(captured[-1].flatten(1).float().cpu())  # the last head call made the logits
            maps.append(model.token_maps(x))
            if attention:
                scores.append(attention_scores(model.vit, x))
    finally:
        hook.remove()
    merged = [
        TokenMap(first.block, first.kind, torch.cat([batch[i].values.cpu() for batch in maps]))
        for i, first in enumerate(maps[0])
    ]
    per_block = [torch.cat([batch[i] for batch in scores]).cpu() for i in range(len(scores[0]))] if attention else None
    return merged, torch.cat(features), torch.cat(correct), per_block


# ------------------------------------------------------------------------------------------------ comparing runs
def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def pattern_similarity(a: Sequence[TokenMap], b: Sequence[TokenMap]) -> dict[str, Any]:
    """Per block both runs have: mean kept-set IoU and mean partition NMI over the images, None where neither run
    reduces (both trivially 1); and their means over the blocks where one does."""
    other = {m.block: m for m in b}
    shared = [(ma, other[ma.block]) for ma in a if ma.block in other]
    blocks, iou, nmi = [ma.block for ma, _ in shared], [], []
    for ma, mb in shared:
        active = reduces(ma) or reduces(mb)
        iou.append(float(kept_iou(kept_set(ma), kept_set(mb)).mean()) if active else None)
        nmi.append(float(assignment_nmi(partition(ma), partition(mb)).mean()) if active else None)
    return {"blocks": blocks, "iou": iou, "nmi": nmi, "iou_mean": _mean(iou), "nmi_mean": _mean(nmi)}


def attention_agreement(maps: Sequence[TokenMap], attention: Sequence[torch.Tensor]) -> dict[str, Any]:
    """Per block where the run reduces: mean IoU of its kept set with the top-k patches of the baseline's CLS
    attention at that block, k the run's kept count per image, over the images that keep a patch; and the mean over
    those blocks."""
    per_block = []
    for m in maps:
        if m.block >= len(attention) or not reduces(m):
            per_block.append(None)
            continue
        kept = kept_set(m)
        some = kept.any(1)  # an image with no patch left alone (all merged) agrees vacuously: left out
        top = top_k_mask(attention[m.block], kept.sum(1))
        per_block.append(float(kept_iou(kept[some], top[some]).mean()) if some.any() else None)
    return {"blocks": [m.block for m in maps], "iou": per_block, "mean": _mean(per_block)}


def _finite(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else value


def compare(
    runs: Sequence[Observation], baseline: int | None, confidence: float = 0.95, n_boot: int = 10_000, seed: int = 0
) -> dict[str, Any]:
    """The analysis of observed ``runs`` (``baseline``: index of the reference run, or None): per-run rows, per-pair
    similarities and the rank correlation of attention agreement with top-1, as JSON-able values."""
    base = runs[baseline] if baseline is not None else None
    rows = []
    for run in runs:
        acc, lo, hi = bootstrap_interval(run.correct, confidence, n_boot, seed)
        row: dict[str, Any] = {
            "label": run.label,
            "reducer": run.reducer,
            "gmacs": round(run.gmacs, 4),
            "top1": run.top1,
            "split": run.split,
            "top1_images": acc,
            "top1_images_ci": [lo, hi],
            "diff_vs_baseline": None,
            "diff_vs_baseline_ci": None,
            "bootstrap_p_vs_baseline": None,
            "mcnemar_p_vs_baseline": None,
            "attention_iou": None,
            "attention_iou_blocks": None,
            "run_dir": run.run_dir,
        }
        if base is not None and run is not base:
            diff, dlo, dhi, p = paired_bootstrap(run.correct, base.correct, confidence, n_boot, seed)
            agreement = attention_agreement(run.maps, base.attention)
            row.update(
                diff_vs_baseline=diff,
                diff_vs_baseline_ci=[dlo, dhi],
                bootstrap_p_vs_baseline=p,
                mcnemar_p_vs_baseline=mcnemar(run.correct, base.correct),
                attention_iou=agreement["mean"],
                attention_iou_blocks=agreement["iou"],
            )
        rows.append(row)
    pairs = [
        {
            "a": a.label,
            "b": b.label,
            "cka": _finite(linear_cka(a.features, b.features)),
            **pattern_similarity(a.maps, b.maps),
        }
        for a, b in combinations(runs, 2)
    ]
    # The run's own top-1 (its whole split) when every run has a summary, else top-1 on the analysed images.
    source = "summary" if all(r["top1"] is not None for r in rows) else "images"
    points = [(r["attention_iou"], r["top1"] if source == "summary" else r["top1_images"]) for r in rows]
    points = [p for p in points if p[0] is not None]
    rho = _finite(spearman(*zip(*points))) if len(points) >= 3 else None
    return {
        "images": int(len(runs[0].correct)),
        "confidence": confidence,
        "n_boot": n_boot,
        "baseline": base.label if base is not None else None,
        "runs": rows,
        "pairs": pairs,
        "correlation": {"spearman": rho, "n": len(points), "top1_source": source},
    }


# ------------------------------------------------------------------------------------------------ files
def _matrix(labels: Sequence[str], pairs: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    """Symmetric (runs x runs) matrix of a pair value, 1 on the diagonal, NaN where missing."""
    index = {label: i for i, label in enumerate(labels)}
    out = np.eye(len(labels))
    for pair in pairs:
        value = pair[key]
        out[index[pair["a"]], index[pair["b"]]] = out[index[pair["b"]], index[pair["a"]]] = (
            np.nan if value is None else value
        )
    return out


def heatmap(ax: plt.Axes, values: np.ndarray, rows: Sequence[str], cols: Sequence[str], title: str) -> None:
    """``values`` in [0, 1] as coloured cells with their numbers; NaN cells blank."""
    image = ax.imshow(np.ma.masked_invalid(values), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    for (r, c), v in np.ndenumerate(values):
        if not np.isnan(v):
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if v < 0.6 else "black")
    ax.set_title(title, fontsize=9)
    ax.figure.colorbar(image, ax=ax, fraction=0.046)


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=130))
    plt.close(fig)
    return path


def similarity_figure(result: Mapping[str, Any], path: Path) -> Path:
    """Runs x runs: feature CKA, kept-set IoU and partition NMI (means over the blocks where a run reduces)."""
    labels = [r["label"] for r in result["runs"]]
    panels = (("cka", "feature CKA (linear)"), ("iou_mean", "kept-set IoU"), ("nmi_mean", "partition NMI"))
    side = 1.2 + 0.55 * len(labels)
    fig, axes = plt.subplots(1, 3, figsize=(3 * side + 1, side), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        heatmap(ax, _matrix(labels, result["pairs"], key), labels, labels, title)
    return _save(fig, path)


def blocks_figure(result: Mapping[str, Any], path: Path) -> Path | None:
    """Runs x blocks: IoU of each run's kept set with the baseline's CLS-attention top-k (blank: no reduction);
    None (no file) without a baseline or a reducing run. The pairs' per-block values are in analysis.json."""
    rows = [
        r for r in result["runs"] if r["attention_iou_blocks"] and any(v is not None for v in r["attention_iou_blocks"])
    ]
    if not rows:
        return None
    depth = max(len(r["attention_iou_blocks"]) for r in rows)
    values = np.full((len(rows), depth), np.nan)
    for i, row in enumerate(rows):
        values[i, : len(row["attention_iou_blocks"])] = [
            np.nan if v is None else v for v in row["attention_iou_blocks"]
        ]
    fig, ax = plt.subplots(figsize=(3.5 + 0.5 * depth, 1.2 + 0.3 * len(rows)))
    labels = [r["label"] for r in rows]
    heatmap(
        ax, values, labels, [str(b) for b in range(depth)], f"kept set vs {result['baseline']}'s CLS-attention top-k"
    )
    ax.set_xlabel("block", fontsize=8)
    return _save(fig, path)


RUN_COLUMNS = [
    ("run", lambda r: r["label"]),
    ("GMACs", lambda r: fmt(r["gmacs"], ".4f")),
    ("top-1 (%)", lambda r: "–" if r["top1"] is None else f"{100 * r['top1']:.2f} ({r['split']})"),
    (
        "top-1 here (%) [CI]",
        lambda r: (
            f"{100 * r['top1_images']:.2f} [{100 * r['top1_images_ci'][0]:.1f}, {100 * r['top1_images_ci'][1]:.1f}]"
        ),
    ),
    (
        "Δ vs baseline (pt) [CI]",
        lambda r: (
            "–"
            if r["diff_vs_baseline"] is None
            else f"{100 * r['diff_vs_baseline']:+.2f} [{100 * r['diff_vs_baseline_ci'][0]:+.1f}, "
            f"{100 * r['diff_vs_baseline_ci'][1]:+.1f}]"
        ),
    ),
    ("McNemar p", lambda r: fmt(r["mcnemar_p_vs_baseline"], ".3g")),
    ("bootstrap p", lambda r: fmt(r["bootstrap_p_vs_baseline"], ".3g")),
    ("IoU with CLS attention top-k", lambda r: fmt(r["attention_iou"], ".3f")),
]
PAIR_COLUMNS = [
    ("run a", lambda p: p["a"]),
    ("run b", lambda p: p["b"]),
    ("feature CKA", lambda p: fmt(p["cka"], ".3f")),
    ("kept-set IoU", lambda p: fmt(p["iou_mean"], ".3f")),
    ("partition NMI", lambda p: fmt(p["nmi_mean"], ".3f")),
]


def markdown(result: Mapping[str, Any]) -> str:
    """``analysis.md``: the per-run table, the rank correlation and the pairs table, each column explained."""
    corr = result["correlation"]
    rho = (
        f"Spearman rank correlation of the IoU with CLS attention top-k and top-1 ({corr['top1_source']}) over "
        f"{corr['n']} runs: {fmt(corr['spearman'], '.3f')}."
        if corr["spearman"] is not None
        else f"Rank correlation not computed: {corr['n']} runs with an attention IoU (needs a baseline and >= 3)."
    )
    conf = f"{100 * result['confidence']:g} %"
    return "\n".join(
        [
            f"# tokred analysis: {result.get('dataset', '')}",
            "",
            f"{len(result['runs'])} runs on the same {result['images']} validation images; baseline: "
            f"{result['baseline'] or 'none'}. top-1 (%): the run's own, on its whole split (summary.json); top-1 here: "
            f"on the analysed images, {conf} percentile bootstrap interval ({result['n_boot']} resamples). Δ: paired "
            "difference to the baseline on those images (paired bootstrap interval and p; exact McNemar p). IoU with "
            "CLS attention top-k: per block where the run reduces, its kept set against the patches the baseline's "
            "CLS attends to most at that block, as many as the run keeps; mean over those blocks.",
            "",
            md_table(result["runs"], RUN_COLUMNS),
            "",
            rho,
            "",
            "## Pairs",
            "",
            "Feature CKA: linear CKA of the pooled features the heads receive. Kept-set IoU and partition NMI: mean "
            "over the blocks where either run reduces (an assignment map's kept set is its patches alone in their "
            "group; a kept map's partition is each kept patch alone, the dropped ones together).",
            "",
            md_table(result["pairs"], PAIR_COLUMNS),
            "",
            f"Regenerate: `{result.get('command', 'tokred-analyze')}`.",
            "",
        ]
    )


def write_analysis(result: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """``analysis.json``, ``analysis.md``, ``analysis_similarity.png`` and (if any run reduces)
    ``analysis_blocks.png`` under ``out_dir``, each written atomically."""
    out_dir = Path(out_dir)
    write_json(out_dir / "analysis.json", result)
    write_text(out_dir / "analysis.md", markdown(result))
    written = [
        out_dir / "analysis.json",
        out_dir / "analysis.md",
        similarity_figure(result, out_dir / "analysis_similarity.png"),
    ]
    blocks = blocks_figure(result, out_dir / "analysis_blocks.png")
    return written + ([blocks] if blocks else [])


# ------------------------------------------------------------------------------------------------ runs on disk
def find_exports(paths: Sequence[str | Path]) -> list[Path]:
    """The export directories of ``paths``: each an export directory, a run directory (its ``export/``) or a
    directory of runs (every ``*/export`` below it, but runs set aside as ``<run>.old-<time>``)."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if (path / "config.json").is_file():
            found.append(path)
        elif (path / "export" / "config.json").is_file():
            found.append(path / "export")
        elif path.is_dir():
            below = sorted(
                p.parent
                for p in path.rglob("export/config.json")
                if not any(".old-" in part for part in p.relative_to(path).parts)
            )
            if not below:
                raise ConfigError(
                    f"{path} holds no exported run (no export/config.json below it); pass run directories "
                    "written by tokred-train, their export/ directories, or a multirun directory"
                )
            found += below
        else:
            raise ConfigError(f"{path} does not exist; pass run directories, export/ directories or a multirun dir")
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if len(unique) < 2:
        raise ConfigError(f"found {len(unique)} exported run; the analysis compares runs: pass at least two")
    return unique


def run_dir_of(export: Path) -> Path:
    return export.parent if export.name == "export" else export


def recorded_dataset(run_dir: Path) -> dict[str, Any] | None:
    """The dataset config a run trained on: ``run_config.json`` (resolved), else Hydra's ``.hydra/config.yaml``."""
    if (run_dir / "run_config.json").is_file():
        return json.loads((run_dir / "run_config.json").read_text()).get("dataset")
    if (run_dir / ".hydra" / "config.yaml").is_file():
        return OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml").dataset, resolve=True)
    return None


def recorded_top1(run_dir: Path) -> tuple[float | None, str | None]:
    """The run's own top-1 from ``summary.json``: the test split where it has one (as tokred-report reads it)."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return None, None
    summary = json.loads(path.read_text())
    split = "test" if summary.get("test/acc1") is not None else "val"
    value = summary.get(f"{split}/acc1")
    return (None, None) if value is None else (float(value), split)


def _run_label(meta: Mapping[str, Any]) -> str:
    knobs = meta["reducer"]
    ratio = knobs.get("target_ratio")
    return knobs["name"] if ratio is None else f"{knobs['name']}@{float(ratio):g}"


def _dataset(cfg: DictConfig, run_dirs: Sequence[Path]) -> dict[str, Any]:
    """The dataset to analyse: ``dataset=`` of the command line, else the one all the runs recorded."""
    if cfg.get("dataset") is not None:
        return OmegaConf.to_container(cfg["dataset"], resolve=True)
    recorded = {str(d): recorded_dataset(d) for d in run_dirs}
    missing = [d for d, data in recorded.items() if data is None]
    if missing:
        raise ConfigError(f"{missing[0]} records no dataset (no run_config.json); pass dataset=<name> [dataset.*=...]")
    names = {json.dumps(data, sort_keys=True) for data in recorded.values()}
    if len(names) > 1:
        raise ConfigError(
            "the runs were trained on different dataset configs; pass dataset=<name> [dataset.*=...] to analyse "
            "them on one"
        )
    return next(iter(recorded.values()))


def validation_images(dataset_cfg: Mapping[str, Any], n: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` validation images (evaluation transform) and labels of the dataset."""
    datamodule = build_datamodule(dataset_cfg)
    if datamodule.num_classes != num_classes:
        raise ConfigError(
            f"the runs have {num_classes}-class heads but dataset {dataset_cfg.get('name')} has "
            f"{datamodule.num_classes} classes; analyse them on the dataset they were trained on"
        )
    data = datamodule.val_set
    samples = [data[i] for i in range(min(n, len(data)))]
    if not samples:
        raise ConfigError(f"dataset {dataset_cfg.get('name')} has no validation images")
    return torch.stack([s[0] for s in samples]), torch.tensor([int(s[1]) for s in samples])


def _baseline_index(cfg: DictConfig, exports: Sequence[Path], reducers: Sequence[str]) -> int | None:
    """Index of the reference run: ``baseline=`` of the command line, else the one run with reducer none."""
    if cfg.get("baseline"):
        path = Path(str(cfg["baseline"])).expanduser()
        wanted = (path / "export" if (path / "export" / "config.json").is_file() else path).resolve()
        if wanted not in exports:
            raise ConfigError(f"baseline={cfg['baseline']} is not one of the analysed runs; pass one of them")
        return list(exports).index(wanted)
    plain = [i for i, name in enumerate(reducers) if name == "none"]
    if len(plain) > 1:
        raise ConfigError(f"{len(plain)} runs have reducer=none; choose the reference with baseline=<run dir>")
    return plain[0] if plain else None


def analyze(cfg: DictConfig, runs: Sequence[str | Path], command: str = "tokred-analyze") -> list[Path]:
    """The whole analysis of ``runs`` as a composed ``conf/analyze.yaml`` asks; returns the files written."""
    n, batch_size = int(cfg["n"]), int(cfg["batch_size"])
    for key, value in (("n", n), ("batch_size", batch_size)):
        if value < 1:
            raise ConfigError(f"{key}={value} must be >= 1 ({key}: validation images analysed, resp. per forward)")
    exports = find_exports(runs)
    metas = [json.loads((e / "config.json").read_text()) for e in exports]
    inputs = {(int(m["backbone"]["img_size"]), m["backbone"].get("patch_size")) for m in metas}
    if len(inputs) > 1:
        raise ConfigError(
            f"the runs take different inputs ({sorted(inputs, key=str)}: px, patch); the maps and images are "
            "compared patch by patch, so analyse runs of one input size and patch size together"
        )
    baseline = _baseline_index(cfg, exports, [m["reducer"]["name"] for m in metas])
    if baseline is not None:  # the reference leads the tables
        order = [baseline, *(i for i in range(len(exports)) if i != baseline)]
        exports, metas, baseline = [exports[i] for i in order], [metas[i] for i in order], 0
    run_dirs = [run_dir_of(e) for e in exports]
    if cfg.get("dataset") is not None:  # the dataset's img_size follows the backbone, as in tokred-eval
        with open_dict(cfg):
            cfg.backbone = metas[0]["backbone"]
    dataset_cfg = _dataset(cfg, run_dirs)
    images, labels = validation_images(dataset_cfg, n, int(metas[0]["num_classes"]))
    device = torch.device(str(cfg["device"]))
    observations = []
    for i, (export, meta, label) in enumerate(zip(exports, metas, unique_labels([_run_label(m) for m in metas]))):
        model = load_deployable(export).to(device)  # one model in memory at a time
        maps, features, correct, attention = observe(model, images, labels, batch_size, i == baseline)
        top1, split = recorded_top1(run_dirs[i])
        observations.append(
            Observation(
                label,
                str(run_dirs[i]),
                meta["reducer"]["name"],
                model.cost().gmacs,
                top1,
                split,
                maps,
                features,
                correct,
                attention,
            )
        )
    result = compare(observations, baseline, float(cfg["confidence"]), int(cfg["n_boot"]), int(cfg["seed"]))
    result = {"dataset": dataset_cfg.get("name"), "command": command, **result}
    out_dir = Path(cfg["out_dir"]) if cfg.get("out_dir") else _default_out_dir(runs, run_dirs)
    written = write_analysis(result, out_dir)
    if cfg["wandb"]["enabled"]:
        print(f"wandb run: {log_analysis(result, written, str(cfg['wandb']['project']))}")
    return written


def _default_out_dir(runs: Sequence[str | Path], run_dirs: Sequence[Path]) -> Path:
    """Next to the runs: the one directory given (a multirun directory), else the runs' common parent."""
    if len(runs) == 1:
        return Path(runs[0]).expanduser()
    return Path(os.path.commonpath([str(d.parent) for d in run_dirs]))


def log_analysis(result: Mapping[str, Any], written: Sequence[Path], project: str) -> str:
    """The per-run rows as a wandb.Table with an attention-IoU vs top-1 scatter, and the heat maps."""
    from tokred.benchmark.wandb_log import log_rows

    columns = [
        "label",
        "reducer",
        "gmacs",
        "top1",
        "top1_images",
        "diff_vs_baseline",
        "mcnemar_p_vs_baseline",
        "attention_iou",
    ]
    return log_rows(
        result["runs"],
        columns,
        [("attention_iou", "top1_images", "top-1 vs IoU with CLS attention top-k")],
        project=project,
        name=f"analysis-{result.get('dataset')}",
        job_type="analysis",
        config={k: result[k] for k in ("images", "confidence", "n_boot", "baseline", "correlation")},
        images={p.stem: p for p in written if p.suffix == ".png"},
    )
