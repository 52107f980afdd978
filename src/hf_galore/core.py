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

from .config import GROUP_DEFAULTS, validate_galore_options
from .inner import InnerUpdate
from .projector import (
    compute_bases,
    effective_rank,
    identity_bases,
    is_refresh_step,
    project,
    project_back,
    subspace_overlap,
)

STEP = "step"
LEFT_BASIS = "left_basis"
RIGHT_BASIS = "right_basis"


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


class GaLoreOptimizer(torch.optim.Optimizer):
    """Gradient Low-Rank Projection around a pluggable inner update rule (Zhao et al., 2024, Algorithm 1)."""

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], *, inner: InnerUpdate) -> None:
        self.inner = inner
        self._refresh_stats = RefreshStats()
        super().__init__(params, defaults)

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "inner": self.inner, "_refresh_stats": self._refresh_stats}

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
        validate_galore_options(group["rank"], group["update_proj_gap"], group["scale"], group["proj_type"])
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
            if is_refresh_step(step, group["update_proj_gap"]) or not (LEFT_BASIS in state or RIGHT_BASIS in state):
                self._refresh_bases(grad, state, group)
            grad = project(grad, state.get(LEFT_BASIS), state.get(RIGHT_BASIS))
        step += 1
        state[STEP] = step
        lr = self.inner.learning_rate(group, step, param)
        delta = self.inner.update(grad, state, group, step, lr)
        if group["weight_decay"] != 0:
            param.mul_(1.0 - lr * group["weight_decay"])
        if galore:
            param.add_(project_back(delta, state.get(LEFT_BASIS), state.get(RIGHT_BASIS)), alpha=-group["scale"])
        else:
            param.sub_(delta)

    def _refresh_bases(self, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        """Recompute the bases from `grad`; keep the old ones (or fall back to coordinate axes) if that fails."""
        old = (state.get(LEFT_BASIS), state.get(RIGHT_BASIS))
        has_old = old != (None, None)
        start = time.perf_counter()
        problem = None
        if not bool(torch.isfinite(grad).all()):
            problem = "the gradient has non-finite values"
        else:
            try:
                bases = compute_bases(grad, group["rank"], group["proj_type"])
                if not all(bool(torch.isfinite(b).all()) for b in bases if b is not None):
                    problem = "the SVD returned non-finite values"
            except torch.linalg.LinAlgError as err:
                problem = f"the SVD failed ({err})"
        if problem is not None:
            action = "keeping the previous basis" if has_old else "starting from coordinate axes"
            warnings.warn(
                f"GaLore basis refresh skipped for a weight shaped {tuple(grad.shape)}: {problem}; {action}.",
                stacklevel=4,
            )
            if has_old:
                return
            bases = identity_bases(tuple(grad.shape), group["rank"], group["proj_type"], like=grad)
        self._record_refresh(old, bases, time.perf_counter() - start)
        for key, basis in zip((LEFT_BASIS, RIGHT_BASIS), bases):
            if basis is not None:
                state[key] = basis

    def _record_refresh(self, old: tuple[Tensor | None, ...], new: tuple[Tensor | None, ...], seconds: float) -> None:
        stats = self._refresh_stats
        stats.count += 1
        stats.seconds += seconds
        for side, old_basis, new_basis in zip(("left", "right"), old, new):
            if old_basis is not None and new_basis is not None:
                overlap = subspace_overlap(old_basis, new_basis, side)
                if math.isfinite(overlap):
                    stats.overlap_sum += overlap
                    stats.overlap_count += 1

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
