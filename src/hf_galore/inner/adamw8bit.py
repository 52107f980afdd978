"""Adam with 8-bit block-wise quantized moments, through bitsandbytes' own update kernels (CPU and CUDA)."""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from ..sharding import RowShard
from .adamw import EXP_AVG, EXP_AVG_SQ, adam_bias_correction, validate_adam_group
from .base import layout_bytes

EXP_AVG_ABSMAX = "exp_avg_absmax"
EXP_AVG_SQ_ABSMAX = "exp_avg_sq_absmax"
BLOCKSIZE = 256  # bitsandbytes' block-wise optimizer kernels quantize in blocks of 256 values
MIN_8BIT_SIZE = 4096  # bitsandbytes' default: tensors with fewer entries keep 32-bit moments

_QMAPS: dict[tuple[bool, torch.device], Tensor] = {}


def _qmap(signed: bool, device: torch.device) -> Tensor:
    """bitsandbytes' dynamic quantization map: a constant, so it is cached here rather than kept in state."""
    key = (signed, device)
    if key not in _QMAPS:
        import bitsandbytes.functional as bnbf

        _QMAPS[key] = bnbf.create_dynamic_map(signed=signed).to(device)
    return _QMAPS[key]


def quantized_blocks(numel: int) -> int:
    """How many block constants (absmax values) one 8-bit moment of `numel` entries carries."""
    return -(-numel // BLOCKSIZE)


class AdamW8bitUpdate:
    """bitsandbytes AdamW8bit's rule: 8-bit moments for tensors of at least `min_8bit_size` entries, else 32-bit.

    bitsandbytes updates a parameter in place; to get the subspace delta it updates a zero buffer of the
    projected shape with weight decay off (the core applies decoupled decay to the full weight).
    """

    form = "adamw8bit"  # the name `inner_rule` builds it by

    # The 8-bit moments have the gradient's shape and shard with its rows; the block constants are per rank (blocks
    # of the local rows): checkpoints save them by row (see `hf_galore.sharding.blocks_by_row`); loaded over another
    # split of the rows, the moments are requantized in the new blocks (`requantize`).
    row_wise_state = frozenset({EXP_AVG, EXP_AVG_SQ})
    block_wise_state = MappingProxyType({EXP_AVG_ABSMAX: EXP_AVG, EXP_AVG_SQ_ABSMAX: EXP_AVG_SQ})  # constant -> moment
    blocksize = BLOCKSIZE

    def __init__(self, min_8bit_size: int = MIN_8BIT_SIZE) -> None:
        if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 0:
            raise ValueError(f"Invalid {min_8bit_size=}. Must be an int >= 0.")
        self.min_8bit_size = min_8bit_size

    def validate_group(self, group: dict[str, Any]) -> None:
        validate_adam_group(group)
        if group.get("amsgrad", False):
            raise ValueError("GaLoreAdamW8bit does not support amsgrad=True.")

    def learning_rate(self, group: dict[str, Any], step: int, param: Tensor, shard: RowShard | None = None) -> float:
        return group["lr"]

    def bias_correction(self, group: dict[str, Any], step: int) -> float:
        return adam_bias_correction(group, step)

    def state_bytes(self, shape: tuple[int, ...], dtype: torch.dtype, shard: RowShard | None = None) -> int:
        """Two uint8 moments and their float32 block constants, or two float32 moments below `min_8bit_size`."""
        return layout_bytes(self, shape, dtype, group={}, shard=shard)

    def requantize(self, moment_key: str, codes: Tensor, scales: Tensor) -> tuple[Tensor, Tensor]:
        """An 8-bit moment dequantized with each value's old block constant (`scales`, codes' shape) and quantized
        again in blocks of `codes` itself, as bitsandbytes quantizes: (codes, block constants). One extra
        quantization: in the same blocks the codes come back and a constant shrinks by at most one step of the map's
        top (0.7%, where a block's largest value is negative: the signed map ends at -0.993 and 1.0)."""
        import bitsandbytes.functional as bnbf

        if codes.numel() == 0:  # an empty row shard
            return codes, scales.new_zeros(0)
        qmap = _qmap(moment_key == EXP_AVG, codes.device)  # the first moment is signed, the second is not
        values = (qmap[codes.long()] * scales).contiguous()
        quantized, quant_state = bnbf.quantize_blockwise(values, code=qmap, blocksize=BLOCKSIZE)
        return quantized, quant_state.absmax.float()

    def init_state(
        self, grad: Tensor, state: dict[str, Any], group: dict[str, Any], shard: RowShard | None = None
    ) -> None:
        # 8-bit or not by the whole tensor's size, so every rank of a row-sharded one keeps the same kind of state
        numel = grad.numel() if shard is None else shard.global_rows * math.prod(grad.shape[1:])
        if numel < self.min_8bit_size:
            state[EXP_AVG] = torch.zeros_like(grad, dtype=torch.float32)
            state[EXP_AVG_SQ] = torch.zeros_like(grad, dtype=torch.float32)
            return
        state[EXP_AVG] = torch.zeros_like(grad, dtype=torch.uint8)
        state[EXP_AVG_SQ] = torch.zeros_like(grad, dtype=torch.uint8)
        blocks = quantized_blocks(grad.numel())
        state[EXP_AVG_ABSMAX] = torch.zeros(blocks, dtype=torch.float32, device=grad.device)
        state[EXP_AVG_SQ_ABSMAX] = torch.zeros(blocks, dtype=torch.float32, device=grad.device)

    def update(
        self,
        grad: Tensor,
        state: dict[str, Any],
        group: dict[str, Any],
        step: int,
        lr: float,
        shard: RowShard | None = None,
    ) -> Tensor:
        import bitsandbytes.functional as bnbf

        if EXP_AVG not in state:
            self.init_state(grad, state, group, shard)
        beta1, beta2 = group["betas"]
        grad = grad.contiguous()
        buffer = torch.zeros_like(grad, dtype=torch.float32)
        common = {"g": grad, "p": buffer, "beta1": beta1, "beta2": beta2, "eps": group["eps"], "step": step}
        if state[EXP_AVG].dtype == torch.uint8:
            bnbf.optimizer_update_8bit_blockwise(
                optimizer_name="adam",
                state1=state[EXP_AVG],
                state2=state[EXP_AVG_SQ],
                beta3=0.0,
                alpha=0.0,
                lr=lr,
                qmap1=_qmap(True, grad.device),
                qmap2=_qmap(False, grad.device),
                absmax1=state[EXP_AVG_ABSMAX],
                absmax2=state[EXP_AVG_SQ_ABSMAX],
                weight_decay=0.0,
                **common,
            )
        else:
            bnbf.optimizer_update_32bit(
                optimizer_name="adam",
                state1=state[EXP_AVG],
                state2=state[EXP_AVG_SQ],
                lr=lr,
                weight_decay=0.0,
                **common,
            )
        return buffer.neg_().to(grad.dtype)
