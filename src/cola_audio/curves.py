"""A run's training curve, whole across a resume: Lightning's metrics.csv → one clean CSV."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pandas as pd

from cola_audio import fsutil
from cola_audio.errors import MissingInput

log = logging.getLogger(__name__)

EARLIER_METRICS = "metrics-before-resume.csv"


def prepare_logs(out_dir: Path, resume: Path | None) -> None:
    """Keep the metrics of an interrupted run when resuming it; start clean otherwise.

    Lightning's CSVLogger deletes an existing metrics.csv, which would cut the curve at the resume
    point (or leave no curve at all when resuming a finished run).
    """
    logs = Path(out_dir) / "logs"
    if resume is None:
        shutil.rmtree(logs, ignore_errors=True)
        return
    current, earlier = logs / "metrics.csv", logs / EARLIER_METRICS
    if current.is_file():
        try:
            frames = [pd.read_csv(p) for p in (earlier, current) if p.is_file()]
        except pd.errors.ParserError as exc:  # a kill in the middle of Lightning's rewrite
            aside = current.with_name(f"metrics.csv.unreadable-{os.getpid()}")
            current.rename(aside)
            log.warning(
                "%s: unreadable (%s); moved to %s, its rows leave the curve",
                current,
                str(exc).strip(),
                aside,
            )
            return
        with fsutil.atomic_path(earlier) as tmp:
            pd.concat(frames, ignore_index=True).to_csv(tmp, index=False)
        current.unlink()


def export_curve(out_dir: Path, columns: list[str], dest: Path, x: str = "step") -> pd.DataFrame:
    """Lightning's sparse metrics.csv → one clean CSV per curve for DVC plots and the report."""
    logs = Path(out_dir) / "logs"
    parts = [pd.read_csv(p) for p in (logs / EARLIER_METRICS, logs / "metrics.csv") if p.is_file()]
    if not parts:
        raise MissingInput(f"{logs}: no metrics.csv; the run logged nothing")
    metrics = pd.concat(parts, ignore_index=True)
    present = [c for c in columns if c in metrics.columns]
    curve = metrics[[x, *present]].dropna(subset=present, how="all")
    curve = curve.groupby(x, as_index=False).first()
    with fsutil.atomic_path(dest) as tmp:
        curve.to_csv(tmp, index=False, lineterminator="\n", float_format="%.6g")
    return curve
