"""Projection maths: orthonormal bases, idempotent projection, no energy gain, explicit sides."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_galore.config import PROJ_TYPES
from hf_galore.projector import (
    add_projected_back_,
    compute_bases,
    effective_rank,
    identity_bases,
    project,
    project_back,
    projected_shape,
    projection_sides,
    randomized_right_basis,
    subspace_overlap,
)

shapes = st.tuples(st.integers(1, 24), st.integers(1, 24))


def _assert_orthonormal(basis, side):
    gram = basis.T @ basis if side == "left" else basis @ basis.T
    torch.testing.assert_close(gram, torch.eye(gram.shape[0]), atol=1e-5, rtol=0)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, rank=st.integers(1, 30), proj_type=st.sampled_from(PROJ_TYPES), seed=st.integers(0, 2**16))
def test_basis_orthonormal_projection_idempotent_and_energy_bounded(shape, rank, proj_type, seed):
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    left, right = compute_bases(grad, rank, proj_type)
    r = effective_rank(shape, rank)
    if left is not None:
        assert left.shape == (shape[0], r)
        _assert_orthonormal(left, "left")
    if right is not None:
        assert right.shape == (r, shape[1])
        _assert_orthonormal(right, "right")
    low = project(grad, left, right)
    assert tuple(low.shape) == projected_shape(shape, rank, proj_type)
    # P Pᵀ is a projection: projecting the projected-back gradient changes nothing.
    once = project_back(low, left, right)
    torch.testing.assert_close(project_back(project(once, left, right), left, right), once, atol=1e-5, rtol=1e-5)
    assert low.norm() <= grad.norm() * (1 + 1e-5) + 1e-6


@pytest.mark.parametrize(
    "shape,proj_type,expected",
    [
        ((48, 16), "std", (False, True)),
        ((16, 48), "std", (True, False)),
        ((16, 16), "std", (False, True)),  # square: right, as the reference
        ((48, 16), "reverse_std", (True, False)),
        ((16, 48), "reverse_std", (False, True)),
        ((16, 48), "left", (True, False)),
        ((16, 48), "right", (False, True)),
        ((16, 48), "full", (True, True)),
    ],
    ids=lambda v: str(v),
)
def test_projection_sides(shape, proj_type, expected):
    assert projection_sides(shape, proj_type) == expected


def test_std_keeps_top_singular_subspace():
    u, _ = torch.linalg.qr(torch.randn(32, 32))
    v, _ = torch.linalg.qr(torch.randn(12, 12))
    s = torch.tensor([10.0, 5.0, 2.0] + [1e-3] * 9)
    grad = u[:, :12] @ torch.diag(s) @ v.T  # tall: projected from the right
    _, right = compute_bases(grad, 3, "std")
    captured = project(grad, None, right).norm() ** 2 / grad.norm() ** 2
    assert captured > 0.9999


def test_bases_own_their_storage():
    grad = torch.randn(40, 10)
    _, right = compute_bases(grad, 2, "std")
    assert right.untyped_storage().nbytes() == right.numel() * right.element_size()


def test_bases_keep_gradient_dtype_but_use_float32_svd():
    grad = torch.randn(20, 8, dtype=torch.bfloat16)
    _, right = compute_bases(grad, 4, "std")
    assert right.dtype == torch.bfloat16
    reference = torch.linalg.svd(grad.float(), full_matrices=False)[2][:4].to(torch.bfloat16)
    torch.testing.assert_close(right, reference, atol=0, rtol=0)


def test_identity_bases_are_orthonormal_coordinate_axes():
    left, right = identity_bases((5, 9), 3, "full", like=torch.zeros(1))
    _assert_orthonormal(left, "left")
    _assert_orthonormal(right, "right")
    assert left[:3].equal(torch.eye(3))


def test_subspace_overlap_is_one_for_same_span_and_zero_for_orthogonal():
    q, _ = torch.linalg.qr(torch.randn(10, 4))
    rotation, _ = torch.linalg.qr(torch.randn(2, 2))
    same_span = q[:, :2] @ rotation
    assert subspace_overlap(q[:, :2], same_span, "left") == pytest.approx(1.0, abs=1e-5)
    assert subspace_overlap(q[:, :2], q[:, 2:], "left") == pytest.approx(0.0, abs=1e-6)
    assert subspace_overlap(q[:, :2].T, q[:, 2:].T, "right") == pytest.approx(0.0, abs=1e-6)


def _decaying_matrix(rows, cols, seed=0, decay=0.7):
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, min(rows, cols), generator=gen))
    v, _ = torch.linalg.qr(torch.randn(cols, min(rows, cols), generator=gen))
    s = decay ** torch.arange(min(rows, cols), dtype=torch.float32)
    return (u * s) @ v.T


@pytest.mark.parametrize("shape", [(300, 120), (120, 300), (64, 64)], ids=str)
@pytest.mark.parametrize("proj_type", ["std", "full"])
def test_randomized_refresh_captures_the_exact_top_r_energy(shape, proj_type):
    grad = _decaying_matrix(*shape) + 1e-3 * torch.randn(shape, generator=torch.Generator().manual_seed(1))
    exact = compute_bases(grad, 16, proj_type, "exact")
    fast = compute_bases(grad, 16, proj_type, "randomized", oversample=8, power_iters=2, seed=3)
    for side, basis in zip(("left", "right"), fast):
        if basis is not None:
            _assert_orthonormal(basis, side)
    energy = project(grad, *fast).norm() ** 2
    assert energy >= 0.999 * project(grad, *exact).norm() ** 2
    # the same seed gives the same basis (resume), another seed another sketch
    again = compute_bases(grad, 16, proj_type, "randomized", oversample=8, power_iters=2, seed=3)
    assert all(a is None or torch.equal(a, b) for a, b in zip(fast, again))


def test_randomized_refresh_leaves_the_global_rng_alone():
    matrix = torch.randn(20, 10)
    state = torch.get_rng_state()
    randomized_right_basis(matrix, 4, oversample=2, power_iters=1, seed=0)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_fused_apply_equals_project_back(proj_type):
    grad = torch.randn(12, 7)
    left, right = compute_bases(grad, 3, proj_type, "exact")
    low = project(grad, left, right)
    param = torch.randn(12, 7)
    expected = param - 0.5 * project_back(low, left, right)
    add_projected_back_(param, low, left, right, alpha=-0.5)
    torch.testing.assert_close(param, expected)


@pytest.mark.parametrize("start,stop", [(0, 2500), (1000, 1030), (1023, 2049), (2400, 2500), (7, 7)])
def test_gaussian_rows_are_the_same_rows_whatever_the_split(start, stop):
    """A rank's rows of the refresh's test matrix equal those rows of the whole draw, across block boundaries."""
    from hf_galore.projector import gaussian_rows

    like = torch.empty(0)
    whole = gaussian_rows(0, 2500, 2500, 5, seed=3, like=like)
    assert whole.shape == (2500, 5) and not torch.equal(whole[:1024], whole[1024:2048])  # blocks differ
    assert torch.equal(gaussian_rows(start, stop, 2500, 5, seed=3, like=like), whole[start:stop])
