"""The full-rank residual (Fira, Chen et al. 2024): the part of the gradient outside the subspace, added back.

GaLore drops G − back(R), everything the rank-r basis does not span. Fira adds it back scaled like the subspace
update: along the projected dimension, each column (left projection) or row (right projection) of the residual is
multiplied by ‖D‖ / ‖R‖ of that column or row, where R is the projected gradient and D the inner rule's update of
it — so the residual moves at the adaptive step size the subspace gets, with no state of its own. A norm-growth
limiter keeps the residual's norm from growing more than `NORM_GROWTH_LIMIT` times per step (one scalar of state).

hf_galore applies the residual with the same α as the subspace update: W ← W − α·(back(D) + lr·S), S computed at
unit learning rate as the reference does (its limiter sees no lr schedule). (The reference code subtracts α·back(R)
to form the residual, which leaves (1 − α)·back(R) in it when α ≠ 1; here the residual is exactly what the basis does
not span.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from .projector import project_back
from .sharding import RowShard, global_sum

NORM_GROWTH_LIMIT = 1.01  # Fira's γ: the residual's norm may grow at most this much per step
EPS = 1e-8


def fira_residual(
    grad: Tensor,
    low_rank_grad: Tensor,
    low_rank_update: Tensor,
    lr: float,
    left: Tensor | None,
    right: Tensor | None,
    previous_norm: Tensor | None,
    shard: RowShard | None = None,
) -> tuple[Tensor, Tensor]:
    """The scaled residual S at unit learning rate (the shape of `grad`; apply it as lr·S) and its norm, which the
    next step's limiter compares against.

    `low_rank_grad` is R = project(grad), `low_rank_update` the inner rule's D for it at learning rate `lr` (> 0):
    the scaling uses D / lr, so the limiter sees how the residual grows, not how the schedule moves the lr (a
    warm-up would otherwise pin the residual near its first, tiny norm). `previous_norm` is the norm this function
    returned last step (None on the first). Sharded (`shard`, right projection), every rank holds its rows: the
    row-wise scaling is local and the norm takes one all-reduced float.
    """
    dtype = grad.dtype
    residual = grad.float() - project_back(low_rank_grad.float(), left, right)
    dims = [dim for dim, projected in ((0, left is not None), (1, right is not None)) if projected]
    scaling = (
        low_rank_update.float().norm(dim=dims, keepdim=True)
        / lr
        / (low_rank_grad.float().norm(dim=dims, keepdim=True) + EPS)
    )
    scaled = residual.mul_(scaling)
    norm = global_sum(scaled.square().sum(), shard).sqrt()
    if previous_norm is not None:
        limiter = torch.clamp(norm / (previous_norm + EPS), min=NORM_GROWTH_LIMIT) / NORM_GROWTH_LIMIT
        scaled.div_(limiter)
        norm = norm / limiter
    return scaled.to(dtype), norm
