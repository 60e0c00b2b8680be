"""The embedded default dataset: a miniature FMA in the release's exact layout, made from a seed.

FMA cannot be downloaded here, so the default pipeline runs on this. Everything downstream reads it
exactly as it would read the release (tracks.csv with three header lines, genres.csv, NNN/NNNNNN.mp3
folders with their `checksums` files, small ⊂ large), so the same code path serves both.

Eight genres get distinct but overlapping signatures (tempo, register, timbre, rhythm, noise) so a
model can learn them well above chance but not trivially; a few clips are deliberately faulty, like
the release's known bad files, so fault handling runs in every demo.
"""

from __future__ import annotations

import io
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import soundfile as sf
from tqdm import tqdm

from cola_audio import digest, fsutil
from cola_audio.fma import SUBSET_ORDER, audio_relpath
from cola_audio.pools import process_pool

# Real FMA genre ids (genres.csv of the release): the eight fma_small roots, a few children each,
# and two roots that only occur beyond fma_small.
ROOT_GENRES: dict[int, str] = {
    15: "Electronic",
    38: "Experimental",
    17: "Folk",
    21: "Hip-Hop",
    1235: "Instrumental",
    2: "International",
    10: "Pop",
    12: "Rock",
}
EXTRA_ROOTS: dict[int, str] = {4: "Jazz", 5: "Classical"}
CHILD_GENRES: dict[int, tuple[str, int]] = {  # id: (title, parent)
    42: ("Ambient Electronic", 15),
    1: ("Avant-Garde", 38),
    32: ("Noise", 38),
    103: ("Singer-Songwriter", 17),
    33: ("Psych-Folk", 17),
    100: ("Alternative Hip-Hop", 21),
    18: ("Soundtrack", 1235),
    46: ("Latin America", 2),
    86: ("Indian", 2),
    76: ("Experimental Pop", 10),
    25: ("Punk", 12),
    66: ("Indie-Rock", 12),
}


@dataclass(frozen=True)
class Signature:
    """Ranges a clip of a genre draws its musical parameters from; ranges overlap across genres."""

    tempo: tuple[float, float]  # beats per minute
    root_midi: tuple[float, float]  # register of the melody
    tilt: tuple[float, float]  # harmonic amplitude ∝ k^-tilt: low = bright
    harmonics: int
    note_decay: tuple[float, float]  # seconds; long = sustained pads
    notes_per_beat: tuple[float, float]
    kick: float
    snare: float
    hihat: float
    noise: tuple[float, float]  # broadband noise level
    drive: tuple[float, float]  # tanh distortion gain
    scale: tuple[int, ...]  # semitone steps of the melody's scale


SIGNATURES: dict[str, Signature] = {
    "Electronic": Signature(
        (118, 134),
        (45, 60),
        (0.6, 1.2),
        12,
        (0.08, 0.3),
        (1.5, 4),
        1.0,
        0.3,
        0.8,
        (0.0, 0.03),
        (1.0, 2.0),
        (0, 3, 5, 7, 10),
    ),
    "Experimental": Signature(
        (60, 160),
        (40, 90),
        (0.3, 2.5),
        10,
        (0.05, 2.0),
        (0.2, 3),
        0.15,
        0.3,
        0.2,
        (0.05, 0.3),
        (1.0, 5.0),
        (0, 1, 6, 7, 11),
    ),
    "Folk": Signature(
        (80, 112),
        (52, 67),
        (1.4, 2.2),
        8,
        (0.4, 1.2),
        (1, 2),
        0.0,
        0.0,
        0.1,
        (0.0, 0.02),
        (1.0, 1.2),
        (0, 2, 4, 7, 9),
    ),
    "Hip-Hop": Signature(
        (82, 98),
        (36, 50),
        (1.2, 2.0),
        8,
        (0.2, 0.6),
        (0.5, 1.5),
        1.2,
        0.9,
        0.5,
        (0.0, 0.04),
        (1.0, 1.8),
        (0, 3, 5, 7, 10),
    ),
    "Instrumental": Signature(
        (60, 90),
        (48, 72),
        (1.8, 2.8),
        6,
        (1.0, 3.0),
        (0.25, 1),
        0.0,
        0.0,
        0.0,
        (0.0, 0.02),
        (1.0, 1.1),
        (0, 2, 4, 5, 7, 9, 11),
    ),
    "International": Signature(
        (96, 126),
        (55, 70),
        (1.0, 1.6),
        10,
        (0.15, 0.5),
        (2, 4),
        0.4,
        0.0,
        0.6,
        (0.0, 0.03),
        (1.0, 1.5),
        (0, 1, 4, 5, 7, 8, 10),
    ),
    "Pop": Signature(
        (100, 122),
        (58, 74),
        (1.0, 1.6),
        10,
        (0.2, 0.6),
        (1, 2),
        0.8,
        0.7,
        0.5,
        (0.0, 0.03),
        (1.0, 1.5),
        (0, 2, 4, 5, 7, 9, 11),
    ),
    "Rock": Signature(
        (110, 150),
        (40, 57),
        (0.4, 1.0),
        14,
        (0.15, 0.5),
        (1, 2),
        0.9,
        0.9,
        0.7,
        (0.03, 0.12),
        (3.0, 8.0),
        (0, 3, 5, 7, 10),
    ),
}
GENRE_IDS = {name: gid for gid, name in {**ROOT_GENRES, **EXTRA_ROOTS}.items()}

