"""COLA: contrastive pretraining with in-batch negatives and a bilinear similarity."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from cola_audio.models.encoder import EMBED_DIM, Encoder
from cola_audio.models.hparams import hyperparameter_keys
from cola_audio.optim import adam_with_schedule

# E[tanh(x)²] for x ~ N(0, 1): LayerNorm gives each embedding unit variance per dimension, so a
# tanh embedding's squared norm is ≈ TANH_SECOND_MOMENT · embedding_dim.
TANH_SECOND_MOMENT = 0.3943


def bilinear_init_scale(embedding_dim: int, temperature: float) -> float:
    """s for W₀ = s·I, so a·W₀·p ≈ cos(a, p)/τ: the bilinear head starts as the cosine head."""
    return 1.0 / (temperature * TANH_SECOND_MOMENT * embedding_dim)


class ColaHead(torch.nn.Module):
    """g(h) = tanh(LayerNorm(W_g h)): the projection the similarity is computed on."""

    def __init__(self, embedding_dim: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(EMBED_DIM, embedding_dim)
        self.norm = torch.nn.LayerNorm(embedding_dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.norm(self.proj(h)))


def similarity_logits(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    bilinear: torch.Tensor | None,
    temperature: float,
) -> torch.Tensor:
    """(n_anchors, n_positives) logits: a·W·pᵀ (bilinear) or cos(a, p)/τ; pure, for testing."""
    if bilinear is not None:
        return anchors @ bilinear @ positives.T
    return F.normalize(anchors, dim=-1) @ F.normalize(positives, dim=-1).T / temperature


class ColaModule(pl.LightningModule):
    """Every hyperparameter is a key of params.yaml's pretrain section, under the same name and
    without a default here: params.yaml (validated by the schema) is the one place values are set,
    and `from_params` passes each one (a key missing from the section is an error, not a default).
    """

    @classmethod
    def from_params(cls, section: dict[str, Any], run_identity: str = "") -> ColaModule:
        return cls(**{k: section[k] for k in hyperparameter_keys(cls)}, run_identity=run_identity)

    def __init__(
        self,
        pooling: str,
        input_norm: str,
        bn_momentum: float,
        embedding_dim: int,
        similarity: str,
        temperature: float,
        dropout: float,
        positive_noise_std: float,
        bilinear_lr_scale: float,
        lr: float,
        weight_decay: float,
        lr_schedule: str,
        warmup_steps: int,
        run_identity: str = "",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()  # plain values only: checkpoints load with weights_only=True
        self.encoder = Encoder(pooling, input_norm, bn_momentum)
        self.dropout = torch.nn.Dropout(dropout)
        self.head = ColaHead(embedding_dim)
        self.bilinear = (
            torch.nn.Parameter(torch.empty(embedding_dim, embedding_dim))
            if similarity == "bilinear"
            else None
        )
        if self.bilinear is not None:
            # A random W makes a·W·p a random form to be undone before anything is learnt (at
            # std 1e-3, in-batch accuracy stayed near chance for 60 steps); the scaled identity
            # starts from a similarity that already means something.
            with torch.no_grad():
                self.bilinear.copy_(
                    torch.eye(embedding_dim) * bilinear_init_scale(embedding_dim, temperature)
                )

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.encoder(x)))

    def batchnorm_forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        """The forward pass training uses, for recomputing BatchNorm statistics."""
        self.embed(torch.cat(batch))

    def contrastive_step(
        self, anchors: torch.Tensor, positives: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Loss, accuracy and logits; negatives are every other positive of the global batch."""
        if self.hparams.positive_noise_std > 0:
            positives = positives + self.hparams.positive_noise_std * torch.randn_like(positives)
        n = anchors.shape[0]
        # One encoder pass for both views: shared BatchNorm statistics, as the official code.
        z = self.embed(torch.cat([anchors, positives]))
        z_a, z_p = z[:n], z[n:]
        offset = 0
        if self._trainer is not None and self.trainer.world_size > 1:
            gathered = self.all_gather(z_p, sync_grads=True)  # (world, n, d)
            z_p = gathered.reshape(-1, z_p.shape[-1])
            offset = self.global_rank * n
        logits = similarity_logits(
            z_a.float(),
            z_p.float(),
            None if self.bilinear is None else self.bilinear.float(),
            self.hparams.temperature,
        )
        target = torch.arange(n, device=logits.device) + offset
        loss = F.cross_entropy(logits, target)
        acc = (logits.argmax(dim=1) == target).float().mean()
        return loss, acc, logits

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        anchors, positives = batch
        loss, acc, logits = self.contrastive_step(anchors, positives)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        self.log("train_acc", acc, prog_bar=True, on_step=True, on_epoch=True)
        # Contrastive accuracy only means something next to the number of candidates.
        self.log("global_batch", float(logits.shape[1]), on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        """W gets `bilinear_lr_scale` × lr: Adam moves each of its d² entries by ~lr per step,
        so at the network's lr the logits jump by O(d²·lr) (measured: logit std 0.16 → 3.7 and
        loss ln 64 → 6.7 within the 5 warm-up steps, then a stall near chance)."""
        lr = self.hparams.lr
        if self.bilinear is None:
            return adam_with_schedule(self, self.parameters(), lr)
        rest = [p for name, p in self.named_parameters() if name != "bilinear"]
        groups = [
            {"params": rest, "lr": lr},
            {"params": [self.bilinear], "lr": lr * self.hparams.bilinear_lr_scale},
        ]
        return adam_with_schedule(self, groups, lr)
