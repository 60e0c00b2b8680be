"""`cola embed`: embeddings of any audio files with a trained encoder, written as Parquet.

The encoder file carries the front-end settings it was trained on (`save_encoder`), so audio
libsndfile reads, at any rate and of any length, goes through that same log-mel front-end and is cut
into 1 s windows as in evaluation; a clip shorter than one window is padded with the log floor
(silence) and says so in its row (one with no analysis frame at all is skipped). Windows are stacked
and embedded one batch at a time, and each file's rows go to the Parquet file (one row group per
file) as soon as they are computed, so memory is bounded by a batch and one file's rows, not by the
audio's length or the file count. A file that cannot be decoded is reported and skipped; if every
file is, nothing is written.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import stat
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
        """The encoder at `path`, in eval mode, on `device` (a GPU when present by default).
        A device torch lacks, or metadata this version cannot read, is a BadInput naming it."""
        where = usable_device(device)
        meta = encoder_metadata(path)
        frontend, crop = _frontend_of(path, meta), _crop_frames_of(path, meta)
        try:
            encoder = Encoder(
                pooling=meta.get("pooling", "max"), input_norm=meta.get("input_norm", "crop")
            )
        except ValueError as exc:  # a pooling or input_norm this version does not have
            raise _foreign(path, str(exc)) from None
        load_encoder_weights(encoder, path)
        encoder.eval().to(where)
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


def usable_device(device: str | None) -> torch.device:
    """`device` as torch names it, refused (BadInput, one line) when torch does not know it or
    this machine lacks it; None picks a GPU when present, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        where = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise BadInput(
            f"--device {device}: not a device torch knows (cpu, cuda, cuda:1, ...)"
        ) from None
    if where.type == "cuda":
        if not torch.cuda.is_available():
            raise BadInput(
                f"--device {device}: no CUDA device here (torch.cuda.is_available() is False); "
                "use --device cpu"
            )
        count = torch.cuda.device_count()
        if where.index is not None and where.index >= count:
            raise BadInput(
                f"--device {device}: this machine has {count} CUDA device(s) "
                f"(cuda:0 to cuda:{count - 1}); use one of them, or --device cpu"
            )
    elif where.type == "mps" and not torch.backends.mps.is_available():
        raise BadInput(
            f"--device {device}: no MPS device here (torch.backends.mps.is_available() is "
            "False); use --device cpu"
        )
    elif where.type not in ("cpu", "cuda", "mps"):
        raise BadInput(f"--device {device}: cannot embed on it; use cpu, cuda, cuda:1 or mps")
    return where


def _foreign(path: str | Path, what: str) -> BadInput:
    return BadInput(
        f"{path}: encoder metadata {what}: the file was written by another version of "
        "cola-audio; re-export it with this version's `cola pretrain`, or use the version that "
        "wrote it"
    )


def _frontend_of(path: str | Path, meta: dict[str, str]) -> FrontEnd:
    """The front-end the encoder's metadata records (the defaults when it records none)."""
    if "frontend" not in meta:
        return FrontEnd()
    text = meta["frontend"]
    try:
        settings = json.loads(text)
    except ValueError:
        raise _foreign(path, f"frontend {text!r} is not JSON") from None
    if not isinstance(settings, dict):
        raise _foreign(path, f"frontend {text!r} is not a JSON object")
    fields = {f.name: f.default for f in dataclasses.fields(FrontEnd)}
    for key, value in settings.items():
        if key not in fields:
            known = ", ".join(fields)
            raise _foreign(path, f"frontend key {key!r} (value {value!r}) is unknown ({known})")
        wanted = type(fields[key])
        numeric = wanted is float and isinstance(value, int)
        if isinstance(value, bool) or not (isinstance(value, wanted) or numeric):
            raise _foreign(path, f"frontend {key}={value!r} is not of type {wanted.__name__}")
    return FrontEnd(**settings)


def _crop_frames_of(path: str | Path, meta: dict[str, str]) -> int:
    """Frames per window the encoder's metadata records (98, 1 s, when it records none)."""
    text = meta.get("crop_frames", "98")
    try:
        crop = int(text)
    except ValueError:
        raise _foreign(path, f"crop_frames {text!r} is not a whole number") from None
    if crop < 1:
        raise _foreign(path, f"crop_frames {text!r} is not a positive number of frames")
    return crop


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


