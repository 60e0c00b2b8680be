"""`cola featurize`: the log-mel feature store under data/features/.

FMA-large has 106,574 clips; one file per clip chokes DVC and Snakemake, so clips go to the shards
of features.shards (track t → shard t mod n), each one float16 .npy of stacked frames plus a JSON
index (track id, offset, frames). Shards are independent jobs for the orchestrator; `--gather`
joins their indexes and enforces the skipped-clip threshold. A shard's JSON is written last and
atomically, so a killed job never leaves a shard that looks complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd
import soundfile as sf
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from cola_audio import digest, fsutil, meta
from cola_audio.errors import BadInput, InputError, MissingInput
from cola_audio.frontend import FrontEnd
from cola_audio.pools import process_pool

log = logging.getLogger(__name__)
DTYPE = np.float16


class TooManySkipped(InputError, RuntimeError):
    """More clips failed to decode than features.max_skipped_fraction allows."""


@dataclass(frozen=True)
class Decoded:
    track_id: int
    features: np.ndarray | None
    reason: str | None = None


# Frames per byte of file beyond which a header is not trusted with one allocation: an 8 kb/s MP3
# at 48 kHz holds 48. A damaged FLAC header announced 2^36 frames (a 275 GB read) for 83 kB here.
PLAUSIBLE_FRAMES_PER_BYTE = 64
BLOCK_FRAMES = 1 << 15  # libsndfile fails the block that reaches a lying header's end: lose little


# Header values no recording has, refused before anything is allocated from them: a WAV header
# claiming 1 Hz made resampling to 16 kHz ask for gigabytes (16,000x the decoded length).
PLAUSIBLE_RATES_HZ = (1_000, 768_000)
MAX_CHANNELS = 64
MAX_SECONDS = 6 * 3600  # FMA's full tracks are hours long at most; longer is a lying header


UNREADABLE = "unreadable: permission denied (fix the file's permissions)"


class ImplausibleHeader(BadInput):
    """A header value no real recording has; the message is the skip reason."""


def plausible_header(rate: int, channels: int, frames: int) -> None:
    """Raise ImplausibleHeader unless the header's rate, channels and length could be real."""
    low, high = PLAUSIBLE_RATES_HZ
    if not low <= rate <= high:
        raise ImplausibleHeader(
            f"implausible header: sample rate {rate} Hz (outside {low}-{high} Hz)"
        )
    if not 1 <= channels <= MAX_CHANNELS:
        raise ImplausibleHeader(f"implausible header: {channels} channels (at most {MAX_CHANNELS})")
    if frames / rate > MAX_SECONDS:
        raise ImplausibleHeader(
            f"implausible header: {frames / rate / 3600:.1f} h at {rate} Hz "
            f"(at most {MAX_SECONDS // 3600} h)"
        )


