"""The one GaLore optimizer loop: project, run the inner update in the subspace, project back, apply.

`step()` only loops; the maths lives in `projector` (projection) and `inner` (the update rule). Param groups
that carry `rank` get GaLore; the others get the inner rule on the full gradient, exactly like the plain optimizer.
Optimizer state holds tensors and plain values only, so `torch.load(weights_only=True)` reads a checkpoint.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.weak import WeakTensorKeyDictionary

from .config import GROUP_DEFAULTS, GaLoreConfig, validate_galore_options
from .inner import InnerUpdate
from .log import warn_at_caller
from .projector import (
    add_projected_back_,
    compute_bases,
    effective_rank,
    identity_bases,
    project,
    projected_shape,
    projection_sides,
    resolve_proj_type,
    subspace_overlap,
)
from .residual import fira_residual
from .schedule import schedule_after_refresh, stagger_offsets
from .sharding import (
    RowShard,
    any_rank,
    block_scales_by_value,
    blocks_by_row,
    blocks_from_rows,
    global_sum,
    local_tensor,
    row_shard,
    shard_like,
    world_size,
)

logger = logging.getLogger(__name__)

STEP = "step"
LEFT_BASIS = "left_basis"
RIGHT_BASIS = "right_basis"
NEXT_REFRESH = "next_refresh"  # plain int, in the refresh clock's units
REFRESH_INTERVAL = "refresh_interval"  # plain int: the interval that scheduled NEXT_REFRESH
RESIDUAL_NORM = "residual_norm"  # 0-d tensor: the Fira residual's norm last step (its norm-growth limiter)
# Counters and scalars that may come or go with a setting that can change on resume: not part of the layout check.
SCHEDULE_KEYS = (STEP, NEXT_REFRESH, REFRESH_INTERVAL, RESIDUAL_NORM)
# Checkpoints only, plain int: over how many row shards (FSDP2 ranks) the block constants were computed (1 unsharded).
QUANTIZED_SHARDS = "quantized_shards"
# On resume the checkpoint provides these group keys (the LR scheduler's); the settings given now provide the rest.
CHECKPOINT_GROUP_KEYS = ("lr", "initial_lr")
# Group keys that fix the layout of the saved state: they cannot change on resume without starting afresh.
LAYOUT_KEYS = ("rank", "proj_type")

# parameter -> the optimizer whose layer-wise hook is registered on it (held weakly on both sides)
_HOOK_OWNERS: WeakTensorKeyDictionary = WeakTensorKeyDictionary()


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
    if not chosen:
        raise ValueError(
            "Invalid galore_params: it holds no tensors (an empty list, or a generator already consumed, e.g. the "
            "same `model.parameters()` generator passed as `params` too). Pass a list of the 2-D weights to project, "
            "or leave galore_params out for plain groups."
        )
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


def _hook_owner(param: Tensor) -> GaLoreOptimizer | None:
    """The live optimizer whose layer-wise hook is registered on `param`, if any."""
    owner = _HOOK_OWNERS.get(param)
    return owner() if owner is not None else None


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
    boundary), and frees the gradient, so at most one full gradient is alive at a time; `remove_hooks()` ends
    that (the Trainer integration does it when training ends). `param_names` (tensor -> name) lets warnings and
    errors name the parameter.

    A parameter whose gradient holds NaN or inf is not updated at all (weights, moments, step count and refresh
    schedule untouched); one warning names it and `pop_skipped_updates()` reports it.
    """

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        *,
        inner: InnerUpdate,
        galore_params: Iterable[Tensor] | None = None,
        galore_config: GaLoreConfig | Mapping[str, Any] | None = None,
        layerwise: bool = False,
        should_step: Callable[[], bool] = accelerate_sync_gradients,
        param_names: Mapping[Tensor, str] | None = None,
    ) -> None:
        if not callable(should_step):
            raise TypeError(
                f"Invalid should_step={should_step!r}: must be a callable returning True on the micro-batch that "
                "completes the accumulated gradient (default: accelerate's GradientState().sync_gradients)."
            )
        self.inner = inner
        self._refresh_stats = RefreshStats()
        self._skipped: list[str] = []  # since the last pop_skipped_updates()
        self._skipped_this_step: list[str] = []  # for the step's one warning
        self._refresh_clock: int | None = None
        self.layerwise = layerwise
        self._should_step = should_step
        self._layerwise_hooks: list[Any] = []
        self._hooked: list[Tensor] = []  # the parameters the hooks are registered on
        self.last_grad_norm: float | None = None
        self._layerwise_sq_norm: Tensor | float = 0.0
        self._norm_shard: RowShard | None = None
        if galore_params is not None:
            params = split_galore_groups(params, galore_params, as_galore_config(galore_config))
        elif galore_config is not None:
            raise ValueError("Invalid galore_config without galore_params: say which tensors get GaLore.")
        self._names: dict[tuple[int, int], str] = {}
        super().__init__(params, defaults)
        # Kept by position in the groups: accelerate's FSDP2 prepare swaps each parameter for its sharded one there.
        by_id = {id(p): name for p, name in (param_names or {}).items()}
        self._names = {
            (g, i): by_id[id(p)]
            for g, group in enumerate(self.param_groups)
            for i, p in enumerate(group["params"])
            if id(p) in by_id
        }
        self._release_from_earlier_hooks()
        if layerwise:
            self.register_hooks()

    def __getstate__(self) -> dict[str, Any]:
        # Hook handles belong to the original parameters; a copy (deepcopy, pickle) starts without hooks.
        return {**super().__getstate__(), **self.__dict__, "_layerwise_hooks": [], "_hooked": []}

    def set_refresh_clock(self, step: int | None) -> None:
        """Schedule refreshes by this step count (the Trainer's global step) instead of each tensor's own count.

        They differ when updates are skipped (fp16 overflow, a parameter without gradient), so a run resumed from
        a checkpoint or trained with accumulation keeps the refresh schedule the step counter promises.
        """
        self._refresh_clock = step

    def restart_refresh_clock(self, step: int) -> None:
        """The clock restarts at `step` while this optimizer goes on (`train()` run again without a resume: the
        Trainer counts its global step from 0 but keeps the optimizer): keep each due refresh as many steps away."""
        if self._refresh_clock is None:
            return  # nothing scheduled by the clock yet, or a checkpoint was just loaded (its own schedule)
        shift = self._refresh_clock + 1 - step
        for state in self.state.values():
            if NEXT_REFRESH in state:
                state[NEXT_REFRESH] -= shift
        self._refresh_clock = None

    def param_name(self, param: Tensor) -> str:
        """The parameter's name where known (`param_names`, or torch's `param_names` group key), else its shape."""
        for g, group in enumerate(self.param_groups):
            for index, member in enumerate(group["params"]):
                if member is param and (g, index) in self._names:
                    return self._names[g, index]
                if member is param and "param_names" in group:
                    return group["param_names"][index]
        return f"a parameter shaped {tuple(param.shape)}"

    # ---- layer-wise hooks -------------------------------------------------------------------------------------

    @property
    def has_hooks(self) -> bool:
        return bool(self._layerwise_hooks)

    def register_hooks(self) -> None:
        """Update each parameter from its post-accumulate-grad hook (layer-wise form); calling it again does nothing.

        The hooks hold the optimizer weakly: once it is garbage, they do nothing and gradients accumulate as usual.
        """
        if not self.layerwise:
            raise RuntimeError("register_hooks() is for layer-wise optimizers (layerwise=True).")
        params = [p for group in self.param_groups for p in group["params"]]
        if self._layerwise_hooks and all(a is b for a, b in zip(self._hooked, params)):
            return
        self.remove_hooks()  # none yet, or on parameters the groups no longer hold (swapped by FSDP2's prepare)
        self._hooked = params
        self._release_from_earlier_hooks()
        # Group by index, looked up when the hook runs: load_state_dict (accelerate's prepare does one) replaces
        # the group dicts, and the LR scheduler writes the new ones.
        group_index = {param: i for i, group in enumerate(self.param_groups) for param in group["params"]}
        owner = weakref.ref(self)

        def update_now(param: Tensor) -> None:
            optimizer = owner()
            if optimizer is not None:
                optimizer._layerwise_update(param, group_index[param])

        for param in group_index:
            if param.requires_grad:
                self._layerwise_hooks.append(param.register_post_accumulate_grad_hook(update_now))
                _HOOK_OWNERS[param] = owner

    def remove_hooks(self) -> None:
        """Stop updating from backward hooks: later `backward()` calls leave `.grad` alone, as without GaLore."""
        for handle in self._layerwise_hooks:
            handle.remove()
        self._layerwise_hooks = []
        for param in self._hooked:
            if _hook_owner(param) is self:
                del _HOOK_OWNERS[param]
        self._hooked = []

    def _release_from_earlier_hooks(self) -> None:
        """Take our parameters back from another optimizer's layer-wise hooks (a run that never reached its end).

        Left in place, those hooks would update the weights and delete every gradient before this optimizer sees
        it.
        """
        owners = (_hook_owner(param) for group in self.param_groups for param in group["params"])
        earlier = {id(owner): owner for owner in owners if owner is not None and owner is not self}
        for other in earlier.values():
            other.remove_hooks()
            warn_at_caller(
                "Removed the layer-wise hooks an earlier GaLore optimizer left on these parameters (its training "
                "did not reach its end, e.g. it was interrupted); they would have consumed this optimizer's "
                "gradients. Call `optimizer.remove_hooks()` when you abandon a layer-wise optimizer."
            )

    def _layerwise_update(self, param: Tensor, group_index: int) -> None:
        if param.grad is None or not self._should_step():
            return
        with torch.no_grad():
            self._norm_shard = self._norm_shard or row_shard(param)  # sharded squares are summed over ranks in step()
            self._layerwise_sq_norm = self._layerwise_sq_norm + local_tensor(param.grad).float().square().sum()
            self._update_parameter(param, self.param_groups[group_index])
        param.grad = None

    # ---- groups -----------------------------------------------------------------------------------------------

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
                    f"Invalid GaLore parameter {self.param_name(param)} of shape {tuple(param.shape)}: `rank` applies "
                    "to 2-D weights only; put 1-D and N-D parameters in a group without `rank`."
                )
        clipped = sorted(
            {tuple(p.shape) for p in group["params"] if effective_rank(tuple(p.shape), group["rank"]) < group["rank"]}
        )
        if clipped:
            warn_at_caller(
                f"GaLore rank={group['rank']} exceeds min(m, n) of weights shaped {clipped}; "
                "their rank is clipped to min(m, n)."
            )

    # ---- the step ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.layerwise:  # the hooks have updated (and freed) every gradient of this step by now
            squares = torch.as_tensor(self._layerwise_sq_norm, dtype=torch.float32)
            self.last_grad_norm = float(global_sum(squares, self._norm_shard).sqrt())
            self._layerwise_sq_norm = 0.0
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update_parameter(param, group)
        self._warn_skipped()
        return loss

    def _update_parameter(self, param: Tensor, group: dict[str, Any]) -> None:
        """One parameter's update. Under FSDP2 (a `Shard(0)` DTensor) it works on the local rows (see `sharding`)."""
        if param.grad.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients.")
        if param.is_meta:
            raise RuntimeError(
                f"{type(self).__name__} cannot update {self.param_name(param)}: it is on the meta device (no data). "
                "Materialize the model (load its weights, or `to_empty()` and initialise) before training."
            )
        shard = row_shard(param)
        weight, grad = local_tensor(param), local_tensor(param.grad)
        state = self.state[param] if param in self.state else {}  # a skipped first update leaves no state
        step = state.get(STEP, 0)
        galore = is_galore_group(group)
        clock = step if self._refresh_clock is None else self._refresh_clock
        refresh_due = galore and (NEXT_REFRESH not in state or clock >= state[NEXT_REFRESH])
        full_grad = grad
        if galore and not refresh_due:
            # Checked in the subspace: any NaN/inf of G reaches the projection (NaN·0 is NaN), at r/min(m, n) the cost.
            grad = project(grad, state.get(LEFT_BASIS), state.get(RIGHT_BASIS))
        if not self._is_finite(grad, shard, agree=refresh_due):
            self._skip(param)
            if shard is not None and not refresh_due:
                state[STEP] = step + 1  # every rank keeps the same step count, so refreshes stay in lockstep
                self.state[param] = state
            return
        self.state[param] = state
        moments = state if shard is None else {k: local_tensor(v) for k, v in state.items()}
        if refresh_due:
            proj_type = self._proj_type(param, group, row_sharded=shard is not None)
            self._refresh(param, full_grad, state, group, clock, proj_type, shard)
            grad = project(full_grad, state.get(LEFT_BASIS), state.get(RIGHT_BASIS))
        step += 1
        state[STEP] = step
        lr = self.inner.learning_rate(group, step, weight, shard=shard)
        delta = self.inner.update(grad, moments, group, step, lr, shard=shard)
        if shard is not None:
            self._keep_sharded(param, state, moments)
        if group["weight_decay"] != 0:
            weight.mul_(1.0 - lr * group["weight_decay"])
        if not galore:
            weight.sub_(delta)
            return
        left, right = state.get(LEFT_BASIS), state.get(RIGHT_BASIS)
        if group["residual"] == "fira":
            residual, state[RESIDUAL_NORM] = fira_residual(
                full_grad, grad, delta, left, right, state.get(RESIDUAL_NORM), shard
            )
            weight.add_(residual, alpha=-group["scale"])
        add_projected_back_(weight, delta, left, right, alpha=-group["scale"])

    def _proj_type(self, param: Tensor, group: dict[str, Any], *, row_sharded: bool) -> str:
        try:
            return resolve_proj_type(group["proj_type"], tuple(param.shape), row_sharded=row_sharded)
        except ValueError as err:
            raise ValueError(f"{self.param_name(param)}: {err}") from None

    @staticmethod
    def _is_finite(grad: Tensor, shard: RowShard | None, *, agree: bool) -> bool:
        """Whether `grad` has no NaN/inf, read from its float32 sum: one pass and no full-size temporary (any NaN or
        inf makes the sum non-finite; finite gradients would need a sum beyond 3e38 to look otherwise). Sharded,
        each rank judges its own rows, except where the ranks must agree (a refresh, whose collectives every rank
        joins): then the sums are all-reduced (one float)."""
        total = grad.sum(dtype=torch.float32)
        if shard is not None and agree:
            total = global_sum(total, shard)
        return bool(torch.isfinite(total))

    def _keep_sharded(self, param: Tensor, state: dict[str, Any], moments: dict[str, Any]) -> None:
        """Store moments the rule just created: per-row ones as DTensors sharded like `param` (so distributed
        checkpoints save every rank's rows), replicated ones as they are."""
        for key in moments.keys() - state.keys():
            value = moments[key]
            state[key] = shard_like(value, param) if key in self.inner.row_wise_state else value

    def _skip(self, param: Tensor) -> None:
        self._skipped.append(self.param_name(param))
        self._skipped_this_step.append(self._skipped[-1])

    def _warn_skipped(self) -> None:
        """One warning per step for every parameter skipped in it (layer-wise: in the backward before it)."""
        names, self._skipped_this_step = self._skipped_this_step, []
        if not names:
            return
        listed = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        warn_at_caller(
            f"GaLore skipped the update of {listed}: the gradient has NaN or inf values. Weights, moments, step count "
            "and refresh schedule of each are unchanged (logged as galore/skipped_updates)."
        )

    def pop_skipped_updates(self) -> list[str]:
        """Names of the parameters whose update was skipped (non-finite gradient) since the last call."""
        skipped, self._skipped = self._skipped, []
        return skipped

    # ---- basis refresh ----------------------------------------------------------------------------------------

    def _refresh(
        self,
        param: Tensor,
        grad: Tensor,
        state: dict[str, Any],
        group: dict[str, Any],
        clock: int,
        proj_type: str,
        shard: RowShard | None,
    ) -> None:
        """Refresh the bases and schedule the next refresh (plain ints in state, so resume keeps the schedule)."""
        start = time.perf_counter()
        bases, problem = self._new_bases(grad, group, proj_type, shard, seed=clock)
        old = (state.get(LEFT_BASIS), state.get(RIGHT_BASIS))
        if problem is not None:
            action = "keeping the previous basis" if old != (None, None) else "starting from coordinate axes"
            warn_at_caller(f"GaLore basis refresh skipped for {self.param_name(param)}: {problem}; {action}.")
            if old == (None, None):
                bases = identity_bases(tuple(param.shape), group["rank"], proj_type, like=grad)
        overlap = self._record_refresh(old, bases, time.perf_counter() - start)
        for key, basis in zip((LEFT_BASIS, RIGHT_BASIS), bases):
            if basis is not None:
                state[key] = basis
        offset = None
        if group["stagger"] and NEXT_REFRESH not in state:
            index = next(i for i, p in enumerate(group["params"]) if p is param)
            offset = stagger_offsets(len(group["params"]), group["update_proj_gap"])[index]
        interval, state[NEXT_REFRESH] = schedule_after_refresh(
            clock,
            update_proj_gap=group["update_proj_gap"],
            previous_interval=state.get(REFRESH_INTERVAL),
            overlap=overlap,
            lazy_threshold=group["lazy_threshold"],
            stagger_offset=offset,
        )
        state[REFRESH_INTERVAL] = interval

    def _new_bases(
        self, grad: Tensor, group: dict[str, Any], proj_type: str, shard: RowShard | None, seed: int
    ) -> tuple[tuple[Tensor | None, Tensor | None], str | None]:
        """The bases of `grad`'s top-r subspace, or (None, None) and what went wrong (the SVD failed or is not finite).

        The gradient itself is finite here: non-finite gradients are skipped before any refresh.
        """
        try:
            bases = compute_bases(
                grad,
                group["rank"],
                proj_type,
                group["refresh_method"],
                oversample=group["oversample"],
                power_iters=group["power_iters"],
                seed=seed,
                shard=shard,
            )
        except torch.linalg.LinAlgError as err:
            return (None, None), f"the SVD failed ({err})"
        if not all(bool(torch.isfinite(b).all()) for b in bases if b is not None):
            return (None, None), "the SVD returned non-finite values"
        return bases, None

    def _record_refresh(
        self, old: tuple[Tensor | None, Tensor | None], new: tuple[Tensor | None, Tensor | None], seconds: float
    ) -> float | None:
        """Add one refresh to the stats; return how much the new bases overlap the old ones (smallest side)."""
        overlaps = [
            subspace_overlap(old_basis, new_basis, side)
            for side, old_basis, new_basis in zip(("left", "right"), old, new)
            if old_basis is not None and new_basis is not None
        ]
        overlaps = [o for o in overlaps if math.isfinite(o)]
        stats = self._refresh_stats
        stats.count += 1
        stats.seconds += seconds
        stats.overlap_sum += sum(overlaps)
        stats.overlap_count += len(overlaps)
        return min(overlaps) if overlaps else None

    def pop_refresh_stats(self) -> RefreshStats:
        """Refresh figures gathered since the last call (telemetry, not checkpointed state)."""
        stats, self._refresh_stats = self._refresh_stats, RefreshStats()
        return stats

    # ---- checkpoints ------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict, with 8-bit block constants saved by row (`hf_galore.sharding.blocks_by_row`).

        Under FSDP2 each rank quantizes its own rows, so the constants are per-rank lists; by row they shard like
        the moments (a DTensor of global shape rows × k, whatever the world size), and torch.distributed.checkpoint
        saves every rank's, where a plain tensor would be saved once, from one rank, for all. `quantized_shards`
        records over how many row shards they were computed; `load_state_dict` converts them back.
        """
        state_dict = super().state_dict()
        blockwise = getattr(self.inner, "block_wise_state", {})
        params = [p for group in self.param_groups for p in group["params"]]
        for index, param in enumerate(params):
            state = state_dict["state"].get(index)
            if not blockwise or not state or not blockwise.keys() & state.keys():
                continue
            state = state_dict["state"][index] = dict(state)  # the live state stays as it is
            for key, moment_key in blockwise.items():
                moment = local_tensor(state[moment_key])
                rows, cols = (moment.shape[0], math.prod(moment.shape[1:])) if moment.dim() else (1, 1)
                table = blocks_by_row(local_tensor(state[key]), rows, cols, self.inner.blocksize)
                state[key] = shard_like(table, param)
            state[QUANTIZED_SHARDS] = world_size(row_shard(param))
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from a checkpoint: its state, learning rate and schedule; the settings given now for the rest.

        Settings that do not change the state's layout (`update_proj_gap`, `scale`, refresh options, weight decay,
        betas, eps, …) take the value given now, and each change is logged. What fixes the layout (`rank`,
        `proj_type`, the inner form, 8-bit or not, GaLore or not) must match the checkpoint: a mismatch raises
        before anything is loaded, naming both values. So does a checkpoint whose state holds NaN or inf, and an
        8-bit one saved over another number of FSDP2 ranks. Saved dtypes are kept (torch would cast 8-bit moments to
        the parameter's dtype).

        Under FSDP2 (torch.distributed.checkpoint, `set_optimizer_state_dict`) the state holds DTensors: the checks
        use their global shapes, and every rank reaches the same verdict. Whatever ran before the load (e.g. the
        zero-gradient, lr=0 step torch.distributed.checkpoint takes to create a template state) leaves no trace:
        its state is replaced, and its refresh and skip telemetry is dropped.
        """
        state_dict = self._unpack_block_constants(state_dict)
        self._check_resumable(state_dict)
        self._refresh_clock = None  # the checkpoint's schedule counts the steps of the run that saved it
        self._refresh_stats, self._skipped, self._skipped_this_step = RefreshStats(), [], []
        self.last_grad_norm, self._layerwise_sq_norm = None, 0.0
        given_now = [dict(group) for group in self.param_groups]
        super().load_state_dict(state_dict)
        self._apply_settings_given_now(given_now)
        params = [p for group in self.param_groups for p in group["params"]]
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        for param_id, param in zip(saved_ids, params):
            for key, saved in state_dict["state"].get(param_id, {}).items():
                loaded = self.state[param].get(key)
                if isinstance(saved, Tensor) and isinstance(loaded, Tensor) and loaded.dtype != saved.dtype:
                    self.state[param][key] = saved.to(device=param.device)

    def _unpack_block_constants(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """The state dict with `state_dict()`'s by-row block constants back as this rank's per-block lists.

        Saved over another number of FSDP2 ranks (another split of the rows into blocks), the 8-bit moments are
        dequantized with the constants they were saved with and quantized again in this rank's blocks (no
        collective: each value's old constant is in its row of the table).
        """
        blockwise = getattr(self.inner, "block_wise_state", {})
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        if len(saved_ids) != len(params):
            return state_dict  # other parameters: `_check_resumable` says what changed
        unpacked = dict(state_dict["state"])
        for param_id, param in zip(saved_ids, params):
            state = unpacked.get(param_id, {})
            if QUANTIZED_SHARDS not in state:
                continue  # not 8-bit, or saved before block constants were saved by row (per-block already)
            saved_shards, shards = int(state[QUANTIZED_SHARDS]), world_size(row_shard(param))
            state = unpacked[param_id] = {k: v for k, v in state.items() if k != QUANTIZED_SHARDS}
            for key, moment_key in blockwise.items():
                if key not in state or moment_key not in state:
                    continue
                moment, table = local_tensor(state[moment_key]), local_tensor(state[key])
                cols = math.prod(moment.shape[1:]) if moment.dim() else 1
                if table.dim() != 2 or table.shape[0] != (moment.shape[0] if moment.dim() else 1):
                    continue  # not what `state_dict()` saves: `_check_resumable` names the mismatch
                if saved_shards == shards:
                    state[key] = blocks_from_rows(table, cols, self.inner.blocksize)
                    continue
                shard = row_shard(param)
                global_rows = state[moment_key].shape[0] if moment.dim() else 1
                scales = block_scales_by_value(
                    table, shard.offset if shard else 0, global_rows, saved_shards, cols, self.inner.blocksize
                )
                codes, state[key] = self.inner.requantize(moment_key, moment.reshape(scales.shape), scales)
                state[moment_key] = shard_like(codes.reshape(moment.shape), param)
            if saved_shards != shards:
                logger.info(
                    "Requantized the 8-bit moments of %s: saved over %d row shard(s), loaded over %d.",
                    self.param_name(param),
                    saved_shards,
                    shards,
                )
        return {**state_dict, "state": unpacked}

    def _check_resumable(self, state_dict: dict[str, Any]) -> None:
        fresh = "or start the optimizer afresh (load only the model weights, without resume_from_checkpoint)"
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"Cannot resume: the checkpoint's optimizer has {len(saved_groups)} param groups, this one has "
                f"{len(self.param_groups)}. The target selection (optim_target_modules), the trainable parameters "
                f"or the weight-decay split changed since it was saved. Resume with the same settings, {fresh}."
            )
        for index, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            where = f"param group {index} ({len(group['params'])} tensors, e.g. {self.param_name(group['params'][0])})"
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"Cannot resume: {where} held {len(saved['params'])} tensors in the checkpoint. The target "
                    f"selection or the trainable parameters changed since it was saved. Resume with the same "
                    f"settings, {fresh}."
                )
            if is_galore_group(saved) != is_galore_group(group):
                was, now = ("GaLore", "a plain group") if is_galore_group(saved) else ("a plain group", "GaLore")
                raise ValueError(
                    f"Cannot resume: {where} is {now} now but was {was} in the checkpoint (saved by a different "
                    f"optimizer or target selection). Resume with the checkpoint's --optim and targets, {fresh}."
                )
            for key in LAYOUT_KEYS if is_galore_group(group) else ():
                if saved[key] != group[key] and not self._same_projection(saved, group, key, state_dict["state"]):
                    raise ValueError(
                        f"Cannot resume with {key}={group[key]!r}: the checkpoint was saved with "
                        f"{key}={saved[key]!r} ({where}), and its moments and bases have that shape. Resume with "
                        f"{key}={saved[key]!r}, {fresh}."
                    )
            for param_id, param in zip(saved["params"], group["params"]):
                self._check_saved_state(param, group, state_dict["state"].get(param_id, {}), fresh)
        self._check_finite(state_dict)

    def _same_projection(self, saved: dict[str, Any], group: dict[str, Any], key: str, states: dict[Any, Any]) -> bool:
        """Whether a `proj_type` named differently gives every weight of the group the projection it was saved with:
        an FSDP2 run projects sharded weights from the right whatever `std` would pick, so `std` there is `right`
        in one process (and vice versa). Decided on keys and global shapes, the same on every rank."""
        if key != "proj_type":
            return False
        pairs = [(param, states.get(param_id, {})) for param_id, param in zip(saved["params"], group["params"])]
        return all(self._layout_matches(param, group, state) for param, state in pairs if state)

    def _layout_matches(self, param: Tensor, group: dict[str, Any], saved: dict[str, Any]) -> bool:
        """The saved state has the keys, shapes (global, for DTensors) and kinds (8-bit or float) this optimizer
        would create for `param`."""
        expected = self.state_layout(param, group)
        found = {k: v for k, v in saved.items() if k not in SCHEDULE_KEYS}
        return found.keys() == expected.keys() and all(
            isinstance(v, Tensor)
            and tuple(v.shape) == tuple(expected[k].shape)
            and (v.dtype == torch.uint8) == (expected[k].dtype == torch.uint8)
            for k, v in found.items()
        )

    def _check_finite(self, state_dict: dict[str, Any]) -> None:
        """No NaN or inf in the saved tensors. Sharded, each rank checks its own rows and the ranks agree (one
        all-reduce), so all of them raise the same error or none does."""
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        entries = [
            (param, key, value)
            for param_id, param in zip(saved_ids, params)
            for key, value in state_dict["state"].get(param_id, {}).items()
            if isinstance(value, Tensor) and value.is_floating_point()
        ]
        sharded = next((p for p in params if row_shard(p) is not None), None)
        device = local_tensor(sharded).device if sharded is not None else "cpu"
        bad = torch.tensor([float(not torch.isfinite(local_tensor(v)).all()) for _, _, v in entries], device=device)
        if sharded is not None:
            bad = any_rank(bad)
        for (param, key, _), flag in zip(entries, bad.tolist()):
            if flag:
                raise ValueError(
                    f"Cannot resume {self.param_name(param)}: the checkpoint's {key} holds NaN or inf values (a "
                    "corrupt checkpoint, not a gradient problem of this run). Resume from an earlier checkpoint."
                )

    def _check_saved_state(self, param: Tensor, group: dict[str, Any], saved: dict[str, Any], fresh: str) -> None:
        """The saved state must have the keys, shapes (global, for DTensors) and kinds (8-bit or float) this
        optimizer would create. Every rank sees the same keys and global shapes, so all raise alike."""
        if not saved:
            return
        expected = self.state_layout(param, group)
        found = {k: v for k, v in saved.items() if k not in SCHEDULE_KEYS}

        def describe(entries: dict[str, Any]) -> str:  # the moments: the bases' shapes follow from rank/proj_type
            return ", ".join(
                f"{k} {tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}"
                for k, v in entries.items()
                if k not in (LEFT_BASIS, RIGHT_BASIS) and isinstance(v, Tensor)
            )

        if not self._layout_matches(param, group, saved):
            raise ValueError(
                f"Cannot resume {self.param_name(param)}: the checkpoint holds {describe(found) or 'no moments'}, "
                f"while {type(self).__name__} with these settings keeps {describe(expected)}. It was saved with a "
                f"different --optim (e.g. galore_adamw vs galore_adamw_8bit or galore_adafactor), min_8bit_size, "
                f"beta1 or projection side (FSDP2 projects sharded weights from the right: continue such a run "
                f"unsharded with proj_type='right'). Resume with the checkpoint's settings, {fresh}."
            )

    def state_layout(self, param: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        """The state tensors this optimizer creates for `param` (on the meta device: shapes and dtypes only).

        Row-sharded (FSDP2), per-row state has the global shape (it is kept as DTensors) and the rest this rank's
        (8-bit block constants: blocks of the local rows).
        """
        shape = tuple(param.shape)
        shard = row_shard(param)
        if is_galore_group(group):
            proj_type = self._proj_type(param, group, row_sharded=shard is not None)
            shape = projected_shape(shape, group["rank"], proj_type)
        local_shape = shape if shard is None else (local_tensor(param).shape[0], *shape[1:])
        layout: dict[str, Tensor] = {}
        self.inner.init_state(torch.empty(local_shape, dtype=param.dtype, device="meta"), layout, group, shard)
        for key in layout.keys() & self.inner.row_wise_state if shard is not None else ():
            layout[key] = torch.empty((shape[0], *layout[key].shape[1:]), dtype=layout[key].dtype, device="meta")
        if is_galore_group(group):
            left, right = projection_sides(tuple(param.shape), proj_type)
            r = effective_rank(tuple(param.shape), group["rank"])
            if left:
                layout[LEFT_BASIS] = torch.empty(param.shape[0], r, dtype=param.dtype, device="meta")
            if right:
                layout[RIGHT_BASIS] = torch.empty(r, param.shape[1], dtype=param.dtype, device="meta")
        return layout

    def _apply_settings_given_now(self, given_now: list[dict[str, Any]]) -> None:
        for index, (group, now) in enumerate(zip(self.param_groups, given_now)):
            kept = {key: group[key] for key in CHECKPOINT_GROUP_KEYS if key in group}
            ignored = ("params", "param_names", *CHECKPOINT_GROUP_KEYS)
            changes = [
                f"{key} {group[key]!r} -> {value!r}"
                for key, value in now.items()
                if key not in ignored and key in group and group[key] != value
            ]
            group.clear()
            group.update(now)
            group.update(kept)
            if changes:
                logger.info("Resumed param group %d with the settings given now: %s.", index, ", ".join(changes))


def as_galore_config(config: GaLoreConfig | Mapping[str, Any] | None) -> GaLoreConfig:
    """A `GaLoreConfig`: the one given, one built from a dict of its fields, or the default."""
    if config is None:
        return GaLoreConfig()
    if isinstance(config, GaLoreConfig):
        return config
    if isinstance(config, Mapping):
        valid = GaLoreConfig.__dataclass_fields__
        unknown = sorted(set(config) - set(valid))
        if unknown:
            raise ValueError(
                f"Invalid galore_config key(s) {', '.join(map(repr, unknown))}. Valid keys: {', '.join(valid)}."
            )
        return GaLoreConfig(**config)
    raise TypeError(f"Invalid galore_config={config!r}: must be a GaLoreConfig, a dict of its fields, or None.")
