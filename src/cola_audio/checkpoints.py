"""Which checkpoint a run may continue from, and loading it safely: a run resumes only if it is the
same run (its identity), one process at a time, and a finished run leaves nothing to resume."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from cola_audio import codedeps, digest
from cola_audio.errors import InputError

log = logging.getLogger(__name__)


class UnsafeCheckpoint(InputError, RuntimeError):
    """A checkpoint that would need arbitrary unpickling to load."""


def run_identity(
    section: dict[str, Any],
    inputs: list[Path],
    entry: str,
    ignore: tuple[str, ...] = (),
    **extra: Any,
) -> str:
    """SHA1 of everything a run's result depends on: its whole resolved params section (less
    `ignore`, the lists of other jobs), `extra` (this job's run and seed), every input file's
    bytes (feature shards included) and the stage's code: the import closure of its module
    `entry`, the files both orchestrators declare. Only a checkpoint with this identity is
    resumed."""
    settings = {k: v for k, v in section.items() if k not in ignore}
    code = [codedeps.REPO / p for p in codedeps.closure(entry)]
    files = [digest.file_digest(path) for path in [*sorted(Path(p) for p in inputs), *code]]
    return digest.json_digest({"params": settings, **extra, "files": files})[:16]


def safe_load(path: str | Path) -> dict[str, Any]:
    """torch.load(weights_only=True): tensors and plain values only, never arbitrary objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpoint(
            f"{path}: refusing to load, it holds objects beyond tensors and plain values "
            f"({str(exc).splitlines()[0]}). Only load checkpoints written by cola-audio."
        ) from exc
    except (EOFError, RuntimeError, ValueError) as exc:
        raise UnreadableCheckpoint(
            f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc}); delete it and "
            "rerun the stage"
        ) from exc


class UnreadableCheckpoint(InputError, RuntimeError):
    """A truncated or damaged checkpoint file."""


def resume_point(out_dir: Path, identity: str) -> Path | None:
    """last.ckpt of an interrupted run with this identity, else None; any other checkpoint folder
    is cleared first, saying why, so nothing of another run can leak into this one.

    A finished run leaves no checkpoints (`finish`), so it is never resumed.
    """
    folder = Path(out_dir) / "checkpoints"
    last = folder / "last.ckpt"
    if not last.is_file():
        shutil.rmtree(folder, ignore_errors=True)
        return None
    try:
        saved = safe_load(last).get("hyper_parameters", {}).get("run_identity")
    except (UnreadableCheckpoint, UnsafeCheckpoint) as exc:
        aside = last.with_name(f"last.ckpt.unreadable-{os.getpid()}")
        last.rename(aside)
        log.warning("%s; moved it to %s and starting afresh", exc, aside)
        saved = None
    if saved != identity:
        if saved is not None:
            log.warning(
                "%s belongs to another run (identity %s, this run is %s: params, data or code "
                "changed); starting afresh",
                last,
                saved,
                identity,
            )
        for stale in folder.glob("*.ckpt"):
            stale.unlink()
        return None
    log.info("resuming the interrupted run %s from %s", identity, last)
    return last


class RunFolderBusy(InputError, RuntimeError):
    """Another live process is training into the same run folder."""


@contextlib.contextmanager
def exclusive(out_dir: Path) -> Iterator[None]:
    """Hold `<out_dir>/.lock` for the whole run: a second process training into the same folder
    (an orphan left by a killed Snakemake keeps running) would interleave checkpoints and logs.
    The kernel releases the lock when its holder dies, so a stale lock file never blocks. Only
    rank 0 of a multi-process run takes it: the other ranks write nothing there."""
    ranks = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")
    if any(os.environ.get(name, "0") != "0" for name in ranks):
        yield
        return
    path = Path(out_dir) / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            raise RunFolderBusy(
                f"{out_dir} is in use by another training process (pid {holder}); wait for it to "
                "finish or stop it, then rerun"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        yield


def finish(out_dir: Path) -> None:
    """A completed run keeps its products, not its resume point: it must never be resumed."""
    shutil.rmtree(Path(out_dir) / "checkpoints", ignore_errors=True)


def checkpoint_callbacks(
    out_dir: Path, monitor: str, mode: str
) -> tuple[ModelCheckpoint, list[pl.Callback]]:
    """best.ckpt by `monitor`; last.ckpt at the end of every epoch, the only resume point.

    A resume starts at an epoch boundary, where `EpochSeeds` makes the rest of the run a function
    of the epoch alone: a killed run ends bit-identical to an uninterrupted one. No checkpoint is
    saved on a crash, because a mid-epoch state cannot be continued exactly (the loader's position
    and random stream are not in it). Lightning 2.6's save_last only refreshes last.ckpt when a
    top-k checkpoint was saved, which would leave a stale resume point, so last.ckpt has a
    callback of its own.
    """
    folder = str(Path(out_dir) / "checkpoints")
    best = ModelCheckpoint(
        dirpath=folder,
        filename="best",
        monitor=monitor,
        mode=mode,
        save_top_k=1,
        enable_version_counter=False,
    )
    last = ModelCheckpoint(
        dirpath=folder,
        filename="last",
        monitor=None,
        save_top_k=1,
        every_n_epochs=1,
        save_on_train_epoch_end=True,
        enable_version_counter=False,
    )
    return best, [best, last]
