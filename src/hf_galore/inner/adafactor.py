"""Adafactor (Shazeer & Stern, 2018) with transformers.optimization.Adafactor's conventions."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..sharding import RowShard, global_mean, global_rms, mean_over_rows
from .base import layout_bytes

EXP_AVG = "exp_avg"
EXP_AVG_SQ = "exp_avg_sq"
EXP_AVG_SQ_ROW = "exp_avg_sq_row"
EXP_AVG_SQ_COL = "exp_avg_sq_col"


def _global_numel(local: Tensor, shard: RowShard | None) -> int:
    """Entries of the whole tensor whose rows `local` holds (all of it when unsharded)."""
    return local.numel() if shard is None else shard.global_rows * math.prod(local.shape[1:])


class AdafactorUpdate:
    """Factored second moments for matrices, optional first moment (`beta1`), update clipping, relative steps.

    Works in float32 whatever the gradient's dtype, as transformers' Adafactor does. On a row-sharded gradient
    (`shard`) the statistics that span rows (the column statistic, the row statistic's mean, the update's RMS and
    the weight's RMS) are reduced over the ranks, so every rank applies what one process would.

    `first_moment` serves `state_bytes` only: whether the groups set `beta1`, so a first moment is kept (the update
    itself reads `group["beta1"]`, per group). Left None, as the optimizer leaves it, `state_bytes` refuses to guess.
    """

    form = "adafactor"  # the name `inner_rule` builds it by

    # Per-row state, sharded with a row-sharded parameter; the column statistic is the same on every rank.
    row_wise_state = frozenset({EXP_AVG, EXP_AVG_SQ, EXP_AVG_SQ_ROW})

    def __init__(self, *, first_moment: bool | None = None) -> None:
        self.first_moment = first_moment

    def validate_group(self, group: dict[str, Any]) -> None:
        eps = group["eps"]
        if not (isinstance(eps, (tuple, list)) and len(eps) == 2 and all(e >= 0 for e in eps)):
            raise ValueError(f"Invalid {eps=}. Must be a pair (eps_sq, eps_scale) of numbers >= 0.")
        beta1 = group["beta1"]
        if beta1 is not None and not 0.0 <= beta1 < 1.0:
            raise ValueError(f"Invalid {beta1=}. Must be None (no first moment) or in [0, 1).")
        clip_threshold = group["clip_threshold"]
        if not clip_threshold > 0:
            raise ValueError(f"Invalid {clip_threshold=}. Must be > 0.")
        if group["relative_step"] and group["lr"] is not None:
            raise ValueError("Invalid lr with relative_step=True: pass lr=None, or relative_step=False with an lr.")
        if not group["relative_step"] and group["lr"] is None:
            raise ValueError("Invalid lr=None with relative_step=False: pass an lr >= 0.")

    def learning_rate(self, group: dict[str, Any], step: int, param: Tensor, shard: RowShard | None = None) -> float:
        lr = group["lr"]
        if group["relative_step"]:
            min_step = 1e-6 * step if group["warmup_init"] else 1e-2
            lr = min(min_step, 1.0 / math.sqrt(step))
        if group["scale_parameter"]:
            lr *= max(group["eps"][1], float(global_rms(param.float(), _global_numel(param, shard), shard)))
        return lr

    def bias_correction(self, group: dict[str, Any], step: int) -> float:
        return 1.0  # transformers' Adafactor corrects no moment: its decay schedule starts at 0 instead

    def init_state(
        self, grad: Tensor, state: dict[str, Any], group: dict[str, Any], shard: RowShard | None = None
    ) -> None:
        grad = torch.empty_like(grad, dtype=torch.float32)  # statistics are float32 whatever the gradient's dtype
        if group["beta1"] is not None:
            state[EXP_AVG] = torch.zeros_like(grad)
        if grad.dim() >= 2:
            state[EXP_AVG_SQ_ROW] = grad.new_zeros(grad.shape[:-1])
            state[EXP_AVG_SQ_COL] = grad.new_zeros(grad.shape[:-2] + grad.shape[-1:])
        else:
            state[EXP_AVG_SQ] = torch.zeros_like(grad)

    def state_bytes(self, shape: tuple[int, ...], dtype: torch.dtype, shard: RowShard | None = None) -> int:
        """float32 throughout: row and column second moments for matrices (the full one otherwise), plus the first
        moment with `first_moment`."""
        if self.first_moment is None:
            raise ValueError(
                "Invalid first_moment=None for state_bytes: the state depends on beta1. Count with "
                "AdafactorUpdate(first_moment=True) when the groups set beta1, else first_moment=False."
            )
        return layout_bytes(self, shape, dtype, group={"beta1": 0.0 if self.first_moment else None}, shard=shard)

    def update(
        self,
        grad: Tensor,
        state: dict[str, Any],
        group: dict[str, Any],
        step: int,
        lr: float,
        shard: RowShard | None = None,
    ) -> Tensor:
        dtype, grad = grad.dtype, grad.float()
        factored = grad.dim() >= 2
        if EXP_AVG_SQ_ROW not in state and EXP_AVG_SQ not in state:
            self.init_state(grad, state, group, shard)

        beta2t = 1.0 - math.pow(step, group["decay_rate"])
        update = grad.square().add_(group["eps"][0])
        if factored:
            row, col = state[EXP_AVG_SQ_ROW], state[EXP_AVG_SQ_COL]
            row.mul_(beta2t).add_(update.mean(dim=-1), alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(mean_over_rows(update, shard), alpha=1.0 - beta2t)
            row_mean = row.mean(dim=-1, keepdim=True) if shard is None else global_mean(row, shard.global_rows, shard)
            row_factor = (row / row_mean).rsqrt_().unsqueeze(-1)
            update = row_factor.mul(col.unsqueeze(-2).rsqrt()).mul_(grad)
        else:
            exp_avg_sq = state[EXP_AVG_SQ]
            exp_avg_sq.mul_(beta2t).add_(update, alpha=1.0 - beta2t)
            update = exp_avg_sq.rsqrt().mul_(grad)
        rms = global_rms(update, _global_numel(update, shard), shard)
        update.div_((rms / group["clip_threshold"]).clamp_(min=1.0)).mul_(lr)
        if group["beta1"] is not None:
            update = state[EXP_AVG].mul_(group["beta1"]).add_(update, alpha=1.0 - group["beta1"])
        return update.to(dtype)  # the gradient's dtype, as the bases that project it back
