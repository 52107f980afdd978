"""GaLoreCallback: refreshes on the Trainer's global step, and GaLore's memory and refresh figures in its logs."""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import TrainerCallback

from .core import GaLoreOptimizer, RefreshStats
from .layerwise import refuse_replicated_layerwise
from .memory import optimizer_state_bytes, peak_memory_mb
from .sharding import local_tensor
from .state_keys import STEP, is_frozen_group
from .trainer_factory import GALORE_OPTIMIZERS, optim_name

logger = logging.getLogger(__name__)

MIB = 2**20
# Our entry in trainer_state.json's `stateful_callbacks` (written with every checkpoint, last): what a resume checks.
RECORD = "GaLoreCallback"


def unwrap_galore(optimizer: Any) -> GaLoreOptimizer | None:
    """The GaLore optimizer inside accelerate's wrapper (or the argument itself), else None."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return inner if isinstance(inner, GaLoreOptimizer) else None


def _device(optimizer: torch.optim.Optimizer) -> torch.device:
    return next((p.device for g in optimizer.param_groups for p in g["params"]), torch.device("cpu"))


def memory_figures(optimizer: GaLoreOptimizer) -> dict[str, float]:
    """Optimizer-state MiB held, what AdamW would hold for the same trained parameters (`others=frozen` ones are not
    trained, so not counted), the saving, and peak memory.

    Per process: under FSDP2 each counts this rank's rows.
    """
    held = optimizer_state_bytes(optimizer)
    params = [local_tensor(p) for g in optimizer.param_groups if not is_frozen_group(g) for p in g["params"]]
    adamw = sum(2 * p.numel() * p.element_size() for p in params)
    return {
        "galore/optimizer_state_mb": held / MIB,
        "galore/adamw_equivalent_mb": adamw / MIB,
        "galore/state_saving_pct": 100.0 * (1.0 - held / adamw) if adamw else 0.0,
        "galore/peak_memory_mb": peak_memory_mb(_device(optimizer)),
    }


def optimizer_steps(optimizer: GaLoreOptimizer) -> int:
    """The most updates any tensor has had: what the optimizer's state says it has trained."""
    return max((int(state[STEP]) for state in optimizer.state.values() if STEP in state), default=0)


def _record_run(state: Any, args: Any, optimizer: GaLoreOptimizer) -> None:
    attributes = {
        "optimizer_steps": optimizer_steps(optimizer),
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
    }
    state.stateful_callbacks[RECORD] = {"args": {}, "attributes": attributes}


def check_saved_run(optimizer: GaLoreOptimizer, state: Any, args: Any, checkpoint: str) -> None:
    """After a resume loaded `optimizer`: refuse an optimizer file that was not saved with the `trainer_state.json`
    beside it (their step counts differ), and warn when gradient accumulation changed."""
    record = (state.stateful_callbacks or {}).get(RECORD, {}).get("attributes", {})
    steps = optimizer_steps(optimizer)
    saved = record.get("optimizer_steps")
    if saved is not None and saved != steps:
        raise ValueError(
            f"Cannot resume from {checkpoint}: its optimizer.pt has trained {steps} steps, but trainer_state.json "
            f"beside it was saved after {saved} (global step {state.global_step}), so the optimizer file belongs to "
            "another checkpoint (copied by hand, or a save cut short while the folder was rewritten). Resume from a "
            "checkpoint whose files were saved together, or set HF_GALORE_FRESH_OPTIMIZER=1 to load these weights "
            "and start the optimizer afresh."
        )
    if saved is None and steps != state.global_step and not (args.fp16 and steps < state.global_step):
        logger.warning(
            "Resuming %s: its optimizer.pt has trained %d steps and trainer_state.json says global step %d. Expected "
            "when updates were skipped (non-finite gradients) or one Trainer trained twice; otherwise the optimizer "
            "file belongs to another checkpoint. (This checkpoint predates the record hf_galore checks exactly.)",
            checkpoint,
            steps,
            state.global_step,
        )
    accumulation = record.get("gradient_accumulation_steps")
    if accumulation is not None and accumulation != args.gradient_accumulation_steps:
        logger.warning(
            "Resuming %s with gradient_accumulation_steps=%d; it was saved with %d. Refreshes and the LR schedule "
            "count optimizer steps, which now span %s micro-batches each, and the data order from here on differs "
            "from the uninterrupted run's.",
            checkpoint,
            args.gradient_accumulation_steps,
            accumulation,
            "more" if args.gradient_accumulation_steps > accumulation else "fewer",
        )


