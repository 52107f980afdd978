"""The contract between the GaLore optimizer core and the update rule it runs in the subspace."""

from __future__ import annotations

from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from ..sharding import RowShard

InnerForm = Literal["adamw", "adamw8bit", "adafactor"]


class InnerUpdate(Protocol):
    """An optimizer's update rule, applied to a (possibly projected) gradient.

    The core owns the parameter, the projection, the step counter and decoupled weight decay; an inner update
    owns only its moment state, which has the gradient's (projected) shape, and knows how many bytes it holds.
    """

    form: InnerForm
    """The rule's name, as `hf_galore.inner.inner_rule` builds it."""

    row_wise_state: frozenset[str]
    """State keys laid out along the gradient's rows: under FSDP2 they are kept sharded like the parameter.

    A rule that quantizes its state in blocks also has `block_wise_state` (block-constant key -> the key of the
    moment it scales), `blocksize` and `requantize`: checkpoints save those constants by row
    (`hf_galore.sharding.blocks_by_row`), and a load over another split of the rows requantizes the moments.
    """

    def validate_group(self, group: dict[str, Any]) -> None:
        """Raise a `ValueError` naming any hyper-parameter of `group` this rule cannot use."""

    def init_state(
        self, grad: Tensor, state: dict[str, Any], group: dict[str, Any], shard: RowShard | None = None
    ) -> None:
        """Create this rule's zeroed moments for a gradient like `grad` (also on the meta device: the layout).

        With `shard`, `grad` is one rank's rows: choices that depend on the whole tensor (8-bit or not) use its size.
        """

    def learning_rate(self, group: dict[str, Any], step: int, param: Tensor, shard: RowShard | None = None) -> float:
        """The step size for this update (`step` counts this update, starting at 1)."""

    def bias_correction(self, group: dict[str, Any], step: int) -> float:
        """How much larger this update's direction is than the rule's raw moment ratio at `step` (Adam's
        √(1 − β2ᵗ) / (1 − β1ᵗ); 1 for rules without bias correction). Fira and APOLLO scale and limit the raw ratio and
        put this factor into the step size, as their authors' code does."""

    def update(
        self,
        grad: Tensor,
        state: dict[str, Any],
        group: dict[str, Any],
        step: int,
        lr: float,
        shard: RowShard | None = None,
    ) -> Tensor:
        """Advance the moments in `state` with `grad` and return the delta D to subtract: x ← x − D.

        With `shard`, `grad`, `param` and the moments are one rank's rows of a row-sharded tensor (FSDP2): a rule
        whose maths spans rows reduces over `shard` (see `hf_galore.sharding`).

        The core never modifies D in place, so D may be a state tensor.
        """

    def state_bytes(self, shape: tuple[int, ...], dtype: torch.dtype, shard: RowShard | None = None) -> int:
        """Bytes of the state `update` allocates for a gradient of `shape` and `dtype` (every tensor it keeps); with
        `shard`, `shape` is one rank's rows of a row-sharded tensor (as `init_state`)."""


def layout_bytes(
    rule: InnerUpdate,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    group: dict[str, Any],
    shard: RowShard | None = None,
) -> int:
    """Bytes of the state `rule.init_state` creates for a gradient of `shape` and `dtype` (one rank's rows with
    `shard`), counted on the meta device.

    Every rule's `state_bytes` is this, so the count can never drift from what the rule allocates.
    """
    layout: dict[str, Any] = {}
    rule.init_state(torch.empty(shape, dtype=dtype, device="meta"), layout, group, shard)
    return sum(t.numel() * t.element_size() for t in layout.values())
