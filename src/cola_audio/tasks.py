"""`cola task-data`: one downstream task's labelled clips, split, and kept out of pretraining.

A task (params `tasks.<name>`) is either the labelled subset of the pretraining release
(`source: release`: FMA-small genres, the official split of `data/meta/finetune.json`) or a
labelled folder (`source: folder`: a class-per-folder tree or a labels CSV, split by
`folder.index`; `demo` generates one). Its clips go to `<out>/clips.csv` (clip, path, label,
split, sha1). Validation and test audio must never have been seen in pretraining: any whose bytes
(SHA1) equal a pretraining clip's, whatever its name or source, is left out of the task and listed
with the reason in `<out>/excluded.csv`. Pretraining itself does not change when a task is added.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from cola_audio import digest, fma, fsutil, meta
from cola_audio.demo_tasks import GROUP_PATTERN, WRITERS
from cola_audio.errors import BadInput
from cola_audio.folder import index as folder_index
from cola_audio.folder import shown
from cola_audio.splits import classes_missing_a_split

log = logging.getLogger(__name__)

COLUMNS = ["clip", "path", "label", "split", "sha1"]


def release_clips(finetune: dict[str, Any], checksums: dict[str, str]) -> pd.DataFrame:
    """The release's labelled tracks as clips; SHA1s from the release's checksums (the folder
    source's metadata carries its own), else from the file itself."""
    rows = [
        {
            "clip": str(t["track_id"]),
            "path": t["audio"],
            "label": t["genre"],
            "split": t["split"],
            "sha1": t.get("sha1") or checksums.get(t["audio"]) or _file_sha1(t["audio"]),
        }
        for t in finetune["tracks"]
    ]
    return pd.DataFrame(rows, columns=COLUMNS)


def _file_sha1(path: str) -> str:
    """The file's SHA1, or '' where there is no readable file (nothing to score, nothing leaks:
    embedding skips it)."""
    try:
        return digest.file_digest(path, "sha1") if Path(path).is_file() else ""
    except OSError:
        return ""


def folder_clips(task: dict[str, Any], out: Path, section: str) -> pd.DataFrame:
    """A folder task's clips, indexed and split as `data.source: folder` does (grouped, stratified,
    copies kept in one split); a demo task's audio is generated under `out/audio` first."""
    cfg = {**task, "unlabelled_path": None, "demo": False}
    if task["demo"]:
        root = out / "audio"
        WRITERS[task["demo"]](root, task["demo_clips_per_class"])
        cfg |= {"path": root.as_posix(), "group_pattern": GROUP_PATTERN}
    table = folder_index(cfg, out, section)
    table = table.sort_values("path", ignore_index=True)
    table["clip"] = [Path(p).as_posix() for p in table["path"]]
    return table[COLUMNS]


def pretraining_sha1s(pretrain: dict[str, Any], checksums: dict[str, str]) -> dict[str, str]:
    """SHA1 → a pretraining clip holding those bytes (from the metadata, the release's checksums,
    or the file itself)."""
    found: dict[str, str] = {}
    for track in pretrain["tracks"]:
        path = track["audio"]
        sha1 = track.get("sha1") or checksums.get(path)
        if sha1 is None and Path(path).is_file():
            sha1 = digest.file_digest(path, "sha1")
        if sha1:
            found.setdefault(sha1, path)
    return found


def split_off_seen(clips: pd.DataFrame, seen: dict[str, str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Pure: (kept, excluded): validation and test clips whose bytes pretraining saw are excluded,
    each with the pretraining clip it equals."""
    held_out = clips["split"].isin(["val", "test"])
    leaked = held_out & clips["sha1"].isin(list(seen))
    excluded = clips[leaked].copy()
    excluded["reason"] = [f"same bytes as pretraining clip {seen[s]}" for s in excluded["sha1"]]
    return clips[~leaked].reset_index(drop=True), excluded.reset_index(drop=True)


def release_checksums(raw: Path) -> dict[str, str]:
    """Every `checksums` file of the release under raw, keyed by the audio's path as metadata
    names it (`data/raw/fma_small/000/000135.mp3`)."""
    found: dict[str, str] = {}
    for listing in sorted(Path(raw).glob("fma_*/checksums")):
        for rel, sha1 in fma.read_checksums(listing).items():
            found[(listing.parent / rel).as_posix()] = sha1
    return found


def check_task(clips: pd.DataFrame, name: str) -> None:
    if short := classes_missing_a_split(clips):
        raise BadInput(
            f"tasks.{name}: class(es) {shown(short)} have no clip left in train, val or test "
            "(after leaving out audio pretraining saw); add audio or lower the fractions"
        )


def run(params: dict[str, Any], name: str, raw: Path, meta_dir: Path, out: Path) -> pd.DataFrame:
    task = params["tasks"][name]
    out = Path(out)
    checksums = release_checksums(raw) if params["data"]["source"] != "folder" else {}
    if task["source"] == "release":
        clips = release_clips(meta.read(meta_dir, "finetune"), checksums)
    else:
        clips = folder_clips(task, out, f"tasks.{name}")
    if params["prepare"]["exclude_eval_from_pretrain"]:
        seen = pretraining_sha1s(meta.read(meta_dir, "pretrain"), checksums)
        clips, excluded = split_off_seen(clips, seen)
    else:  # leakage studied on purpose: nothing is left out
        excluded = clips.iloc[:0].assign(reason="")
    check_task(clips, name)
    fsutil.write_text(out / "clips.csv", clips.to_csv(index=False, lineterminator="\n"))
    fsutil.write_text(out / "excluded.csv", excluded.to_csv(index=False, lineterminator="\n"))
    if len(excluded):
        log.warning(
            "tasks.%s: %d validation/test clip(s) hold the bytes of pretraining audio and are "
            "left out (listed in %s), e.g. %s",
            name,
            len(excluded),
            out / "excluded.csv",
            excluded["path"].iloc[0],
        )
    log.info(
        "tasks.%s: %d clips, %d classes, split %s",
        name,
        len(clips),
        clips["label"].nunique(),
        clips["split"].value_counts().to_dict(),
    )
    return clips
