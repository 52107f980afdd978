"""The full-rank residual (Fira, Chen et al. 2024, arXiv 2410.01623): the gradient outside the subspace, added back.

GaLore drops G − back(R), everything the rank-r basis does not span. Fira adds it back scaled like the subspace
update: along the projected dimension, each column (left projection) or row (right projection) of the residual is
multiplied by ‖U‖ / ‖R‖ of that column or row, where R is the projected gradient and U the inner rule's raw direction
for it (Adam's M / (√V + ε), before bias correction), then limited in norm growth (`hf_galore.scaling`, shared with
APOLLO). It keeps no state but the limiter's scalar.

hf_galore applies it as the authors' `FiraAdamW` does, W ← W − α·(back(D) + η·S), with η = lr × the rule's bias
correction (Adam's √(1 − β2ᵗ)/(1 − β1ᵗ)): the correction sits in the step size, not in S, so the limiter sees how
the raw ratio grows (and no lr schedule: a warm-up would otherwise pin the residual near its first, tiny norm).
(The reference subtracts α·back(R) to form the residual, which leaves (1 − α)·back(R) in it when α ≠ 1; here the
residual is exactly what the basis does not span. Adam's ε sits after the corrected √V̂ here, after the raw √V there:
equal for a small ε.)
"""

from __future__ import annotations

from torch import Tensor

from .projector import project_back
from .scaling import norm_scaled
from .sharding import RowShard


def fira_residual(
    grad: Tensor,
    low_rank_grad: Tensor,
    low_rank_update: Tensor,
    step_size: float,
    left: Tensor | None,
    right: Tensor | None,
    previous_norm: Tensor,
    shard: RowShard | None = None,
) -> tuple[Tensor, Tensor]:
    """The scaled residual S (the shape of `grad`; apply it as step_size·S) and its norm, which the next step's
    limiter compares against.

    `low_rank_grad` is R = project(grad), `low_rank_update` the inner rule's D for it, and `step_size` (> 0) the lr
    times the rule's bias correction, so D / step_size is the raw direction U. `previous_norm` is the norm this
    function returned last step (`scaling.no_norm()` on the first). Sharded (`shard`, right projection), every rank
    holds its rows: the row-wise scaling is local and the norm takes one all-reduced float.
    """
    residual = grad.float() - project_back(low_rank_grad.float(), left, right)
    dims = [dim for dim, projected in ((0, left is not None), (1, right is not None)) if projected]
    raw_direction = low_rank_update.float() / step_size
    scaled, norm = norm_scaled(residual, low_rank_grad, raw_direction, dims, previous_norm, shard)
    return scaled.to(grad.dtype), norm
