"""Test-set statistics with their uncertainty: pure functions of labels and predictions.

Every interval is a percentile bootstrap over test clips (scipy.stats.bootstrap). A run repeated
with several seeds is scored on the same clips, so one resample of clip indices scores every seed
of every run at once: the interval of a run's seed-mean, and of the paired difference between two
runs, both come from that one resampling.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import bootstrap

from cola_audio.errors import BadInput


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) counts, rows actual, columns predicted."""
    flat = np.asarray(labels) * n_classes + np.asarray(preds)
    return np.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def classification_metrics(
    labels: np.ndarray, preds: np.ndarray, genres: list[str]
) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class accuracy (recall) and the confusion matrix."""
    n = len(genres)
    confusion = confusion_matrix(labels, preds, n)
    recall = _recall(confusion)
    present = confusion.sum(1) > 0
    return {
        "accuracy": float(np.trace(confusion) / max(1, len(labels))),
        "macro_f1": float(_f1(confusion)[present].mean()) if present.any() else 0.0,
        "per_class_accuracy": {g: float(r) for g, r in zip(genres, recall, strict=True)},
        "confusion_matrix": confusion.tolist(),
        "labels": genres,
    }


def _recall(confusion: np.ndarray) -> np.ndarray:
    support = confusion.sum(-1)
    tp = np.diagonal(confusion, axis1=-2, axis2=-1)
    return np.divide(tp, support, out=np.zeros(tp.shape), where=support > 0)


def _f1(confusion: np.ndarray) -> np.ndarray:
    """Per-class F1 over the last two axes (any leading batch axes)."""
    tp = np.diagonal(confusion, axis1=-2, axis2=-1).astype(np.float64)
    support, predicted = confusion.sum(-1), confusion.sum(-2)
    denom = support + predicted
    return np.divide(2 * tp, denom, out=np.zeros(tp.shape), where=denom > 0)


def batched_macro_f1(labels: np.ndarray, preds: np.ndarray, n_classes: int) -> np.ndarray:
    """Macro-F1 over the last axis for any leading axes: labels (..., n), preds (..., n).

    Classes absent from a resample's labels are left out of the mean, as in
    `classification_metrics`.
    """
    lead = preds.shape[:-1]
    labels = np.broadcast_to(labels, preds.shape)
    batch = np.arange(int(np.prod(lead))).reshape(*lead, 1) * n_classes * n_classes
    flat = (batch + labels * n_classes + preds).ravel()
    counts = np.bincount(flat, minlength=int(np.prod(lead)) * n_classes * n_classes)
    confusion = counts.reshape(*lead, n_classes, n_classes)
    present = confusion.sum(-1) > 0
    f1 = _f1(confusion)
    return (f1 * present).sum(-1) / np.maximum(present.sum(-1), 1)


@dataclass(frozen=True)
class Scored:
    """One run's test predictions for each seed, on clips in one shared order."""

    labels: np.ndarray  # (n_clips,)
    preds: np.ndarray  # (n_seeds, n_clips)
    n_classes: int

    def accuracy(self, idx: np.ndarray) -> np.ndarray:
        """Seed-mean accuracy on the clips `idx` (..., k) → (...)."""
        correct = self.preds[:, idx] == self.labels[idx]  # (seeds, ..., k)
        return correct.mean(-1).mean(0)

    def macro_f1(self, idx: np.ndarray) -> np.ndarray:
        f1 = batched_macro_f1(self.labels[idx], self.preds[:, idx], self.n_classes)
        return f1.mean(0)

    def per_seed(self, metric: str) -> np.ndarray:
        every = np.arange(len(self.labels))
        single = [Scored(self.labels, p[None], self.n_classes) for p in self.preds]
        return np.array([float(getattr(s, metric)(every)) for s in single])


def bootstrap_ci(
    statistic: Callable[[np.ndarray], np.ndarray],
    n_clips: int,
    confidence: float,
    n_resamples: int,
    seed: int,
) -> tuple[float, float]:
    """Percentile interval of `statistic(clip indices)` under resampling of the test clips."""
    result = bootstrap(
        (np.arange(n_clips),),
        lambda idx, axis=-1: statistic(idx),
        vectorized=True,
        n_resamples=n_resamples,
        confidence_level=confidence,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def run_summary(
    scored: Scored, confidence: float, n_resamples: int, seed: int
) -> dict[str, float | int]:
    """Mean ± std over seeds and the bootstrap interval of the seed-mean, per metric."""
    out: dict[str, float | int] = {"seeds": len(scored.preds), "n_test": len(scored.labels)}
    for metric in ("accuracy", "macro_f1"):
        values = scored.per_seed(metric)
        lo, hi = bootstrap_ci(
            getattr(scored, metric), len(scored.labels), confidence, n_resamples, seed
        )
        out |= {
            f"{metric}_mean": float(values.mean()),
            f"{metric}_std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            f"{metric}_ci_low": lo,
            f"{metric}_ci_high": hi,
        }
    return out


def paired_difference(
    a: Scored, b: Scored, confidence: float, n_resamples: int, seed: int
) -> dict[str, float]:
    """Seed-mean accuracy of `a` minus that of `b`, with a paired bootstrap interval: both runs
    are scored on the same resampled clips, so clip difficulty cancels out."""
    if not np.array_equal(a.labels, b.labels):
        raise BadInput("paired runs must be scored on the same test clips in the same order")

    def diff(idx: np.ndarray) -> np.ndarray:
        return a.accuracy(idx) - b.accuracy(idx)

    every = np.arange(len(a.labels))
    lo, hi = bootstrap_ci(diff, len(a.labels), confidence, n_resamples, seed)
    return {"difference": float(diff(every)), "ci_low": lo, "ci_high": hi}


def verdict(low: float, high: float) -> str:
    """The words a difference's interval allows."""
    if low > 0:
        return "better"
    if high < 0:
        return "worse"
    return "no detectable difference"
