"""Precise BatchNorm statistics: running averages recomputed as a plain mean over some batches."""

from __future__ import annotations

from collections.abc import Callable

import torch


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