class GaLoreCallback(TrainerCallback):
    """Drive refreshes by `state.global_step` and add GaLore's figures to every training log.

    The plugin inserts it first in the Trainer's callback list, so the figures reach the console, `log_history`
    and every `report_to` integration; added by hand (`trainer.add_callback`) it still fills `log_history`.
    With a layer-wise optimizer it replaces the logged `grad_norm` (0: the hooks consumed the gradients) with the
    real norm, and registers the hooks when training begins (the `train()` wrapper removes them when it ends, however
    it ends), refusing parameters that the prepared model replicates over processes (DDP). It records the optimizer's
    step count and `gradient_accumulation_steps` in `trainer_state.json`, which a resume checks.
    """

    def __init__(self) -> None:
        self.refreshes = 0
        self.refresh_seconds = 0.0
        self.skipped_updates = 0

    def _collect(self, galore: GaLoreOptimizer) -> tuple[RefreshStats, int]:
        """Refreshes and skipped updates since the last call, also added to the run's totals for the summary."""
        stats, skipped = galore.pop_refresh_stats(), len(galore.pop_skipped_updates())
        self.refreshes += stats.count
        self.refresh_seconds += stats.seconds
        self.skipped_updates += skipped
        return stats, skipped

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        galore = unwrap_galore(optimizer)
        if galore is None:
            return
        self._collect(galore)  # drop what happened before this train() call ...
        self.refreshes, self.refresh_seconds, self.skipped_updates = 0, 0.0, 0  # ... so the summary is this call's
        galore.restart_refresh_clock(state.global_step)
        if galore.layerwise:
            name = optim_name(args)
            refuse_replicated_layerwise(galore, name if name in GALORE_OPTIMIZERS else type(galore).__name__)
            galore.register_hooks()  # again when train() runs a second time; anew on FSDP2's sharded parameters
        _record_run(state, args, galore)

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        galore = unwrap_galore(optimizer)
        if galore is not None:
            galore.set_refresh_clock(state.global_step)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        galore = unwrap_galore(optimizer)
        if galore is not None:
            _record_run(state, args, galore)  # before a checkpoint of this step is saved

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        galore = unwrap_galore(optimizer)
        if galore is None or logs is None or "loss" not in logs:
            return
        stats, skipped = self._collect(galore)
        figures = {
            **memory_figures(galore),
            "galore/refresh_seconds": stats.seconds,
            "galore/skipped_updates": skipped,
        }
        if stats.mean_overlap is not None:
            figures["galore/subspace_overlap"] = stats.mean_overlap
        if galore.layerwise and "grad_norm" in logs and galore.last_grad_norm is not None:
            figures["grad_norm"] = galore.last_grad_norm
        logs.update(figures)
        # Trainer.log appends a copy of `logs` to log_history before calling on_log: update that entry too.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(figures)

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        galore = unwrap_galore(optimizer)
        if galore is None:
            return
        self._collect(galore)
        figures = memory_figures(galore)
        logger.info(
            "%s: optimizer state %.1f MiB vs %.1f MiB for AdamW (%.1f%% saved); %d basis refreshes took %.2f s; "
            "%d parameter updates skipped for non-finite gradients; peak memory %.0f MiB.",
            galore.outer.title,
            figures["galore/optimizer_state_mb"],
            figures["galore/adamw_equivalent_mb"],
            figures["galore/state_saving_pct"],
            self.refreshes,
            self.refresh_seconds,
            self.skipped_updates,
            figures["galore/peak_memory_mb"],
        )


def attach_callback(trainer: Any) -> None:
    """Put a GaLoreCallback first in `trainer`'s callbacks (once) when its optimizer is a GaLore optimizer."""
    handler = trainer.callback_handler
    if unwrap_galore(trainer.optimizer) is None or any(isinstance(c, GaLoreCallback) for c in handler.callbacks):
        return
    handler.callbacks.insert(0, GaLoreCallback())
