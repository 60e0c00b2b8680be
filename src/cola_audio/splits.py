"""The three split names, and the check every labelled table must pass before training or
probing: folder indexing, a task's clips and the embedded clips each run it."""

from __future__ import annotations

import pandas as pd

SPLITS = ("train", "val", "test")


def classes_missing_a_split(table: pd.DataFrame) -> list[str]:
    """The labels (column `label`) with no row in train, val or test (column `split`), sorted.
    A missing (NaN) label or split drops its row, as pandas' groupby does; the callers read every
    column as text, so none is missing."""
    counts = table.groupby(["label", "split"]).size().unstack(fill_value=0)
    return [str(c) for c in counts.index if any(counts.loc[c].get(s, 0) == 0 for s in SPLITS)]
