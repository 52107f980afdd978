"""The one GaLore optimizer loop: project, run the inner update in the subspace, project back, apply.

`step()` only loops; the maths lives in `projector` (projection) and `inner` (the update rule). Param groups
that carry `rank` get GaLore; the others get the inner rule on the full gradient, exactly like the plain optimizer.
Optimizer state holds tensors and plain values only, so `torch.load(weights_only=True)` reads a checkpoint.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .config import GROUP_DEFAULTS, GaLoreConfig, validate_galore_options
from .inner import InnerUpdate
from .projector import (
    add_projected_back_,
    compute_bases,
    effective_rank,
    identity_bases,
    project,
    stagger_offsets,
    subspace_overlap,
)

STEP = "step"
LEFT_BASIS = "left_basis"
RIGHT_BASIS = "right_basis"
NEXT_REFRESH = "next_refresh"  # plain int, in the refresh clock's units
REFRESH_INTERVAL = "refresh_interval"  # plain int: the interval that scheduled NEXT_REFRESH
LAZY_MAX_FACTOR = 8


@dataclass
class RefreshStats:
    """What basis refreshes cost and how far the subspace moved, since the last `pop_refresh_stats()`."""

    count: int = 0
    seconds: float = 0.0
    overlap_sum: float = 0.0
    overlap_count: int = 0

    @property
    def mean_overlap(self) -> float | None:
        return self.overlap_sum / self.overlap_count if self.overlap_count else None


def is_galore_group(group: dict[str, Any]) -> bool:
    return group.get("rank") is not None


def split_galore_groups(
    params: Iterable[Any], galore_params: Iterable[Tensor], config: GaLoreConfig
) -> list[dict[str, Any]]:
    """Split each param group in two: its `galore_params` with `config`'s keys, and the rest as they were.

    This keeps whatever grouping the caller made (the Trainer's weight-decay split, say) and adds GaLore to it.
    """
    groups = list(params)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    chosen = {id(p) for p in galore_params}
    found: set[int] = set()
    split: list[dict[str, Any]] = []
    for group in groups:
        members = list(group["params"]) if not isinstance(group["params"], Tensor) else [group["params"]]
        galore = [p for p in members if id(p) in chosen]
        found.update(id(p) for p in galore)
        rest = [p for p in members if id(p) not in chosen]
        if rest:
            split.append({**group, "params": rest})
        if galore:
            split.append({**group, "params": galore, **config.group_options()})
    if len(found) != len(chosen):
        raise ValueError(
            f"Invalid galore_params: {len(chosen) - len(found)} of {len(chosen)} tensors are not among the "
            "optimizer's params; pass the parameters being optimized."
        )
    return split


def accelerate_sync_gradients() -> bool:
    """True on the micro-batch whose backward completes the accumulated gradient (always, without accumulation).

    accelerate's GradientState is shared process-wide and defaults to True when nothing set it up.
    """
    from accelerate.state import GradientState

    return GradientState().sync_gradients


class GaLoreOptimizer(torch.optim.Optimizer):
    """Gradient Low-Rank Projection around a pluggable inner update rule (Zhao et al., 2024, Algorithm 1).

    `galore_params` + `galore_config` give GaLore to those tensors whatever groups `params` holds (otherwise,
    groups opt in with a `rank` key). `layerwise=True` updates each parameter from its post-accumulate-grad
    hook as soon as its gradient is complete, on the micro-batch `should_step()` approves (the accumulation
    boundary), and frees the gradient, so at most one full gradient is alive at a time.
    """

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        *,
        inner: InnerUpdate,
        galore_params: Iterable[Tensor] | None = None,
        galore_config: GaLoreConfig | None = None,
        layerwise: bool = False,
        should_step: Callable[[], bool] = accelerate_sync_gradients,
    ) -> None:
        self.inner = inner
        self._refresh_stats = RefreshStats()
        self._refresh_clock: int | None = None
        self.layerwise = layerwise
        self.last_grad_norm: float | None = None
        self._layerwise_sq_norm: Tensor | float = 0.0
        if galore_params is not None:
            params = split_galore_groups(params, galore_params, galore_config or GaLoreConfig())
        elif galore_config is not None:
            raise ValueError("Invalid galore_config without galore_params: say which tensors get GaLore.")
        super().__init__(params, defaults)
        if layerwise:
            self._register_layerwise_hooks(should_step)

    def __getstate__(self) -> dict[str, Any]:
        # Hook handles belong to the original parameters; a copy (deepcopy, pickle) starts without hooks.
        return {**super().__getstate__(), **{k: v for k, v in self.__dict__.items() if k != "_layerwise_hooks"}}

    def set_refresh_clock(self, step: int | None) -> None:
        """Schedule refreshes by this step count (the Trainer's global step) instead of each tensor's own count.

        They differ when updates are skipped (fp16 overflow, a parameter without gradient), so a run resumed from
        a checkpoint or trained with accumulation keeps the refresh schedule the step counter promises.
        """
        self._refresh_clock = step

    def _register_layerwise_hooks(self, should_step: Callable[[], bool]) -> None:
        # Group by index, looked up when the hook runs: load_state_dict (accelerate's prepare does one) replaces
        # the group dicts, and the LR scheduler writes the new ones.
        group_index = {param: i for i, group in enumerate(self.param_groups) for param in group["params"]}

        def update_now(param: Tensor) -> None:
            if param.grad is None or not should_step():
                return
            with torch.no_grad():
                self._layerwise_sq_norm = self._layerwise_sq_norm + param.grad.float().square().sum()
                self._update_parameter(param, self.param_groups[group_index[param]])
            param.grad = None

        self._layerwise_hooks = [
            param.register_post_accumulate_grad_hook(update_now) for param in group_index if param.requires_grad
        ]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            self._validate_group(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise

    def _validate_group(self, group: dict[str, Any]) -> None:
        lr = group["lr"]
        if lr is not None and not lr >= 0.0:
            raise ValueError(f"Invalid {lr=}. Must be >= 0.0.")
        weight_decay = group["weight_decay"]
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid {weight_decay=}. Must be >= 0.0.")
        self.inner.validate_group(group)
        if not is_galore_group(group):
            return
        for key, default in GROUP_DEFAULTS.items():
            group.setdefault(key, default)
        validate_galore_options(group)
        for param in group["params"]:
            if param.dim() != 2:
                raise ValueError(
                    f"Invalid GaLore parameter of shape {tuple(param.shape)}: `rank` applies to 2-D weights only; "
                    "put 1-D and N-D parameters in a group without `rank`."
                )
        clipped = sorted(
            {tuple(p.shape) for p in group["params"] if effective_rank(tuple(p.shape), group["rank"]) < group["rank"]}
        )
        if clipped:
            warnings.warn(
                f"GaLore rank={group['rank']} exceeds min(m, n) of weights shaped {clipped}; "
                "their rank is clipped to min(m, n).",
                stacklevel=3,
            )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.layerwise:  # the hooks have updated (and freed) every gradient of this step by now
            self.last_grad_norm = float(torch.as_tensor(self._layerwise_sq_norm).sqrt())
            self._layerwise_sq_norm = 0.0
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update_parameter(param, group)
        return loss

    def _update_parameter(self, param: Tensor, group: dict[str, Any]) -> None:
        grad = param.grad
        if grad.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients.")
        state = self.state[param]
        step = state.get(STEP, 0)
        galore = is_galore_group(group)
        if galore:
            clock = step if self._refresh_clock is None else self._refresh_clock
            if NEXT_REFRESH not in state or clock >= state[NEXT_REFRESH]:
                self._refresh(param, state, group, clock)
            grad = project(grad, state.get(LEFT_BASIS), state.get(RIGHT_BASIS))
        step += 1
        state[STEP] = step
        lr = self.inner.learning_rate(group, step, param)
        delta = self.inner.update(grad, state, group, step, lr)
        if group["weight_decay"] != 0:
            param.mul_(1.0 - lr * group["weight_decay"])
        if galore:
            add_projected_back_(param, delta, state.get(LEFT_BASIS), state.get(RIGHT_BASIS), alpha=-group["scale"])
        else:
            param.sub_(delta)

    def _refresh(self, param: Tensor, state: dict[str, Any], group: dict[str, Any], clock: int) -> None:
        """Refresh the bases and schedule the next refresh (plain ints in state, so resume keeps the schedule).

        The interval is `update_proj_gap`; lazily (`lazy_threshold` > 0) it doubles, up to LAZY_MAX_FACTOR times
        the gap, while each new basis overlaps the old one by at least the threshold, and falls back to the gap
        when the subspace moves. With `stagger`, a target's first interval is shortened by its offset.
        """
        gap = group["update_proj_gap"]
        overlap = self._refresh_bases(param.grad, state, group, seed=clock)
        interval = gap
        if group["lazy_threshold"] > 0 and overlap is not None and overlap >= group["lazy_threshold"]:
            interval = min(2 * state.get(REFRESH_INTERVAL, gap), LAZY_MAX_FACTOR * gap)
        delay = interval
        if group["stagger"] and NEXT_REFRESH not in state:
            index = next(i for i, p in enumerate(group["params"]) if p is param)
            delay = stagger_offsets(len(group["params"]), gap)[index] or gap
        state[REFRESH_INTERVAL] = interval
        state[NEXT_REFRESH] = clock + delay

    def _refresh_bases(self, grad: Tensor, state: dict[str, Any], group: dict[str, Any], seed: int) -> float | None:
        """Recompute the bases from `grad`; keep the old ones (or fall back to coordinate axes) if that fails.

        Returns how much the new bases overlap the old ones (the smaller side's figure), None without both.
        """
        old = (state.get(LEFT_BASIS), state.get(RIGHT_BASIS))
        has_old = old != (None, None)
        start = time.perf_counter()
        problem = None
        if not bool(torch.isfinite(grad).all()):
            problem = "the gradient has non-finite values"
        else:
            try:
                bases = compute_bases(
                    grad,
                    group["rank"],
                    group["proj_type"],
                    group["refresh_method"],
                    oversample=group["oversample"],
                    power_iters=group["power_iters"],
                    seed=seed,
                )
                if not all(bool(torch.isfinite(b).all()) for b in bases if b is not None):
                    problem = "the SVD returned non-finite values"
            except torch.linalg.LinAlgError as err:
                problem = f"the SVD failed ({err})"
        if problem is not None:
            action = "keeping the previous basis" if has_old else "starting from coordinate axes"
            warnings.warn(
                f"GaLore basis refresh skipped for a weight shaped {tuple(grad.shape)}: {problem}; {action}.",
                stacklevel=5,
            )
            if has_old:
                return None
            bases = identity_bases(tuple(grad.shape), group["rank"], group["proj_type"], like=grad)
        overlaps = [
            subspace_overlap(old_basis, new_basis, side)
            for side, old_basis, new_basis in zip(("left", "right"), old, bases)
            if old_basis is not None and new_basis is not None
        ]
        overlaps = [o for o in overlaps if math.isfinite(o)]
        stats = self._refresh_stats
        stats.count += 1
        stats.seconds += time.perf_counter() - start
        stats.overlap_sum += sum(overlaps)
        stats.overlap_count += len(overlaps)
        for key, basis in zip((LEFT_BASIS, RIGHT_BASIS), bases):
            if basis is not None:
                state[key] = basis
        return min(overlaps) if overlaps else None

    def pop_refresh_stats(self) -> RefreshStats:
        """Refresh figures gathered since the last call (telemetry, not checkpointed state)."""
        stats, self._refresh_stats = self._refresh_stats, RefreshStats()
        return stats

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load, keeping every saved tensor's dtype (torch would cast 8-bit moments to the parameter's dtype)."""
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        for param_id, param in zip(saved_ids, params):
            for key, saved in state_dict["state"].get(param_id, {}).items():
                loaded = self.state[param].get(key)
                if isinstance(saved, Tensor) and isinstance(loaded, Tensor) and loaded.dtype != saved.dtype:
                    self.state[param][key] = saved.to(device=param.device)
