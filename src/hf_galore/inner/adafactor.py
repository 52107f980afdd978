"""Adafactor (Shazeer & Stern, 2018) with transformers.optimization.Adafactor's conventions."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .base import FLOAT32_BYTES

EXP_AVG = "exp_avg"
EXP_AVG_SQ = "exp_avg_sq"
EXP_AVG_SQ_ROW = "exp_avg_sq_row"
EXP_AVG_SQ_COL = "exp_avg_sq_col"


def _rms(tensor: Tensor) -> Tensor:
    return tensor.norm(2) / (tensor.numel() ** 0.5)


class AdafactorUpdate:
    """Factored second moments for matrices, optional first moment (`beta1`), update clipping, relative steps.

    Works in float32 whatever the gradient's dtype, as transformers' Adafactor does.

    `first_moment` serves `state_bytes` only: whether the groups set `beta1`, so a first moment is kept (the update
    itself reads `group["beta1"]`, per group). Left None, as the optimizer leaves it, `state_bytes` refuses to guess.
    """

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

    def learning_rate(self, group: dict[str, Any], step: int, param: Tensor) -> float:
        lr = group["lr"]
        if group["relative_step"]:
            min_step = 1e-6 * step if group["warmup_init"] else 1e-2
            lr = min(min_step, 1.0 / math.sqrt(step))
        if group["scale_parameter"]:
            lr *= max(group["eps"][1], float(_rms(param.float())))
        return lr

    def state_bytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        """float32 throughout: row and column second moments for matrices (the full one otherwise), plus the first
        moment with `first_moment`."""
        if self.first_moment is None:
            raise ValueError(
                "Invalid first_moment=None for state_bytes: the state depends on beta1. Count with "
                "AdafactorUpdate(first_moment=True) when the groups set beta1, else first_moment=False."
            )
        numel = math.prod(shape)
        first = numel * FLOAT32_BYTES if self.first_moment else 0
        if len(shape) >= 2:
            rows, cols = math.prod(shape[:-1]), math.prod(shape[:-2]) * shape[-1]
            return first + (rows + cols) * FLOAT32_BYTES
        return first + numel * FLOAT32_BYTES

    def update(self, grad: Tensor, state: dict[str, Any], group: dict[str, Any], step: int, lr: float) -> Tensor:
        dtype, grad = grad.dtype, grad.float()
        factored = grad.dim() >= 2
        if EXP_AVG_SQ_ROW not in state and EXP_AVG_SQ not in state:
            if group["beta1"] is not None:
                state[EXP_AVG] = torch.zeros_like(grad)
            if factored:
                state[EXP_AVG_SQ_ROW] = grad.new_zeros(grad.shape[:-1])
                state[EXP_AVG_SQ_COL] = grad.new_zeros(grad.shape[:-2] + grad.shape[-1:])
            else:
                state[EXP_AVG_SQ] = torch.zeros_like(grad)

        beta2t = 1.0 - math.pow(step, group["decay_rate"])
        update = grad.square().add_(group["eps"][0])
        if factored:
            row, col = state[EXP_AVG_SQ_ROW], state[EXP_AVG_SQ_COL]
            row.mul_(beta2t).add_(update.mean(dim=-1), alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(update.mean(dim=-2), alpha=1.0 - beta2t)
            row_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
            update = row_factor.mul(col.unsqueeze(-2).rsqrt()).mul_(grad)
        else:
            exp_avg_sq = state[EXP_AVG_SQ]
            exp_avg_sq.mul_(beta2t).add_(update, alpha=1.0 - beta2t)
            update = exp_avg_sq.rsqrt().mul_(grad)
        update.div_((_rms(update) / group["clip_threshold"]).clamp_(min=1.0)).mul_(lr)
        if group["beta1"] is not None:
            update = state[EXP_AVG].mul_(group["beta1"]).add_(update, alpha=1.0 - group["beta1"])
        return update.to(dtype)  # the gradient's dtype, as the bases that project it back
