"""Names of the entries GaLore keeps in optimizer state and param groups, and which of them a resume may change."""

from __future__ import annotations

from typing import Any

STEP = "step"
LEFT_BASIS = "left_basis"
RIGHT_BASIS = "right_basis"
NEXT_REFRESH = "next_refresh"  # plain int, in the refresh clock's units
REFRESH_INTERVAL = "refresh_interval"  # plain int: the interval that scheduled NEXT_REFRESH
RESIDUAL_NORM = "residual_norm"  # 0-d tensor: the Fira residual's norm last step (its norm-growth limiter)
PROJ_SEED = "proj_seed"  # plain int: APOLLO's per-parameter seed of its random projections
PROJ_DRAW = "proj_draw"  # plain int: which draw of that seed the projection is (one more per refresh)
LIMITER_NORM = "limiter_norm"  # 0-d tensor: APOLLO's scaled gradient's norm last step (its norm-growth limiter)
# Counters and scalars that may come or go with a setting that can change on resume: not part of the layout check.
SCHEDULE_KEYS = (STEP, NEXT_REFRESH, REFRESH_INTERVAL, RESIDUAL_NORM, PROJ_SEED, PROJ_DRAW, LIMITER_NORM)
# Checkpoints only, plain int: over how many row shards (FSDP2 ranks) the block constants were computed (1 unsharded).
QUANTIZED_SHARDS = "quantized_shards"
# On resume the checkpoint provides these group keys (the LR scheduler's); the settings given now provide the rest.
CHECKPOINT_GROUP_KEYS = ("lr", "initial_lr")
# Group keys that fix the layout of the saved state: they cannot change on resume without starting afresh.
LAYOUT_KEYS = ("rank", "proj_type")


FROZEN = "frozen"  # a plain group's `inner` value: its parameters are frozen (requires_grad=False), no state


def is_galore_group(group: dict[str, Any]) -> bool:
    return group.get("rank") is not None


def is_frozen_group(group: dict[str, Any]) -> bool:
    """A plain group whose parameters `others=frozen` froze: not trained, no state."""
    return group.get("inner") == FROZEN
