"""Read the feature store: memory-mapped shards, so a crop reads only its own frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cola_audio import fsutil
from cola_audio.errors import MissingInput
from cola_audio.featurize import shard_paths


class FeatureStore:
    """Index plus lazily opened memory maps (opened per process, so it survives worker forks)."""

    def __init__(self, root: str | Path = "data/features") -> None:
        self.root = Path(root)
        index_path = self.root / "index.csv"
        if not index_path.is_file():
            raise MissingInput(f"{index_path}: missing; run `cola featurize` first")
        index = pd.read_csv(index_path)
        self.track_ids = index["track_id"].to_numpy(np.int64)
        self.shards = index["shard"].to_numpy(np.int64)
        self.offsets = index["offset"].to_numpy(np.int64)
        self.lengths = index["frames"].to_numpy(np.int64)
        self._row = {int(t): i for i, t in enumerate(self.track_ids)}
        self._maps: dict[int, np.ndarray] = {}
        summary = fsutil.read_json(self.root / "summary.json")
        self.n_mels = int(summary["frontend"]["n_mels"])
        # Padding is silence: the log of the front-end's floor, not log(1) = 0.
        self.pad_value = float(np.log(summary["frontend"]["log_floor"]))

    @staticmethod
    def files(root: str | Path = "data/features") -> list[Path]:
        """Every file the store's contents come from: what a run's identity must hash."""
        root = Path(root)
        n_shards = int(fsutil.read_json(root / "summary.json")["n_shards"])
        shards = [p for k in range(n_shards) for p in shard_paths(root, k)]
        return [root / "index.csv", root / "summary.json", *shards]

    def __contains__(self, track_id: int) -> bool:
        return int(track_id) in self._row

    def __len__(self) -> int:
        return len(self.track_ids)

    def _map(self, shard: int) -> np.ndarray:
        if shard not in self._maps:
            self._maps[shard] = np.load(shard_paths(self.root, shard)[0], mmap_mode="r")
        return self._maps[shard]

    def locate(self, track_id: int) -> tuple[int, int, int]:
        """(shard, offset, frames) of a track; KeyError names the track if it was skipped."""
        try:
            i = self._row[int(track_id)]
        except KeyError:
            raise KeyError(
                f"track {track_id} is not in {self.root} (skipped or not listed; see skipped.csv)"
            ) from None
        return int(self.shards[i]), int(self.offsets[i]), int(self.lengths[i])

    def frames(self, track_id: int) -> int:
        return self.locate(track_id)[2]

    def clip(self, track_id: int) -> np.ndarray:
        """All frames of a track, as a read-only float16 view."""
        shard, offset, frames = self.locate(track_id)
        return self._map(shard)[offset : offset + frames]

    def crops(self, track_ids: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
        """(n, length, mels) float32 crops, one fancy-index read per shard, silence-padded.

        The batched twin of `crop`: no Python work per crop or per frame, so the loader keeps up
        with the GPU.
        """
        rows = np.fromiter((self._row[int(t)] for t in track_ids), np.int64, len(track_ids))
        lengths = self.lengths[rows]
        starts = np.clip(np.asarray(starts, np.int64), 0, lengths - 1)
        positions = starts[:, None] + np.arange(length)[None, :]
        valid = positions < lengths[:, None]
        frames = self.offsets[rows][:, None] + np.minimum(positions, lengths[:, None] - 1)
        out = np.empty((len(rows), length, self.n_mels), dtype=np.float32)
        shards = self.shards[rows]
        for shard in np.unique(shards):
            mine = shards == shard
            out[mine] = self._map(int(shard))[frames[mine].ravel()].reshape(-1, length, self.n_mels)
        out[~valid] = self.pad_value
        return out

    def crop(self, track_id: int, start: int, length: int) -> np.ndarray:
        """`length` frames from `start` as float32, padded with silence (the log floor) past the
        end of a short clip: one crop of `crops`."""
        self.locate(track_id)  # a KeyError naming the track if it is not in the store
        return self.crops(np.asarray([track_id]), np.asarray([start]), length)[0]
