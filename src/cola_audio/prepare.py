"""`cola prepare`: metadata JSON under data/meta/ from the release's tracks.csv.

Fixes the seed repository's flaws at the source: labels come from sorted genre names (the same
ids on every run and machine), the split is the official `set.split` (artist-filtered), and the
pretraining set leaves out the fine-tuning subset's validation and test audio.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from cola_audio import fma, folder, fsutil, meta
from cola_audio.errors import BadInput

log = logging.getLogger(__name__)


def in_subset(tracks: pd.DataFrame, subset: str) -> pd.Series:
    """Tracks held by fma_<subset>: their smallest subset is at most `subset`."""
    return tracks[("set", "subset")] <= subset


def label_map(genres: pd.Series) -> dict[str, int]:
    """Sorted genre names → 0..n-1: stable across runs, machines and row orders."""
    return {name: i for i, name in enumerate(sorted(set(genres)))}


def build(
    tracks: pd.DataFrame,
    data: dict[str, Any],
    guard: dict[str, bool],
    raw_dir: Path = fma.RAW_DIR,
) -> dict[str, Any]:
    """Pure: the three metadata documents from a parsed tracks table. `guard` is the prepare
    section: which fine-tuning validation/test audio (and artists) pretraining must not see."""
    root = Path(raw_dir)
    ft_subset, pt_subset = data["finetune_subset"], data["pretrain_subset"]
    ft = tracks[in_subset(tracks, ft_subset)]
    unlabelled = ft[ft[("track", "genre_top")] == ""]
    ft = ft[ft[("track", "genre_top")] != ""]
    labels = label_map(ft[("track", "genre_top")])
    bad_split = sorted(set(ft[("set", "split")]) - set(fma.SPLITS))
    if bad_split:
        raise BadInput(
            f"tracks.csv: unknown set.split values {bad_split}; expected {sorted(fma.SPLITS)}"
        )
    finetune = [
        {
            "track_id": int(tid),
            "genre": row[("track", "genre_top")],
            "label": labels[row[("track", "genre_top")]],
            "split": fma.SPLITS[row[("set", "split")]],
            "audio": (root / f"fma_{ft_subset}" / fma.audio_relpath(tid)).as_posix(),
        }
        for tid, row in ft.sort_index().iterrows()
    ]
    held_out = {t["track_id"] for t in finetune if t["split"] != "train"}
    pretrain, by_track, by_artist = pretrain_tracks(tracks, pt_subset, held_out, guard, root)
    split_counts = {s: sum(t["split"] == s for t in finetune) for s in ("train", "val", "test")}
    return {
        "labels": {"subset": ft_subset, "genres": list(labels), "ids": labels},
        "finetune": {
            "subset": ft_subset,
            "n_classes": len(labels),
            "split_counts": split_counts,
            "dropped_without_genre_top": [int(t) for t in unlabelled.index],
            "tracks": finetune,
        },
        "pretrain": {
            "subset": pt_subset,
            "excluded_eval_tracks": len(by_track),
            "excluded_eval_artist_tracks": len(by_artist),
            "tracks": pretrain,
        },
    }


def pretrain_tracks(
    tracks: pd.DataFrame, subset: str, held_out: set[int], guard: dict[str, bool], root: Path
) -> tuple[list[dict[str, Any]], set[int], set[int]]:
    """Pure: the pretraining tracks of `subset`, less the held-out (validation/test) tracks and,
    with `exclude_eval_artists`, every other track by their artists; and the two excluded sets."""
    by_artists = guard["exclude_eval_artists"]  # implies the track guard: same artists
    artists = tracks[("artist", "id")]
    held_out_artists = set(artists[sorted(held_out)].dropna()) if by_artists else set()
    pt = tracks[in_subset(tracks, subset)].sort_index()
    track_guard = guard["exclude_eval_from_pretrain"] or by_artists
    by_track = {int(t) for t in pt.index if track_guard and t in held_out}
    by_artist = {int(t) for t in pt.index if artists[t] in held_out_artists} - held_out
    pretrain = [
        {
            "track_id": int(tid),
            "audio": (root / f"fma_{subset}" / fma.audio_relpath(tid)).as_posix(),
        }
        for tid in pt.index
        if int(tid) not in by_track | by_artist
    ]
    return pretrain, by_track, by_artist


def build_folder(index: pd.DataFrame) -> dict[str, Any]:
    """Pure: the three metadata documents from a folder index (data.source: folder). Track ids
    number the labelled files in path order, then the unlabelled ones; class names sorted → ids;
    pretraining gets the training split and the unlabelled files, never validation or test."""
    index = index.sort_values("path", kind="stable")
    labelled = index[index["split"] != "unlabelled"]
    labels = label_map(labelled["label"])
    finetune = [
        {
            "track_id": i,
            "genre": row.label,
            "label": labels[row.label],
            "split": row.split,
            "audio": row.path,
            "sha1": row.sha1,
        }
        for i, row in enumerate(labelled.itertuples(), start=1)
    ]
    extra = index[index["split"] == "unlabelled"]
    unlabelled = [
        {"track_id": i, "audio": row.path, "sha1": row.sha1}
        for i, row in enumerate(extra.itertuples(), start=len(finetune) + 1)
    ]
    train = [
        {k: t[k] for k in ("track_id", "audio", "sha1")} for t in finetune if t["split"] == "train"
    ]
    counts = {s: sum(t["split"] == s for t in finetune) for s in ("train", "val", "test")}
    return {
        "labels": {"subset": "folder", "genres": list(labels), "ids": labels},
        "finetune": {
            "subset": "folder",
            "n_classes": len(labels),
            "split_counts": counts,
            "dropped_without_genre_top": [],
            "tracks": finetune,
        },
        "pretrain": {
            "subset": "folder",
            "excluded_eval_tracks": counts["val"] + counts["test"],
            "excluded_eval_artist_tracks": 0,
            "tracks": train + unlabelled,
        },
    }


def validate_meta(docs: dict[str, Any]) -> None:
    """The documents about to be written must pass the schema their readers check (a bug here
    otherwise, not bad input)."""
    for name, doc in docs.items():
        if (why := meta.problem(name, doc)) is not None:
            raise ValueError(f"data/meta/{name}.json would be {why}")


def run(
    params: dict[str, Any], out_dir: str | Path = "data/meta", raw_dir: Path = fma.RAW_DIR
) -> dict[str, Any]:
    data = params["data"]
    if data["source"] == "folder":
        docs = build_folder(folder.read_index(Path(raw_dir)))
    else:
        release = Path(raw_dir) / "fma_metadata"
        tracks = fma.read_tracks(release / "tracks.csv")
        fma.read_genres(release / "genres.csv")  # fail early on a wrong or missing genre table
        docs = build(tracks, data, params["prepare"], Path(raw_dir))
    validate_meta(docs)
    for name, doc in docs.items():
        fsutil.write_json(Path(out_dir) / f"{name}.json", doc)
    ft = docs["finetune"]
    log.info(
        "fine-tuning set: %d tracks, %d genres, split %s; pretraining set: %d tracks "
        "(%d validation/test tracks and %d more by their artists excluded)",
        len(ft["tracks"]),
        ft["n_classes"],
        ft["split_counts"],
        len(docs["pretrain"]["tracks"]),
        docs["pretrain"]["excluded_eval_tracks"],
        docs["pretrain"]["excluded_eval_artist_tracks"],
    )
    return docs
