"""Adam moments with torch.optim.AdamW's conventions (eps added after the bias-corrected square root)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..sharding import RowShard
from .base import layout_bytes

EXP_AVG = "exp_avg"
EXP_AVG_SQ = "exp_avg_sq"


def validate_adam_group(group: dict[str, Any]) -> None:
    """Check the Adam hyper-parameters every Adam-style rule shares."""
    beta1, beta2 = group["betas"]
    if not 0.0 <= beta1 < 1.0:
        raise ValueError(f"Invalid {beta1=}. Must be in [0, 1).")
    if not 0.0 <= beta2 < 1.0:
        raise ValueError(f"Invalid {beta2=}. Must be in [0, 1).")
    eps = group["eps"]
    if not eps >= 0.0:
        raise ValueError(f"Invalid {eps=}. Must be >= 0.0.")


def adam_bias_correction(group: dict[str, Any], step: int) -> float:
    """√(1 − β2ᵗ) / (1 − β1ᵗ): Adam's bias-corrected direction over its raw m / (√v + eps) (eps aside)."""
    beta1, beta2 = group["betas"]
    return math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)


def adam_direction(
    grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *, step: int, beta1: float, beta2: float, eps: float
) -> Tensor:
    """Update the moments in place and return m̂ / (√v̂ + eps), the unit-lr Adam step."""
    exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    bias_correction1 = 1.0 - beta1**step
    bias_correction2_sqrt = math.sqrt(1.0 - beta2**step)
    denom = exp_avg_sq.sqrt().div_(bias_correction2_sqrt).add_(eps)
    return torch.div(exp_avg, denom, out=denom).div_(bias_correction1)  # reuses denom's memory


class AdamWUpdate:
    """Adam on full-precision moments; with weight decay in the core it is exactly torch.optim.AdamW."""

    form = "adamw"  # the name `inner_rule` builds it by

    row_wise_state = frozenset({EXP_AVG, EXP_AVG_SQ})  # element-wise moments: sharded with the parameter's rows

    def validate_group(self, group: dict[str, Any]) -> None:
        validate_adam_group(group)
        if group.get("amsgrad", False):
            raise ValueError("GaLoreAdamW does not support amsgrad=True.")

    def init_state(
        self, grad: Tensor, state: dict[str, Any], group: dict[str, Any], shard: RowShard | None = None
    ) -> None:
        state[EXP_AVG] = torch.zeros_like(grad, memory_format=torch.preserve_format)
        state[EXP_AVG_SQ] = torch.zeros_like(grad, memory_format=torch.preserve_format)

    def learning_rate(self, group: dict[str, Any], step: int, param: Tensor, shard: RowShard | None = None) -> float:
        return group["lr"]

    def bias_correction(self, group: dict[str, Any], step: int) -> float:
        return adam_bias_correction(group, step)

    def state_bytes(self, shape: tuple[int, ...], dtype: torch.dtype, shard: RowShard | None = None) -> int:
        """Two moments in the gradient's dtype."""
        return layout_bytes(self, shape, dtype, group={}, shard=shard)

    def update(
        self,
        grad: Tensor,
        state: dict[str, Any],
        group: dict[str, Any],
        step: int,
        lr: float,
        shard: RowShard | None = None,
    ) -> Tensor:
        if EXP_AVG not in state:
            self.init_state(grad, state, group, shard)
        beta1, beta2 = group["betas"]
        direction = adam_direction(
            grad, state[EXP_AVG], state[EXP_AVG_SQ], step=step, beta1=beta1, beta2=beta2, eps=group["eps"]
        )
        return direction.mul_(lr)
