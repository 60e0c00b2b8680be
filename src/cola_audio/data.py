"""Datasets and LightningDataModules over the memory-mapped feature store.

A crop is a slice of a memory map: no whole-clip reads, no per-frame Python loops. Randomness comes
from torch's generators, seeded per epoch (`epoch_seed`) and per worker: two runs with one seed see
the same crops, and so does a run resumed at an epoch boundary.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from cola_audio import meta
from cola_audio.errors import BadInput
from cola_audio.store import FeatureStore

log = logging.getLogger(__name__)


def derived_seed(*key: int) -> int:
    """Pure: a seed for the stream named by `key` (run seed, epoch, …), independent of others."""
    return int(np.random.SeedSequence(list(key)).generate_state(1)[0])


def epoch_seed(seed: int, epoch: int) -> int:
    """Pure: the seed of one epoch's random streams (crops, order, dropout), from the run's seed."""
    return derived_seed(seed, epoch)


def random_starts(
    frames: np.ndarray, crop: int, generator: torch.Generator | None = None
) -> np.ndarray:
    """One uniform start per clip in [0, frames - crop], from `generator` (torch's global one
    when None)."""
    span = torch.from_numpy(np.maximum(frames - crop, 0) + 1)
    return (torch.rand(len(frames), dtype=torch.float64, generator=generator) * span).long().numpy()


class RandomCrops(Dataset):
    """A dataset drawing random crops from a generator of its own, which its loader seeds
    (`_loader`): crops then depend on the epoch's seed only, not on what the model or an earlier
    prefetch drew from torch's global generator (Lightning fetches the first batch of an epoch
    before the epoch-start hooks run, so a resumed run saw other crops)."""

    generator: torch.Generator | None = None

    def starts(self, frames: np.ndarray) -> np.ndarray:
        return random_starts(frames, self.crop, self.generator)


class PretrainViews(RandomCrops):
    """Two independent random crops of one clip: anchor and positive."""

    def __init__(self, store: FeatureStore, track_ids: list[int], crop_frames: int) -> None:
        self.store, self.track_ids, self.crop = store, track_ids, crop_frames
        self.lengths = [store.frames(t) for t in track_ids]
        self.n_padded = sum(n < crop_frames for n in self.lengths)
        self._ids, self._lengths = np.asarray(track_ids), np.asarray(self.lengths)

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A whole batch in two vectorised reads (the DataLoader calls this when it exists)."""
        ids, lengths = self._ids[indices], self._lengths[indices]
        anchors = torch.from_numpy(self.store.crops(ids, self.starts(lengths), self.crop))
        positives = torch.from_numpy(self.store.crops(ids, self.starts(lengths), self.crop))
        return list(zip(anchors, positives, strict=True))

    def __len__(self) -> int:
        return len(self.track_ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([i])[0]


class LabelledCrops(RandomCrops):
    """One random crop per clip and its label (training)."""

    def __init__(self, store: FeatureStore, tracks: list[dict[str, Any]], crop_frames: int) -> None:
        self.store, self.tracks, self.crop = store, tracks, crop_frames
        self.lengths = [store.frames(t["track_id"]) for t in tracks]
        self._ids = np.asarray([t["track_id"] for t in tracks])
        self._labels = [t["label"] for t in tracks]
        self._lengths = np.asarray(self.lengths)

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        crops = self.store.crops(self._ids[indices], self.starts(self._lengths[indices]), self.crop)
        return [(torch.from_numpy(c), self._labels[i]) for c, i in zip(crops, indices, strict=True)]

    def __len__(self) -> int:
        return len(self.tracks)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.__getitems__([i])[0]


def window_starts(frames: int, crop: int) -> list[int]:
    """Every non-overlapping full window; a clip shorter than one window gets one padded window."""
    return list(range(0, frames - crop + 1, crop)) or [0]


def clip_windows(clip: np.ndarray, crop: int, pad_value: float) -> np.ndarray:
    """(n, crop, mels) non-overlapping windows of a (frames, mels) clip: a reshape, no copy per
    window; a clip shorter than one window gives one window padded with `pad_value` (silence)."""
    if len(clip) < crop:
        pad = np.full((crop - len(clip), clip.shape[1]), pad_value, dtype=np.float32)
        return np.concatenate([clip.astype(np.float32), pad])[None]
    n = len(window_starts(len(clip), crop))
    return clip[: n * crop].reshape(n, crop, clip.shape[1])


class ClipWindows(Dataset):
    """All windows of one clip as a stack (evaluation: logits are averaged over the clip)."""

    def __init__(self, store: FeatureStore, tracks: list[dict[str, Any]], crop_frames: int) -> None:
        self.store, self.tracks, self.crop = store, tracks, crop_frames

    def __len__(self) -> int:
        return len(self.tracks)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        track = self.tracks[i]
        tid = track["track_id"]
        clip = np.asarray(self.store.clip(tid), dtype=np.float32)
        windows = clip_windows(clip, self.crop, self.store.pad_value)
        return torch.from_numpy(np.ascontiguousarray(windows)), track["label"], tid


def collate_clips(batch: list[tuple[torch.Tensor, int, int]]) -> dict[str, torch.Tensor]:
    """Concatenate windows of several clips; `clip` says which clip each window belongs to."""
    windows = torch.cat([w for w, _, _ in batch])
    clip = torch.cat(
        [torch.full((len(w),), i, dtype=torch.long) for i, (w, _, _) in enumerate(batch)]
    )
    labels = torch.tensor([label for _, label, _ in batch])
    track_ids = torch.tensor([tid for _, _, tid in batch])
    return {"windows": windows, "clip": clip, "labels": labels, "track_ids": track_ids}


class SeededPermutation(Sampler[int]):
    """One permutation of range(n), the same every time it is iterated.

    Lightning makes a second iterator for every epoch after the first, but not for the epoch a
    resumed run starts with; a sampler drawing from a shared generator then gave the resumed run
    another order than the uninterrupted one.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed))
        return iter(order.tolist())

    def __len__(self) -> int:
        return self.n


def _loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int,
    seed: int,
    drop_last: bool = False,
    collate_fn: Any = None,
    rank: int = 0,
) -> DataLoader:
    """A loader whose order and crops are a function of `seed` alone, however often it is
    iterated: the order from `SeededPermutation`, the crops from a copy of the dataset with a
    generator of its own, seeded afresh in each worker (or, without workers, per loader)."""
    if isinstance(dataset, RandomCrops):
        dataset = copy.copy(dataset)  # another loader of the same data keeps its own stream
        dataset.generator = torch.Generator().manual_seed(crop_seed(seed, rank, None))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=SeededPermutation(len(dataset), seed) if shuffle else None,  # type: ignore[arg-type]
        num_workers=num_workers,
        drop_last=drop_last,
        collate_fn=collate_fn,
        worker_init_fn=functools.partial(_seed_worker_crops, seed, rank),
        # Each iterator draws a base seed; from torch's global generator that draw would shift
        # the dropout masks by how many iterators Lightning made.
        generator=torch.Generator().manual_seed(seed),
    )


def crop_seed(seed: int, rank: int, worker: int | None) -> int:
    """Pure: the crop stream's seed for one process (DDP rank) and loader worker (None: none).
    The sample order stays one per epoch for all ranks (their shards of it must not overlap);
    the crops differ per rank and worker."""
    return derived_seed(seed, rank) if worker is None else derived_seed(seed, rank, worker)


def _seed_worker_crops(seed: int, rank: int, worker_id: int) -> None:
    info = get_worker_info()
    if info is not None and isinstance(info.dataset, RandomCrops):
        info.dataset.generator = torch.Generator().manual_seed(crop_seed(seed, rank, worker_id))


class StoreData(pl.LightningDataModule):
    """What both data modules read: the feature store and the metadata JSON, with loader knobs."""

    def __init__(
        self,
        features: Path,
        meta_dir: Path,
        crop_frames: int,
        batch_size: int,
        num_workers: int,
        seed: int,
    ) -> None:
        super().__init__()
        self.features, self.meta_dir = Path(features), Path(meta_dir)
        self.crop_frames, self.batch_size = crop_frames, batch_size
        self.num_workers, self.seed = num_workers, seed

    def epoch_seed(self) -> int:
        """The train loader's seed: a function of the epoch about to run, so an epoch's order and
        worker streams are the same whether the run was resumed or not (training.EpochSeeds)."""
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        return epoch_seed(self.seed, epoch)

    def rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0


class PretrainData(StoreData):
    dataset: PretrainViews | None = None  # built by setup()
    n_missing = 0  # listed for pretraining but skipped at featurization

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        store = FeatureStore(self.features)
        listed = [t["track_id"] for t in meta.read(self.meta_dir, "pretrain")["tracks"]]
        ids = [t for t in listed if t in store]
        self.n_missing = len(listed) - len(ids)
        if len(ids) < 2:
            raise BadInput(f"{self.features}: fewer than two pretraining clips are featurized")
        self.dataset = PretrainViews(store, ids, self.crop_frames)
        log.info(
            "pretraining on %d clips (%d listed but skipped at featurization, %d shorter "
            "than one crop and padded)",
            len(ids),
            self.n_missing,
            self.dataset.n_padded,
        )

    def train_dataloader(self) -> DataLoader:
        assert self.dataset is not None
        # drop_last: every step has the same number of negatives, so accuracy is comparable.
        batch = min(self.batch_size, len(self.dataset))
        return _loader(
            self.dataset,
            batch,
            True,
            self.num_workers,
            self.epoch_seed(),
            drop_last=True,
            rank=self.rank(),
        )


class GenreData(StoreData):
    def __init__(
        self,
        features: Path,
        meta_dir: Path,
        crop_frames: int,
        batch_size: int,
        eval_batch_size: int,
        num_workers: int,
        seed: int,
    ) -> None:
        super().__init__(features, meta_dir, crop_frames, batch_size, num_workers, seed)
        self.eval_batch_size = eval_batch_size
        self.splits: dict[str, list[dict[str, Any]]] = {}
        self.missing: dict[str, int] = {}
        self.genres: list[str] = []
        self.store: FeatureStore | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.store is not None:
            return
        self.store = FeatureStore(self.features)
        self.genres, tracks = meta.read_labelled(self.meta_dir)
        for split in ("train", "val", "test"):
            listed = [t for t in tracks if t["split"] == split]
            self.splits[split] = [t for t in listed if t["track_id"] in self.store]
            self.missing[split] = len(listed) - len(self.splits[split])
            if not self.splits[split]:
                raise BadInput(f"no featurized {split} clips in {self.features}")

    def train_dataloader(self) -> DataLoader:
        assert self.store is not None
        data = LabelledCrops(self.store, self.splits["train"], self.crop_frames)
        return _loader(
            data, self.batch_size, True, self.num_workers, self.epoch_seed(), rank=self.rank()
        )

    def _eval_loader(self, split: str) -> DataLoader:
        assert self.store is not None
        data = ClipWindows(self.store, self.splits[split], self.crop_frames)
        lengths = sorted(self.store.frames(t["track_id"]) for t in self.splits[split])
        per_clip = max(1, lengths[len(lengths) // 2] // self.crop_frames)
        clips = max(1, self.eval_batch_size // per_clip)
        return _loader(data, clips, False, self.num_workers, self.seed, collate_fn=collate_clips)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
