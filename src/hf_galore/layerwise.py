"""Layer-wise GaLore: each parameter updated from its post-accumulate-grad hook, its gradient freed at once.

A mixin of `GaLoreOptimizer`. The hooks hold the optimizer weakly, end with training (the Trainer integration removes
them when `train()` returns or raises) and are taken back by a later optimizer or Trainer on the same parameters, so
an abandoned run never consumes another's gradients.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.utils.weak import WeakTensorKeyDictionary

from .log import warn_at_caller
from .sharding import local_tensor, row_shard

if TYPE_CHECKING:
    from .core import GaLoreOptimizer

# parameter -> the optimizer whose layer-wise hook is registered on it (held weakly on both sides)
_HOOK_OWNERS: WeakTensorKeyDictionary = WeakTensorKeyDictionary()


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


def end_accumulation() -> None:
    """Set accelerate's process-wide `GradientState.sync_gradients` back to True, its value outside an accumulation.

    An accumulation interrupted on a micro-batch that does not complete the gradient (a notebook's stop button) leaves
    it False, and every later layer-wise optimizer that reads it would never update.
    """
    from accelerate.state import GradientState

    GradientState()._set_sync_gradients(True)


def release_hooks(params: Iterable[Tensor], keep: object = None) -> None:
    """Remove the layer-wise hooks that GaLore optimizers other than `keep` hold on `params`, with one warning.

    Left in place, those hooks (a run that never reached its end) would update the weights and delete every gradient
    before the optimizer that trains now sees it.
    """
    owners = (_hook_owner(param) for param in params)
    earlier = {id(owner): owner for owner in owners if owner is not None and owner is not keep}
    for other in earlier.values():
        other.remove_hooks()
    if earlier:
        warn_at_caller(
            "Removed the layer-wise hooks an earlier GaLore optimizer left on these parameters (its training did not "
            "reach its end, e.g. it was interrupted); they would have consumed this optimizer's gradients. Call "
            "`optimizer.remove_hooks()` when you abandon a layer-wise optimizer."
        )


def refuse_replicated_layerwise(optimizer: GaLoreOptimizer, name: str) -> None:
    """Refuse a layer-wise optimizer (`name`: its `--optim` name or class) on parameters replicated over processes.

    Decided by what the parameters are once the model is prepared: under FSDP2 they are DTensors and each hook
    updates its reduced shard; plain tensors in a multi-process run are replicas whose hooks would update from the
    local, not yet averaged gradient (`--fsdp` on CPU, for one, falls back to DDP), and the replicas would diverge.
    """
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if any(isinstance(p, DTensor) for p in params):
        return
    raise NotImplementedError(
        f"Layer-wise {name} cannot run on parameters replicated over {dist.get_world_size()} processes (DDP): each "
        "update would run before DDP averages that gradient, and the replicas would diverge. The prepared model is "
        "not sharded by FSDP2 (accelerate falls back to DDP where it cannot shard, e.g. `--fsdp` on CPU). Use the "
        "non-layer-wise form under DDP (e.g. galore_adamw for galore_adamw_layerwise), or shard with FSDP2 on GPUs."
    )


class LayerwiseHooks:
    """`register_hooks()` / `remove_hooks()` and the per-parameter update the hooks run."""

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
        if self._layerwise_hooks and len(self._hooked) == len(params) and all(map(operator.is_, self._hooked, params)):
            return
        # none yet, on parameters the groups no longer hold (swapped by FSDP2's prepare), or a group added since
        self.remove_hooks()
        self._hooked = params
        self._release_from_earlier_hooks()
        if self._should_step is accelerate_sync_gradients and not accelerate_sync_gradients():
            end_accumulation()
            warn_at_caller(
                "accelerate's GradientState.sync_gradients was False when the layer-wise hooks were registered (left "
                "by an accumulation that was interrupted); set back to True, or the hooks would never update."
            )
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
        release_hooks((param for group in self.param_groups for param in group["params"]), keep=self)

    def _layerwise_update(self, param: Tensor, group_index: int) -> None:
        if param.grad is None or not self._should_step():
            return
        with torch.no_grad():
            self._norm_shard = self._norm_shard or row_shard(param)  # sharded squares are summed over ranks in step()
            self._layerwise_sq_norm = self._layerwise_sq_norm + local_tensor(param.grad).float().square().sum()
            self._update_parameter(param, self.param_groups[group_index])
        param.grad = None
