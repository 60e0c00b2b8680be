"""Pretraining input pipeline: our memory-mapped crops versus a seed-style loader, same clips.

Not a test: prints ratios measured in one run. Needs a feature store (default: data/features from
`cola download && cola prepare && cola featurize`). Usage: python benchmarks/train_input.py
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

from cola_audio.data import PretrainViews
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--features", type=Path, default=Path("data/features"))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    store = FeatureStore(args.features)
    ids = [int(t) for t in store.track_ids]
    ours = PretrainViews(store, ids, 98)
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for tid in ids:
            path = Path(tmp) / f"{tid}.npy"
            np.save(path, np.asarray(store.clip(tid), dtype=np.float32))
            files.append(path)
        seed = SeedStyleViews(files, 98)
        batches = max(1, len(ids) // args.batch)
        ours_rate = crops_per_second(ours, args.batch, batches)
        seed_rate = crops_per_second(seed, args.batch, batches)

    torch.set_num_threads(len(__import__("os").sched_getaffinity(0)))
    model = ColaModule()
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    loader = DataLoader(ours, batch_size=args.batch, shuffle=True, num_workers=0)
    fixed = next(iter(loader))

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        loss, _, _ = model.contrastive_step(*batch)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step(fixed)  # warm-up
    start = time.perf_counter()
    for _ in range(args.steps):
        step(fixed)
    in_memory = (time.perf_counter() - start) / args.steps
    start = time.perf_counter()
    it = iter(loader)
    for _ in range(args.steps):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        step(batch)
    real = (time.perf_counter() - start) / args.steps

    print(f"{len(ids)} clips, batch {args.batch}, crop 98 frames")
    print(f"our loader (1 core)        : {ours_rate:10.0f} crops/s")
    print(f"seed-style loader (1 core) : {seed_rate:10.0f} crops/s")
    print(f"ours ÷ seed-style          : {ours_rate / seed_rate:10.1f}x (target ≥ 20x)")
    print(f"training step, in-memory   : {in_memory:10.3f} s")
    print(f"training step, real loader : {real:10.3f} s")
    print(f"input overhead             : {100 * (real - in_memory) / real:10.1f} % (target ≤ 10 %)")


if __name__ == "__main__":
    main()