# (sample rate, channels, bit rate kb/s, weight): the release mixes these, mostly 44.1 kHz stereo;
# the cheap-to-encode ones dominate here to keep the default pipeline fast.
AUDIO_FORMATS = [
    (44100, 2, 256, 0.2),
    (22050, 1, 128, 0.45),
    (32000, 1, 128, 0.1),
    (48000, 2, 320, 0.05),
    (22050, 2, 192, 0.2),
]
FAULTS = ("empty", "id3_only", "truncated", "too_short")


def synth_clip(
    signature: Signature, seconds: float, sr: int, rng: np.random.Generator
) -> np.ndarray:
    """Render one mono clip of a genre signature at `sr`, peak-normalised to 0.9.

    Long on purpose, like plan_dataset: the clip's samples follow from one sequence of draws
    from `rng`, read top to bottom here.
    """
    n = int(seconds * sr)
    t = np.arange(n) / sr
    out = np.zeros(n, dtype=np.float64)

    def draw(lo_hi: tuple[float, float]) -> float:
        return float(rng.uniform(*lo_hi))

    beat = 60.0 / draw(signature.tempo)
    root = draw(signature.root_midi)
    tilt = draw(signature.tilt)
    decay = draw(signature.note_decay)
    note_len = beat / draw(signature.notes_per_beat)
    drive = draw(signature.drive)
    k = np.arange(1, signature.harmonics + 1)
    amps = k ** (-tilt)
    start = 0.0
    while start < seconds:
        step = int(rng.integers(-2, 3))
        degree = signature.scale[int(rng.integers(len(signature.scale)))]
        midi = root + degree + 12 * (step // 2)
        f0 = 440.0 * 2 ** ((midi - 69) / 12)
        i0, i1 = int(start * sr), min(n, int((start + max(note_len, decay)) * sr))
        tt = t[i0:i1] - start
        freqs = f0 * k[k * f0 < sr / 2 - 500]
        partials = np.sin(2 * np.pi * np.outer(tt, freqs) + rng.uniform(0, 2 * np.pi, len(freqs)))
        tone = partials @ amps[: len(freqs)]
        env = np.exp(-tt / decay) * np.minimum(1.0, tt / 0.005)
        out[i0:i1] += tone * env
        start += note_len
    out = np.tanh(drive * out / (np.abs(out).max() + 1e-9))

    beats = np.arange(0.0, seconds, beat)
    for idx, b in enumerate(beats):
        i0 = int(b * sr)
        if signature.kick and idx % 2 == 0:
            m = min(n - i0, int(0.25 * sr))
            tt = np.arange(m) / sr
            sweep = 2 * np.pi * (50 * tt + 100 * 0.04 * (1 - np.exp(-tt / 0.04)))
            out[i0 : i0 + m] += signature.kick * np.sin(sweep) * np.exp(-tt / 0.08)
        if signature.snare and idx % 2 == 1:
            m = min(n - i0, int(0.15 * sr))
            tt = np.arange(m) / sr
            out[i0 : i0 + m] += 0.6 * signature.snare * rng.standard_normal(m) * np.exp(-tt / 0.04)
        if signature.hihat:
            for half in (0.0, 0.5):
                j0 = int((b + half * beat) * sr)
                m = min(n - j0, int(0.04 * sr))
                if m > 1:
                    hat = np.diff(rng.standard_normal(m + 1)) * np.exp(-np.arange(m) / (0.01 * sr))
                    out[j0 : j0 + m] += 0.25 * signature.hihat * hat
    out += draw(signature.noise) * rng.standard_normal(n)
    return (0.9 * out / (np.abs(out).max() + 1e-9)).astype(np.float32)


def encode_mp3(mono: np.ndarray, sr: int, channels: int, rng: np.random.Generator) -> bytes:
    """MP3 bytes of a clip; stereo gets a slight, seeded decorrelation between channels."""
    if channels == 2:
        shift = int(rng.integers(1, 40))
        audio = np.stack([mono, np.roll(mono, shift) * 0.9], axis=1)
    else:
        audio = mono
    buf = io.BytesIO()
    sf.write(buf, audio, sr, format="MP3", subtype="MPEG_LAYER_III")
    return buf.getvalue()


def id3_only_bytes() -> bytes:
    """An ID3v2.4 tag with one title frame and no audio, like release track 133297."""
    title = b"\x03Silent"
    frame = b"TIT2" + len(title).to_bytes(4, "big") + b"\x00\x00" + title
    size = len(frame) + 1024  # padding, as taggers leave
    syncsafe = bytes([(size >> 21) & 0x7F, (size >> 14) & 0x7F, (size >> 7) & 0x7F, size & 0x7F])
    return b"ID3\x04\x00\x00" + syncsafe + frame + b"\x00" * 1024


@dataclass(frozen=True)
class TrackPlan:
    track_id: int
    genre: str  # the signature the audio is rendered from
    seconds: float
    sr: int
    channels: int
    fault: str | None
    seed: int


def render_track(plan: TrackPlan) -> bytes:
    """Pure: the bytes of one planned audio file (faulty ones included)."""
    rng = np.random.default_rng([plan.seed, plan.track_id])
    if plan.fault == "empty":
        return b""
    if plan.fault == "id3_only":
        return id3_only_bytes()
    seconds = 1.0 if plan.fault == "too_short" else plan.seconds
    mono = synth_clip(SIGNATURES[plan.genre], seconds, plan.sr, rng)
    data = encode_mp3(mono, plan.sr, plan.channels, rng)
    if plan.fault == "truncated":  # the header still announces the full length
        data = data[: len(data) // 5]
    return data


def _assign_splits(
    artist_sizes: list[int], eval_fraction: float, rng: np.random.Generator
) -> list[str]:
    """Artist-level split, `eval_fraction` of tracks each to test and validation, the rest to
    training: an artist's tracks never straddle splits."""
    total = sum(artist_sizes)
    target = round(eval_fraction * total)
    order = rng.permutation(len(artist_sizes))
    splits = ["training"] * len(artist_sizes)
    counts = {"test": 0, "validation": 0}
    for i in order:
        for split in ("test", "validation"):
            if counts[split] + artist_sizes[i] <= target:
                splits[i] = split
                counts[split] += artist_sizes[i]
                break
    return splits


def plan_dataset(cfg: dict[str, Any]) -> tuple[pd.DataFrame, list[TrackPlan]]:
    """Pure: the tracks table (release schema) and the audio plan for every track.

    Long on purpose: every random draw of the dataset happens here in one sequence, top to
    bottom, and that order fixes the dataset's bytes; cut into pieces, the order would be spread
    over several functions and easy to disturb by accident.
    """
    seed = cfg["seed"]
    rng = np.random.default_rng(seed)
    per_genre = cfg["small_tracks_per_genre"]
    n_large = cfg["large_only_tracks"]
    n_total = per_genre * len(ROOT_GENRES) + n_large
    ids = np.sort(rng.choice(np.arange(2, 156_000), size=n_total, replace=False))
    ids = rng.permutation(ids)  # which id gets which role is random, ids themselves sorted later
    lo, hi = cfg["clip_seconds"]
    fmt_weights = np.array([f[3] for f in AUDIO_FORMATS])
    rows: list[dict[str, Any]] = []
    plans: list[TrackPlan] = []
    children = {
        p: [c for c, (_, parent) in CHILD_GENRES.items() if parent == p] for p in ROOT_GENRES
    }
    next_id = iter(ids.tolist())
    artist_id = 0

    def add(genre: str, split: str, subset: str, artist: int, genre_ids: list[int], top: str):
        tid = next(next_id)
        fmt = AUDIO_FORMATS[int(rng.choice(len(AUDIO_FORMATS), p=fmt_weights / fmt_weights.sum()))]
        seconds = round(float(rng.uniform(lo, hi)), 2)
        ancestors = sorted(
            {g for gid in genre_ids for g in (gid, CHILD_GENRES.get(gid, (None, gid))[1])}
        )
        rows.append(
            {
                ("album", "id"): 1000 + artist,
                ("album", "title"): f"Album {artist:04d}",
                ("artist", "id"): artist,
                ("artist", "name"): f"Artist {artist:04d}",
                ("set", "split"): split,
                ("set", "subset"): subset,
                ("track", "bit_rate"): fmt[2] * 1000,
                ("track", "duration"): int(rng.integers(int(hi) + 1, 420)),
                ("track", "genre_top"): top,
                ("track", "genres"): str(genre_ids),
                ("track", "genres_all"): str(ancestors),
                ("track", "title"): f"{genre} study {tid}",
                ("track", "tags"): "[]",
                ("track_id", ""): tid,
            }
        )
        plans.append(TrackPlan(tid, genre, seconds, fmt[0], fmt[1], None, seed))

    for gid, genre in ROOT_GENRES.items():
        sizes: list[int] = []
        while sum(sizes) < per_genre:
            sizes.append(min(int(rng.integers(1, 4)), per_genre - sum(sizes)))
        splits = _assign_splits(sizes, cfg["eval_fraction"], rng)
        for size, split in zip(sizes, splits, strict=True):
            artist_id += 1
            for _ in range(size):
                pool = [gid, *children[gid]]
                genre_ids = sorted({int(rng.choice(pool))})
                add(genre, split, "small", artist_id, genre_ids, genre)
    for i in range(n_large):
        artist_id += 1
        genre = list(SIGNATURES)[int(rng.integers(len(SIGNATURES)))]
        kind = i % 4
        if kind == 0:  # a genre outside fma_small, no signature of its own
            extra = list(EXTRA_ROOTS)[i % 2]
            genre_ids, top = [extra], EXTRA_ROOTS[extra]
        elif kind == 1:  # several root genres → empty genre_top, as in the release
            other = GENRE_IDS[list(SIGNATURES)[(i + 3) % len(SIGNATURES)]]
            genre_ids, top = sorted({GENRE_IDS[genre], other, GENRE_IDS["Jazz"]}), ""
        else:
            genre_ids, top = [GENRE_IDS[genre]], genre
        subset = "medium" if kind == 2 else "large"
        split = ["training", "training", "validation", "test"][int(rng.integers(4))]
        add(genre, split, subset, artist_id, genre_ids, top)

    if cfg["faulty_files"]:
        plans = _plant_faults(rows, plans)
    plans = sorted(plans, key=lambda p: p.track_id)
    return _tracks_table(rows), plans


def _plant_faults(rows: list[dict[str, Any]], plans: list[TrackPlan]) -> list[TrackPlan]:
    """Pure: the plans with one clip of each fault the featurizer must skip (no random draw)."""
    small_train = [
        i
        for i, r in enumerate(rows)
        if r[("set", "subset")] == "small" and r[("set", "split")] == "training"
    ]
    small_val = [
        i
        for i, r in enumerate(rows)
        if r[("set", "subset")] == "small" and r[("set", "split")] == "validation"
    ]
    large_only = [i for i, r in enumerate(rows) if r[("set", "subset")] != "small"]
    picks = {
        "empty": small_train[0],
        "id3_only": small_train[len(small_train) // 2],
        "truncated": small_val[0],
        "too_short": large_only[0] if large_only else small_train[-1],
    }
    plans = list(plans)
    for fault, i in picks.items():
        p = plans[i]
        plans[i] = TrackPlan(p.track_id, p.genre, p.seconds, p.sr, p.channels, fault, p.seed)
    return plans


def _tracks_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Pure: the release's tracks table (two-level columns), sorted by track id."""
    table = pd.DataFrame(rows).set_index(("track_id", ""))
    table.columns = pd.MultiIndex.from_tuples(table.columns)
    table.index.name = "track_id"
    return table.iloc[np.argsort(table.index.to_numpy())]


def genres_table(tracks: pd.DataFrame) -> pd.DataFrame:
    """genres.csv in the release's schema, #tracks counted over genres_all like the release."""
    import ast

    counts: dict[int, int] = {}
    for cell in tracks[("track", "genres_all")]:
        for gid in ast.literal_eval(cell):
            counts[gid] = counts.get(gid, 0) + 1
    rows = [
        (gid, counts.get(gid, 0), 0, title, gid)
        for gid, title in {**ROOT_GENRES, **EXTRA_ROOTS}.items()
    ]
    rows += [
        (gid, counts.get(gid, 0), parent, title, parent)
        for gid, (title, parent) in CHILD_GENRES.items()
    ]
    return pd.DataFrame(
        rows, columns=["genre_id", "#tracks", "parent", "title", "top_level"]
    ).sort_values("genre_id")


def _checksums_text(entries: dict[str, str]) -> str:
    return "".join(f"{sha1}  {name}\n" for name, sha1 in sorted(entries.items()))


def write_metadata(tracks: pd.DataFrame, meta_dir: Path) -> None:
    """fma_metadata/: tracks.csv, genres.csv and their checksums, as the release has them."""
    tracks_csv = tracks.to_csv(lineterminator="\n")
    genres_csv = genres_table(tracks).to_csv(index=False, lineterminator="\n")
    fsutil.write_text(meta_dir / "tracks.csv", tracks_csv)
    fsutil.write_text(meta_dir / "genres.csv", genres_csv)
    sums = {
        "tracks.csv": digest.bytes_digest(tracks_csv.encode()),
        "genres.csv": digest.bytes_digest(genres_csv.encode()),
    }
    fsutil.write_text(meta_dir / "checksums", _checksums_text(sums))


def generate(
    cfg: dict[str, Any], root: Path, subsets: list[str], workers: int = 0
) -> dict[str, int]:
    """Write metadata and the `fma_<subset>` audio folders under `root`; reruns are byte-identical.

    A clip goes into every requested folder whose subset holds it (small ⊂ medium ⊂ large).
    """
    root = Path(root)
    tracks, plans = plan_dataset(cfg)
    write_metadata(tracks, root / "fma_metadata")
    rank = {name: i for i, name in enumerate(SUBSET_ORDER)}
    track_rank = {int(t): rank[s] for t, s in tracks[("set", "subset")].items()}
    folders = {f"fma_{s}": rank[s] for s in sorted(set(subsets), key=rank.__getitem__)}
    for folder in folders:
        shutil.rmtree(root / folder, ignore_errors=True)
    sums: dict[str, dict[str, str]] = {folder: {} for folder in folders}
    n_workers = workers or None
    with process_pool(n_workers) as pool:
        blobs = pool.map(render_track, plans, chunksize=4)
        for plan, data in tqdm(
            zip(plans, blobs, strict=True),
            total=len(plans),
            desc="synthesising FMA clips",
            unit="clip",
        ):
            rel = audio_relpath(plan.track_id)
            targets = [f for f, r in folders.items() if track_rank[plan.track_id] <= r]
            for sub in targets:  # the same bytes in every folder holding the clip, as released
                fsutil.write_bytes(root / sub / rel, data)
                sums[sub][rel] = digest.bytes_digest(data)
    for sub, entries in sums.items():
        fsutil.write_text(root / sub / "checksums", _checksums_text(entries))
        fsutil.write_text(
            root / sub / "README.txt",
            "Synthetic stand-in for the FMA release, generated by `cola download`.\n",
        )
    return {
        "tracks": len(plans),
        **{f: len(entries) for f, entries in sums.items()},
        "faulty": sum(p.fault is not None for p in plans),
    }
