"""Projection maths: a rank-r orthonormal basis of a gradient, projection onto it and back.

Pure functions on tensors. The bases live in optimizer state as plain tensors (never a Python object), and the
side each basis acts on is derived from the weight's shape and `proj_type`, never guessed from a projected
tensor's shape (the reference gets that wrong for square projected gradients).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import ProjType, RefreshMethod
from .sharding import RowShard, gather_rows, global_sum, world_size


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


def resolve_proj_type(proj_type: ProjType, shape: tuple[int, int], *, row_sharded: bool) -> ProjType:
    """The projection a weight gets. Row-sharded (FSDP2), `std` projects from the right: the basis (r×n) is
    replicated, the projection and the moments stay on each rank's rows, and no collective runs between refreshes.
    A left projection would need an all-reduce of r×n every step, so it is refused there (callers add the name)."""
    if not row_sharded:
        return proj_type
    if proj_type in ("std", "right") or (proj_type == "reverse_std" and shape[0] < shape[1]):
        return "right"
    raise ValueError(
        f"Invalid proj_type={proj_type!r} for a weight row-sharded by FSDP2: it projects from the left, which would "
        "need an all-reduce of rank×columns values every step. Use proj_type='std' (sharded weights are then "
        "projected from the right) or 'right'."
    )


def effective_rank(shape: tuple[int, ...], rank: int) -> int:
    """The rank actually used: an SVD of an m×n matrix has at most min(m, n) directions."""
    return min(rank, *shape)


def projected_shape(shape: tuple[int, ...], rank: int, proj_type: ProjType) -> tuple[int, int]:
    """Shape of the projected gradient, where the inner optimizer keeps its state."""
    left, right = projection_sides(shape, proj_type)
    r = effective_rank(shape, rank)
    return (r if left else shape[0], r if right else shape[1])


GAUSSIAN_BLOCK_ROWS = 1024  # rows of the Gaussian test matrix drawn from one seed (see `gaussian_rows`)


def gaussian_rows(start: int, stop: int, rows: int, k: int, seed: int, like: Tensor) -> Tensor:
    """Rows [start, stop) of the rows×k Gaussian test matrix Ω of a refresh seeded by `seed`, the same whatever the
    split: Ω is drawn in blocks of `GAUSSIAN_BLOCK_ROWS` rows, block b from its own generator seeded by (seed, b), so a
    rank draws only the blocks its rows touch (transient memory ~1/W of Ω, not the whole m×k) and the global RNG
    (dropout, data order) stays untouched."""
    first, last = start // GAUSSIAN_BLOCK_ROWS, -(-stop // GAUSSIAN_BLOCK_ROWS)
    blocks = []
    for block in range(first, last):
        generator = torch.Generator(device=like.device).manual_seed(seed * 1_000_003 + block)
        size = min(GAUSSIAN_BLOCK_ROWS, rows - block * GAUSSIAN_BLOCK_ROWS)
        blocks.append(torch.randn(size, k, generator=generator, device=like.device, dtype=like.dtype))
    drawn = torch.cat(blocks) if blocks else like.new_zeros(0, k)
    return drawn[start - first * GAUSSIAN_BLOCK_ROWS : stop - first * GAUSSIAN_BLOCK_ROWS]


def randomized_right_basis(
    local_rows: Tensor,
    rank: int,
    *,
    oversample: int,
    power_iters: int,
    seed: int,
    shard: RowShard | None = None,
) -> Tensor:
    """Approximate top-`rank` right singular vectors of G (r×n, orthonormal rows, float32) by a randomized range
    finder on Gᵀ (Halko et al., 2011), from `local_rows`: all of G, or rows [shard.offset, ...) of a row-sharded G.

    One algorithm for one process and for row shards, so both give the same basis to float error:
    Ω is the same m×k Gaussian whatever the split (k = rank + oversample, at most min(m, n); each rank draws its own
    rows, `gaussian_rows`); Y = Gᵀ Ω = Σ_i G_iᵀ Ω_i; `power_iters` times Y ← Gᵀ (G orth(Y)); Q = orth(Y) (n×k).
    Then the small SVD of B = G Q (m×k) from its k×k Gram matrix BᵀB = Σ_i B_iᵀ B_i, formed and eigendecomposed in
    float64 (its eigenvectors are B's right singular vectors Vs; float64 keeps the squared condition number harmless).
    Last, one more half power step on the r Ritz directions: the basis is orth(Gᵀ B Vs[:, :r])ᵀ = orth(GᵀG Q
    Vs[:, :r])ᵀ, each row's sign chosen so that its largest entry is positive. Sketching the row space directly would
    otherwise lose half a power iteration against sketching the column space (whose final Qᵀ G pass carries one);
    with this step it captures as much energy as that, or more, for one extra pass over G with r columns.

    Collectives (sharded only), all of a size that does not grow with the world size W: 1 + power_iters all-reduces
    of n×k float32, one of k×k float64 and one of n×r float32; their results are identical on every rank, so is the
    basis. The largest buffers are n×k and m_i×k (m_i = this rank's rows). Costs O(m·n·k) flops instead of the full
    SVD's O(m·n·min(m, n)).
    """
    local_count, cols = local_rows.shape
    rows = local_count if shard is None else shard.global_rows
    offset = 0 if shard is None else shard.offset
    rank = min(rank, rows, cols)
    k = min(rank + oversample, rows, cols)
    matrix = local_rows.float()
    omega = gaussian_rows(offset, offset + local_count, rows, k, seed, like=matrix)
    sketch = global_sum(matrix.T @ omega, shard)
    for _ in range(power_iters):
        q, _ = torch.linalg.qr(sketch)
        sketch = global_sum(matrix.T @ (matrix @ q), shard)
    q, _ = torch.linalg.qr(sketch)
    small = matrix @ q
    wide = small.double()
    _, vectors = torch.linalg.eigh(global_sum(wide.T @ wide, shard))  # eigenvalues ascending
    ritz = vectors[:, -rank:].flip(-1).to(small.dtype)
    basis = torch.linalg.qr(global_sum(matrix.T @ (small @ ritz), shard)).Q.T
    # Each direction is fixed up to sign, and LAPACK's choice can flip between two inputs equal to float error: make
    # each row's largest entry positive, so shards and one process agree.
    largest = basis.gather(1, basis.abs().argmax(dim=1, keepdim=True))
    return basis * torch.where(largest < 0, -1.0, 1.0)


def compute_bases(
    grad: Tensor,
    rank: int,
    proj_type: ProjType,
    method: RefreshMethod = "exact",
    *,
    oversample: int = 8,
    power_iters: int = 2,
    seed: int = 0,
    shard: RowShard | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """The (left m×r, right r×n) bases of `grad`'s top-r singular subspace, computed in float32, stored in
    `grad`'s dtype. Either entry is None when that side is not projected.

    `method="exact"` takes a full SVD (the reference's behaviour); `"randomized"` uses `randomized_right_basis`
    seeded by `seed` (a left basis alone is the right basis of Gᵀ; with both sides, the left one is the left singular
    vectors of G Qᵀ). Raises `torch.linalg.LinAlgError` when the SVD fails.

    With `shard`, `grad` holds rows [shard.offset, ...) of a row-sharded m×n gradient (see `sharding`): the sides
    follow the global shape, the right basis is replicated on every rank and the left basis comes back as the same
    rows of P (m_i×r), as the gradient. Exact gathers the whole gradient once (`sharding.gather_rows`) and takes
    the same SVD on every rank; randomized exchanges only n×k sketches and supports the right side only.
    """
    sharded = world_size(shard) > 1
    shape = (shard.global_rows if sharded else grad.shape[0], grad.shape[1])
    left, right = projection_sides(shape, proj_type)
    r = effective_rank(shape, rank)
    if method == "exact":
        u, _, vh = torch.linalg.svd(gather_rows(grad, shard).float(), full_matrices=False)
        if sharded:
            u = u[shard.offset : shard.offset + grad.shape[0]]
        left_basis, right_basis = u[:, :r], vh[:r, :]
    else:
        if left and sharded:
            raise ValueError(
                f"Invalid refresh_method='randomized' with proj_type={proj_type!r} on a row-sharded {shape} weight: "
                "the randomized refresh of a sharded weight computes the right basis only; project from the right "
                "(proj_type='right') or use refresh_method='exact'."
            )
        options = {"oversample": oversample, "power_iters": power_iters, "seed": seed}
        right_basis = randomized_right_basis(grad, r, shard=shard, **options) if right else None
        if left and right:  # `full`: the left singular vectors of G Qᵀ pair with Q and keep all of its energy
            left_basis = torch.linalg.svd(grad.float() @ right_basis.T, full_matrices=False)[0]
        elif left:
            left_basis = randomized_right_basis(grad.T, r, **options).T
    # Copy out of the SVD's factors: a slice would keep the whole m×min(m, n) factor alive in optimizer state.
    own = {"dtype": grad.dtype, "memory_format": torch.contiguous_format, "copy": True}
    return (left_basis.to(**own) if left else None, right_basis.to(**own) if right else None)


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