def shown(path: Path) -> str:
    """`path` as text that can always be written: a name byte that is not UTF-8 as `\\xe9`."""
    return os.fsencode(path.as_posix()).decode("utf-8", "backslashreplace")


def check_out(out: Path, paths: Iterable[Path]) -> None:
    """Refuse (BadInput, before any work) an `--out` that would overwrite an input or audio, or
    that cannot be written: an existing folder, or under a path that is not a folder."""
    skipped_csv = out.with_name(out.name + ".skipped.csv")
    for named in paths:
        for target in (out, skipped_csv):
            same = target.resolve() == named.resolve()
            if not same and target.exists() and named.exists():
                same = os.path.samefile(target, named)
            if same and not named.is_dir():
                what = "is" if target == out else f"would write {target}, which is"
                raise BadInput(
                    f"--out {out}: {what} the input file {named}, which would be overwritten; "
                    "choose another path, e.g. --out embeddings.parquet"
                )
    if out.suffix.lower() in AUDIO_SUFFIXES:
        raise BadInput(
            f"--out {out}: named like audio ({out.suffix}), but the output is Parquet (and could "
            f"overwrite a recording); choose a .parquet name, e.g. --out "
            f"{out.with_suffix('.parquet')}"
        )
    if out.is_dir():
        raise BadInput(
            f"--out {out}: is a folder; name the Parquet file to write, e.g. --out "
            f"{out / 'embeddings.parquet'}"
        )
    above = out.absolute().parent
    while not os.path.lexists(above) and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise BadInput(
            f"--out {out}: {above} exists and is not a folder, so nothing can be written under "
            "it; choose a path in a folder"
        )


def unembeddable(path: Path) -> str | None:
    """Why `path` cannot be embedded whatever it holds (it is not opened), or None."""
    try:
        os.fsencode(path).decode("utf-8")
    except UnicodeError:
        return "file name is not valid UTF-8; rename it"
    if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the run on open
        return "not a regular file (a FIFO, socket or device)"
    return None


def embed_file(embedder: Embedder, path: Path, windows: bool, batch_size: int) -> list[dict]:
    """Rows for one decodable file: one per clip (mean and max over its windows) or per window.
    Raises an InputError (BadInput) or OSError, naming the reason, for a file to skip."""
    if (why := unembeddable(path)) is not None:
        raise BadInput(why)
    sha1 = digest.file_digest(path, "sha1")  # before decoding: the bytes the vectors come from
    checked = check_audio(path, DECODE_CHECKS)
    if isinstance(checked, str):
        raise BadInput(checked)
    wave, sample_rate = checked
    fe = embedder.frontend
    features = fe.features(wave, sample_rate)
    if len(features) == 0:  # all padding: every such clip would get the same vector
        samples = -(-len(wave) * fe.sample_rate // sample_rate)  # as many as resampling gives
        raise BadInput(
            f"too short for one analysis frame ({samples} samples at {fe.sample_rate} Hz; "
            f"at least {fe.frame_length} needed)"
        )
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
    out = Path(out)
    check_out(out, list(map(Path, paths)))  # before anything is read or written
    files = audio_files(paths)  # before loading the encoder: an empty folder fails at once
    embedder = Embedder.load(encoder, device)
    skipped: list[dict[str, str]] = []
    skipped_csv = out.with_name(out.name + ".skipped.csv")
    with fsutil.atomic_path(out, suffix=".parquet") as tmp:
        n_rows, n_files = _write_rows(embedder, files, tmp, windows, batch_size, skipped)
        with fsutil.atomic_path(skipped_csv) as tmp_csv:
            pd.DataFrame(skipped, columns=["path", "reason"]).to_csv(tmp_csv, index=False)
        if n_files == 0:  # raised inside the block: the temporary Parquet file is removed
            stale = ""
            if out.is_file() or out.is_symlink():  # an earlier run's: it does not describe this one
                out.unlink()
                stale = f"; the older {out} from an earlier run was removed"
            raise BadInput(
                f"{out}: not written: all {len(files)} audio file(s) were skipped (e.g. "
                f"{skipped[0]['path']}: {skipped[0]['reason']}); every reason is in "
                f"{skipped_csv}{stale}"
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
                log.warning("%s: skipped: %s", shown(path), exc)
                skipped.append({"path": shown(path), "reason": str(exc)})
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
