"""Make transformers' own `galore_*` optimizer names build hf_galore's optimizers.

transformers keeps one handler per `OptimizerNames` member in `trainer_optimizer._OPTIMIZER_HANDLERS` (read at
call time, shared with `trainer.py`); new names would be rejected by its argument parser, so hf_galore serves
the existing ones. Four Trainer functions are wrapped once, each only to add what it lacks: `create_optimizer`
(the GaLoreCallback joins), `_parse_optim_args` (a malformed `--optim_args` names its bad entry instead of a bare
unpacking error), `train` (a resume loads only a complete checkpoint; hooks, `others=frozen` and accelerate's
accumulation flag end with the call, however it ends) and `_load_optimizer_and_scheduler` (a missing, unreadable or
mismatched optimizer file is named, never replaced silently by a fresh optimizer; see `checkpoints`).
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch

from .callback import attach_callback, check_saved_run, unwrap_galore
from .checkpoints import (
    FRESH_OPTIMIZER_ENV,
    SCHEDULER_FILE,
    check_complete,
    check_optimizer_files,
    fresh_optimizer_requested,
    newest_complete_checkpoint,
    unreadable_checkpoint_reason,
)
from .config import split_optim_args
from .core import GaLoreOptimizer
from .layerwise import end_accumulation, release_hooks
from .log import warn_at_caller
from .trainer_factory import GALORE_OPTIMIZERS, galore_optimizer_handler, optim_name

_WRAPPED = "_hf_galore_wrapped"


def register() -> None:
    """Install the handlers and the Trainer wrappers; calling it again changes nothing."""
    import transformers.trainer as trainer_module
    from transformers import Trainer
    from transformers.trainer_optimizer import _OPTIMIZER_HANDLERS
    from transformers.training_args import OptimizerNames

    for name in GALORE_OPTIMIZERS:
        _OPTIMIZER_HANDLERS[OptimizerNames(name)] = galore_optimizer_handler
    _wrap(Trainer, "create_optimizer", _attach_callback_after)
    _wrap(Trainer, "train", _guard_training)
    _wrap(Trainer, "_load_optimizer_and_scheduler", _load_checked)
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


def _guard_training(original: Callable) -> Callable:
    def train(self: Any, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        if resume_from_checkpoint is True:  # no checkpoint at all: transformers says so
            resume_from_checkpoint = newest_complete_checkpoint(self.args.output_dir) or True
        elif isinstance(resume_from_checkpoint, str):
            check_complete(resume_from_checkpoint)
        if isinstance(resume_from_checkpoint, str):
            check_optimizer_files(resume_from_checkpoint, galore=_trains_galore(self))
        galore = unwrap_galore(self.optimizer)
        if getattr(self, "model", None) is not None:
            release_hooks(self.model.parameters(), keep=galore)  # hooks an interrupted plain-PyTorch run left
        if galore is not None:
            galore.freeze_others()  # train() again: the end of the last call gave them back
        try:
            return original(self, resume_from_checkpoint, *args, **kwargs)
        finally:
            end_training(self)

    return train


def _trains_galore(trainer: Any) -> bool:
    """Whether `trainer` trains, or will build, a GaLore optimizer."""
    if trainer.optimizer is not None:
        return unwrap_galore(trainer.optimizer) is not None
    if trainer.optimizer_cls_and_kwargs is not None:
        return issubclass(trainer.optimizer_cls_and_kwargs[0], GaLoreOptimizer)
    return optim_name(trainer.args) in GALORE_OPTIMIZERS


def end_training(trainer: Any) -> None:
    """What must end with `train()`, however it ends (an exception, a notebook's stop button, on_train_end skipped):
    the layer-wise hooks (a later backward, evaluation or another optimizer would be updated by them), the
    `others=frozen` freeze (a later Trainer would train the targets only), and accelerate's accumulation flag."""
    galore = unwrap_galore(trainer.optimizer)
    if galore is not None:
        galore.remove_hooks()
        galore.unfreeze_others()
    end_accumulation()


def _load_checked(original: Callable) -> Callable:
    def load(self: Any, checkpoint: str | None, *args: Any, **kwargs: Any) -> Any:
        if checkpoint is None or self.is_deepspeed_enabled:
            return original(self, checkpoint, *args, **kwargs)
        if fresh_optimizer_requested():
            return _start_optimizer_afresh(self, checkpoint)
        result = original(self, checkpoint, *args, **kwargs)  # the train() wrapper checked its files
        galore = unwrap_galore(self.optimizer)
        if galore is not None:
            check_saved_run(galore, self.state, self.args, checkpoint)
        return result

    return load


def _start_optimizer_afresh(trainer: Any, checkpoint: str) -> None:
    """HF_GALORE_FRESH_OPTIMIZER=1: the optimizer starts empty; the schedule continues at the checkpoint's step
    (`scheduler.pt` if readable, else stepped forward to it)."""
    step = trainer.state.global_step
    scheduler_file = os.path.join(checkpoint, SCHEDULER_FILE)
    if os.path.isfile(scheduler_file) and unreadable_checkpoint_reason(scheduler_file) is None:
        trainer.lr_scheduler.load_state_dict(torch.load(scheduler_file, weights_only=True))
        source = SCHEDULER_FILE
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": on purpose here
            for _ in range(step):
                trainer.lr_scheduler.step()
        source = f"the schedule stepped forward {step} steps"
    warn_at_caller(
        f"{FRESH_OPTIMIZER_ENV} is set: resuming {checkpoint} with a fresh optimizer (empty state, new bases at the "
        f"first step) and its learning rate schedule at step {step} ({source})."
    )


def is_registered() -> bool:
    from transformers.trainer_optimizer import _OPTIMIZER_HANDLERS
    from transformers.training_args import OptimizerNames

    return all(_OPTIMIZER_HANDLERS.get(OptimizerNames(n)) is galore_optimizer_handler for n in GALORE_OPTIMIZERS)
