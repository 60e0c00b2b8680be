"""`data.source: folder`: any labelled audio folder, indexed and split, in place of FMA.

A class-per-folder tree (Speech Commands, GTZAN, most private sets), or a labels CSV with
`path,label[,split][,group]` columns (ESC-50, UrbanSound8K). `cola download` indexes it: every
file's SHA1 (so DVC, featurization and the report trace each clip), its label, its group and its
split. The split is the CSV's when it has one; otherwise it is drawn once, stratified by class and
grouped by `group_pattern` (e.g. a speaker id in the file name), so a group never spans two
splits. Identical bytes never cross a split: copies under two labels, or in two of the CSV's
splits, are refused, and copies within one class join one group. Only regular files count as audio;
folders are walked through symlinks, each real folder once, so a link loop is skipped with a
warning. The embedded demo (`demo: true`) writes a small generated set of sound classes first, so
the folder source runs offline.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import soundfile as sf

from cola_audio import digest, fsutil
from cola_audio.errors import BadInput, MissingInput
from cola_audio.splits import SPLITS, classes_missing_a_split

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".au")
INDEX = "folder_index.csv"
DEMO_DIR = "folder-demo"  # under data/raw, so the demo is part of download's output
SHOWN = 5  # paths named in one message; the rest are counted


def shown(items: Sequence[str], limit: int = SHOWN) -> str:
    """The first `limit` items and how many more: a message stays one readable line."""
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


class Walk(NamedTuple):
    """What `walk` found under a folder."""

    files: list[Path]  # regular files (through symlinks that resolve), sorted
    skipped: list[Path]  # links not followed: loops, second paths to a folder, broken links
    unreadable: list[tuple[Path, str]]  # folders that could not be listed, with the reason


def walk(root: Path) -> Walk:
    """Every regular file under `root`, through symlinks: `rglob` left linked folders out and
    yielded folders and looping or broken links named like audio, which failed only when hashed.
    Each real folder is entered once and none above `root`, so a link loop ends; real subfolders
    go before linked ones, so a folder reachable both ways keeps its own path."""
    top = Path(os.path.realpath(root))
    seen: set[Path] = set()
    files: list[Path] = []
    skipped: list[Path] = []
    unreadable: list[tuple[Path, str]] = []
    real_dirs, linked_dirs = [Path(root)], []
    while real_dirs or linked_dirs:
        here = real_dirs.pop() if real_dirs else linked_dirs.pop(0)
        real = Path(os.path.realpath(here))
        if real in seen or real in top.parents:  # walked already, or a loop back up the tree
            skipped.append(here)
            continue
        seen.add(real)
        try:
            with os.scandir(here) as listed:
                entries = sorted(listed, key=lambda e: e.name)
        except OSError as exc:
            unreadable.append((here, exc.strerror or type(exc).__name__))
            continue
        for entry in entries:
            path = here / entry.name
            try:  # both follow links; a loop such as `a -> a` raises ELOOP
                is_dir, is_file = entry.is_dir(), entry.is_file()
            except OSError:
                is_dir = is_file = False
            if is_dir:
                (linked_dirs if entry.is_symlink() else real_dirs).append(path)
            elif is_file:
                files.append(path)
            elif entry.is_symlink():  # dangling or looping: nothing to read
                skipped.append(path)
    return Walk(sorted(files), sorted(skipped), unreadable)


def audio_under(root: Path) -> list[Path]:
    """The regular files under `root` named like audio; skipped links are logged, and a folder
    that cannot be listed is refused (its audio would silently be missing)."""
    found = walk(root)
    if found.unreadable:
        folders = [f"{p} ({why})" for p, why in found.unreadable]
        raise BadInput(
            f"{len(folders)} folder(s) under {root} cannot be listed: {shown(folders)}; "
            "fix their permissions (e.g. chmod a+rx) or remove them, then rerun"
        )
    if found.skipped:
        log.warning(
            "%s: skipped %d symlinked path(s) that loop, repeat a folder already walked or lead "
            "nowhere: %s",
            root,
            len(found.skipped),
            shown([p.as_posix() for p in found.skipped]),
        )
    return [p for p in found.files if p.suffix.lower() in AUDIO_SUFFIXES]


def _is_utf8(path: Path) -> bool:
    """False for a name holding bytes that are not UTF-8 (Python keeps them as surrogates)."""
    try:
        path.as_posix().encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(path: Path) -> str:
    return path.as_posix() if _is_utf8(path) else repr(os.fsencode(path))


def refuse_undecodable(paths: Iterable[Path], root: Path) -> None:
    """The index is UTF-8 text: a name that is not failed only when it was written, after every
    file was hashed. Refused first, naming each (as bytes, relative to `root`)."""
    names = [repr(os.fsencode(p.relative_to(root))) for p in paths if not _is_utf8(p)]
    if names:
        raise BadInput(
            f"{_printable(root)}: {len(names)} file name(s) are not valid UTF-8: {shown(names)}; "
            "rename them to UTF-8 names (e.g. `convmv -f latin1 -t utf8 -r --notest <folder>`), "
            "then rerun"
        )


def group_regex(pattern: str | None, section: str = "data.folder") -> re.Pattern[str] | None:
    """`<section>.group_pattern` compiled; params validation refuses a bad one before any job,
    this guards direct calls."""
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise BadInput(
            f"{section}.group_pattern {pattern!r} is not a valid regular expression ({exc}); "
            "fix it or set it to null"
        ) from None


def labelled_files(cfg: dict[str, Any], root: Path, section: str = "data.folder") -> pd.DataFrame:
    """path, label, split ('' when not given), group: from the labels CSV or the subfolders.
    Messages name the keys under `section` (data.folder, or a task's tasks.<name>)."""
    regex = group_regex(cfg["group_pattern"], section)
    if cfg["labels_csv"]:
        table = _from_labels_csv(Path(cfg["labels_csv"]), root, section)
    else:
        table = _from_class_folders(root, section)
    classes = sorted(set(table["label"]))
    if len(classes) < 2:
        source = cfg["labels_csv"] or root
        fix = (
            f"label files of another class in {source}"
            if cfg["labels_csv"]
            else f"add a subfolder per class ({section}.path must hold the class subfolders)"
        )
        raise BadInput(
            f"{source}: a classifier needs at least 2 classes, found {len(classes)}: "
            f"{', '.join(classes) or 'none'}; {fix}"
        )
    if "split" not in table:
        table["split"] = ""
    if "group" not in table:
        table["group"] = ""
    blank = table["group"] == ""  # the CSV's groups stand; the others come from the file name
    table.loc[blank, "group"] = [group_of(p, cfg["group_pattern"]) for p in table["path"][blank]]
    if regex and blank.any():
        names = sorted(Path(p).name for p in table["path"][blank])
        missed = [n for n in names if _group_match(regex, n) is None]
        if len(missed) == len(names):
            raise BadInput(
                f"{section}.group_pattern {cfg['group_pattern']!r} matches no file name under "
                f"{root} (e.g. {Path(table['path'].iloc[0]).name}); fix it or set it to null"
            )
        if missed:
            log.warning(
                "%s.group_pattern %r matches %d of %d file names under %s (not e.g. "
                "%s): each of the other %d files is its own group, so a speaker among them may "
                "span splits; widen the pattern if they share one",
                section,
                cfg["group_pattern"],
                len(names) - len(missed),
                len(names),
                root,
                ", ".join(missed[:2]),
                len(missed),
            )
    return table[["path", "label", "split", "group"]].sort_values("path", ignore_index=True)


def _from_labels_csv(csv: Path, root: Path, section: str) -> pd.DataFrame:
    """The labels CSV's rows, checked: columns, labels, duplicates, files present, splits."""
    table = _read_labels_csv(csv, section)
    missing_cols = {"path", "label"} - set(table.columns)
    if missing_cols:
        raise BadInput(f"{csv}: needs columns path,label[,split][,group]; no {missing_cols}")
    table = table.apply(lambda column: column.str.strip())
    if blank := [i + 2 for i in table.index[table["label"] == ""]]:
        raise BadInput(f"{csv}: line(s) {blank[:10]} have no label")
    if dupes := sorted(set(table["path"][table["path"].duplicated()])):
        raise BadInput(f"{csv}: path(s) listed more than once: {', '.join(dupes[:5])}")
    table["path"] = [(root / p).as_posix() for p in table["path"]]
    absent = [p for p in table["path"] if not Path(p).is_file()]
    if absent:
        raise BadInput(f"{csv}: {len(absent)} listed file(s) do not exist: {shown(absent)}")
    bad = sorted(set(table.get("split", pd.Series([], dtype=str))) - {"", *SPLITS})
    if bad:
        raise BadInput(f"{csv}: unknown split values {bad}; use train, val or test")
    return table


def _read_labels_csv(csv: Path, section: str) -> pd.DataFrame:
    """The CSV as text, or one line naming <section>.labels_csv and the fix."""
    what = f"{section}.labels_csv {csv}"
    if not csv.exists():
        raise MissingInput(
            f"{what}: no such file; give the path of a CSV with path,label[,split][,group] "
            "columns, or set it to null to read class subfolders"
        )
    if csv.is_dir():
        raise BadInput(f"{what}: is a folder, not a CSV file; give the CSV file's path")
    try:
        return pd.read_csv(csv, dtype=str, encoding="utf-8").fillna("")
    except UnicodeDecodeError:
        pass  # pandas gives an offset into its read buffer: find the line in the file below
    except pd.errors.EmptyDataError:
        raise BadInput(
            f"{what}: the file is empty; it needs a header line path,label[,split][,group] and "
            "a row per audio file"
        ) from None
    except pd.errors.ParserError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise BadInput(f"{what}: not a readable CSV ({reason}); fix it and rerun") from None
    data = csv.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, byte = data.count(b"\n", 0, exc.start) + 1, data[exc.start : exc.start + 1]
    else:  # the file changed since pandas read it: name no line rather than a wrong one
        line, byte = 0, b""
    at = f" (line {line} holds byte {byte!r})" if line else ""
    raise BadInput(f"{what}: not UTF-8 text{at}; save it as UTF-8 and rerun")


def _from_class_folders(root: Path, section: str) -> pd.DataFrame:
    """One row per audio file under each class subfolder of `root`."""
    classes = (
        sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith((".", "_")))
        if root.is_dir()
        else []
    )  # `_background_noise_`, `.ipynb_checkpoints`: not classes
    if not classes:
        raise MissingInput(
            f"{root}: no class subfolders; set {section}.path to a folder "
            f"with one subfolder per class, or give {section}.labels_csv"
        )
    refuse_undecodable(classes, root)
    files = {d.name: audio_under(d) for d in classes}
    refuse_undecodable((p for found in files.values() for p in found), root)
    empty = [name for name, found in files.items() if not found]
    if empty:
        raise BadInput(f"{root}: class folder(s) without audio files: {', '.join(empty)}")
    rows = [(p.as_posix(), name) for name, found in files.items() for p in found]
    table = pd.DataFrame(rows, columns=["path", "label"])
    return table


