"""`cola task-embed`: one vector per clip of a downstream task, from one encoder.

It embeds every clip of a task once per encoder: the pretrained one (its own
front-end and window length, as `cola embed`) and the random-init control (seeded; its BatchNorm
statistics recomputed on the task's training windows, as the random-encoder runs do). Each clip's
1 s windows (non-overlapping; a shorter clip is padded with silence) are embedded and averaged
(and max-pooled) into one vector per clip, so the probes (probe.py) fit in seconds.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from cola_audio import fsutil
from cola_audio.embed import Embedder, embed_file, usable_device
from cola_audio.errors import BadInput, InputError, MissingInput
from cola_audio.featurize import check_audio
from cola_audio.frontend import FrontEnd
from cola_audio.models.batchnorm import recompute_batchnorm
from cola_audio.models.encoder import Encoder

log = logging.getLogger(__name__)

INITS = ("pretrained", "random")
# On the CPU everywhere: a GPU's kernels sum in another order, and the probes' numbers would
# depend on the machine that embedded (a few hundred windows per second on 2 cores).
DEVICE = "cpu"
POOLINGS = ("mean", "max")


def random_embedder(params: dict[str, Any], seed: int) -> Embedder:
    """The random-init control: an encoder as pretraining builds it, seeded, untrained."""
    torch.manual_seed(seed)
    pre = params["pretrain"]
    encoder = Encoder(pooling=pre["pooling"], input_norm=pre["input_norm"])
    encoder.eval().to(usable_device(DEVICE))
    frontend = FrontEnd.from_params(params["features"])
    return Embedder(encoder, frontend, pre["crop_frames"], f"random-init seed {seed}")


def _train_windows(embedder: Embedder, paths: list[str]) -> Iterator[np.ndarray]:
    for path in paths:
        checked = check_audio(Path(path), {"min_decoded_fraction": 0.9, "min_seconds": 0.0})
        if isinstance(checked, str):
            continue
        features = embedder.frontend.features(*checked)
        if len(features):
            yield from embedder.windows(features)


def recompute_statistics(
    embedder: Embedder, paths: list[str], batches: int, size: int, seed: int, task: str
) -> None:
    """BatchNorm running statistics as the plain mean over `batches` batches of training windows,
    the clips in a seeded order (a folder's path order would be one class after another):
    untrained statistics (mean 0, variance 1) describe no real input."""
    encoder = embedder.encoder
    norms = [m for m in encoder.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    order = np.random.default_rng(seed).permutation(len(paths))
    shuffled = [paths[i] for i in order]
    windows = list(itertools.islice(_train_windows(embedder, shuffled), batches * size))
    if not windows:
        raise BadInput(
            f"tasks.{task}: no training clip decodes, so the random-init encoder has no "
            "BatchNorm statistics; check the task's audio (data/tasks/<task>/data/clips.csv)"
        )

    def forward_passes() -> None:
        for start in range(0, len(windows), size):
            batch = np.stack(windows[start : start + size])
            encoder(torch.from_numpy(batch).to(embedder.device))

    encoder.train()
    recompute_batchnorm(norms, forward_passes)
    encoder.eval()


def embed_task(
    params: dict[str, Any], name: str, init: str, data: Path, out: Path, encoder: Path | None
) -> pd.DataFrame:
    """Write out/{clips.csv, mean.npy, max.npy, skipped.csv}: one vector per clip."""
    cfg, task = params["probe"], params["tasks"][name]
    torch.set_num_threads(cfg["threads"])
    clips = pd.read_csv(Path(data) / "clips.csv", dtype=str, keep_default_na=False)
    if init == "pretrained":
        if encoder is None or not Path(encoder).is_file():
            raise MissingInput(f"{encoder}: no encoder; run `cola pretrain` first")
        embedder = Embedder.load(encoder, DEVICE)
    else:
        embedder = random_embedder(params, cfg["random_init_seed"])
        train = clips.loc[clips["split"] == "train", "path"].tolist()
        seed = cfg["random_init_seed"]
        recompute_statistics(
            embedder, train, cfg["precise_bn_batches"], cfg["batch_size"], seed, name
        )
    rows, vectors, skipped = [], {p: [] for p in POOLINGS}, []
    for clip in tqdm(clips.itertuples(), total=len(clips), desc=f"{name}/{init}", mininterval=5):
        try:
            (row,) = embed_file(embedder, Path(clip.path), False, cfg["batch_size"])
        except (InputError, OSError) as exc:
            skipped.append({"clip": clip.clip, "path": clip.path, "reason": str(exc)})
            continue
        if row["duration_s"] < task["min_seconds"]:
            reason = f"shorter than tasks.{name}.min_seconds ({row['duration_s']} s)"
            skipped.append({"clip": clip.clip, "path": clip.path, "reason": reason})
            continue
        rows.append({"clip": clip.clip, "label": clip.label, "split": clip.split})
        for pooling in POOLINGS:
            vectors[pooling].append(row[pooling])
    if not rows:
        raise BadInput(
            f"tasks.{name}: none of its {len(clips)} clips could be embedded (e.g. "
            f"{skipped[0]['path']}: {skipped[0]['reason']}); check its audio and min_seconds"
            if skipped
            else f"tasks.{name}: no clips; rerun `cola task-data`"
        )
    out = Path(out)
    table = pd.DataFrame(rows, columns=["clip", "label", "split"])
    fsutil.write_text(out / "clips.csv", table.to_csv(index=False, lineterminator="\n"))
    skipped_table = pd.DataFrame(skipped, columns=["clip", "path", "reason"])
    fsutil.write_text(out / "skipped.csv", skipped_table.to_csv(index=False, lineterminator="\n"))
    for pooling in POOLINGS:
        matrix = np.asarray(vectors[pooling], dtype=np.float32).reshape(len(rows), -1)
        with fsutil.atomic_path(out / f"{pooling}.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, matrix)
    log.info(
        "tasks.%s, %s encoder: %d clips embedded, %d skipped", name, init, len(rows), len(skipped)
    )
    return table
