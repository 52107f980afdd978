"""Make transformers' own `galore_*` optimizer names build hf_galore's optimizers.

transformers keeps one handler per `OptimizerNames` member in `trainer_optimizer._OPTIMIZER_HANDLERS` (read at
call time, shared with `trainer.py`); new names would be rejected by its argument parser, so hf_galore serves
the existing ones. Three Trainer functions are wrapped once, each only to add what it lacks: `create_optimizer`
(the GaLoreCallback joins), `_parse_optim_args` (a malformed `--optim_args` names its bad entry instead of a bare
unpacking error) and `_load_optimizer_and_scheduler` (a truncated `optimizer.pt` is named as such).
"""

from __future__ import annotations

import functools
import os
import zipfile
from collections.abc import Callable
from typing import Any

from .callback import attach_callback
from .config import split_optim_args
from .trainer_factory import GALORE_OPTIMIZERS, galore_optimizer_handler

_WRAPPED = "_hf_galore_wrapped"
OPTIMIZER_FILE = "optimizer.pt"  # transformers' OPTIMIZER_NAME


def register() -> None:
    """Install the handlers and the Trainer wrappers; calling it again changes nothing."""
    import transformers.trainer as trainer_module
    from transformers import Trainer
    from transformers.trainer_optimizer import _OPTIMIZER_HANDLERS
    from transformers.training_args import OptimizerNames

    for name in GALORE_OPTIMIZERS:
        _OPTIMIZER_HANDLERS[OptimizerNames(name)] = galore_optimizer_handler
    _wrap(Trainer, "create_optimizer", _attach_callback_after)
    _wrap(Trainer, "_load_optimizer_and_scheduler", _name_unreadable_checkpoint)
    _wrap(trainer_module, "_parse_optim_args", _explain_malformed_optim_args)


def _wrap(owner: Any, name: str, make_wrapper: Callable[[Callable], Callable]) -> None:
    original = getattr(owner, name)
    if getattr(original, _WRAPPED, False):
        return
    wrapper = functools.wraps(original)(make_wrapper(original))
    setattr(wrapper, _WRAPPED, True)
    setattr(owner, name, wrapper)


def _attach_callback_after(original: Callable) -> Callable:
    def create_optimizer(self: Any, *args: Any, **kwargs: Any) -> Any:
        optimizer = original(self, *args, **kwargs)
        attach_callback(self)
        return optimizer

    return create_optimizer


def _explain_malformed_optim_args(original: Callable) -> Callable:
    def parse(text: str | None) -> dict[str, str]:
        try:
            return original(text)
        except ValueError:
            split_optim_args(text)  # raises, naming the malformed entry
            raise

    return parse


def unreadable_checkpoint_reason(path: str) -> str | None:
    """Why `path` (a torch.save file) cannot be read, when the reason is a truncated file; None otherwise.

    torch.save writes a zip archive whose directory sits at its end: a save cut short (disk full, a killed job)
    leaves the local header ("PK") without that directory, and torch.load reports only "failed finding central
    directory".
    """
    if not os.path.isfile(path) or zipfile.is_zipfile(path):
        return None
    with open(path, "rb") as handle:
        if handle.read(2) != b"PK":
            return None
    return (
        f"{path} is truncated ({os.path.getsize(path):,} bytes, its zip directory is missing): the save that wrote it "
        "was cut short. Resume from an earlier checkpoint, or start the optimizer afresh."
    )


def _name_unreadable_checkpoint(original: Callable) -> Callable:
    def load(self: Any, checkpoint: str | None, *args: Any, **kwargs: Any) -> Any:
        try:
            return original(self, checkpoint, *args, **kwargs)
        except Exception as err:
            reason = checkpoint and unreadable_checkpoint_reason(os.path.join(checkpoint, OPTIMIZER_FILE))
            if reason:
                raise RuntimeError(reason) from err
            raise

    return load


def is_registered() -> bool:
    from transformers.trainer_optimizer import _OPTIMIZER_HANDLERS
    from transformers.training_args import OptimizerNames

    return all(_OPTIMIZER_HANDLERS.get(OptimizerNames(n)) is galore_optimizer_handler for n in GALORE_OPTIMIZERS)
