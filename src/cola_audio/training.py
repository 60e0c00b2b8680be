"""A Lightning Trainer from a params section: devices, precision, seeds, threads and the callbacks
every run carries (epoch seeds, precise BatchNorm)."""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger

from cola_audio.data import epoch_seed
from cola_audio.models.batchnorm import recompute_batchnorm

# The keys of a training section that drive the Trainer and the data, not the model: with the
# model's own (ColaModule's arguments; classifier.model_keys), every key a training stage declares.
TRAINER_KEYS = (
    "seed",
    "crop_frames",
    "batch_size",
    "eval_batch_size",
    "precise_bn_batches",
    "max_epochs",
    "max_steps",
    "val_every_n_epochs",
    "num_workers",
    "threads",
    "trainer",
)


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


def make_trainer(
    section: dict[str, Any],
    out_dir: Path,
    seed: int,
    callbacks: list[pl.Callback],
    precise_bn_batches: int,
    **overrides: Any,
) -> pl.Trainer:
    """The Trainer of a training section; `precise_bn_batches` (the section's, or 0 where no
    BatchNorm layer trains) batches recompute BatchNorm statistics before each evaluation."""
    cfg = section["trainer"]
    callbacks = [*callbacks, EpochSeeds(seed), PreciseBatchNorm(precise_bn_batches)]
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
