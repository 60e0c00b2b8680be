"""Feature-store throughput versus decode-only and a seed-style baseline, on the same clips.

Not a test: prints ratios measured in one run. Usage: python benchmarks/featurize.py [--clips N]
Clips are 30 s synthetic songs at the release's typical format (44.1 kHz stereo MP3), plus the real
fma_small clip 000002.mp3 when ../shared is present.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import librosa
import numpy as np
import soundfile as sf
from threadpoolctl import threadpool_limits

from cola_audio import featurize, params, synthetic

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "fixtures" / "fma_real" / "fma_small" / "000" / "000002.mp3"


def make_clips(folder: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    genres = list(synthetic.SIGNATURES)
    paths = []
    for i in range(n):
        mono = synthetic.synth_clip(synthetic.SIGNATURES[genres[i % 8]], 30.0, 44100, rng)
        path = folder / f"{i:06d}.mp3"
        path.write_bytes(synthetic.encode_mp3(mono, 44100, 2, rng))
        paths.append(path)
    if REAL.is_file():
        shutil.copy(REAL, folder / "000002.mp3")
        paths.append(folder / "000002.mp3")
    return paths


def decode_only(path: Path) -> int:
    return len(sf.read(path, dtype="float32")[0])


def seed_style(args: tuple[Path, Path]) -> int:
    """What the seed repository does: librosa.load + melspectrogram defaults + power_to_db, .npy."""
    path, out = args
    y, sr = librosa.load(path, sr=16000)
    mel = librosa.power_to_db(librosa.feature.melspectrogram(y=y, sr=sr))
    np.save(out / (path.stem + ".npy"), mel.astype(np.float32))
    return mel.shape[1]


def timed(fn, items) -> float:
    start = time.perf_counter()
    for item in items:
        fn(item)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clips", type=int, default=48)
    parser.add_argument("--repeat", type=int, default=4, help="passes over the clips")
    args = parser.parse_args()
    feats = params.load(REPO / "params.yaml")["features"]
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "audio").mkdir()
        clips = make_clips(tmp / "audio", args.clips)
        (tmp / "seed").mkdir()
        seconds = sum(sf.info(p).duration for p in clips)
        featurize.featurize_file(0, str(clips[0]), feats)  # warm imports and caches, not timed
        seed_style((clips[0], tmp))
        # Each file read several times: steady-state throughput, as in a shard of thousands.
        clips = clips * args.repeat
        n = len(clips)
        seconds *= args.repeat
        with threadpool_limits(1):  # "1 core" means one thread, BLAS included
            decode_s = timed(decode_only, clips)
            ours_1 = timed(lambda p: featurize.featurize_file(0, str(p), feats), clips)
            seed_1 = timed(seed_style, [(p, tmp / "seed") for p in clips])
        tracks = {i + 1: str(p) for i, p in enumerate(clips)}
        one_shard = dict(feats, shards=[0])
        start = time.perf_counter()
        featurize.featurize_shard(tracks, 0, one_shard, tmp / "store", workers=cores)
        ours_all = time.perf_counter() - start
        with ProcessPoolExecutor(cores) as pool:
            start = time.perf_counter()
            list(pool.map(seed_style, [(p, tmp / "seed") for p in clips]))
            seed_all = time.perf_counter() - start
        ours_bytes = sum(f.stat().st_size for f in (tmp / "store").rglob("*") if f.is_file())
        seed_bytes = sum(f.stat().st_size for f in (tmp / "seed").glob("*.npy")) * args.repeat

    def rate(s: float) -> float:
        return n / s

    print(f"{n} clips, {seconds / n:.1f} s each on average, {cores} cores")
    print(f"(a) decode only (soundfile), 1 core : {rate(decode_s):7.2f} clips/s")
    print(f"(b) ours, 1 core                    : {rate(ours_1):7.2f} clips/s")
    print(f"(b) ours, {cores} cores (shard job)       : {rate(ours_all):7.2f} clips/s")
    print(f"(c) seed-style, 1 core              : {rate(seed_1):7.2f} clips/s")
    print(f"(c) seed-style, {cores} cores             : {rate(seed_all):7.2f} clips/s")
    print(f"ours ÷ decode-only (per core)       : {decode_s / ours_1:7.2f}  (target ≥ 0.8)")
    print(f"ours ÷ seed-style (1 core)          : {seed_1 / ours_1:7.2f}")
    print(f"ours {cores}-core scaling              : {ours_1 / ours_all:7.2f}x (target ≥ 1.7)")
    print(
        f"bytes on disk per clip-second       : ours {ours_bytes / seconds:,.0f}, "
        f"seed-style {seed_bytes / seconds:,.0f}"
    )


if __name__ == "__main__":
    main()
