"""Optional wandb logging of result rows: one ``wandb.Table`` plus scatter plots built on it, so the dashboard compares
reducers with no manual set-up. Offline mode (``WANDB_MODE=offline``) works without an account.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def log_rows(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str],
    scatters: Sequence[tuple[str, str, str]],
    *,
    project: str,
    name: str,
    job_type: str,
    config: Mapping[str, Any],
    images: Mapping[str, Path] | None = None,
) -> str:
    """Log ``rows`` as a table, a ``wandb.plot.scatter`` per ``(x, y, title)`` and the PNGs; returns the run's dir."""
    import wandb  # imported here: wandb is slow to import and only needed when logging is on

    run = wandb.init(project=project, name=name, job_type=job_type, config=dict(config), reinit="finish_previous")
    try:
        table = wandb.Table(columns=list(columns), data=[[row.get(c) for c in columns] for row in rows])
        payload: dict[str, Any] = {"rows": table}
        for x, y, title in scatters:
            payload[f"{y}_vs_{x}"] = wandb.plot.scatter(table, x, y, title=title)
        for key, path in (images or {}).items():
            payload[key] = wandb.Image(str(path))
        run.log(payload)
        return str(Path(run.dir).parent)
    finally:
        run.finish()
