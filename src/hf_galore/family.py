"""The outer rules of the low-rank family: what a target weight's projection is and how its update is applied.

`GaLoreOptimizer` owns everything the members share (targets, the inner rule's moments on the projected gradient,
the refresh schedule, non-finite skips, resume checks, FSDP2 rows, layer-wise hooks); an outer rule owns three
things only, called from the step:

* `bases`: the current projection of a target (read from state, or regenerated);
* `new_bases` / `keep_bases`: what a refresh computes and what of it is stored;
* `apply`: turn the inner rule's update D of the projected gradient R into the weight's update.

GaLore (Zhao et al., 2024) projects D back (plus Fira's residual with `residual='fira'`); APOLLO (Zhu et al.,
2025) scales the full gradient by how much the inner rule rescaled R, per channel or per tensor. A third member is
one more class here with these methods, a config dataclass for its keys, and an optimizer class that names it
(`outer = ...`; see docs/family.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .config import (
    APOLLO_GROUP_DEFAULTS,
    GROUP_DEFAULTS,
    ApolloConfig,
    GaLoreConfig,
    validate_apollo_options,
    validate_galore_options,
)
from .projector import add_projected_back_, effective_rank, projection_sides
from .residual import fira_residual
from .scaling import no_norm, norm_scaled
from .sharding import RowShard
from .state_keys import LAYOUT_KEYS, LEFT_BASIS, LIMITER_NORM, PROJ_DRAW, PROJ_SEED, RESIDUAL_NORM, RIGHT_BASIS

if TYPE_CHECKING:
    from .core import GaLoreOptimizer

Bases = tuple[Tensor | None, Tensor | None]


class GaLoreRule:
    """GaLore: the top-r singular basis of the gradient, stored and refreshed every T steps; D projected back."""

    name = "galore"
    title = "GaLore"  # how logs and the planner name the member
    config_cls: type[GaLoreConfig] = GaLoreConfig
    group_defaults = GROUP_DEFAULTS
    layout_keys = LAYOUT_KEYS  # group keys that fix the saved state's shapes

    def validate(self, group: Mapping[str, Any]) -> dict[str, Any]:
        """Raise for a bad option; return the numeric ones as plain Python numbers."""
        return validate_galore_options(group)

    def stores_bases(self, group: dict[str, Any]) -> bool:
        return True

    def state_options(self, config: GaLoreConfig) -> dict[str, Any]:
        """`expected_state_bytes` keywords for a target of this rule with `config` (beyond rank and proj_type)."""
        return {"limiter": config.residual == "fira"}

    def bases(
        self, state: dict[str, Any], shape: tuple[int, int], group: dict[str, Any], proj_type: str, like: Tensor
    ) -> Bases:
        return state.get(LEFT_BASIS), state.get(RIGHT_BASIS)

    def new_bases(
        self,
        optimizer: GaLoreOptimizer,
        param: Tensor,
        grad: Tensor,
        state: dict[str, Any],
        group: dict[str, Any],
        proj_type: str,
        shard: RowShard | None,
        clock: int,
    ) -> tuple[Bases, str | None]:
        return optimizer._new_bases(grad, group, proj_type, shard, seed=clock)

    def keep_bases(self, state: dict[str, Any], bases: Bases) -> None:
        for key, basis in zip((LEFT_BASIS, RIGHT_BASIS), bases):
            if basis is not None:
                state[key] = basis

    def apply(
        self,
        weight: Tensor,
        grad: Tensor,
        low_rank_grad: Tensor,
        delta: Tensor,
        step_size: float,
        state: dict[str, Any],
        group: dict[str, Any],
        bases: Bases,
        shard: RowShard | None,
    ) -> None:
        """W −= α·back(D), plus α·η·S with Fira's residual S (η = `step_size`, the lr with the bias correction)."""
        left, right = bases
        if group["residual"] == "fira":
            previous = state.setdefault(RESIDUAL_NORM, no_norm(weight))
            if step_size > 0:  # lr 0 (a warm-up's first step, a checkpoint's template step) moves nothing
                residual, state[RESIDUAL_NORM] = fira_residual(
                    grad, low_rank_grad, delta, step_size, left, right, previous, shard
                )
                weight.add_(residual, alpha=-group["scale"] * step_size)
        add_projected_back_(weight, delta, left, right, alpha=-group["scale"])


