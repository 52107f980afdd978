"""The planner's maths: optimizer state, refresh workspace and activations of a training run, and the largest rank
and batch that fit a device. Functions of shapes, dtypes and sizes only; `hf_galore.estimate` builds their inputs.

* activations, per transformer layer, s·b·h·(34 + 5·a·s/h) bytes at 16 bits (Korthikanti et al. 2022, "Reducing
  Activation Recomputation in Large Transformer Models", no recomputation; doubled at 32 bits); an encoder layer's
  bidirectional attention holds the same tensors as a decoder layer's causal one. Plus the head: for `causal-lm`,
  2·s·b·h values in the model dtype (final norm and LM-head inputs) and s·b·V·(dtype bytes + 8) for the logits, their
  float32 copy and the loss's float32 log-softmax; for `sequence-classification`, the pooled output (b·h values) and
  b·L·(dtype bytes + 8) for the L-label logits, their float32 copy and log-softmax. With gradient checkpointing every
  layer keeps only its input (s·b·h values) and one layer's activations are alive during its recomputation.
* refresh workspace: see `refresh_workspace`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .config import GaLoreConfig
from .inner import MIN_8BIT_SIZE, inner_rule
from .memory import expected_state_bytes
from .trainer_factory import GALORE_OPTIMIZERS

__all__ = [
    "PLAIN_OPTIMIZERS",
    "TensorKind",
    "activation_bytes",
    "largest_batch",
    "largest_rank",
    "refresh_workspace",
    "state_bytes",
]

# transformers `--optim` names without GaLore that the planner models -> how their state is counted.
PLAIN_OPTIMIZERS: dict[str, str] = {
    "adamw_torch": "torch_adamw",
    "adamw_torch_fused": "torch_adamw",
    "adamw_bnb_8bit": "bnb_adamw8bit",
    "adamw_8bit": "bnb_adamw8bit",
    "adafactor": "adafactor",
}
_TORCH_STEP_BYTES = 4  # torch.optim.AdamW keeps `step` as a float32 scalar tensor per parameter
_ADAFACTOR_RMS_BYTES = 4  # transformers' Adafactor keeps the weight's RMS as a float32 scalar tensor per parameter
_BNB_QMAP_BYTES = 2 * 256 * 4  # bitsandbytes' two 256-entry float32 quantization maps, shared by all 8-bit tensors


@dataclass(frozen=True)
class TensorKind:
    """A kind of trainable tensor: the planner counts tensors by (shape, dtype, GaLore target or not)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    target: bool

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def state_bytes(
    tensors: Mapping[TensorKind, int], optim: str, *, rank: int | None, proj_type: str, min_8bit_size: int
) -> int:
    """Bytes optimizer `optim` allocates for these trainable tensors (what `optimizer_state_bytes` measures)."""
    if optim in GALORE_OPTIMIZERS:
        rule = inner_rule(GALORE_OPTIMIZERS[optim].form, min_8bit_size=min_8bit_size)
        return sum(
            count * expected_state_bytes(tensor.shape, form=rule, dtype=tensor.dtype, rank=rank, proj_type=proj_type)
            if tensor.target
            else count * rule.state_bytes(tensor.shape, tensor.dtype)
            for tensor, count in tensors.items()
        )
    kind = PLAIN_OPTIMIZERS[optim]
    if kind == "torch_adamw":
        rule, extra = inner_rule("adamw"), _TORCH_STEP_BYTES
    elif kind == "bnb_adamw8bit":  # transformers' adamw_bnb_8bit keeps bitsandbytes' default min_8bit_size
        rule, extra = inner_rule("adamw8bit", min_8bit_size=MIN_8BIT_SIZE), 0
    else:
        rule, extra = inner_rule("adafactor"), _ADAFACTOR_RMS_BYTES
    total = sum(count * (rule.state_bytes(t.shape, t.dtype) + extra) for t, count in tensors.items())
    if kind == "bnb_adamw8bit" and any(math.prod(t.shape) >= MIN_8BIT_SIZE for t in tensors):
        total += _BNB_QMAP_BYTES
    return total


def refresh_workspace(tensors: Mapping[TensorKind, int], config: GaLoreConfig, rank: int) -> int:
    """float32 bytes alive during the largest target's basis refresh (one refresh runs at a time).

    exact: `svd(G.float())` holds a float32 G (m×n; torch copies it for LAPACK even when G is float32), U (m×k), S (k)
    and Vᵀ (k×n), k = min(m, n). randomized: G.float() (a copy only when G is not float32), the sketch and its QR
    (2·m·l), the Gaussian test matrix, Gᵀ·Q and Qᵀ·G (3·n·l) and the small SVD (l×l), l = min(rank + oversample, m, n).
    The solvers' own scratch is not counted.
    """
    sizes = [0]
    for tensor in tensors:
        if not tensor.target:
            continue
        m, n = tensor.shape
        if config.refresh_method == "exact":
            k = min(m, n)
            sizes.append(4 * (m * n + m * k + k + k * n))
        else:
            sketch = min(rank + config.oversample, m, n)
            copy = 0 if tensor.dtype == torch.float32 else m * n
            sizes.append(4 * (copy + 2 * m * sketch + 3 * n * sketch + sketch * sketch))
    return max(sizes)


def activation_bytes(
    config: Any,
    *,
    batch_size: int,
    seq_len: int,
    dtype: torch.dtype,
    gradient_checkpointing: bool = False,
    task: str = "causal-lm",
    num_labels: int = 2,
) -> int | None:
    """Estimated bytes of activations kept for the backward pass (module docstring) of a `causal-lm` or a
    `sequence-classification` model with `num_labels` labels; None when the config lacks hidden_size,
    num_hidden_layers, num_attention_heads or vocab_size."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    sizes = [getattr(text, key, None) for key in ("hidden_size", "num_hidden_layers", "num_attention_heads")]
    vocab = getattr(text, "vocab_size", None)
    if any(not isinstance(value, int) for value in [*sizes, vocab]):
        return None
    h, layers, heads = sizes
    s, b, k = seq_len, batch_size, dtype.itemsize
    layer = (34 * s * b * h + 5 * heads * s * s * b) * k // 2  # k/2: the formula counts 16-bit values
    if task == "sequence-classification":
        head = b * h * k + b * num_labels * (k + 8)
    else:
        head = 2 * s * b * h * k + s * b * vocab * (k + 8)
    if gradient_checkpointing:
        return layers * s * b * h * k + layer + head
    return layers * layer + head


def largest_rank(total_at_rank: Callable[[int], int], max_rank: int, device_bytes: int) -> int | None:
    """The largest rank in 1..max_rank whose total fits `device_bytes`, None if none does.

    A linear scan: 8-bit state is not monotone in rank (a projected moment below min_8bit_size keeps 32 bits).
    """
    return max((r for r in range(1, max_rank + 1) if total_at_rank(r) <= device_bytes), default=None)


def largest_batch(fixed_bytes: int, activations_at: Callable[[int], int | None], device_bytes: int) -> int | None:
    """The largest batch whose activations fit beside `fixed_bytes` (0 if not even one), None if unknown.

    Activations grow linearly with the batch (rounding only adds), so the division is an upper bound to walk down from.
    """
    per_sample = activations_at(1)
    if not per_sample:
        return None
    batch = max(0, (device_bytes - fixed_bytes) // per_sample)
    while batch > 0 and fixed_bytes + activations_at(batch) > device_bytes:
        batch -= 1
    return batch
