"""Pretraining input pipeline: our memory-mapped crops versus a seed-style loader, same clips.

Not a test: prints ratios measured in one run. The clips are FMA-sized (30 s = 2,998 frames × 64
mels, random values) in a feature store written in our format, and the same clips as one float32
.npy each for the seed-style loader. Usage: python benchmarks/train_input.py [--clips N]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cola_audio import fsutil, params
from cola_audio.data import PretrainViews
from cola_audio.featurize import shard_paths
from cola_audio.models.cola import ColaModule
from cola_audio.store import FeatureStore


class SeedStyleViews(Dataset):
    """Whole-clip float32 np.load per sample, a per-frame Python masking loop, two crops."""

    def __init__(self, files: list[Path], crop: int) -> None:
        self.files, self.crop = files, crop

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        clip = np.load(self.files[i])
        for t in range(len(clip)):  # per-frame masking, as the seed does
            if random.random() < 0.1:
                clip[t] = 0
        views = []
        for _ in range(2):
            start = random.randint(0, max(0, len(clip) - self.crop))
            views.append(torch.from_numpy(clip[start : start + self.crop].copy()))
        return views[0], views[1]


def crops_per_second(dataset: Dataset, batch: int, batches: int) -> float:
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=0)
    start, n = time.perf_counter(), 0
    for i, (a, p) in enumerate(loader):
        n += len(a) + len(p)
        if i + 1 == batches:
            break
    return n / (time.perf_counter() - start)


def write_store(root: Path, clips: int, frames: int = 2998, n_shards: int = 4) -> None:
    """A feature store in the layout `cola featurize` writes, filled with random log-mels."""
    rng = np.random.default_rng(0)
    (root / "shards").mkdir(parents=True)
    rows = []
    for shard in range(n_shards):
        ids = [t for t in range(1, clips + 1) if t % n_shards == shard]
        np.save(
            shard_paths(root, shard)[0],
            rng.normal(-6, 2, (len(ids) * frames, 64)).astype(np.float16),
        )
        rows += [(t, shard, i * frames, frames) for i, t in enumerate(ids)]
    (root / "index.csv").write_text(
        "track_id,shard,offset,frames\n"
        + "".join(f"{a},{b},{c},{d}\n" for a, b, c, d in sorted(rows))
    )
    fsutil.write_json(root / "summary.json", {"frontend": {"n_mels": 64, "log_floor": 1e-5}})


def measure_steps(dataset: Dataset, batch: int, steps: int) -> tuple[float, float]:
    """Seconds per training step with a pre-built batch, and with batches from the loader."""
    torch.set_num_threads(len(__import__("os").sched_getaffinity(0)))
    repo = Path(__file__).resolve().parents[1]
    model = ColaModule.from_params(params.load(repo / "params.yaml")["pretrain"])
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=0)
    fixed = next(iter(loader))

    def step(views: tuple[torch.Tensor, torch.Tensor]) -> None:
        loss, _, _ = model.contrastive_step(*views)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step(fixed)  # warm-up
    in_memory = real = 0.0
    it = iter(loader)
    for _ in range(steps):  # interleaved, so drift in machine speed hits both alike
        start = time.perf_counter()
        step(fixed)
        in_memory += time.perf_counter() - start
        start = time.perf_counter()
        try:
            fresh = next(it)
        except StopIteration:
            it = iter(loader)
            fresh = next(it)
        step(fresh)
        real += time.perf_counter() - start
    in_memory, real = in_memory / steps, real / steps
    return in_memory, real


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clips", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        write_store(Path(tmp) / "store", args.clips)
        store = FeatureStore(Path(tmp) / "store")
        ids = [int(t) for t in store.track_ids]
        ours = PretrainViews(store, ids, 98)
        files = []
        for tid in ids:
            path = Path(tmp) / f"{tid}.npy"
            np.save(path, np.asarray(store.clip(tid), dtype=np.float32))
            files.append(path)
        seed = SeedStyleViews(files, 98)
        batches = max(1, len(ids) // args.batch)
        ours_rate = crops_per_second(ours, args.batch, batches)
        seed_rate = crops_per_second(seed, args.batch, batches)
        step_times = measure_steps(ours, args.batch, args.steps)
    in_memory, real = step_times

    print(f"{args.clips} clips of 2,998 frames, batch {args.batch}, crop 98 frames")
    print(f"our loader (1 core)        : {ours_rate:10.0f} crops/s")
    print(f"seed-style loader (1 core) : {seed_rate:10.0f} crops/s")
    print(f"ours ÷ seed-style          : {ours_rate / seed_rate:10.1f}x (target ≥ 20x)")
    print(f"training step, in-memory   : {in_memory:10.3f} s")
    print(f"training step, real loader : {real:10.3f} s")
    print(f"input overhead             : {100 * (real - in_memory) / real:10.1f} % (target ≤ 10 %)")


if __name__ == "__main__":
    main()
