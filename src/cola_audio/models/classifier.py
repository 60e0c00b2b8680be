"""Genre classification on the 1280-d encoder output: fine-tuning or linear evaluation."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from cola_audio.models.batchnorm import recompute_batchnorm
from cola_audio.models.encoder import EMBED_DIM, Encoder
from cola_audio.optim import adam_with_schedule


def clip_logits(window_logits: torch.Tensor, clip: torch.Tensor, n_clips: int) -> torch.Tensor:
    """Average window logits per clip (the official evaluation protocol); pure."""
    sums = torch.zeros(
        n_clips, window_logits.shape[1], dtype=window_logits.dtype, device=window_logits.device
    ).index_add_(0, clip, window_logits)
    counts = torch.bincount(clip, minlength=n_clips).clamp(min=1).unsqueeze(1)
    return sums / counts


def model_keys(mode: str) -> dict[str, str]:
    """Constructor argument → the finetune key that sets it, for a run of `mode`: the same name,
    except that linear evaluation trains its head at `linear_lr` and has no `bn_momentum` (a
    frozen encoder's BatchNorm statistics never move). What a fine-tuning stage declares beyond
    these drives the trainer and the data (training.TRAINER_KEYS)."""
    shared = ("pooling", "input_norm", "dropout", "weight_decay", "lr_schedule", "warmup_steps")
    own = {"lr": "lr", "bn_momentum": "bn_momentum"} if mode == "finetune" else {"lr": "linear_lr"}
    return {**{k: k for k in shared}, **own}


class GenreClassifier(pl.LightningModule):
    """No hyperparameter has a default here: `from_params` passes each from params.yaml's finetune
    section (model_keys), the one place values are set."""

    @classmethod
    def from_params(
        cls, section: dict[str, Any], n_classes: int, init: str, mode: str, run_identity: str = ""
    ) -> GenreClassifier:
        hparams = {arg: section[key] for arg, key in model_keys(mode).items()}
        return cls(n_classes, init, mode, **hparams, run_identity=run_identity)

    def __init__(
        self,
        n_classes: int,
        init: str,
        mode: str,
        pooling: str,
        input_norm: str,
        dropout: float,
        lr: float,
        weight_decay: float,
        lr_schedule: str,
        warmup_steps: int,
        bn_momentum: float | None = None,
        run_identity: str = "",
    ) -> None:
        super().__init__()
        if mode not in ("finetune", "linear"):
            raise ValueError(f"mode must be finetune or linear, got {mode!r}")
        if (bn_momentum is None) != (mode == "linear"):
            raise ValueError("bn_momentum is set for finetune runs only (a frozen encoder's is 0)")
        self.save_hyperparameters()
        # momentum 0: a frozen encoder's running statistics stay what they were
        self.encoder = Encoder(pooling, input_norm, 0.0 if bn_momentum is None else bn_momentum)
        self.dropout = torch.nn.Dropout(dropout)
        self.head = torch.nn.Linear(EMBED_DIM, n_classes)
        if mode == "linear":
            self.encoder.freeze()
        self.val_correct = 0
        self.val_total = 0
        self.test_outputs: dict[str, torch.Tensor] = {}
        self._frozen_features: dict[tuple[int, ...], torch.Tensor] = {}
        self._test_parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def calibrate_frozen_encoder(self, loader: Iterable[Any], n_batches: int) -> None:
        """BatchNorm statistics for a random frozen encoder, from unlabelled training crops.

        The pretrained encoder arrives with statistics computed on pretraining audio; a random one
        would otherwise normalise with the initial mean 0 and variance 1, which here gave
        constant features (one class predicted for every clip). Weights stay as initialised.
        """
        encoder = self.encoder
        encoder.frozen = False
        encoder.train()
        norms = [
            m for m in encoder.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        ]

        def forward_passes() -> None:
            for crops, _ in itertools.islice(loader, n_batches):
                encoder(crops.to(self.device))

        recompute_batchnorm(norms, forward_passes)
        encoder.freeze()

    @property
    def linear(self) -> bool:
        return self.hparams.mode == "linear"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.linear:
            with torch.no_grad():
                h = self.encoder(x)
        else:
            h = self.encoder(x)
        return self.head(self.dropout(h))

    def _window_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits of every window; a frozen encoder's outputs are a pure function of the windows,
        so in linear mode each evaluation batch is encoded once per run, not once per epoch."""
        if not self.linear:
            return self(batch["windows"])
        key = tuple(batch["track_ids"].tolist())
        if key not in self._frozen_features:
            with torch.no_grad():
                self._frozen_features[key] = self.encoder(batch["windows"])
        return self.head(self.dropout(self._frozen_features[key]))

    def batchnorm_forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        """The forward pass training uses, for recomputing BatchNorm statistics."""
        self(batch[0])

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        self.log("train_acc", (logits.argmax(1) == y).float().mean(), on_step=True, on_epoch=True)
        return loss

    def _predict_clips(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self._window_logits(batch)
        return clip_logits(logits.float(), batch["clip"], len(batch["labels"]))

    def on_validation_epoch_start(self) -> None:
        self.val_correct = 0
        self.val_total = 0

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self._predict_clips(batch)
        correct = (logits.argmax(1) == batch["labels"]).sum()
        self.val_correct += int(correct)
        self.val_total += len(batch["labels"])
        self.log(
            "val_loss",
            F.cross_entropy(logits, batch["labels"]),
            on_epoch=True,
            batch_size=len(batch["labels"]),
            sync_dist=True,
        )

    def on_validation_epoch_end(self) -> None:
        counts = torch.tensor(
            [self.val_correct, self.val_total], dtype=torch.float64, device=self.device
        )
        counts = self.all_gather(counts).reshape(-1, 2).sum(0)
        self.log("val_acc", (counts[0] / counts[1].clamp(min=1)).float(), prog_bar=True)

    def on_test_epoch_start(self) -> None:
        self._test_parts = []

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self._predict_clips(batch)
        self._test_parts.append((batch["track_ids"], batch["labels"], logits.argmax(1)))

    def on_test_epoch_end(self) -> None:
        parts = [torch.cat([p[i] for p in self._test_parts]) for i in range(3)]
        if self.trainer.world_size > 1:  # each rank scored whole clips; gather and de-duplicate
            parts = [self.all_gather(p).reshape(-1) for p in parts]
        track_ids, labels, preds = (p.cpu() for p in parts)
        order = torch.argsort(track_ids, stable=True)
        track_ids, labels, preds = track_ids[order], labels[order], preds[order]
        keep = torch.ones_like(track_ids, dtype=torch.bool)
        keep[1:] = track_ids[1:] != track_ids[:-1]
        self.test_outputs = {
            "track_ids": track_ids[keep],
            "labels": labels[keep],
            "preds": preds[keep],
        }

    def configure_optimizers(self) -> dict[str, Any]:
        if self.linear:
            return adam_with_schedule(self, self.head.parameters(), self.hparams.lr)
        return adam_with_schedule(self, self.parameters(), self.hparams.lr)
