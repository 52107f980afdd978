"""What transformers' `--optim galore_*` names build: hf_galore's optimizers, every optimizer setting forwarded.

The handler returns the optimizer class and its keyword arguments, never `params`: the Trainer keeps building the
param groups itself (its weight-decay exclusions, frozen parameters skipped, a subclass's
`get_decay_parameter_names`), and the optimizer splits the GaLore targets out of those groups.
"""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING, Any, NamedTuple

from .config import parse_optim_args, split_optim_args
from .inner import MIN_8BIT_SIZE, InnerForm
from .optimizers import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit
from .targets import select_targets

if TYPE_CHECKING:
    from transformers import TrainingArguments
    from transformers.trainer_optimizer import OptimizerContext

logger = logging.getLogger(__name__)


class GaLoreOptimizerSpec(NamedTuple):
    """What one `--optim galore_*` name builds; unpacks as `optimizer_cls, form, layerwise`."""

    optimizer_cls: type
    form: InnerForm  # its inner rule, by the name `hf_galore.inner.inner_rule` builds (memory figures)
    layerwise: bool


GALORE_OPTIMIZERS: dict[str, GaLoreOptimizerSpec] = {
    "galore_adamw": GaLoreOptimizerSpec(GaLoreAdamW, "adamw", layerwise=False),
    "galore_adamw_8bit": GaLoreOptimizerSpec(GaLoreAdamW8bit, "adamw8bit", layerwise=False),
    "galore_adafactor": GaLoreOptimizerSpec(GaLoreAdafactor, "adafactor", layerwise=False),
    "galore_adamw_layerwise": GaLoreOptimizerSpec(GaLoreAdamW, "adamw", layerwise=True),
    "galore_adamw_8bit_layerwise": GaLoreOptimizerSpec(GaLoreAdamW8bit, "adamw8bit", layerwise=True),
    "galore_adafactor_layerwise": GaLoreOptimizerSpec(GaLoreAdafactor, "adafactor", layerwise=True),
}
# `--optim_args` keys an optimizer takes beyond the GaLore ones, with their defaults
_EXTRA_OPTIM_ARGS: dict[type, dict[str, Any]] = {GaLoreAdamW8bit: {"min_8bit_size": MIN_8BIT_SIZE}}


def optim_name(args: TrainingArguments) -> str:
    return getattr(args.optim, "value", args.optim)


def _distributed_type() -> str | None:
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state  # read without initialising: the Trainer has set it up by now
    return str(state["distributed_type"]) if state.get("distributed_type") is not None else None


def check_supported(args: TrainingArguments, name: str, layerwise: bool) -> None:
    """Refuse, with the reason, the combinations hf_galore cannot run correctly yet."""
    distributed = _distributed_type() or ""
    if args.fsdp or "FSDP" in distributed:
        raise NotImplementedError(
            f"--optim {name} with FSDP is not supported yet (sharded GaLore is planned). Train with DDP "
            "(`accelerate launch` / `torchrun` without an FSDP config) or with a non-GaLore --optim."
        )
    if args.deepspeed or "DEEPSPEED" in distributed:
        raise NotImplementedError(
            f"--optim {name} with DeepSpeed is not supported yet (sharded GaLore is planned). Train with DDP "
            "(`accelerate launch` / `torchrun` without a DeepSpeed config) or with a non-GaLore --optim."
        )
    if not layerwise:
        return
    if str(args.parallel_mode.value) == "distributed":
        raise NotImplementedError(
            f"--optim {name} does not support multi-process training: a layer-wise update would run before DDP "
            f"averages that gradient. Use --optim {name.removesuffix('_layerwise')} under DDP."
        )
    if args.fp16:
        raise ValueError(
            f"--optim {name} cannot run with --fp16: its gradients are still loss-scaled when each layer updates. "
            "Use --bf16, or the non-layer-wise form."
        )
    if args.max_grad_norm and args.max_grad_norm > 0:
        warnings.warn(
            f"--optim {name} updates each weight as soon as its gradient is complete, before the global norm "
            f"exists, so max_grad_norm={args.max_grad_norm} cannot clip (the logged grad_norm is the true, "
            "unclipped norm). Pass --max_grad_norm 0 to silence this warning.",
            stacklevel=2,
        )


def galore_optimizer_handler(ctx: OptimizerContext) -> tuple[type, dict[str, Any]]:
    """transformers optimizer handler for the six `galore_*` names (see `_OPTIMIZER_HANDLERS`)."""
    args, name = ctx.args, optim_name(ctx.args)
    optimizer_cls, form, layerwise = GALORE_OPTIMIZERS[name]
    check_supported(args, name, layerwise)
    if ctx.model is None:
        raise ValueError(f"--optim {name} needs the model to choose its target modules; pass `model` to Trainer.")
    # The raw string, parsed strictly: transformers' ctx.optim_args silently keeps the last of a repeated key.
    config, extra = parse_optim_args(split_optim_args(args.optim_args), extra=_EXTRA_OPTIM_ARGS.get(optimizer_cls))
    targets = select_targets(
        ctx.model, args.optim_target_modules, optimizer_name=name, rank=config.rank, form=form, **extra
    )
    kwargs: dict[str, Any] = {**ctx.optimizer_kwargs, "weight_decay": args.weight_decay, **extra}
    if optimizer_cls is GaLoreAdafactor:  # as transformers' own adafactor: a fixed, scheduled lr
        kwargs.update(scale_parameter=False, relative_step=False)
    else:
        kwargs.update(ctx.adam_kwargs)
    kwargs.update(galore_params=[t.param for t in targets], galore_config=config, layerwise=layerwise)
    kwargs["param_names"] = {param: name for name, param in ctx.model.named_parameters()}
    return optimizer_cls, kwargs
