"""Facts of the FMA release format, in one place: paths, tracks.csv, checksums files."""

from __future__ import annotations

import ast
from pathlib import Path

import pandas as pd

from cola_audio.errors import BadInput, MissingInput

RAW_DIR = Path("data/raw")  # where the release's folders land: download's output in both tools
SUBSET_ORDER = ("small", "medium", "large")
SPLITS = {"training": "train", "validation": "val", "test": "test"}


def audio_relpath(track_id: int) -> str:
    """Track 2 → '000/000002.mp3': six zero-padded digits, folder = their first three."""
    name = f"{int(track_id):06d}"
    return f"{name[:3]}/{name}.mp3"


def read_tracks(path: str | Path) -> pd.DataFrame:
    """tracks.csv as the release writes it: three header lines, two-level columns.

    List columns are parsed from their Python-literal text, subset becomes an ordered categorical
    (small < medium < large) so `subset <= "medium"` means "in fma_medium".
    """
    path = Path(path)
    try:
        tracks = pd.read_csv(path, index_col=0, header=[0, 1], low_memory=False)
    except FileNotFoundError:
        raise MissingInput(f"{path}: missing; run `cola download` first") from None
    needed = [
        ("artist", "id"),
        ("set", "split"),
        ("set", "subset"),
        ("track", "genre_top"),
        ("track", "genres"),
        ("track", "genres_all"),
    ]
    missing = [".".join(c) for c in needed if c not in tracks.columns]
    if missing or tracks.index.name != "track_id":
        raise BadInput(
            f"{path}: not an FMA tracks.csv (missing columns {missing or 'none'}, index "
            f"{tracks.index.name!r}); expected the release's three-line, two-level header"
        )
    if dupes := sorted(set(tracks.index[tracks.index.duplicated()])):
        shown = ", ".join(map(str, dupes[:10])) + (" …" if len(dupes) > 10 else "")
        raise BadInput(
            f"{path}: {len(dupes)} track id(s) listed more than once ({shown}); one id must be "
            "one clip. The file is damaged or was edited: rerun `cola download` to restore it"
        )
    for col in [("track", "genres"), ("track", "genres_all"), ("track", "tags")]:
        if col in tracks.columns:
            tracks[col] = tracks[col].map(ast.literal_eval)
    tracks[("set", "subset")] = pd.Categorical(
        tracks[("set", "subset")], categories=list(SUBSET_ORDER), ordered=True
    )
    tracks[("track", "genre_top")] = tracks[("track", "genre_top")].fillna("").astype(str)
    return tracks


def read_genres(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    genres = pd.read_csv(path, index_col=0)
    expected = {"#tracks", "parent", "title", "top_level"}
    if genres.index.name != "genre_id" or not expected <= set(genres.columns):
        raise BadInput(f"{path}: not an FMA genres.csv (columns genre_id,{','.join(expected)})")
    return genres


def read_checksums(path: str | Path) -> dict[str, str]:
    """`sha1␠␠relative/path` lines (sha1sum's format) → {relative path: sha1}."""
    path = Path(path)
    entries: dict[str, str] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 40:
            raise BadInput(f"{path}:{lineno}: not a `sha1  path` line: {line!r}")
        entries[name.strip()] = digest.lower()
    return entries
