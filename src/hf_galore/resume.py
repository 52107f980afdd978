"""GaLore checkpoints: what `state_dict()` saves and how `load_state_dict()` resumes, checks included.

A mixin of `GaLoreOptimizer`. The checkpoint provides the state, the learning rate and the refresh schedule; the
settings given now provide the rest (changes logged); whatever fixes the state's layout must match, or loading raises
before anything changes. Under FSDP2 every check agrees over the ranks.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor

from .projector import effective_rank, projected_shape, projection_sides
from .sharding import (
    any_rank,
    block_scales_by_value,
    blocks_by_row,
    blocks_from_rows,
    local_tensor,
    row_shard,
    shard_like,
    world_size,
)
from .state_keys import (
    CHECKPOINT_GROUP_KEYS,
    LEFT_BASIS,
    QUANTIZED_SHARDS,
    RIGHT_BASIS,
    SCHEDULE_KEYS,
    is_frozen_group,
    is_galore_group,
)

logger = logging.getLogger(__name__)

START_AFRESH = "or start the optimizer afresh (load only the model weights, without resume_from_checkpoint)"


def optimizer_change(state_dict: dict[str, Any], optimizer: torch.optim.Optimizer) -> str | None:
    """Why `state_dict` cannot resume `optimizer` when one is GaLore (param groups with `rank`) and the other is not
    (a plain optimizer: `--optim adamw_torch` and the like), naming both; None when both are or neither is.

    `GaLoreOptimizer.load_state_dict` raises with it; torch's optimizers report the GaLore-to-plain direction only as
    "a different number of parameter groups", so a checkpoint loader can ask it for the reason.
    """
    saved_galore = any(is_galore_group(group) for group in state_dict["param_groups"])
    if saved_galore == any(is_galore_group(group) for group in optimizer.param_groups):
        return None
    keys = sorted({key for state in state_dict["state"].values() for key in state})
    held = f"per-parameter state {', '.join(keys)}" if keys else "no per-parameter state yet"
    plain = "e.g. --optim adamw_torch, adamw_bnb_8bit or adafactor"
    if saved_galore:
        ranks = sorted({group["rank"] for group in state_dict["param_groups"] if is_galore_group(group)})
        saved = f"a GaLore optimizer (param groups with rank {', '.join(map(str, ranks))}; {held}: --optim galore_*)"
        now = f"{type(optimizer).__name__}, a plain optimizer ({plain})"
    else:
        saved = f"a plain optimizer (no GaLore param group; {held}: {plain})"
        now = f"{type(optimizer).__name__} with GaLore groups (--optim galore_*)"
    return (
        f"Cannot resume: the optimizer changed. The checkpoint was saved by {saved}, and this one is {now}. Resume "
        f"with the checkpoint's --optim, {START_AFRESH}."
    )


class Resumable:
    """`state_dict()` and `load_state_dict()` for GaLore optimizers."""

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict, with 8-bit block constants saved by row (`hf_galore.sharding.blocks_by_row`).

        Under FSDP2 each rank quantizes its own rows, so the constants are per-rank lists; by row they shard like
        the moments (a DTensor of global shape rows × k, whatever the world size), and torch.distributed.checkpoint
        saves every rank's, where a plain tensor would be saved once, from one rank, for all. `quantized_shards`
        records over how many row shards they were computed; `load_state_dict` converts them back.
        """
        state_dict = super().state_dict()
        params = [(p, self._rule_of(group)) for group in self.param_groups for p in group["params"]]
        for index, (param, rule) in enumerate(params):
            state = state_dict["state"].get(index)
            blockwise = getattr(rule, "block_wise_state", {})
            if not blockwise or not state or not blockwise.keys() & state.keys():
                continue
            state = state_dict["state"][index] = dict(state)  # the live state stays as it is
            for key, moment_key in blockwise.items():
                moment = local_tensor(state[moment_key])
                rows, cols = (moment.shape[0], math.prod(moment.shape[1:])) if moment.dim() else (1, 1)
                table = blocks_by_row(local_tensor(state[key]), rows, cols, rule.blocksize)
                state[key] = shard_like(table, param)
            state[QUANTIZED_SHARDS] = world_size(row_shard(param))
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from a checkpoint: its state, learning rate and schedule; the settings given now for the rest.

        Settings that do not change the state's layout (`update_proj_gap`, `scale`, refresh options, weight decay,
        betas, eps, …) take the value given now, and each change is logged. What fixes the layout (`rank`,
        `proj_type`, the inner form, 8-bit or not, GaLore or not) must match the checkpoint: a mismatch raises
        before anything is loaded, naming both values. So does a checkpoint whose state holds NaN or inf. 8-bit
        moments saved over another number of FSDP2 ranks are quantized again in this rank's blocks (logged). Saved
        dtypes are kept (torch would cast 8-bit moments to the parameter's dtype).

        Under FSDP2 (torch.distributed.checkpoint, `set_optimizer_state_dict`) the state holds DTensors: the checks
        use their global shapes, and every rank reaches the same verdict. Whatever ran before the load (e.g. the
        zero-gradient, lr=0 step torch.distributed.checkpoint takes to create a template state) leaves no trace:
        its state is replaced, and its refresh and skip telemetry is dropped.
        """
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
            found = sorted(state_dict)[:5] if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(
                f"Cannot resume: expected an optimizer state dict (a dict with 'state' and 'param_groups', as "
                f"optimizer.state_dict() returns), got {found}. Was the file written by torch.save(optimizer."
                "state_dict())? A model's state dict or a whole checkpoint folder's file does not fit here."
            )
        state_dict = self._unpack_block_constants(state_dict)
        self._check_resumable(state_dict)
        self._refresh_clock = None  # the checkpoint's schedule counts the steps of the run that saved it
        self.pop_refresh_stats()
        self._skipped, self._skipped_this_step = [], []
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
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [(p, self._rule_of(group)) for group in self.param_groups for p in group["params"]]
        if len(saved_ids) != len(params):
            return state_dict  # other parameters: `_check_resumable` says what changed
        unpacked = dict(state_dict["state"])
        for param_id, (param, rule) in zip(saved_ids, params):
            state = unpacked.get(param_id, {})
            blockwise = getattr(rule, "block_wise_state", {})
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
                    state[key] = blocks_from_rows(table, cols, rule.blocksize)
                    continue
                shard = row_shard(param)
                global_rows = state[moment_key].shape[0] if moment.dim() else 1
                scales = block_scales_by_value(
                    table, shard.offset if shard else 0, global_rows, saved_shards, cols, rule.blocksize
                )
                codes, state[key] = rule.requantize(moment_key, moment.reshape(scales.shape), scales)
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
        fresh = START_AFRESH
        saved_groups = state_dict["param_groups"]
        self._check_same_optimizer(state_dict)
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"Cannot resume: the checkpoint's optimizer has {len(saved_groups)} param groups, this one has "
                f"{len(self.param_groups)}. The target selection (optim_target_modules), the trainable parameters "
                f"or the weight-decay split changed since it was saved. Resume with the same settings, {fresh}."
            )
        groups = list(enumerate(zip(saved_groups, self.param_groups)))
        where = {
            index: f"param group {index} ({len(group['params'])} tensors, e.g. {self.param_name(group['params'][0])})"
            for index, (_, group) in groups
        }
        for index, (saved, group) in groups:  # every count first: another model (more layers) is not a state mismatch
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"Cannot resume: {where[index]} held {len(saved['params'])} tensors in the checkpoint. The model "
                    f"(its number of layers), the target selection or the trainable parameters changed since it was "
                    f"saved. Resume with the same model and settings, {fresh}."
                )
        for index, (saved, group) in groups:
            here = where[index]
            if is_galore_group(saved) != is_galore_group(group):
                was, now = ("GaLore", "a plain group") if is_galore_group(saved) else ("a plain group", "GaLore")
                raise ValueError(
                    f"Cannot resume: {here} is {now} now but was {was} in the checkpoint (saved by a different "
                    f"optimizer or target selection). Resume with the checkpoint's --optim and targets, {fresh}."
                )
            for key in self.outer.layout_keys if is_galore_group(group) else ():
                if key not in saved:
                    raise ValueError(
                        f"Cannot resume: {where} has no {key} in the checkpoint: it was saved by another optimizer of "
                        f"the low-rank family than {type(self).__name__} (e.g. --optim galore_adamw, not "
                        f"apollo_adamw). Resume with the checkpoint's --optim, {fresh}."
                    )
                if saved[key] != group[key] and not self._same_projection(saved, group, key, state_dict["state"]):
                    raise ValueError(
                        f"Cannot resume with {key}={group[key]!r}: the checkpoint was saved with "
                        f"{key}={saved[key]!r} ({here}), and its moments and bases have that shape. Resume with "
                        f"{key}={saved[key]!r}, {fresh}."
                    )
            for param_id, param in zip(saved["params"], group["params"]):
                self._check_saved_state(param, group, state_dict["state"].get(param_id, {}), fresh)
        self._check_finite(state_dict)

    def _check_same_optimizer(self, state_dict: dict[str, Any]) -> None:
        """A plain optimizer's checkpoint (`--optim adamw_torch` and the like) loaded into one with GaLore groups:
        say that the optimizer changed, naming both, before any group count differs."""
        change = optimizer_change(state_dict, self)
        if change is not None:
            raise ValueError(change)

    def _same_projection(self, saved: dict[str, Any], group: dict[str, Any], key: str, states: dict[Any, Any]) -> bool:
        """Whether a `rank` or `proj_type` given differently leaves every weight of the group the state it was saved
        with: a rank clipped to min(m, n) (128 and 32 both give 32 on a 32×32 weight), or an FSDP2 run, which projects
        sharded weights from the right whatever `std` would pick (so `std` there is `right` in one process, and vice
        versa). Decided on keys and global shapes, the same on every rank."""
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
                f"while {type(self).__name__} with these settings keeps {describe(expected) or 'no state'}. It was "
                f"saved with a different --optim (e.g. galore_adamw vs galore_adamw_8bit or galore_adafactor), "
                f"others, min_8bit_size, beta1 or projection side (FSDP2 projects sharded weights from the right: "
                f"continue such a run unsharded with proj_type='right'). Resume with the checkpoint's settings, "
                f"{fresh}."
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
        rule = self._rule_of(group)
        if rule is None:  # a frozen group keeps nothing
            return layout
        rule.init_state(torch.empty(local_shape, dtype=param.dtype, device="meta"), layout, group, shard)
        for key in layout.keys() & rule.row_wise_state if shard is not None else ():
            layout[key] = torch.empty((shape[0], *layout[key].shape[1:]), dtype=layout[key].dtype, device="meta")
        if is_galore_group(group) and self.outer.stores_bases(group):
            left, right = projection_sides(tuple(param.shape), proj_type)
            r = effective_rank(tuple(param.shape), group["rank"])
            if left:
                layout[LEFT_BASIS] = torch.empty(param.shape[0], r, dtype=param.dtype, device="meta")
            if right:
                layout[RIGHT_BASIS] = torch.empty(r, param.shape[1], dtype=param.dtype, device="meta")
        return layout

    def _rule_of(self, group: dict[str, Any]) -> Any:
        """The group's update rule, None for a frozen group."""
        return None if is_frozen_group(group) else self.rule_for(group)

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