def wav_shortfall(path: Path) -> tuple[int, int] | None:
    """(declared, present) bytes of a RIFF/WAVE data chunk cut short, or None. libsndfile sizes
    a WAV by the bytes it finds, so a file cut to a third decoded as a complete 10 s clip."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        offset = 12
        while offset + 8 <= size:
            fh.seek(offset)
            chunk_id, length = fh.read(4), int.from_bytes(fh.read(4), "little")
            if chunk_id == b"data":
                present = size - offset - 8
                unknown = length in (0, 0xFFFFFFFF)  # streamed: the writer never knew the size
                return None if unknown or present >= length else (length, present)
            offset += 8 + length + (length & 1)
    return None


def decode(path: Path) -> tuple[np.ndarray, int, int]:
    """(mono float32 waveform, sample rate, frames the header announces)."""
    with sf.SoundFile(path) as fh:
        header_frames, sr = fh.frames, fh.samplerate
        plausible_header(sr, fh.channels, 0)  # the length is checked on what really decodes
        if header_frames <= PLAUSIBLE_FRAMES_PER_BYTE * Path(path).stat().st_size:
            audio = fh.read(dtype="float32", always_2d=True)
        else:  # read what the stream really holds, block by block
            blocks = []
            with contextlib.suppress(sf.LibsndfileError):  # libsndfile's seek past the real end
                while len(block := fh.read(BLOCK_FRAMES, dtype="float32", always_2d=True)):
                    blocks.append(block)
            audio = np.concatenate(blocks) if blocks else np.empty((0, fh.channels), np.float32)
    return downmix(audio), sr, header_frames


def downmix(audio: np.ndarray) -> np.ndarray:
    """(frames, channels) → mono mean, channel by channel: ~10x faster than mean(axis=1) on
    interleaved frames, and unlike a BLAS matrix-vector product the same bytes on every CPU."""
    channels = audio.shape[1]
    if channels == 1:
        return np.ascontiguousarray(audio[:, 0])
    mono = np.add(audio[:, 0], audio[:, 1])
    for channel in range(2, channels):
        mono += audio[:, channel]
    mono *= np.float32(1.0 / channels)
    return mono


def check_audio(path: Path, features: dict[str, Any]) -> tuple[np.ndarray, int] | str:
    """The decoded mono waveform and its rate, or the reason the clip must be skipped."""
    if path.is_dir():
        return "a directory, not an audio file"
    if not path.exists():
        return "missing file"
    if not path.is_file():  # never opened: a FIFO would block the shard
        return "not a regular file (a FIFO, socket or device)"
    if path.stat().st_size == 0:
        return "empty file (0 bytes)"
    try:  # libsndfile reports a denied open as "System error."
        short = wav_shortfall(path)
    except PermissionError:
        return UNREADABLE
    if short and short[1] < features["min_decoded_fraction"] * short[0]:
        return (
            f"truncated stream: the WAV header's data chunk declares {short[0]} bytes, the file "
            f"holds {short[1]} ({short[1] / short[0]:.0%})"
        )
    try:
        wave, sr, header_frames = decode(path)
        plausible_header(sr, 1, len(wave))
    except ImplausibleHeader as exc:
        return str(exc)
    except (sf.LibsndfileError, RuntimeError, ValueError) as exc:
        detail = getattr(exc, "error_string", None) or str(exc)
        return f"undecodable: no audio stream libsndfile can open ({detail})"
    except PermissionError:
        return UNREADABLE
    if header_frames > 0 and len(wave) < features["min_decoded_fraction"] * header_frames:
        return (
            f"truncated stream: decoded {len(wave)} of {header_frames} frames the header "
            f"announces ({len(wave) / header_frames:.0%})"
        )
    if len(wave) == 0:
        return "no audio frames (tags only?)"
    if not np.isfinite(wave).all():
        return "non-finite samples (NaN or infinity) in the decoded stream"
    seconds = len(wave) / sr
    if seconds < features["min_seconds"]:
        return f"too short: {seconds:.2f} s < features.min_seconds {features['min_seconds']}"
    return wave, sr


def featurize_file(
    track_id: int, path: str, features: dict[str, Any], sha1: str | None = None
) -> Decoded:
    """Decode and featurize one clip, turning every failure into a recorded reason. `sha1`: what
    the file hashed to when `cola download` indexed it (audio outside data/raw can change)."""
    if sha1 and Path(path).is_file():
        try:
            changed = digest.file_digest(path, "sha1") != sha1
        except PermissionError:
            return Decoded(track_id, None, UNREADABLE)
        if changed:
            return Decoded(
                track_id, None, "changed since `cola download` indexed it; rerun download"
            )
    checked = check_audio(Path(path), features)
    if isinstance(checked, str):
        return Decoded(track_id, None, checked)
    wave, sr = checked
    feats = FrontEnd.from_params(features).features(wave, sr)
    if len(feats) == 0:
        return Decoded(track_id, None, "too short for one analysis frame")
    return Decoded(track_id, feats.astype(DTYPE))


def _featurize_star(args: tuple[int, str, dict[str, Any], str | None]) -> Decoded:
    return featurize_file(*args)


def tracks_to_featurize(meta_dir: Path) -> tuple[dict[int, str], dict[int, str]]:
    """Union of fine-tuning and pretraining tracks → audio path (the fine-tuning copy first), and
    → the SHA1 recorded at download where the metadata has one (data.source: folder)."""
    finetune = meta.read(meta_dir, "finetune")["tracks"]
    pretrain = meta.read(meta_dir, "pretrain")["tracks"]
    paths: dict[int, str] = {}
    sha1s: dict[int, str] = {}
    for track in pretrain + finetune:  # later wins: fine-tuning paths override
        paths[int(track["track_id"])] = track["audio"]
        if "sha1" in track:
            sha1s[int(track["track_id"])] = track["sha1"]
    return dict(sorted(paths.items())), sha1s


def shard_name(shard: int) -> str:
    """The shard's file stem: its id as DVC's matrix writes it from features.shards."""
    return str(shard)


def shard_paths(out_dir: Path, shard: int) -> tuple[Path, Path]:
    base = Path(out_dir) / "shards" / shard_name(shard)
    return base.with_suffix(".npy"), base.with_suffix(".json")


def _workers(requested: int) -> int:
    return requested or len(os.sched_getaffinity(0))


def featurize_shard(
    tracks: dict[int, str],
    shard: int,
    features: dict[str, Any],
    out_dir: Path,
    workers: int = 0,
    sha1s: dict[int, str] | None = None,
) -> dict[str, Any]:
    """Write one shard (.npy of frames, then its .json index); return the index document."""
    n_shards = len(features["shards"])
    mine = [(tid, path) for tid, path in sorted(tracks.items()) if tid % n_shards == shard]
    npy_path, json_path = shard_paths(out_dir, shard)
    npy_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.unlink(missing_ok=True)  # no stale index may vouch for a shard being rewritten
    jobs = [(tid, path, features, (sha1s or {}).get(tid)) for tid, path in mine]
    desc = f"featurize shard {shard_name(shard)}/{n_shards}"
    with tempfile.TemporaryFile(dir=npy_path.parent, prefix=".raw-") as raw:
        index, skipped, total = _append_frames(raw, jobs, _workers(workers), desc)
        raw.seek(0)
        write_npy(npy_path, raw, (total, features["n_mels"]))
    doc = {
        "shard": shard,
        "n_shards": n_shards,
        "file": npy_path.name,
        "dtype": np.dtype(DTYPE).name,
        "n_mels": features["n_mels"],
        "total_frames": total,
        "columns": ["track_id", "offset", "frames"],
        "tracks": index,
        "skipped": skipped,
    }
    fsutil.write_json(json_path, doc)
    return doc


def _append_frames(
    raw: IO[bytes], jobs: list[tuple[int, str, dict[str, Any], str | None]], workers: int, desc: str
) -> tuple[list[list[int]], list[dict[str, Any]], int]:
    """Featurize each job's clip (on `workers` processes) and append its frames to `raw` in track
    order; return the index rows [track, offset, frames], the skipped clips and the frame total."""
    index: list[list[int]] = []
    skipped: list[dict[str, Any]] = []
    offset = 0
    # One BLAS thread everywhere (here and in pool workers): a multi-threaded matrix product sums
    # in another order, and the shard's bytes would depend on the worker count.
    with threadpool_limits(1):
        pool = process_pool(workers) if workers > 1 else None
        try:
            results = (
                pool.map(_featurize_star, jobs, chunksize=4) if pool else map(_featurize_star, jobs)
            )
            for (tid, path, *_), result in tqdm(
                zip(jobs, results, strict=True), total=len(jobs), desc=desc, unit="clip"
            ):
                if result.features is None:
                    skipped.append({"track_id": tid, "audio": path, "reason": result.reason})
                    continue
                raw.write(np.ascontiguousarray(result.features).tobytes())
                index.append([tid, offset, len(result.features)])
                offset += len(result.features)
        finally:
            if pool:
                pool.shutdown()
    return index, skipped, offset


def write_npy(path: Path, raw: IO[bytes], shape: tuple[int, int]) -> None:
    """An .npy file of `shape` from raw DTYPE bytes streamed in (a shard never sits in memory
    whole), written atomically: a killed job never leaves a shard that looks complete."""
    with fsutil.atomic_path(path) as tmp, open(tmp, "wb") as out:
        header = {
            "descr": np.lib.format.dtype_to_descr(np.dtype(DTYPE)),
            "fortran_order": False,
            "shape": shape,
        }
        np.lib.format.write_array_header_1_0(out, header)
        shutil.copyfileobj(raw, out, 1 << 22)


def load_shard_index(out_dir: Path, shard: int, n_shards: int) -> dict[str, Any]:
    npy_path, json_path = shard_paths(out_dir, shard)
    if not json_path.is_file():
        raise MissingInput(
            f"{json_path}: shard {shard} is missing or incomplete; run "
            f"`cola featurize --shard {shard}`"
        )
    doc = fsutil.read_json(json_path)
    if doc["n_shards"] != n_shards:
        raise BadInput(
            f"{json_path}: written for {doc['n_shards']} shards, params say "
            f"{n_shards}; rerun `cola featurize`"
        )
    frames = np.load(npy_path, mmap_mode="r").shape[0]
    if frames != doc["total_frames"]:
        raise BadInput(
            f"{npy_path}: holds {frames} frames, its index says "
            f"{doc['total_frames']}; rerun `cola featurize --shard {shard}`"
        )
    return doc


def remove_stray_shards(out_dir: Path, n_shards: int) -> None:
    """Delete shards numbered n_shards and up: outputs of shard stages an earlier, longer
    features.shards had. Left in place they would enter DVC's hash of the shards folder (a
    dependency of every later stage), which a teammate's clean `dvc pull` could never match.
    The shard jobs do it (each reruns when the count changes), not gather: the folder is
    gather's input, and a job that changes its own input is recorded as built from nothing."""
    for path in sorted((out_dir / "shards").glob("*")):
        if path.suffix in (".npy", ".json") and path.stem.isdigit() and int(path.stem) >= n_shards:
            path.unlink(missing_ok=True)  # another shard job may have removed it first
            log.info("%s: removed (no shard %s in features.shards any more)", path, path.stem)


