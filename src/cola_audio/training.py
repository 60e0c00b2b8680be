"""What pretraining and fine-tuning share: Trainer from params, seeds, safe checkpoints, resume."""

from __future__ import annotations

import contextlib
import fcntl
import inspect
import itertools
import logging
import math
import os
import pickle
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from cola_audio import digest, fsutil
from cola_audio.data import epoch_seed
from cola_audio.errors import InputError, MissingInput

log = logging.getLogger(__name__)


class UnsafeCheckpoint(InputError, RuntimeError):
    """A checkpoint that would need arbitrary unpickling to load."""


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up, then constant or cosine decay to zero at `total_steps`."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        span = max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup_steps) / span)))

    return factor


def adam_with_schedule(module: pl.LightningModule, params: Any, lr: float) -> dict[str, Any]:
    """Adam plus the warm-up/decay schedule from the module's hparams, stepped every batch."""
    hp = module.hparams
    opt = torch.optim.Adam(params, lr=lr, weight_decay=hp.weight_decay)
    total = int(module.trainer.estimated_stepping_batches)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(hp.lr_schedule, hp.warmup_steps, total)
    )
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def model_hparams(model_class: type, section: dict[str, Any]) -> dict[str, Any]:
    """The keys of a params section that `model_class`'s constructor takes, with their values:
    the hyperparameter list is the constructor's signature, written nowhere else."""
    names = inspect.signature(model_class.__init__).parameters
    return {k: section[k] for k in names if k in section}


def resolve_precision(trainer_cfg: dict[str, Any]) -> str:
    """auto: bf16-mixed where a GPU will be used, 32-true on CPU."""
    precision = str(trainer_cfg["precision"])
    if precision != "auto":
        return "32-true" if precision == "32" else precision
    return "bf16-mixed" if uses_gpu(trainer_cfg) else "32-true"


def uses_gpu(trainer_cfg: dict[str, Any]) -> bool:
    """The one place that decides whether training runs on a GPU."""
    accelerator = trainer_cfg["accelerator"]
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def run_identity(
    section: dict[str, Any], inputs: list[Path], ignore: tuple[str, ...] = (), **extra: Any
) -> str:
    """SHA1 of everything a run's result depends on: its whole resolved params section (less
    `ignore`, the lists of other jobs), `extra` (this job's run and seed),
    every input file's bytes (feature shards included) and the package's own source. Only a
    checkpoint with this identity is resumed."""
    settings = {k: v for k, v in section.items() if k not in ignore}
    package = sorted(Path(__file__).resolve().parent.rglob("*.py"))
    files = [digest.file_digest(path) for path in [*sorted(Path(p) for p in inputs), *package]]
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


def make_trainer(
    section: dict[str, Any],
    out_dir: Path,
    seed: int,
    callbacks: list[pl.Callback],
    **overrides: Any,
) -> pl.Trainer:
    cfg = section["trainer"]
    callbacks = [*callbacks, EpochSeeds(seed), PreciseBatchNorm(section["precise_bn_batches"])]
    accelerator = "gpu" if cfg["accelerator"] == "cuda" else cfg["accelerator"]
    on_gpu = uses_gpu(cfg)
    kwargs: dict[str, Any] = {
        "accelerator": accelerator,
        "devices": cfg["devices"],
        "strategy": cfg["strategy"],
        "precision": resolve_precision(cfg),
        "max_epochs": section["max_epochs"],
        "max_steps": section["max_steps"],
        "logger": CSVLogger(save_dir=str(out_dir), name="logs", version=""),
        "callbacks": callbacks,
        "deterministic": "warn" if on_gpu else True,
        "log_every_n_steps": 1,
        "enable_progress_bar": True,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "reload_dataloaders_every_n_epochs": 1,  # each epoch's loader seeded by its number
    }
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)


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


