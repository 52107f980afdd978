"""GaLoreCallback: refreshes on the Trainer's global step, and GaLore's memory and refresh figures in its logs."""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import TrainerCallback

from .core import GaLoreOptimizer, RefreshStats
from .memory import optimizer_state_bytes, peak_memory_mb
from .sharding import local_tensor
from .state_keys import is_frozen_group

logger = logging.getLogger(__name__)

MIB = 2**20


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


class GaLoreCallback(TrainerCallback):
    """Drive refreshes by `state.global_step` and add GaLore's figures to every training log.

    The plugin inserts it first in the Trainer's callback list, so the figures reach the console, `log_history`
    and every `report_to` integration; added by hand (`trainer.add_callback`) it still fills `log_history`.
    With a layer-wise optimizer it replaces the logged `grad_norm` (0: the hooks consumed the gradients) with the
    real norm, registers the hooks when training begins and removes them when it ends.
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
            galore.register_hooks()  # again when train() runs a second time; anew on FSDP2's sharded parameters

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        galore = unwrap_galore(optimizer)
        if galore is not None:
            galore.set_refresh_clock(state.global_step)

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
        galore.remove_hooks()  # later backward passes (evaluation, another Trainer) must not update the weights
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
