"""Norm-based scaling and the norm-growth limiter: the one construction Fira and APOLLO share.

Both move a full-size matrix X (Fira: the residual the basis does not span; APOLLO: the gradient itself) at the
adaptive step size the low-rank space measured: X is scaled, channel by channel or as one tensor, by
s = ‖U‖ / ‖R‖, where R is the projected gradient and U the inner rule's raw direction for it. Then the limiter keeps
the norm of the scaled X from growing more than γ = `NORM_GROWTH_LIMIT` times per step (one scalar of state).

Decided once for both (issue 19): U is the *raw* direction, before the rule's bias correction (Adam's
M / (√V + ε), not M̂ / (√V̂ + ε)), and the correction goes into the step size, as the authors' Fira code
(`fira==1.0.2`, `FiraAdamW`) does and as APOLLO's algorithm writes it. Early in training the raw ratio grows quickly
(its bias fades), and the limiter clamps that growth at γ per step; measured on the bias-corrected direction the
limiter would let the first steps through unclamped (59% apart from the reference after 6 steps on a tiny LLaMA).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .sharding import RowShard, global_sum

NORM_GROWTH_LIMIT = 1.01  # γ: the scaled matrix's norm may grow at most this much per step
EPS = 1e-8  # keeps a zero norm from dividing (Fira's and APOLLO's constant)
NO_NORM = -1.0  # the limiter's state before the first step that moves the weight: nothing to compare with


def no_norm(like: Tensor) -> Tensor:
    """The limiter's state before its first real step: a float32 0-d tensor holding `NO_NORM`. It exists from the
    first step on, even a step that moves nothing (lr 0: a warm-up's first step, or the template step
    torch.distributed.checkpoint takes before loading, which loads only the entries that step created)."""
    return torch.full((), NO_NORM, dtype=torch.float32, device=like.device)


def norms(matrix: Tensor, dims: list[int], shard: RowShard | None = None) -> Tensor:
    """‖matrix‖ over `dims` (kept as size-1 dims), in float32. Row-sharded (`shard`), a norm over dim 0 sums the
    ranks' squares: one all-reduce of the result's size (a row of n values, or one float)."""
    squares = matrix.float().square().sum(dim=dims, keepdim=True)
    return (global_sum(squares, shard) if 0 in dims else squares).sqrt()


def norm_scaled(
    matrix: Tensor,
    low_rank_grad: Tensor,
    raw_direction: Tensor,
    dims: list[int],
    previous_norm: Tensor,
    shard: RowShard | None = None,
) -> tuple[Tensor, Tensor]:
    """`matrix` (float32, scaled in place) times ‖raw_direction‖ / ‖low_rank_grad‖ over `dims`, then limited to γ
    times `previous_norm` (`no_norm()`: the first step, nothing to compare with). Returns it and its norm, which the
    next step's limiter reads.

    `dims` are the dims the norms run over: the projected one for channel-wise scaling (0 for a left projection,
    r×n: one factor per column; 1 for a right one, m×r: one per row), both for one tensor-wise factor.
    """
    matrix.mul_(norms(raw_direction, dims, shard) / (norms(low_rank_grad, dims, shard) + EPS))
    norm = global_sum(matrix.square().sum(), shard).sqrt()
    growth = torch.clamp(norm / (previous_norm + EPS), min=NORM_GROWTH_LIMIT) / NORM_GROWTH_LIMIT
    limiter = torch.where(previous_norm < 0, 1.0, growth)  # decided on the device: no host sync per step
    matrix.div_(limiter)
    return matrix, norm / limiter