def _group_match(regex: re.Pattern[str], name: str) -> str | None:
    r"""The group id `regex` finds in a file name: its first capture group (the whole match when
    it has none), or None where it does not match or that group took no part or caught nothing
    (an optional group such as `^(?:spk(\d+)_)?` matches every name)."""
    match = regex.search(name)
    if match is None:
        return None
    found = match.group(1) if match.groups() else match.group(0)
    return found or None


def group_of(path: str, pattern: str | None) -> str:
    """The first capture group of `pattern` in the file name, or the file itself."""
    regex = group_regex(pattern)
    found = _group_match(regex, Path(path).name) if regex else None
    return path if found is None else found


def sha1s(paths: Iterable[str], where: str) -> list[str]:
    """Each file's SHA1; unreadable files are refused together, in one line, rather than by a
    traceback at the first."""
    found, denied = [], []
    for path in paths:
        try:
            found.append(digest.file_digest(path, "sha1"))
        except PermissionError:
            denied.append(path)
    if denied:
        raise BadInput(
            f"{where}: {len(denied)} file(s) cannot be read (permission denied): "
            f"{shown(denied, 3)}; make them readable (e.g. chmod a+r) or move them out of the "
            "folder, then rerun"
        )
    return found


def copies(table: pd.DataFrame) -> list[pd.DataFrame]:
    """The rows of each SHA1 held by more than one file, in path order."""
    twice = table[table["sha1"].duplicated(keep=False)].sort_values("path")
    return [rows for _, rows in twice.groupby("sha1", sort=False)]


