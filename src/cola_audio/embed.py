"""`cola embed`: embeddings of any audio files with a trained encoder, written as Parquet.

The encoder file carries the front-end settings it was trained on (`save_encoder`), so audio
libsndfile reads, at any rate and of any length, goes through that same log-mel front-end and is
cut into 1 s windows as in evaluation; a clip shorter than one window is padded with the log
floor (silence) and says so in its row. Windows are stacked and embedded one batch at a time, and
each file's rows go to the Parquet file (one row group per file) as soon as they are computed, so
memory is bounded by a batch and one file's rows, not by the audio's length or the file count. A
file that cannot be decoded is reported and skipped; if every file is, nothing is written.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from cola_audio import digest, fsutil
from cola_audio.data import clip_windows, window_starts
from cola_audio.errors import BadInput, InputError, MissingInput
from cola_audio.featurize import check_audio
from cola_audio.folder import AUDIO_SUFFIXES, audio_under
from cola_audio.frontend import FrontEnd
from cola_audio.models.encoder import EMBED_DIM, Encoder, encoder_metadata, load_encoder_weights

log = logging.getLogger(__name__)
DEFAULT_ENCODER = Path("models/pretrain/encoder.safetensors")
# Decoding checks of featurization, without its minimum length: short clips are padded here.
DECODE_CHECKS = {"min_decoded_fraction": 0.9, "min_seconds": 0.0}


@dataclass
class Embedder:
    """A trained encoder with the front-end and window length it expects."""

    encoder: Encoder
    frontend: FrontEnd
    crop_frames: int
    encoder_md5: str

    @classmethod
    def load(cls, path: str | Path = DEFAULT_ENCODER, device: str | None = None) -> Embedder:
        """The encoder at `path`, in eval mode, on `device` (a GPU when present by default)."""
        meta = encoder_metadata(path)
        frontend = FrontEnd(**json.loads(meta["frontend"])) if "frontend" in meta else FrontEnd()
        encoder = Encoder(
            pooling=meta.get("pooling", "max"), input_norm=meta.get("input_norm", "crop")
        )
        load_encoder_weights(encoder, path)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        encoder.eval().to(device)
        crop = int(meta.get("crop_frames", 98))
        return cls(encoder, frontend, crop, digest.file_digest(path, "md5"))

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    def windows(self, features: np.ndarray) -> np.ndarray:
        """(n, crop_frames, n_mels) non-overlapping windows, as in evaluation: a view of
        `features`, no copy; a clip shorter than one window gives one window padded with
        silence."""
        return clip_windows(features, self.crop_frames, self.pad_value)

    def starts(self, frames: int) -> list[int]:
        """First frame of each window of a clip with `frames` frames."""
        return window_starts(frames, self.crop_frames)

    def centres_ms(self, starts: Iterable[int]) -> np.ndarray:
        """Each window's centre in milliseconds: midway between its first frame's first sample
        and its last frame's last sample."""
        fe, crop = self.frontend, self.crop_frames
        first = np.asarray(list(starts), dtype=np.float64) * fe.frame_step
        last = first + (crop - 1) * fe.frame_step + fe.frame_length
        return (first + last) / 2 / fe.sample_rate * 1000.0

    @property
    def pad_value(self) -> float:
        return float(np.log(self.frontend.log_floor))

    def silence(self, frames: int) -> np.ndarray:
        """`frames` frames of the log floor: what the store pads short clips with."""
        return np.full((frames, self.frontend.n_mels), self.pad_value, np.float32)

    def embed_batches(
        self, windows: Iterable[np.ndarray], batch_size: int = 64
    ) -> Iterator[np.ndarray]:
        """(≤ batch_size, 1280) float32 embeddings of (crop_frames, n_mels) windows, in order,
        one batch at a time (see `window_batches`): memory is bounded by the batch, not by the
        audio's length."""
        for batch in window_batches(windows, batch_size):
            with torch.no_grad():
                vectors = self.encoder(torch.from_numpy(batch).to(self.device))
            yield vectors.float().cpu().numpy()

    def embed(self, windows: Iterable[np.ndarray], batch_size: int = 64) -> np.ndarray:
        """(n, 1280) float32 embeddings of n (crop_frames, n_mels) windows."""
        vectors = list(self.embed_batches(windows, batch_size))
        return np.concatenate(vectors) if vectors else np.zeros((0, EMBED_DIM), np.float32)


