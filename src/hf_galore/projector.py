"""Projection maths: a rank-r orthonormal basis of a gradient, projection onto it and back.

Pure functions on tensors. The bases live in optimizer state as plain tensors (never a Python object), and the
side each basis acts on is derived from the weight's shape and `proj_type`, never guessed from a projected
tensor's shape (the reference gets that wrong for square projected gradients).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import ProjType, RefreshMethod


def projection_sides(shape: tuple[int, ...], proj_type: ProjType) -> tuple[bool, bool]:
    """Whether a gradient of `shape` is projected from the left (Pᵀ G), the right (G Qᵀ), or both.

    `std` keeps the smaller of the two projected sizes, as the reference does: a tall or square G (m >= n)
    is projected from the right (m×r), a wide one from the left (r×n). `reverse_std` does the opposite.
    """
    rows, cols = shape
    if proj_type == "std":
        return (rows < cols, rows >= cols)
    if proj_type == "reverse_std":
        return (rows >= cols, rows < cols)
    return (proj_type in ("left", "full"), proj_type in ("right", "full"))


def effective_rank(shape: tuple[int, ...], rank: int) -> int:
    """The rank actually used: an SVD of an m×n matrix has at most min(m, n) directions."""
    return min(rank, *shape)


def projected_shape(shape: tuple[int, ...], rank: int, proj_type: ProjType) -> tuple[int, int]:
    """Shape of the projected gradient, where the inner optimizer keeps its state."""
    left, right = projection_sides(shape, proj_type)
    r = effective_rank(shape, rank)
    return (r if left else shape[0], r if right else shape[1])


def randomized_svd(
    matrix: Tensor, rank: int, *, oversample: int, power_iters: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Approximate top-`rank` singular vectors (U_r, Vh_r) by a randomized range finder (Halko et al., 2011).

    Sketch the range with `rank + oversample` Gaussian directions, sharpen it with `power_iters` power
    iterations (re-orthonormalised each time), then take an exact SVD of the small projected matrix. Costs
    O(m·n·k) instead of the full SVD's O(m·n·min(m, n)); `generator` makes it reproducible (and keeps the
    global RNG, which drives dropout and data order, untouched).
    """
    rows, cols = matrix.shape
    k = min(rank + oversample, rows, cols)
    omega = torch.randn(cols, k, generator=generator, device=matrix.device, dtype=matrix.dtype)
    sketch = matrix @ omega
    for _ in range(power_iters):
        q, _ = torch.linalg.qr(sketch)
        sketch = matrix @ (matrix.T @ q)
    q, _ = torch.linalg.qr(sketch)
    u_small, _, vh = torch.linalg.svd(q.T @ matrix, full_matrices=False)
    return q @ u_small[:, :rank], vh[:rank]


def compute_bases(
    grad: Tensor,
    rank: int,
    proj_type: ProjType,
    method: RefreshMethod = "exact",
    *,
    oversample: int = 8,
    power_iters: int = 2,
    seed: int = 0,
) -> tuple[Tensor | None, Tensor | None]:
    """The (left m×r, right r×n) bases of `grad`'s top-r singular subspace, computed in float32, stored in
    `grad`'s dtype. Either entry is None when that side is not projected.

    `method="exact"` takes a full SVD (the reference's behaviour); `"randomized"` uses `randomized_svd` seeded
    by `seed`. Raises `torch.linalg.LinAlgError` when the SVD fails.
    """
    left, right = projection_sides(tuple(grad.shape), proj_type)
    r = effective_rank(tuple(grad.shape), rank)
    matrix = grad.float()
    if method == "exact":
        u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    else:
        generator = torch.Generator(device=matrix.device).manual_seed(seed)
        u, vh = randomized_svd(matrix, r, oversample=oversample, power_iters=power_iters, generator=generator)
    # Copy out of the SVD's factors: a slice would keep the whole m×min(m, n) factor alive in optimizer state.
    own = {"dtype": grad.dtype, "memory_format": torch.contiguous_format, "copy": True}
    return (u[:, :r].to(**own) if left else None, vh[:r, :].to(**own) if right else None)


def identity_bases(shape: tuple[int, ...], rank: int, proj_type: ProjType, like: Tensor) -> tuple[Tensor | None, ...]:
    """Orthonormal fallback bases (the first r coordinate axes), for when no SVD basis can be had."""
    left, right = projection_sides(shape, proj_type)
    r = effective_rank(shape, rank)
    return (
        torch.eye(shape[0], r, dtype=like.dtype, device=like.device) if left else None,
        torch.eye(r, shape[1], dtype=like.dtype, device=like.device) if right else None,
    )


def project(grad: Tensor, left: Tensor | None, right: Tensor | None) -> Tensor:
    """R = Pᵀ G, G Qᵀ or Pᵀ G Qᵀ: the gradient in the subspace."""
    if left is not None:
        grad = left.T @ grad
    if right is not None:
        grad = grad @ right.T
    return grad


def project_back(low_rank: Tensor, left: Tensor | None, right: Tensor | None) -> Tensor:
    """P N, N Q or P N Q: a subspace update as a full-size matrix."""
    if left is not None:
        low_rank = left @ low_rank
    if right is not None:
        low_rank = low_rank @ right
    return low_rank


def add_projected_back_(
    param: Tensor, low_rank: Tensor, left: Tensor | None, right: Tensor | None, alpha: float
) -> None:
    """param += alpha · project_back(low_rank), fused into one addmm so no full-size temporary is allocated."""
    if left is not None and right is not None:
        param.addmm_(left @ low_rank, right, alpha=alpha)
    elif left is not None:
        param.addmm_(left, low_rank, alpha=alpha)
    else:
        param.addmm_(low_rank, right, alpha=alpha)


def subspace_overlap(old: Tensor, new: Tensor, side: str) -> float:
    """How much of the new basis the old one spans: ‖old_basisᵀ new_basis‖²_F / r, in [0, 1]."""
    product = old.float().T @ new.float() if side == "left" else old.float() @ new.float().T
    return float(product.square().sum() / new.shape[1 if side == "left" else 0])