def check_copies(table: pd.DataFrame, where: str) -> list[pd.DataFrame]:
    """Identical bytes under two labels (one clip, two classes) or in two given splits (a test
    clip that is also a training clip) are refused, naming the files; the sets of copies left,
    all within one class, are returned."""

    def named(sets: list[pd.DataFrame], column: str) -> str:
        described = [
            " = ".join(f"{row.path} ({getattr(row, column)})" for row in rows.itertuples())
            for rows in sets
        ]
        return shown(described, 3)

    sets = copies(table)
    if conflicts := [rows for rows in sets if rows["label"].nunique() > 1]:
        raise BadInput(
            f"{where}: {len(conflicts)} audio content(s) under different labels, byte for byte: "
            f"{named(conflicts, 'label')}; a clip has one class: remove the wrong copies or fix "
            "their labels"
        )
    if crossing := [rows for rows in sets if rows["split"].nunique() > 1]:
        raise BadInput(
            f"{where}: {len(crossing)} audio content(s) in two splits, byte for byte: "
            f"{named(crossing, 'split')}; a val/test clip must not be a training clip: give "
            "the copies one split or remove them"
        )
    return sets


def merge_groups(groups: Sequence[str], hashes: Sequence[str]) -> list[str]:
    """Each row's group, joined with every group that holds the same bytes (a union-find over
    group ids), so identical clips land in one split; a joined group takes its smallest id."""
    parent = {g: g for g in groups}

    def root(g: str) -> str:
        while parent[g] != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return g

    first: dict[str, str] = {}
    for group, sha1 in zip(groups, hashes, strict=True):
        a, b = root(first.setdefault(sha1, group)), root(group)
        parent[max(a, b)] = min(a, b)
    return [root(g) for g in groups]


