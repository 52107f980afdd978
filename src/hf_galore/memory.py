"""Optimizer-state accounting: bytes an optimizer holds, and what the formulas say it should hold."""

from __future__ import annotations

import resource
import sys

import torch
from torch import Tensor

from .config import ProjType, checked_rank
from .inner import InnerForm, InnerUpdate, inner_rule
from .projector import effective_rank, projected_shape, projection_sides
from .sharding import local_tensor

__all__ = ["InnerForm", "expected_state_bytes", "optimizer_state_bytes", "peak_memory_mb"]

LIMITER_BYTES = 4  # a norm-growth limiter's norm: a float32 0-d tensor per target (APOLLO)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer's state holds in this process (GaLore bases included), each storage
    counted once; a sharded (DTensor) entry counts its local rows."""
    seen: set[int] = set()
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if not isinstance(value, Tensor):
                continue
            storage = local_tensor(value).untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def peak_memory_mb(device: torch.device) -> float:
    """CUDA's max allocated MiB on a CUDA device, else the process's peak resident set (model, data, Python)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**20 if sys.platform == "darwin" else 1024)


def expected_state_bytes(
    shape: tuple[int, ...],
    *,
    form: InnerForm | InnerUpdate,
    dtype: torch.dtype = torch.float32,
    rank: int | None = None,
    proj_type: ProjType = "std",
    min_8bit_size: int | None = None,
    adafactor_beta1: bool | None = None,
    stored_basis: bool = True,
    limiter: bool = False,
) -> int:
    """State bytes for one parameter: the inner rule's state for the (projected) shape plus, for GaLore, the basis.

    APOLLO (`ApolloRule.state_options`): with `stored_basis=False` (its random projection, regenerated from a seed)
    no basis; `limiter` adds the norm-growth limiter's float32 scalar.

    `form` is an inner rule (`AdamW8bitUpdate(min_8bit_size=256)`, which knows its own footprint) or its name:
    `adamw`, `adamw8bit` (with `min_8bit_size`, default 4096) or `adafactor` (with `adafactor_beta1`: whether a first
    moment is kept). For an m×n GaLore target with `std`: 2·r·max(m, n) moment entries and r·min(m, n) basis entries.
    """
    options = {"min_8bit_size": min_8bit_size, "adafactor_beta1": adafactor_beta1}
    given = {key: value for key, value in options.items() if value is not None}
    if isinstance(form, str):
        rule = inner_rule(form, **given)
    elif given:
        raise ValueError(
            f"Invalid {', '.join(f'{key}={value!r}' for key, value in given.items())} with form={form!r}: "
            "configure the rule instance instead, or pass the form by name."
        )
    else:
        rule = form
    shape = tuple(shape)
    if rank is None:
        return rule.state_bytes(shape, dtype)
    rank = checked_rank(rank)
    left, right = projection_sides(shape, proj_type)
    r = effective_rank(shape, rank)
    basis_entries = (r * shape[0] * left + r * shape[1] * right) * stored_basis
    limiter_bytes = LIMITER_BYTES if limiter else 0
    return (
        rule.state_bytes(projected_shape(shape, rank, proj_type), dtype)
        + basis_entries * dtype.itemsize
        + limiter_bytes
    )
