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
* FSDP2 over W processes (`world=W`), per rank, for the largest rank: every parameter, gradient and per-row moment
  holds ⌈m/W⌉ of its m rows (`torch.chunk` semantics, `shard_rows`); a GaLore target is projected from the right
  (`hf_galore.projector.resolve_proj_type`): each rank keeps ⌈r/W⌉ rows of its basis (r×n) and ⌈m/W⌉×r moments,
  and gathers the basis whole for its update (`step_communication`, the buffer in `refresh_workspace`). The
  refresh's traffic per rank is `refresh_communication`; neither grows with W.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .config import GaLoreConfig
from .inner import MIN_8BIT_SIZE, inner_rule, others_rule
from .memory import LIMITER_BYTES, expected_state_bytes
from .projector import GAUSSIAN_BLOCK_ROWS, effective_rank, resolve_proj_type
from .sharding import RowShard
from .trainer_factory import GALORE_OPTIMIZERS

__all__ = [
    "PLAIN_OPTIMIZERS",
    "TensorKind",
    "activation_bytes",
    "largest_batch",
    "largest_rank",
    "refresh_communication",
    "refresh_workspace",
    "shard_rows",
    "state_bytes",
    "step_communication",
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

    def local_shape(self, world: int) -> tuple[int, ...]:
        """The largest rank's block of this tensor row-sharded over `world` processes."""
        return (shard_rows(self.shape[0], world), *self.shape[1:])

    def local_nbytes(self, world: int) -> int:
        return math.prod(self.local_shape(world)) * self.dtype.itemsize


def shard_rows(rows: int, world: int) -> int:
    """Rows of the largest block when `rows` are cut over `world` ranks as `torch.chunk` (FSDP2) cuts them: ⌈m/W⌉."""
    return -(-rows // world)


def state_bytes(
    tensors: Mapping[TensorKind, int],
    optim: str,
    *,
    rank: int | None,
    proj_type: str,
    min_8bit_size: int,
    world: int | None = None,
    others: str = "same",
    target_options: Mapping[str, Any] | None = None,
) -> int:
    """Bytes optimizer `optim` allocates for these trainable tensors (what `optimizer_state_bytes` measures); with
    `world`, on the largest rank of FSDP2 over `world` processes (module docstring). A GaLore optimizer trains the
    tensors that are not targets with the rule `others` names (`GaLoreConfig.others`; frozen: none).
    `target_options` are the family member's `expected_state_bytes` keywords (`GaLoreRule.state_options`)."""
    target_options = dict(target_options or {})
    if world is not None:
        return _sharded_state_bytes(
            tensors,
            optim,
            rank=rank,
            proj_type=proj_type,
            min_8bit_size=min_8bit_size,
            world=world,
            others=others,
            target_options=target_options,
        )
    if optim in GALORE_OPTIMIZERS:
        rule = inner_rule(GALORE_OPTIMIZERS[optim].form, min_8bit_size=min_8bit_size)
        other_rule = others_rule(GALORE_OPTIMIZERS[optim].form, others, min_8bit_size=min_8bit_size)
        return sum(
            count
            * expected_state_bytes(
                tensor.shape, form=rule, dtype=tensor.dtype, rank=rank, proj_type=proj_type, **target_options
            )
            if tensor.target
            else count * (0 if other_rule is None else other_rule.state_bytes(tensor.shape, tensor.dtype))
            for tensor, count in tensors.items()
        )
    rule, extra = _plain_rule(optim)
    total = sum(count * (rule.state_bytes(t.shape, t.dtype) + extra) for t, count in tensors.items())
    return total + _qmap_bytes(tensors, optim)


def _plain_rule(optim: str) -> tuple[Any, int]:
    """The inner rule that counts a plain optimizer's state, and its extra bytes per tensor."""
    kind = PLAIN_OPTIMIZERS[optim]
    if kind == "torch_adamw":
        return inner_rule("adamw"), _TORCH_STEP_BYTES
    if kind == "bnb_adamw8bit":  # transformers' adamw_bnb_8bit keeps bitsandbytes' default min_8bit_size
        return inner_rule("adamw8bit", min_8bit_size=MIN_8BIT_SIZE), 0
    return inner_rule("adafactor"), _ADAFACTOR_RMS_BYTES


def _qmap_bytes(tensors: Mapping[TensorKind, int], optim: str) -> int:
    eight_bit = PLAIN_OPTIMIZERS.get(optim) == "bnb_adamw8bit"
    return _BNB_QMAP_BYTES if eight_bit and any(math.prod(t.shape) >= MIN_8BIT_SIZE for t in tensors) else 0


def _sharded_state_bytes(
    tensors: Mapping[TensorKind, int],
    optim: str,
    *,
    rank: int | None,
    proj_type: str,
    min_8bit_size: int,
    world: int,
    others: str = "same",
    target_options: Mapping[str, Any],
) -> int:
    """`state_bytes` on the largest rank: each rule's state for the rank's ⌈m/W⌉ rows (8-bit or not by the whole
    tensor's size, as `init_state` decides with a shard), GaLore targets projected from the right with ⌈r/W⌉ rows
    of their r×n basis (`sharding.shard_whole_like`). Plain optimizers are counted the same way, as torch's AdamW
    keeps DTensor moments."""
    galore = optim in GALORE_OPTIMIZERS
    rule, extra = (
        (inner_rule(GALORE_OPTIMIZERS[optim].form, min_8bit_size=min_8bit_size), 0) if galore else _plain_rule(optim)
    )
    other_rule = others_rule(GALORE_OPTIMIZERS[optim].form, others, min_8bit_size=min_8bit_size) if galore else None
    total = 0
    for tensor, count in tensors.items():
        local, shard = tensor.local_shape(world), RowShard(offset=0, global_rows=tensor.shape[0])
        if galore and tensor.target:
            try:
                resolve_proj_type(proj_type, tensor.shape, row_sharded=True)
            except ValueError as err:
                raise ValueError(f"the {tensor.shape[0]}x{tensor.shape[1]} targets: {err}") from None
            r = effective_rank(tensor.shape, rank)
            stored = target_options.get("stored_basis", True)  # ⌈r/W⌉ of the basis' r rows, if it keeps one
            basis = shard_rows(r, world) * tensor.shape[1] * tensor.dtype.itemsize * stored
            limiter = LIMITER_BYTES if target_options.get("limiter") else 0
            inner = rule.state_bytes((local[0], r), tensor.dtype, shard) + basis + limiter
        elif galore:
            inner = 0 if other_rule is None else other_rule.state_bytes(local, tensor.dtype, shard)
        else:
            inner = rule.state_bytes(local, tensor.dtype, shard) + extra
        total += count * inner
    return total + (0 if galore else _qmap_bytes(tensors, optim))


def refresh_workspace(
    tensors: Mapping[TensorKind, int], config: GaLoreConfig, rank: int, world: int | None = None
) -> int:
    """Bytes alive during the largest target's basis refresh (one refresh runs at a time), float32 unless said.

    exact: `svd(G.float())` holds a float32 G (m×n; torch copies it for LAPACK even when G is float32), U (m×k), S (k)
    and Vᵀ (k×n), k = min(m, n). randomized: G.float() (a copy only when G is not float32), the sketch and its QR
    (2·m·l), the Gaussian test matrix, Gᵀ·Q and Qᵀ·G (3·n·l) and the small SVD (l×l), l = min(rank + oversample, m, n).
    The solvers' own scratch is not counted. APOLLO's random projection (`proj='random'`) has no refresh to speak
    of; the figure is what its step holds: the float32 copy of G it scales (the rank's rows) and the drawn P.

    With `world` (FSDP2, the largest rank): exact gathers the m×n gradient (padded to W·⌈m/W⌉ rows) and runs the
    same SVD; randomized holds the rank's m_i = ⌈m/W⌉ rows as float32 (a copy unless float32), the test matrix's
    blocks those rows touch (at most ⌈m_i/1024⌉·1024 rows, `projector.gaussian_rows`), B_i = G_i·Q (m_i×l) and
    its float64 copy, three n×l sketches and the l×l float64 Gram matrix (`randomized_right_basis`): nothing grows
    with W. Between refreshes a step holds one gathered basis (W·⌈r/W⌉×n in the weights' dtype); the larger of the
    two is the workspace.
    """
    sizes = [0]
    for tensor in tensors:
        if not tensor.target:
            continue
        m, n = tensor.shape
        if getattr(config, "proj", None) == "random":
            sizes.append(4 * ((m if world is None else shard_rows(m, world)) * n + min(rank, m, n) * max(m, n)))
        elif world is not None:
            local = shard_rows(m, world)
            gathered_basis = world * shard_rows(effective_rank(tensor.shape, rank), world) * n * tensor.dtype.itemsize
            if config.refresh_method == "exact":
                k = min(m, n)
                sizes.append(4 * (world * local * n + m * k + k + k * n))
            else:
                sketch = min(rank + config.oversample, m, n)
                copy = 0 if tensor.dtype == torch.float32 else local * n
                drawn = min(m, -(-local // GAUSSIAN_BLOCK_ROWS) * GAUSSIAN_BLOCK_ROWS)
                floats = copy + drawn * sketch + local * sketch + 3 * n * sketch
                sizes.append(4 * floats + 8 * (local * sketch + sketch * sketch))
            sizes.append(gathered_basis)
        elif config.refresh_method == "exact":
            k = min(m, n)
            sizes.append(4 * (m * n + m * k + k + k * n))
        else:
            sketch = min(rank + config.oversample, m, n)
            copy = 0 if tensor.dtype == torch.float32 else m * n
            sizes.append(4 * (copy + 2 * m * sketch + 3 * n * sketch + sketch * sketch))
    return max(sizes)


def refresh_communication(tensors: Mapping[TensorKind, int], config: GaLoreConfig, rank: int, world: int) -> int:
    """Bytes each rank exchanges (all-reduce sizes, all-gather results) when every GaLore target refreshes its basis
    under FSDP2 over `world` processes (0 for one): randomized, (1 + power_iters) all-reduces of n×k float32, one of
    k×k float64 and one of n×r float32 (k = min(rank + oversample, m, n), r = min(rank, m, n)), whatever `world`;
    exact, the m×n float32 all-gather. APOLLO's random projection: none (every rank draws the same P from its seed)."""
    if world == 1 or getattr(config, "proj", None) == "random":
        return 0
    total = 0
    for tensor, count in tensors.items():
        if not tensor.target:
            continue
        m, n = tensor.shape
        if config.refresh_method == "exact":
            size = 4 * m * n
        else:
            k, r = min(rank + config.oversample, m, n), effective_rank(tensor.shape, rank)
            size = (1 + config.power_iters) * n * k * 4 + n * r * 4 + k * k * 8
        total += count * size
    return total


def step_communication(
    tensors: Mapping[TensorKind, int],
    optim: str,
    rank: int | None,
    world: int,
    target_options: Mapping[str, Any] | None = None,
) -> int:
    """Bytes each rank exchanges every step outside refreshes under FSDP2 (all-gather results, all-reduce sizes),
    beside FSDP2's own: per target its stored basis gathered (W·⌈r/W⌉×n in the weights' dtype: r·n values when W
    divides r; APOLLO's random projection is drawn, not gathered), the norm-growth limiter's float (Fira, APOLLO),
    for Adafactor its column statistic and two scalars (4·(r + 2)); and one float per trainable tensor, the step's
    finite check. `target_options` as `state_bytes` takes them. None of it for plain optimizers or one process."""
    if world == 1 or optim not in GALORE_OPTIMIZERS:
        return 0
    options = target_options or {}
    adafactor = GALORE_OPTIMIZERS[optim].form == "adafactor"
    total = 0
    for tensor, count in tensors.items():
        per_tensor = 4  # the finite flag
        if tensor.target:
            r = effective_rank(tensor.shape, rank)
            if options.get("stored_basis", True):
                per_tensor += world * shard_rows(r, world) * tensor.shape[1] * tensor.dtype.itemsize
            per_tensor += 4 * (r + 2) if adafactor else 0
            per_tensor += 4 if options.get("limiter") else 0
        total += count * per_tensor
    return total


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
