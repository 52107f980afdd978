"""The one GaLore optimizer loop: project, run the inner update in the subspace, project back, apply.

`step()` only loops; the maths lives in `projector` (projection) and `inner` (the update rule). Param groups
that carry `rank` get GaLore; the others get the inner rule on the full gradient, exactly like the plain optimizer,
or the rule their `inner` key names (`adamw`, `adamw8bit`, `adafactor`; `frozen`: not trained, no state).
Optimizer state holds tensors and plain values only, so `torch.load(weights_only=True)` reads a checkpoint.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .config import OTHERS, GaLoreConfig
from .family import GALORE, GaLoreRule
from .inner import MIN_8BIT_SIZE, InnerUpdate, inner_rule, rule_defaults, rule_family
from .layerwise import LayerwiseHooks, accelerate_sync_gradients
from .log import warn_at_caller
from .projector import (
    compute_bases,
    effective_rank,
    identity_bases,
    project,
    projection_sides,
    resolve_proj_type,
    subspace_overlap,
)
from .resume import Resumable
from .schedule import schedule_after_refresh, stagger_offsets
from .sharding import (
    RowShard,
    global_sum,
    local_tensor,
    row_shard,
    shard_like,
)
from .state_keys import (  # noqa: F401  re-exported: the names tests and users import from here
    CHECKPOINT_GROUP_KEYS,
    FROZEN,
    LAYOUT_KEYS,
    LEFT_BASIS,
    NEXT_REFRESH,
    QUANTIZED_SHARDS,
    REFRESH_INTERVAL,
    RESIDUAL_NORM,
    RIGHT_BASIS,
    SCHEDULE_KEYS,
    STEP,
    is_frozen_group,
    is_galore_group,
)

logger = logging.getLogger(__name__)


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


PLAIN_RULES = tuple(form for form in OTHERS if form != "same")  # what a plain group's `inner` key may name


def plain_group_options(others: str, own: InnerUpdate) -> dict[str, Any]:
    """The keys that give a plain group the rule `others` names (`GaLoreConfig.others`) in an optimizer whose own
    rule is `own`: none for its own rule; the rule's name, plus its default hyper-parameters when it reads other
    ones than `own` (Adam's betas and eps vs Adafactor's)."""
    if others in ("same", own.form):
        return {}
    if others == FROZEN or rule_family(others) == rule_family(own.form):
        return {"inner": others}
    return {"inner": others, **rule_defaults(others)}


def split_galore_groups(
    params: Iterable[Any], galore_params: Iterable[Tensor], config: GaLoreConfig, own: InnerUpdate
) -> list[dict[str, Any]]:
    """Split each param group in two: its `galore_params` with `config`'s keys, and the rest as they were, with the
    rule `config.others` names for them.

    This keeps whatever grouping the caller made (the Trainer's weight-decay split, say) and adds GaLore to it.
    """
    if isinstance(galore_params, Tensor):
        raise TypeError(
            f"Invalid galore_params: a single tensor of shape {tuple(galore_params.shape)} (iterating it would give "
            "its rows). Pass a list of the weights to project, e.g. galore_params=[model.fc.weight]."
        )
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
            split.append({**group, "params": rest, **plain_group_options(config.others, own)})
        if galore:
            split.append({**group, "params": galore, **config.group_options()})
    if len(found) != len(chosen):
        raise ValueError(
            f"Invalid galore_params: {len(chosen) - len(found)} of {len(chosen)} tensors are not among the "
            "optimizer's params; pass the parameters being optimized."
        )
    return split


class GaLoreOptimizer(LayerwiseHooks, Resumable, torch.optim.Optimizer):
    """Gradient Low-Rank Projection around a pluggable inner update rule (Zhao et al., 2024, Algorithm 1).

    `galore_params` + `galore_config` give GaLore to those tensors whatever groups `params` holds (otherwise,
    groups opt in with a `rank` key). `layerwise=True` updates each parameter from its post-accumulate-grad
    hook as soon as its gradient is complete, on the micro-batch `should_step()` approves (the accumulation
    boundary), and frees the gradient, so at most one full gradient is alive at a time; `remove_hooks()` ends
    that (the Trainer integration does it when training ends). `param_names` (tensor -> name) lets warnings and
    errors name the parameter.

    Plain groups (no `rank`) may name another rule in their `inner` key (`adamw`, `adamw8bit`, `adafactor`, or
    `frozen`: requires_grad is turned off and nothing is kept); `GaLoreConfig.others` sets it for every parameter
    outside `galore_params`.

    A parameter whose gradient holds NaN or inf is not updated at all (weights, moments, step count and refresh
    schedule untouched); one warning names it and `pop_skipped_updates()` reports it.

    `outer` is the family member (`hf_galore.family`): GaLore here, APOLLO in `ApolloAdamW`.
    """

    outer: GaLoreRule = GALORE

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
        self._rules: dict[str, InnerUpdate] = {inner.form: inner}
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
        self._frozen_here: list[Tensor] = []  # what others=frozen turned off (trainable before): unfreeze_others()
        if galore_params is not None:
            config = as_galore_config(galore_config, self.outer.config_cls)
            params = split_galore_groups(params, galore_params, config, inner)
        elif galore_config is not None:
            raise ValueError("Invalid galore_config without galore_params: say which tensors get GaLore.")
        self._names: dict[tuple[int, int], str] = {}
        by_id = self._names_by_id = {id(p): name for p, name in _checked_param_names(param_names).items()}
        super().__init__(params, defaults)
        # Kept by position in the groups: accelerate's FSDP2 prepare swaps each parameter for its sharded one there.
        self._names_by_id = {}
        self._names = {
            (g, i): by_id[id(p)]
            for g, group in enumerate(self.param_groups)
            for i, p in enumerate(group["params"])
            if id(p) in by_id
        }
        self._log_frozen()
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
        return self._known_name(param) or f"a parameter shaped {tuple(param.shape)}"

    def _known_name(self, param: Tensor) -> str | None:
        for g, group in enumerate(self.param_groups):
            for index, member in enumerate(group["params"]):
                if member is param and (g, index) in self._names:
                    return self._names[g, index]
                if member is param and "param_names" in group:
                    return group["param_names"][index]
        return self._names_by_id.get(id(param))  # while the constructor adds the groups

    # ---- groups -----------------------------------------------------------------------------------------------

    def rule_for(self, group: dict[str, Any]) -> InnerUpdate:
        """The update rule of `group`: the optimizer's own, or the one its `inner` key names (not `frozen`)."""
        form = group.get("inner")
        if form is None:
            return self.inner
        if form not in self._rules:
            min_8bit_size = getattr(self.inner, "min_8bit_size", MIN_8BIT_SIZE)
            self._rules[form] = inner_rule(form, min_8bit_size=min_8bit_size, adafactor_beta1=None)
        return self._rules[form]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            self._validate_group(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise
        if self.has_hooks:  # layer-wise, hooked already: the new group's tensors update from backward too
            self.register_hooks()

    def _validate_group(self, group: dict[str, Any]) -> None:
        lr = group["lr"]
        if lr is not None and not lr >= 0.0:
            raise ValueError(f"Invalid {lr=}. Must be >= 0.0.")
        weight_decay = group["weight_decay"]
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid {weight_decay=}. Must be >= 0.0.")
        if not self._validate_inner_key(group):
            return
        for param in group["params"]:
            if param.is_complex():
                raise ValueError(
                    f"Invalid parameter {self._described(param)}, dtype {str(param.dtype).removeprefix('torch.')}: "
                    f"{type(self).__name__} does not support complex parameters (its moments, 8-bit blocks and "
                    "projections are real). Optimize them with a torch optimizer of their own, or store them as real "
                    "pairs (torch.view_as_real)."
                )
        self.rule_for(group).validate_group(group)
        if not is_galore_group(group):
            return
        for key, default in self.outer.group_defaults.items():
            group.setdefault(key, default)
        group.update(self.outer.validate(group))
        for param in group["params"]:
            if param.dim() != 2:
                raise ValueError(
                    f"Invalid GaLore parameter {self._described(param)}: `rank` applies to 2-D weights only; put 1-D "
                    "and N-D parameters in a group without `rank`."
                )
            if param.numel() == 0:
                raise ValueError(
                    f"Invalid GaLore parameter {self._described(param)}: it has no elements, so there is no "
                    "gradient to project. Leave it out of galore_params (or put it in a group without `rank`)."
                )
        clipped = sorted(
            {tuple(p.shape) for p in group["params"] if effective_rank(tuple(p.shape), group["rank"]) < group["rank"]}
        )
        if clipped:
            warn_at_caller(
                f"GaLore rank={group['rank']} exceeds min(m, n) of weights shaped {clipped}; "
                "their rank is clipped to min(m, n)."
            )

    def _described(self, param: Tensor) -> str:
        """`name of shape (m, n)`, or only `of shape (m, n)` when the name is unknown."""
        name, shape = self._known_name(param), f"of shape {tuple(param.shape)}"
        return shape if name is None else f"{name} {shape}"

    def _log_frozen(self) -> None:
        frozen = [p for group in self.param_groups if is_frozen_group(group) for p in group["params"]]
        if frozen:
            names = ", ".join(self.param_name(p) for p in frozen[:8])
            more = f" and {len(frozen) - 8} more" if len(frozen) > 8 else ""
            logger.info(
                "others=frozen: %d tensors (%s weights) set to requires_grad=False, not trained: %s%s",
                len(frozen),
                f"{sum(p.numel() for p in frozen):,}",
                names,
                more,
            )

    def unfreeze_others(self) -> None:
        """Give back `requires_grad=True` to the tensors `others=frozen` turned off (those trainable before), so the
        model leaves training as it came (the Trainer integration calls this when `train()` ends, however it ends)."""
        for param in self._frozen_here:
            param.requires_grad_(True)

    def freeze_others(self) -> None:
        """Turn `requires_grad` off again on the tensors of `others=frozen` groups (`train()` called again)."""
        for param in self._frozen_here:
            param.requires_grad_(False)

    def _validate_inner_key(self, group: dict[str, Any]) -> bool:
        """Check a group's `inner` key; freeze a `frozen` group's parameters. Whether the group is trained."""
        form = group.get("inner")
        if form is None:
            return True
        if form not in PLAIN_RULES:
            raise ValueError(f"Invalid param group inner={form!r}. Must be one of {', '.join(PLAIN_RULES)}.")
        if is_galore_group(group):
            raise ValueError(
                f"Invalid inner={form!r} in a GaLore group (one with rank): GaLore groups run the optimizer's own "
                "rule; `inner` is for plain groups (GaLoreConfig.others)."
            )
        if form == FROZEN:
            self._frozen_here.extend(p for p in group["params"] if p.requires_grad)
            for param in group["params"]:
                param.requires_grad_(False)
            return False
        if rule_family(form) == "adamw" and group["lr"] is None:
            raise ValueError(
                f"Invalid lr=None for inner={form!r}: Adam needs a learning rate. Pass lr (GaLoreAdafactor with "
                "relative_step=True has none), or others=adafactor."
            )
        return True

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
            if is_frozen_group(group):
                continue
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
        if galore:
            self._check_unchanged(param, group, state)
        clock = step if self._refresh_clock is None else self._refresh_clock
        refresh_due = galore and (NEXT_REFRESH not in state or clock >= state[NEXT_REFRESH])
        full_grad = grad
        if galore and not refresh_due:
            # Checked in the subspace: any NaN/inf of G reaches the projection (NaN·0 is NaN), at r/min(m, n) the cost.
            grad = project(grad, *self._bases(param, state, group, shard, like=grad))
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
            grad = project(full_grad, *self._bases(param, state, group, shard, like=full_grad))
        step += 1
        state[STEP] = step
        rule = self.rule_for(group)
        lr = rule.learning_rate(group, step, weight, shard=shard)
        delta = rule.update(grad, moments, group, step, lr, shard=shard)
        if shard is not None:
            self._keep_sharded(param, state, moments, rule)
        if group["weight_decay"] != 0:
            weight.mul_(1.0 - lr * group["weight_decay"])
        if not galore:
            weight.sub_(delta)
            return
        bases = self._bases(param, state, group, shard, like=full_grad)
        step_size = lr * rule.bias_correction(group, step)  # Fira and APOLLO scale the raw direction (`scaling`)
        self.outer.apply(weight, full_grad, grad, delta, step_size, state, group, bases, shard)

    def _bases(
        self, param: Tensor, state: dict[str, Any], group: dict[str, Any], shard: RowShard | None, like: Tensor
    ) -> tuple[Tensor | None, Tensor | None]:
        """The target's current projection (stored, or regenerated by the outer rule)."""
        proj_type = self._proj_type(param, group, row_sharded=shard is not None)
        return self.outer.bases(state, tuple(param.shape), group, proj_type, like)

    def param_seed(self, param: Tensor) -> int:
        """A seed of `param`'s own, the same on every rank and in every run of this setup: its position in the
        param groups (kept in state, so a resume with regrouped parameters still draws what it would have)."""
        for g, group in enumerate(self.param_groups):
            for index, member in enumerate(group["params"]):
                if member is param:
                    return g * 2**20 + index
        raise ValueError(f"{self.param_name(param)} is not a parameter of this optimizer.")

    def _check_unchanged(self, param: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        """Check a GaLore group again at each update, for edits after it was validated (`param_groups[i]["rank"] =
        ...`): its options must still be valid, and `rank`/`proj_type` must still give `param`'s bases their shape,
        since its moments live in that subspace. A few dict reads and shape comparisons per parameter."""
        try:
            self.outer.validate(group)
        except ValueError as err:
            index = next(i for i, g in enumerate(self.param_groups) if g is group)
            raise ValueError(
                f"{err} Found in param_groups[{index}] at a step: it was changed during training."
            ) from None
        left, right = state.get(LEFT_BASIS), state.get(RIGHT_BASIS)
        if left is None and right is None:
            return  # no subspace yet: any valid rank and proj_type can start
        shape = tuple(param.shape)
        had = (left is not None, right is not None)
        rank = left.shape[1] if left is not None else right.shape[0]
        sides = projection_sides(shape, self._proj_type(param, group, row_sharded=row_shard(param) is not None))
        if sides != had or effective_rank(shape, group["rank"]) != rank:
            side = {(True, False): "left", (False, True): "right", (True, True): "both sides"}
            raise ValueError(
                f"Cannot update {self.param_name(param)} with rank={group['rank']!r}, proj_type={group['proj_type']!r}"
                f": its moments and bases were built with rank {rank}, projected from the {side[had]}, and these "
                f"settings give rank {effective_rank(shape, group['rank'])} from the {side[sides]}. rank and "
                "proj_type cannot change during training (the moments live in the old subspace): set them back, or "
                "build a new optimizer."
            )

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

    @staticmethod
    def _keep_sharded(param: Tensor, state: dict[str, Any], moments: dict[str, Any], rule: InnerUpdate) -> None:
        """Store moments the rule just created: per-row ones as DTensors sharded like `param` (so distributed
        checkpoints save every rank's rows), replicated ones as they are."""
        for key in moments.keys() - state.keys():
            value = moments[key]
            state[key] = shard_like(value, param) if key in rule.row_wise_state else value

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
        bases, problem = self.outer.new_bases(self, param, grad, state, group, proj_type, shard, clock)
        old = (state.get(LEFT_BASIS), state.get(RIGHT_BASIS))
        if problem is not None:
            action = "keeping the previous basis" if old != (None, None) else "starting from coordinate axes"
            warn_at_caller(f"GaLore basis refresh skipped for {self.param_name(param)}: {problem}; {action}.")
            if old == (None, None):
                bases = identity_bases(tuple(param.shape), group["rank"], proj_type, like=grad)
        overlap = self._record_refresh(old, bases, time.perf_counter() - start)
        self.outer.keep_bases(state, bases)
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


def _checked_param_names(param_names: Mapping[Tensor, str] | None) -> Mapping[Tensor, str]:
    """`param_names` when it maps tensors to names; a name -> tensor mapping (`dict(model.named_parameters())`, the
    other way round) or anything else raises, naming what was found."""
    if param_names is None:
        return {}
    if not isinstance(param_names, Mapping):
        raise TypeError(
            f"Invalid param_names of type {type(param_names).__name__}: must be a mapping tensor -> name, e.g. "
            "{p: n for n, p in model.named_parameters()}."
        )
    for key, value in param_names.items():
        if isinstance(key, str) and isinstance(value, Tensor):
            raise TypeError(
                f"Invalid param_names: it maps names to tensors ({key!r} -> a tensor shaped {tuple(value.shape)}), "
                "the reverse of what is expected. Pass tensor -> name: {p: n for n, p in model.named_parameters()}."
            )
        if not isinstance(key, Tensor) or not isinstance(value, str):
            raise TypeError(
                f"Invalid param_names entry {type(key).__name__} -> {type(value).__name__}: must map each tensor to "
                "its name, e.g. {p: n for n, p in model.named_parameters()}."
            )
    return param_names


def as_galore_config(
    config: GaLoreConfig | Mapping[str, Any] | None, cls: type[GaLoreConfig] = GaLoreConfig
) -> GaLoreConfig:
    """A `cls` (`GaLoreConfig`, or a family member's: `ApolloConfig`): the one given, one built from a dict of its
    fields, or the default."""
    if config is None:
        return cls()
    if type(config) is cls:
        return config
    if isinstance(config, GaLoreConfig):
        raise TypeError(
            f"Invalid galore_config of type {type(config).__name__} for this optimizer: it takes a {cls.__name__}."
        )
    if isinstance(config, Mapping):
        valid = cls.__dataclass_fields__
        unknown = sorted(set(config) - set(valid))
        if unknown:
            raise ValueError(
                f"Invalid galore_config key(s) {', '.join(map(repr, unknown))}. Valid keys: {', '.join(valid)}."
            )
        return cls(**config)
    raise TypeError(f"Invalid galore_config={config!r}: must be a {cls.__name__}, a dict of its fields, or None.")