def window_batches(windows: Iterable[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    """Batches of at most `batch_size` windows: slices of an array of windows (views, fed to the
    encoder as they always were: another memory layout would change the last bits), or the
    windows of any other iterable (cut lazily) stacked one batch at a time, never all at once."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if isinstance(windows, np.ndarray):
        for i in range(0, len(windows), batch_size):
            yield windows[i : i + batch_size]
        return
    remaining = iter(windows)
    while batch := list(itertools.islice(remaining, batch_size)):
        yield np.stack(batch)


def audio_files(paths: Iterable[str | Path]) -> list[Path]:
    """Named files as given, folders searched recursively for audio suffixes; sorted, unique."""
    paths = list(map(Path, paths))
    found: set[Path] = set()
    for path in paths:
        if path.is_dir():
            found.update(audio_under(path))
        elif path.exists():
            found.add(path)
        else:
            raise MissingInput(f"{path}: no such file or folder")
    if not found:
        raise MissingInput(
            f"no audio files in {', '.join(map(str, paths))}: folders are searched recursively "
            f"for {' '.join(AUDIO_SUFFIXES)} (any case); name other files directly, or point at "
            "a folder that holds audio"
        )
    return sorted(found)


def embed_file(embedder: Embedder, path: Path, windows: bool, batch_size: int) -> list[dict]:
    """Rows for one decodable file: one per clip (mean and max over its windows) or per window.
    Raises an InputError (BadInput) or OSError, naming the reason, for a file to skip."""
    sha1 = digest.file_digest(path, "sha1")  # before decoding: the bytes the vectors come from
    checked = check_audio(path, DECODE_CHECKS)
    if isinstance(checked, str):
        raise BadInput(checked)
    wave, sample_rate = checked
    features = embedder.frontend.features(wave, sample_rate)
    starts = embedder.starts(len(features))
    vectors = embedder.embed(embedder.windows(features), batch_size)
    common = {
        "path": path.as_posix(),
        "sha1": sha1,
        "encoder_md5": embedder.encoder_md5,
        "duration_s": round(len(wave) / sample_rate, 4),
        "padded": len(features) < embedder.crop_frames,
    }
    if windows:
        seconds = embedder.frontend.frame_step / embedder.frontend.sample_rate
        return [
            {**common, "window": k, "start_s": round(s * seconds, 4), "embedding": v}
            for k, (s, v) in enumerate(zip(starts, vectors, strict=True))
        ]
    return [{**common, "n_windows": len(vectors), "mean": vectors.mean(0), "max": vectors.max(0)}]


def run(
    paths: list[str | Path],
    out: Path,
    encoder: Path = DEFAULT_ENCODER,
    windows: bool = False,
    batch_size: int = 64,
    device: str | None = None,
) -> int:
    """Embed every audio file under `paths` into `out` (Parquet), streamed one file's rows at a
    time; unreadable files are listed, with their reason, in `<out>.skipped.csv` and the log,
    never fatal unless every file is. Returns the number of rows written."""
    if batch_size < 1:
        raise BadInput(f"batch size {batch_size}: must be at least 1 (windows per forward pass)")
    files = audio_files(paths)  # before loading the encoder: an empty folder fails at once
    embedder = Embedder.load(encoder, device)
    skipped: list[dict[str, str]] = []
    skipped_csv = out.with_name(out.name + ".skipped.csv")
    with fsutil.atomic_path(out, suffix=".parquet") as tmp:
        n_rows, n_files = _write_rows(embedder, files, tmp, windows, batch_size, skipped)
        with fsutil.atomic_path(skipped_csv) as tmp_csv:
            pd.DataFrame(skipped, columns=["path", "reason"]).to_csv(tmp_csv, index=False)
        if n_files == 0:  # raised inside the block: the temporary Parquet file is removed
            raise BadInput(
                f"{out}: not written: all {len(files)} audio file(s) were skipped (e.g. "
                f"{skipped[0]['path']}: {skipped[0]['reason']}); every reason is in {skipped_csv}"
            )
    log.info(
        "%d rows from %d files in %s; %d skipped (%s)",
        n_rows,
        n_files,
        out,
        len(skipped),
        skipped_csv,
    )
    return n_rows


def _write_rows(
    embedder: Embedder,
    files: list[Path],
    parquet: Path,
    windows: bool,
    batch_size: int,
    skipped: list[dict[str, str]],
) -> tuple[int, int]:
    """Write each file's rows to `parquet` as one row group as soon as they are computed (the
    first file's columns set the schema); append each skipped file to `skipped`. Returns the
    rows and files written."""
    writer: pq.ParquetWriter | None = None
    n_rows = n_files = 0
    try:
        for path in tqdm(files, desc="embed", unit="file"):
            try:
                rows = embed_file(embedder, path, windows, batch_size)
            except (InputError, OSError) as exc:  # undecodable, or gone or unreadable since listed
                log.warning("%s: skipped: %s", path, exc)
                skipped.append({"path": path.as_posix(), "reason": str(exc)})
                continue
            schema = writer.schema if writer is not None else None
            table = pa.Table.from_pandas(pd.DataFrame(rows), schema=schema, preserve_index=False)
            if writer is None:
                writer = pq.ParquetWriter(parquet, table.schema)
            writer.write_table(table)
            n_rows, n_files = n_rows + len(rows), n_files + 1
    finally:
        if writer is not None:
            writer.close()
    return n_rows, n_files
