"""Optimizer-state accounting: bytes an optimizer holds, and what the formulas say it should hold."""

from __future__ import annotations

import math
import resource
import sys
from typing import Literal

import torch
from torch import Tensor

from .config import ProjType
from .inner.adamw8bit import quantized_blocks
from .projector import effective_rank, projected_shape, projection_sides

InnerForm = Literal["adamw", "adamw8bit", "adafactor"]
FLOAT32_BYTES = 4


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer's state holds (GaLore bases included), each storage counted once."""
    seen: set[int] = set()
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, Tensor) and value.untyped_storage().data_ptr() not in seen:
                seen.add(value.untyped_storage().data_ptr())
                total += value.untyped_storage().nbytes()
    return total


def peak_memory_mb(device: torch.device) -> float:
    """CUDA's max allocated MiB on a CUDA device, else the process's peak resident set (model, data, Python)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**20 if sys.platform == "darwin" else 1024)


def _moment_bytes(shape: tuple[int, ...], form: InnerForm, dtype: torch.dtype, min_8bit_size: int, beta1: bool) -> int:
    numel = math.prod(shape)
    if form == "adamw":
        return 2 * numel * dtype.itemsize
    if form == "adamw8bit":
        if numel < min_8bit_size:
            return 2 * numel * FLOAT32_BYTES
        return 2 * numel + 2 * quantized_blocks(numel) * FLOAT32_BYTES
    if form == "adafactor":
        first = numel * FLOAT32_BYTES if beta1 else 0
        if len(shape) >= 2:
            rows, cols = math.prod(shape[:-1]), math.prod(shape[:-2]) * shape[-1]
            return first + (rows + cols) * FLOAT32_BYTES
        return first + numel * FLOAT32_BYTES
    raise ValueError(f"Invalid {form=}. Must be one of adamw, adamw8bit, adafactor.")


def expected_state_bytes(
    shape: tuple[int, ...],
    *,
    form: InnerForm,
    dtype: torch.dtype = torch.float32,
    rank: int | None = None,
    proj_type: ProjType = "std",
    min_8bit_size: int = 4096,
    adafactor_beta1: bool = False,
) -> int:
    """State bytes for one parameter: moments of the (projected) shape plus, for GaLore, the basis.

    For an m×n GaLore target with `std`: 2·r·max(m, n) moment entries and r·min(m, n) basis entries.
    """
    if rank is None:
        return _moment_bytes(tuple(shape), form, dtype, min_8bit_size, adafactor_beta1)
    low = projected_shape(tuple(shape), rank, proj_type)
    left, right = projection_sides(tuple(shape), proj_type)
    r = effective_rank(tuple(shape), rank)
    basis_entries = r * shape[0] * left + r * shape[1] * right
    return _moment_bytes(low, form, dtype, min_8bit_size, adafactor_beta1) + basis_entries * dtype.itemsize
