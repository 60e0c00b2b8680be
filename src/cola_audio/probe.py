"""`cola probe`: linear evaluation as the COLA paper and HEAR do it, on stored embeddings.

Per encoder (pretrained, random-init), label fraction and seed: a logistic-regression probe on
standardised clip vectors (task_embed.py), its L2 strength chosen on the validation split; the
training clips of a fraction are a stratified, seeded draw (at least one per class). Seconds per
task, not an epoch loop through the encoder.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from cola_audio import fsutil
from cola_audio.errors import BadInput, MissingInput
from cola_audio.splits import classes_missing_a_split

INITS = ("pretrained", "random")


def fraction_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Pure: sorted indices of a stratified draw of `fraction` of each class (at least one),
    the same for a seed and fraction whatever else is drawn."""
    rng = np.random.default_rng([seed, round(fraction * 1_000_000)])
    chosen = []
    for label in sorted(set(labels.tolist())):
        members = np.flatnonzero(labels == label)
        take = max(1, round(fraction * len(members)))
        chosen.append(
            rng.choice(members, size=take, replace=False) if take < len(members) else members
        )
    return np.sort(np.concatenate(chosen))


def fit_probe(
    x: dict[str, np.ndarray], y: dict[str, np.ndarray], grid: list[float]
) -> dict[str, Any]:
    """Pure: the logistic-regression probe whose L2 strength (C) scores best on validation
    (the smallest C among ties), fitted on the training split, scores test."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x["train"])
    scaled = {s: scaler.transform(v) for s, v in x.items()}
    best: tuple[float, float, Any] | None = None
    with threadpool_limits(1):  # one thread: the same sums, so the same bytes, on any machine
        for c in sorted(grid):
            model = LogisticRegression(C=c, max_iter=2000).fit(scaled["train"], y["train"])
            val = float((model.predict(scaled["val"]) == y["val"]).mean())
            if best is None or val > best[0]:
                best = (val, c, model)
    assert best is not None
    val_acc, c, model = best
    predicted = model.predict(scaled["test"])
    return {
        "C": c,
        "val_accuracy": val_acc,
        "test_accuracy": float((predicted == y["test"]).mean()),
        "predicted": predicted,
    }


def load_embeddings(folder: Path, pooling: str) -> tuple[pd.DataFrame, np.ndarray]:
    paths = [Path(folder) / name for name in ("clips.csv", f"{pooling}.npy", "skipped.csv")]
    for path in paths:
        if not path.is_file():
            raise MissingInput(f"{path}: missing; run `cola task-embed` first")
    clips = pd.read_csv(paths[0], dtype=str, keep_default_na=False)
    return clips, np.load(paths[1])


def check_splits(clips: pd.DataFrame, name: str) -> None:
    """After embedding (a clip one encoder skipped is dropped for both), every class still needs
    training, validation and test clips."""
    short = classes_missing_a_split(clips)
    if short or clips["label"].nunique() < 2:
        raise BadInput(
            f"tasks.{name}: after skipping clips that cannot be embedded, class(es) "
            f"{', '.join(short) or '(fewer than 2 classes left)'} lack train, val or test clips "
            f"(see data/tasks/{name}/embeddings/*/skipped.csv); add audio or lower min_seconds"
        )


def probe_task(
    params: dict[str, Any], name: str, data: Path, embeddings: Path, out: Path
) -> dict[str, Any]:
    """Write out/scores.json (per encoder × fraction × seed: C, validation and test accuracy) and
    out/predictions.csv (every probe's test predictions, one column each, for the report's
    bootstrap intervals)."""
    cfg = params["probe"]
    loaded = {init: load_embeddings(Path(embeddings) / init, cfg["pooling"]) for init in INITS}
    common = set.intersection(*(set(c["clip"]) for c, _ in loaded.values()))
    clips = loaded["pretrained"][0]
    clips = clips[clips["clip"].isin(common)].sort_values("clip", ignore_index=True)
    check_splits(clips, name)
    labels = sorted(set(clips["label"]))
    code = {label: i for i, label in enumerate(labels)}
    y = {
        s: clips.loc[clips["split"] == s, "label"].map(code).to_numpy()
        for s in ("train", "val", "test")
    }
    test_clips = clips.loc[clips["split"] == "test", "clip"].tolist()
    scores, predictions = [], {"clip": test_clips, "actual": [labels[i] for i in y["test"]]}
    for init, (table, matrix) in loaded.items():
        row_of = {clip: i for i, clip in enumerate(table["clip"])}
        x = {
            s: matrix[[row_of[c] for c in clips.loc[clips["split"] == s, "clip"]]]
            for s in ("train", "val", "test")
        }
        fitted: dict[bytes, dict[str, Any]] = {}  # a draw every seed makes (all labels) once
        for fraction, seed in itertools.product(
            sorted(cfg["label_fractions"]), sorted(cfg["seeds"])
        ):
            subset = fraction_subset(y["train"], fraction, seed)
            if subset.tobytes() not in fitted:
                fitted[subset.tobytes()] = fit_probe(
                    {**x, "train": x["train"][subset]},
                    {**y, "train": y["train"][subset]},
                    cfg["C_grid"],
                )
            fit = dict(fitted[subset.tobytes()])
            predictions[f"{init}/{fraction:g}/{seed}"] = [labels[i] for i in fit.pop("predicted")]
            scores.append(
                {"init": init, "fraction": fraction, "seed": seed, "n_train": len(subset), **fit}
            )
    out = Path(out)
    excluded = pd.read_csv(Path(data) / "excluded.csv", dtype=str, keep_default_na=False)
    task_clips = pd.read_csv(Path(data) / "clips.csv", dtype=str, keep_default_na=False)
    doc = {
        "task": name,
        "excluded": len(excluded),
        "skipped": len(task_clips) - len(clips),  # by either encoder
        "labels": labels,
        "split_counts": {s: int(len(v)) for s, v in y.items()},
        "pooling": cfg["pooling"],
        "scores": scores,
    }
    fsutil.write_json(out / "scores.json", doc)
    fsutil.write_text(
        out / "predictions.csv", pd.DataFrame(predictions).to_csv(index=False, lineterminator="\n")
    )
    return doc