class ApolloRule(GaLoreRule):
    """APOLLO: a random projection P (N(0, 1/r) entries) regenerated from a per-parameter seed and a draw counter
    (plain ints in state), redrawn every `update_proj_gap` steps; the full gradient scaled by ‖U‖/‖R‖ per channel
    (or per tensor) with U the inner rule's raw direction for R = P·G, limited in norm growth (`hf_galore.scaling`,
    shared with Fira). `proj='svd'` takes GaLore's stored basis instead of P, the rest unchanged.

    Under FSDP2 (rows sharded, projected from the right: R = G·Pᵀ is m_i×r) every rank draws the same r×n P from the
    seed, the channel factors are per row and local, and the tensor-wise norms and the limiter's norm take one
    all-reduced float each: nothing is gathered.
    """

    name = "apollo"
    title = "APOLLO"
    config_cls = ApolloConfig
    group_defaults = APOLLO_GROUP_DEFAULTS
    layout_keys = (*LAYOUT_KEYS, "proj")  # svd stores bases, random does not

    def validate(self, group: Mapping[str, Any]) -> dict[str, Any]:
        return validate_apollo_options(group)

    def stores_bases(self, group: dict[str, Any]) -> bool:
        return group["proj"] == "svd"

    def state_options(self, config: GaLoreConfig) -> dict[str, Any]:
        # a GaLoreConfig here: the planner's apollo rows beside a galore_* run take APOLLO's default projection
        return {"stored_basis": getattr(config, "proj", "random") == "svd", "limiter": True}

    def bases(
        self, state: dict[str, Any], shape: tuple[int, int], group: dict[str, Any], proj_type: str, like: Tensor
    ) -> Bases:
        if self.stores_bases(group):
            return super().bases(state, shape, group, proj_type, like)
        return random_bases(shape, group["rank"], proj_type, seed=state[PROJ_SEED], draw=state[PROJ_DRAW], like=like)

    def new_bases(
        self,
        optimizer: GaLoreOptimizer,
        param: Tensor,
        grad: Tensor,
        state: dict[str, Any],
        group: dict[str, Any],
        proj_type: str,
        shard: RowShard | None,
        clock: int,
    ) -> tuple[Bases, str | None]:
        if self.stores_bases(group):
            return super().new_bases(optimizer, param, grad, state, group, proj_type, shard, clock)
        state.setdefault(PROJ_SEED, optimizer.param_seed(param))
        state[PROJ_DRAW] = state.get(PROJ_DRAW, -1) + 1
        return (None, None), None  # nothing to store: `bases` regenerates the draw

    def apply(
        self,
        weight: Tensor,
        grad: Tensor,
        low_rank_grad: Tensor,
        delta: Tensor,
        step_size: float,
        state: dict[str, Any],
        group: dict[str, Any],
        bases: Bases,
        shard: RowShard | None,
    ) -> None:
        """W −= α·η·limited(G·diag(s)), s_j = ‖U[:, j]‖/‖R[:, j]‖ along the projected side (one s: tensor-wise)."""
        previous = state.setdefault(LIMITER_NORM, no_norm(weight))
        if step_size <= 0:  # lr 0 (a warm-up's first step, a checkpoint's template step) moves nothing
            return
        left, _ = bases
        dims = [0, 1] if group["scale_type"] == "tensor" else [0 if left is not None else 1]
        raw_direction = delta.float() / step_size
        scaled, state[LIMITER_NORM] = norm_scaled(
            grad.to(torch.float32, copy=True), low_rank_grad, raw_direction, dims, previous, shard
        )
        weight.add_(scaled.to(weight.dtype), alpha=-group["scale"] * step_size)


def random_bases(shape: tuple[int, int], rank: int, proj_type: str, *, seed: int, draw: int, like: Tensor) -> Bases:
    """APOLLO's projection for draw `draw` of `seed`: Pᵀ (m×r) on the left or P (r×n) on the right, entries
    N(0, 1/r), in `like`'s dtype and device. The same (seed, draw) gives the same P on every rank of one device type
    (CPU and CUDA generators draw differently); drawn in float32 from a generator of its own, leaving the global RNG
    (dropout, data order) untouched."""
    left, right = projection_sides(shape, proj_type)
    r = effective_rank(shape, rank)
    generator = torch.Generator(device=like.device).manual_seed(seed * 2**32 + draw)
    size = (shape[0], r) if left else (r, shape[1])
    basis = torch.randn(size, generator=generator, device=like.device, dtype=torch.float32).div_(math.sqrt(r))
    basis = basis.to(like.dtype)
    return (basis, None) if left else (None, basis)


GALORE = GaLoreRule()
APOLLO = ApolloRule()