def gather(features: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Join shard indexes into index.csv and skipped.csv; fail past the skipped-fraction limit."""
    out_dir = Path(out_dir)
    n_shards = len(features["shards"])
    docs = [load_shard_index(out_dir, k, n_shards) for k in range(n_shards)]
    rows = [(t, d["shard"], o, f) for d in docs for t, o, f in d["tracks"]]
    index = pd.DataFrame(rows, columns=["track_id", "shard", "offset", "frames"])
    index = index.sort_values("track_id", kind="stable")
    skipped = pd.DataFrame(
        [s for d in docs for s in d["skipped"]], columns=["track_id", "audio", "reason"]
    ).sort_values("track_id")
    total = len(index) + len(skipped)
    fraction = len(skipped) / total if total else 1.0
    summary = {
        "clips": total,
        "featurized": len(index),
        "skipped": len(skipped),
        "skipped_fraction": round(fraction, 6),
        "skipped_by_reason": dict(
            sorted(Counter(r.split(":")[0] for r in skipped["reason"]).items())
        ),
        "hours": round(
            float(index["frames"].sum()) * features["frame_step"] / features["sample_rate"] / 3600,
            4,
        ),
        "n_shards": n_shards,
        "frontend": dataclasses.asdict(FrontEnd.from_params(features)),
    }
    with fsutil.atomic_path(out_dir / "skipped.csv") as tmp:
        skipped.to_csv(tmp, index=False, lineterminator="\n")
    if fraction > features["max_skipped_fraction"]:
        listed = "\n".join(f"  {r.audio}: {r.reason}" for r in skipped.itertuples())
        raise TooManySkipped(
            f"{len(skipped)} of {total} clips ({fraction:.1%}) could not be featurized, more than "
            f"features.max_skipped_fraction = {features['max_skipped_fraction']}:\n{listed}\n"
            "Re-download the damaged files or raise the threshold in params.yaml."
        )
    with fsutil.atomic_path(out_dir / "index.csv") as tmp:
        index.to_csv(tmp, index=False, lineterminator="\n")
    fsutil.write_json(out_dir / "summary.json", summary)
    for row in skipped.itertuples():
        log.warning("skipped %s: %s", row.audio, row.reason)
    return summary


def run(
    params: dict[str, Any],
    shard: int | None = None,
    gather_only: bool = False,
    workers: int | None = None,
    meta_dir: Path = Path("data/meta"),
    out_dir: Path = Path("data/features"),
) -> None:
    """One shard (`--shard K`), the gather step (`--gather`), or everything (neither)."""
    features = params["features"]
    if shard is not None and shard not in features["shards"]:
        raise BadInput(f"--shard {shard} is not one of features.shards = {features['shards']}")
    shards = [shard] if shard is not None else ([] if gather_only else features["shards"])
    if shards:
        n_workers = features["workers"] if workers is None else workers
        remove_stray_shards(Path(out_dir), len(features["shards"]))
        tracks, sha1s = tracks_to_featurize(Path(meta_dir))
        for k in shards:
            doc = featurize_shard(tracks, k, features, Path(out_dir), n_workers, sha1s)
            log.info(
                "shard %s: %d clips, %d frames, %d skipped",
                shard_name(k),
                len(doc["tracks"]),
                doc["total_frames"],
                len(doc["skipped"]),
            )
    if shard is None:
        summary = gather(features, Path(out_dir))
        log.info(
            "feature store: %d clips (%.2f h), %d skipped %s",
            summary["featurized"],
            summary["hours"],
            summary["skipped"],
            summary["skipped_by_reason"],
        )
