"""The optimiser recipe both LightningModules share: Adam, linear warm-up, constant or cosine decay.

Below the models (they import it) and above nothing of ours, so models never reach up into the
training layer for it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch


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
