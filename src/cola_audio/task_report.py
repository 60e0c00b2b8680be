"""The downstream tasks in the report: a task × run table, paired gains, their average over tasks
and label-efficiency curves, each number with its interval.

A probe's cell is its seed-mean test accuracy with all training labels (fraction 1.0) ± the
standard deviation over seeds, and the percentile bootstrap interval of the seed-mean over test
clips; a gain is paired (both encoders scored on the same resampled clips); the average over tasks
resamples each task's test clips independently and averages the tasks' gains.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from cola_audio import fsutil, stats  # noqa: E402
from cola_audio.errors import MissingInput  # noqa: E402

PROBE_RUNS = {"random": "random-init probe", "pretrained": "pretrained probe"}
FULL = 1.0  # the label fraction the table and the gains use


def load_probes(folder: Path) -> tuple[dict[str, Any], dict[tuple[str, float], stats.Scored]]:
    """A task's scores.json and, per (encoder, fraction), its test predictions over seeds."""
    scores_path, preds_path = Path(folder) / "scores.json", Path(folder) / "predictions.csv"
    for path in (scores_path, preds_path):
        if not path.is_file():
            raise MissingInput(f"{path}: missing; run `cola probe` for this task first")
    doc = fsutil.read_json(scores_path)
    table = pd.read_csv(preds_path, dtype=str, keep_default_na=False)
    code = {label: i for i, label in enumerate(doc["labels"])}
    labels = table["actual"].map(code).to_numpy()
    scored: dict[tuple[str, float], stats.Scored] = {}
    for init in PROBE_RUNS:
        for fraction in sorted({s["fraction"] for s in doc["scores"]}):
            seeds = sorted(
                s["seed"] for s in doc["scores"] if s["init"] == init and s["fraction"] == fraction
            )
            preds = np.stack(
                [table[f"{init}/{fraction:g}/{seed}"].map(code).to_numpy() for seed in seeds]
            )
            scored[init, fraction] = stats.Scored(labels, preds, len(doc["labels"]))
    return doc, scored


def average_difference(
    pairs: list[tuple[stats.Scored, stats.Scored]],
    confidence: float,
    n_resamples: int,
    seed: int,
) -> dict[str, float]:
    """Mean over tasks of a − b (seed-mean accuracies) with a percentile interval: each resample
    draws every task's test clips with replacement, independently, pairing a and b within it."""
    rng = np.random.default_rng(seed)
    resampled = np.zeros(n_resamples)
    point = 0.0
    for a, b in pairs:
        every = np.arange(len(a.labels))
        point += float(a.accuracy(every) - b.accuracy(every))
        idx = rng.integers(0, len(a.labels), size=(n_resamples, len(a.labels)))
        resampled += a.accuracy(idx) - b.accuracy(idx)
    resampled /= len(pairs)
    low, high = np.quantile(resampled, [(1 - confidence) / 2, (1 + confidence) / 2])
    return {"difference": point / len(pairs), "ci_low": float(low), "ci_high": float(high)}


def summarise(
    probes: dict[str, tuple[dict[str, Any], dict[tuple[str, float], stats.Scored]]],
    finetuned: dict[str, dict[str, stats.Scored]],
    boot: dict[str, Any],
) -> dict[str, Any]:
    """Pure: every number of the tasks section. `finetuned` maps a task to its fine-tuning runs'
    test predictions ({} where it is probed only); `boot` holds confidence, n and seed."""
    tasks, gains, curves = [], [], []
    for name, (doc, scored) in probes.items():
        cells = {
            PROBE_RUNS[init]: stats.run_summary(scored[init, FULL], **_args(boot))
            for init in PROBE_RUNS
        }
        for run, s in finetuned.get(name, {}).items():
            cells[run] = stats.run_summary(s, **_args(boot))
        tasks.append(
            {
                "task": name,
                "classes": len(doc["labels"]),
                "split_counts": doc["split_counts"],
                "excluded": doc.get("excluded", 0),
                "skipped": doc.get("skipped", 0),
                "cells": cells,
            }
        )
        pairs = [
            (
                "pretrained probe",
                "random-init probe",
                scored["pretrained", FULL],
                scored["random", FULL],
            )
        ]
        runs = finetuned.get(name, {})
        if {"pretrained-finetune", "scratch-finetune"} <= set(runs):
            pairs.append(
                (
                    "pretrained-finetune",
                    "scratch-finetune",
                    runs["pretrained-finetune"],
                    runs["scratch-finetune"],
                )
            )
        for a, b, sa, sb in pairs:
            diff = stats.paired_difference(sa, sb, **_args(boot))
            gains.append(
                {
                    "task": name,
                    "a": a,
                    "b": b,
                    **diff,
                    "verdict": stats.verdict(diff["ci_low"], diff["ci_high"]),
                }
            )
        for (init, fraction), s in sorted(scored.items()):
            every = np.arange(len(s.labels))
            low, high = stats.bootstrap_ci(s.accuracy, len(s.labels), **_args(boot))
            curves.append(
                {
                    "task": name,
                    "init": init,
                    "fraction": fraction,
                    "n_train": _n_train(doc, init, fraction),
                    "accuracy_mean": float(s.accuracy(every)),
                    "per_seed": s.per_seed("accuracy").tolist(),
                    "ci_low": low,
                    "ci_high": high,
                }
            )
    average = average_difference(
        [(scored["pretrained", FULL], scored["random", FULL]) for _, scored in probes.values()],
        **_args(boot),
    )
    average["verdict"] = stats.verdict(average["ci_low"], average["ci_high"])
    return {"tasks": tasks, "gains": gains, "average_probe_gain": average, "curves": curves}


def _args(boot: dict[str, Any]) -> dict[str, Any]:
    return {"confidence": boot["confidence"], "n_resamples": boot["n"], "seed": boot["seed"]}


def _n_train(doc: dict[str, Any], init: str, fraction: float) -> int:
    return next(
        s["n_train"] for s in doc["scores"] if s["init"] == init and s["fraction"] == fraction
    )


def plot_learning_curves(curves: list[dict[str, Any]], path: Path) -> None:
    """Per task: test accuracy against the labelled training clips used, both encoders, seeds
    as dots and the seed-mean's interval as a band."""
    frame = pd.DataFrame(curves)
    names = list(dict.fromkeys(frame["task"]))
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for init, colour in (("pretrained", "tab:blue"), ("random", "tab:grey")):
            rows = frame[(frame["task"] == name) & (frame["init"] == init)].sort_values("n_train")
            ax.plot(
                rows["n_train"], rows["accuracy_mean"], "o-", color=colour, label=PROBE_RUNS[init]
            )
            ax.fill_between(
                rows["n_train"], rows["ci_low"], rows["ci_high"], color=colour, alpha=0.2
            )
            for n, seeds in zip(rows["n_train"], rows["per_seed"], strict=True):
                ax.scatter([n] * len(seeds), seeds, s=8, color=colour, alpha=0.6)
        ax.set_xscale("log")
        ax.set_title(name)
        ax.set_xlabel("labelled training clips")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("test accuracy")
    axes[0][-1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with fsutil.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
