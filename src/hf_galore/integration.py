"""Make transformers' own `galore_*` optimizer names build hf_galore's optimizers.

transformers keeps one handler per `OptimizerNames` member in `trainer_optimizer._OPTIMIZER_HANDLERS` (read at
call time, shared with `trainer.py`); new names would be rejected by its argument parser, so hf_galore serves
the existing ones. `Trainer.create_optimizer` is wrapped once so the GaLoreCallback joins automatically.
"""

from __future__ import annotations

import functools
from typing import Any

from .callback import attach_callback
from .trainer_factory import GALORE_OPTIMIZERS, galore_optimizer_handler

_WRAPPED = "_hf_galore_wrapped"


def register() -> None:
    """Install the handlers and the callback hook; calling it again changes nothing."""
    from transformers import Trainer
    from transformers.trainer_optimizer import _OPTIMIZER_HANDLERS
    from transformers.training_args import OptimizerNames

    for name in GALORE_OPTIMIZERS:
        _OPTIMIZER_HANDLERS[OptimizerNames(name)] = galore_optimizer_handler
    if getattr(Trainer.create_optimizer, _WRAPPED, False):
        return
    original = Trainer.create_optimizer

    @functools.wraps(original)
    def create_optimizer(self: Trainer, *args: Any, **kwargs: Any):
        optimizer = original(self, *args, **kwargs)
        attach_callback(self)
        return optimizer

    setattr(create_optimizer, _WRAPPED, True)
    Trainer.create_optimizer = create_optimizer


def is_registered() -> bool:
    from transformers.trainer_optimizer import _OPTIMIZER_HANDLERS
    from transformers.training_args import OptimizerNames

    return all(_OPTIMIZER_HANDLERS.get(OptimizerNames(n)) is galore_optimizer_handler for n in GALORE_OPTIMIZERS)
