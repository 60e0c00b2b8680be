"""A LightningModule's hyperparameters are its constructor's arguments (but the run identity)."""

from __future__ import annotations

import inspect

NOT_HYPERPARAMETERS = ("self", "run_identity")


def hyperparameter_keys(model_class: type) -> list[str]:
    """The constructor's argument names: each one a params key of the same name."""
    names = inspect.signature(model_class.__init__).parameters
    return [n for n in names if n not in NOT_HYPERPARAMETERS]