def assign_splits(table: pd.DataFrame, cfg: dict[str, Any]) -> pd.Series:
    """Deterministic split per row: whole groups go to one split, visited in a seeded order and
    each placed where its classes are furthest below their val/test/train targets."""
    fractions = {"val": cfg["val_fraction"], "test": cfg["test_fraction"]}
    fractions["train"] = 1.0 - fractions["val"] - fractions["test"]
    per_class = table["label"].value_counts()
    target = {s: per_class * f for s, f in fractions.items()}
    placed = {s: pd.Series(0.0, index=per_class.index) for s in SPLITS}
    by_group = {g: rows["label"].value_counts() for g, rows in table.groupby("group", sort=True)}
    groups = list(by_group)
    order = np.random.default_rng(cfg["split_seed"]).permutation(len(groups))
    split_of: dict[str, str] = {}
    for g in (groups[i] for i in order):
        counts = by_group[g]
        need = {s: float(((target[s] - placed[s])[counts.index] * counts).sum()) for s in SPLITS}
        best = max(("val", "test", "train"), key=lambda s: need[s])
        split_of[g] = best
        placed[best] = placed[best].add(counts, fill_value=0.0)
    return table["group"].map(split_of)


def check_splits(table: pd.DataFrame, where: str) -> None:
    """Every class needs train, val and test files; no group may span two splits."""
    if short := classes_missing_a_split(table):
        raise BadInput(
            f"{where}: class(es) {', '.join(short)} lack files in train, val or test "
            "(too few files or groups for the split); add files or lower the fractions"
        )
    spanning = table.groupby("group")["split"].nunique()
    if (spanning > 1).any():
        names = ", ".join(spanning[spanning > 1].index[:5])
        raise BadInput(f"{where}: group(s) {names} span two splits; fix their split column")


def index(cfg: dict[str, Any], raw_dir: Path, section: str = "data.folder") -> pd.DataFrame:
    """Write raw_dir/folder_index.csv: every file with label, split, group, SHA1 and size.
    SHA1s come before the split, so identical bytes are kept on one side of it. Messages name
    the keys under `section`: data.folder, or a task's tasks.<name>."""
    root = Path(raw_dir) / DEMO_DIR if cfg["demo"] else Path(cfg["path"])
    if cfg["demo"]:
        write_demo(root)
    where = cfg["labels_csv"] or str(root)
    table = labelled_files(cfg, root, section)
    given = table["split"] != ""
    if given.any() and not given.all():
        raise BadInput(f"{cfg['labels_csv']}: give a split for every row or for none")
    table["sha1"] = sha1s(table["path"], where)
    if sets := check_copies(table, where):
        log.warning(
            "%s: %d file(s) repeat the bytes of another file of their class (e.g. %s): each "
            "set of copies is kept in one group, so it never straddles two splits",
            where,
            sum(len(rows) - 1 for rows in sets),
            " = ".join(sets[0]["path"].iloc[:2]),
        )
        table["group"] = merge_groups(list(table["group"]), list(table["sha1"]))
    if not given.any():
        table["split"] = assign_splits(table, cfg)
    check_splits(table, where)
    if cfg["unlabelled_path"]:
        table = pd.concat(
            [table, unlabelled(Path(cfg["unlabelled_path"]), table)], ignore_index=True
        )
    table["bytes"] = [Path(p).stat().st_size for p in table["path"]]
    with fsutil.atomic_path(Path(raw_dir) / INDEX) as tmp:
        table.to_csv(tmp, index=False, lineterminator="\n")
    return table


