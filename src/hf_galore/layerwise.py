"""Layer-wise GaLore: each parameter updated from its post-accumulate-grad hook, its gradient freed at once.

A mixin of `GaLoreOptimizer`. The hooks hold the optimizer weakly, end with training (the callback removes them) and
are taken back by a later optimizer on the same parameters, so an abandoned run never consumes another's gradients.
"""

from __future__ import annotations

import weakref
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
            # One parameter is what a hook steps: its flag is agreed over the ranks on its own (one all-reduced float
            # beside FSDP2's reduce-scatter of its unit) and read in one host sync, so every rank skips it alike.
            if self._finite([self._checked(param)])[0]:
                self._update_parameter(param, self.param_groups[group_index])
            else:
                self._skip(param)
        param.grad = None