class EpochSeeds(pl.Callback):
    """Reseed every random stream at the start of each epoch from (run seed, epoch).

    Together with a train loader built afresh each epoch from the same seed (`StoreData`), an
    epoch's batches, crops and dropout masks depend on the epoch number only, never on how many
    draws came before: a run resumed from the end of epoch k replays epoch k+1 exactly as an
    uninterrupted run does.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        seed = epoch_seed(self.seed, trainer.current_epoch)
        pl.seed_everything(seed, workers=True, verbose=False)


class PreciseBatchNorm(pl.Callback):
    """Recompute BatchNorm statistics with the current weights before evaluation and at the end.

    Running averages lag behind weights that move fast; on short runs eval-mode outputs collapse
    (seen here: 19 % validation accuracy in eval mode against 74 % with batch statistics). A few
    forward passes over training batches with a cumulative average fix it ("precise BN"). Only
    BatchNorm layers in training mode are touched, so a frozen encoder stays bit-identical.
    """

    def __init__(self, n_batches: int) -> None:
        self.n_batches = n_batches
        self.fresh_at_step = -1  # global step the statistics were last recomputed at

    @torch.no_grad()
    def recompute(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if not self.n_batches or trainer.datamodule is None:
            return
        if trainer.global_step == self.fresh_at_step:  # no weight changed since: same result
            return
        self.fresh_at_step = trainer.global_step
        was_training = module.training
        module.train()
        norms = [
            m
            for m in module.modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training
        ]
        if not norms:  # a frozen encoder: nothing to recompute, no batches to spend
            module.train(was_training)
            return
        batches = itertools.islice(trainer.datamodule.train_dataloader(), self.n_batches)

        def forward_passes() -> None:
            for batch in batches:
                batch = module.transfer_batch_to_device(batch, module.device, 0)
                with trainer.precision_plugin.forward_context():
                    module.batchnorm_forward(batch)

        recompute_batchnorm(norms, forward_passes)
        for m in norms:
            if trainer.world_size > 1:
                m.running_mean.copy_(trainer.strategy.reduce(m.running_mean, reduce_op="mean"))
                m.running_var.copy_(trainer.strategy.reduce(m.running_var, reduce_op="mean"))
        module.train(was_training)

    def on_validation_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self.recompute(trainer, module)

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.recompute(trainer, module)


@torch.no_grad()
def recompute_batchnorm(
    norms: list[torch.nn.modules.batchnorm._BatchNorm], forward_passes: Callable[[], None]
) -> None:
    """Running statistics of `norms` as the plain average over the batches `forward_passes` runs
    (the layers must be in training mode); momenta are restored afterwards."""
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    forward_passes()
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum


def seed_everything(seed: int, threads: int) -> None:
    """Seed every generator and run torch's CPU ops on exactly `threads` threads.

    The thread count is part of the result: a float sum split over another number of threads
    rounds differently (the same tiny pretraining gave two encoders under 1 and 2 threads), so it
    comes from params, not from the cores Snakemake grants (OMP_NUM_THREADS = min(threads,
    --cores)) or the machine (torch's default under DVC). OMP_NUM_THREADS is set too, for DDP
    worker processes, and so that Lightning does not choose its own."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    pl.seed_everything(seed, workers=True, verbose=False)


EARLIER_METRICS = "metrics-before-resume.csv"


def prepare_logs(out_dir: Path, resume: Path | None) -> None:
    """Keep the metrics of an interrupted run when resuming it; start clean otherwise.

    Lightning's CSVLogger deletes an existing metrics.csv, which would cut the curve at the resume
    point (or leave no curve at all when resuming a finished run).
    """
    logs = Path(out_dir) / "logs"
    if resume is None:
        shutil.rmtree(logs, ignore_errors=True)
        return
    current, earlier = logs / "metrics.csv", logs / EARLIER_METRICS
    if current.is_file():
        try:
            frames = [pd.read_csv(p) for p in (earlier, current) if p.is_file()]
        except pd.errors.ParserError as exc:  # a kill in the middle of Lightning's rewrite
            aside = current.with_name(f"metrics.csv.unreadable-{os.getpid()}")
            current.rename(aside)
            log.warning(
                "%s: unreadable (%s); moved to %s, its rows leave the curve",
                current,
                str(exc).strip(),
                aside,
            )
            return
        with fsutil.atomic_path(earlier) as tmp:
            pd.concat(frames, ignore_index=True).to_csv(tmp, index=False)
        current.unlink()


def export_curve(out_dir: Path, columns: list[str], dest: Path, x: str = "step") -> pd.DataFrame:
    """Lightning's sparse metrics.csv → one clean CSV per curve for DVC plots and the report."""
    logs = Path(out_dir) / "logs"
    parts = [pd.read_csv(p) for p in (logs / EARLIER_METRICS, logs / "metrics.csv") if p.is_file()]
    if not parts:
        raise MissingInput(f"{logs}: no metrics.csv; the run logged nothing")
    metrics = pd.concat(parts, ignore_index=True)
    present = [c for c in columns if c in metrics.columns]
    curve = metrics[[x, *present]].dropna(subset=present, how="all")
    curve = curve.groupby(x, as_index=False).first()
    with fsutil.atomic_path(dest) as tmp:
        curve.to_csv(tmp, index=False, lineterminator="\n", float_format="%.6g")
    return curve