def unlabelled(folder: Path, labelled: pd.DataFrame) -> pd.DataFrame:
    """Rows for the pretraining-only audio under `folder`, less any file that is also labelled
    (same path or same bytes): validation and test audio must never reach pretraining."""
    if not folder.is_dir():
        raise MissingInput(f"{folder}: data.folder.unlabelled_path is not a folder")
    found = audio_under(folder)
    refuse_undecodable(found, folder)
    paths = [p.as_posix() for p in found]
    rows = pd.DataFrame({"path": paths, "label": "", "split": "unlabelled", "group": paths})
    rows["sha1"] = sha1s(rows["path"], str(folder))
    known = rows["path"].isin(labelled["path"]) | rows["sha1"].isin(labelled["sha1"])
    return rows[~known]


def listing(cfg: dict[str, Any]) -> str:
    """SHA1 of every file's path, size and modification time under the folder (and the labels
    CSV, and the unlabelled folder): cheap to take at each Snakemake start, and it changes when
    audio is added, removed or rewritten, so the index is rebuilt (the files live outside the
    repository, where no tool watches them by itself). Walked as `index` walks, links included;
    what it cannot read, `index` refuses."""
    if cfg["demo"]:
        return "demo"
    paths = [
        Path(cfg["path"]),
        *(Path(p) for p in (cfg["labels_csv"], cfg["unlabelled_path"]) if p),
    ]
    rows = []
    for root in paths:
        files = [root] if root.is_file() else walk(root).files
        for path in files:
            st = path.stat()
            rows.append([path.as_posix(), st.st_size, st.st_mtime_ns])
    return digest.json_digest(rows)


def read_index(raw_dir: Path) -> pd.DataFrame:
    path = Path(raw_dir) / INDEX
    if not path.is_file():
        raise MissingInput(f"{path}: missing; run `cola download` with data.source: folder")
    return pd.read_csv(path, dtype={"label": str, "group": str}, keep_default_na=False)


# The embedded demo: six sound classes a keyword/event set might hold, 8 "speakers" each saying
# every class 3 times, in mixed formats, rates and lengths (some under 1 s), one file undecodable.
DEMO_CLASSES = ("chirp-down", "chirp-up", "clicks", "noise-burst", "tone-high", "tone-low")
# No OGG: libsndfile's Vorbis encoder picks a random stream serial, so its bytes differ per run.
DEMO_FORMATS = (("wav", 16000), ("flac", 22050), ("flac", 44100), ("wav", 8000))


def demo_clip(kind: str, seconds: float, sr: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    pitch = rng.uniform(0.85, 1.15)  # the speaker's voice
    if kind.startswith("chirp"):
        f0, f1 = (300.0, 2400.0) if kind == "chirp-up" else (2400.0, 300.0)
        wave = np.sin(2 * np.pi * pitch * (f0 * t + (f1 - f0) * t**2 / (2 * seconds)))
    elif kind.startswith("tone"):
        wave = np.sin(2 * np.pi * pitch * (1800.0 if kind == "tone-high" else 350.0) * t)
    elif kind == "clicks":
        wave = (rng.random(len(t)) < 20 * pitch / sr).astype(float) * rng.choice([-1, 1], len(t))
    else:
        wave = rng.standard_normal(len(t)) * np.exp(-3 * t / seconds)
    wave = wave + 0.05 * rng.standard_normal(len(t))
    return (0.8 * wave / max(np.abs(wave).max(), 1e-9)).astype(np.float32)


def write_demo(root: Path, speakers: int = 8, takes: int = 3) -> None:
    """Deterministic: the same bytes on every run."""
    rng = np.random.default_rng(11)
    for kind in DEMO_CLASSES:
        for s in range(speakers):
            speaker = f"{s * 2654435761 % 2**32:08x}"
            for take in range(takes):
                fmt, sr = DEMO_FORMATS[(s + take) % len(DEMO_FORMATS)]
                seconds = float(rng.choice([0.6, 1.0, 1.5, 2.5]))
                wave = demo_clip(kind, seconds, sr, rng)
                path = root / kind / f"{speaker}_nohash_{take}.{fmt}"
                path.parent.mkdir(parents=True, exist_ok=True)
                with fsutil.atomic_path(path, suffix=f".{fmt}") as tmp:
                    sf.write(tmp, wave, sr, format=fmt.upper())
    # One file no decoder can open, as real collections have: skipped, listed in the report.
    fsutil.write_bytes(root / DEMO_CLASSES[0] / "deadbeef_nohash_9.wav", b"RIFF\x00\x00")
