"""What transformers' `--optim galore_*` and `apollo_adamw*` names build: hf_galore's optimizers, every optimizer
setting forwarded (apollo-torch is not needed: `apollo_adamw` builds `ApolloAdamW`).

The handler returns the optimizer class and its keyword arguments, never `params`: the Trainer keeps building the
param groups itself (its weight-decay exclusions, frozen parameters skipped, a subclass's
`get_decay_parameter_names`), and the optimizer splits the GaLore targets out of those groups.
"""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING, Any, NamedTuple

from .config import GaLoreConfig, parse_optim_args, split_optim_args
from .inner import FROZEN, MIN_8BIT_SIZE, InnerForm, others_rule
from .optimizers import ApolloAdamW, GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit
from .report import human_bytes
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
    "apollo_adamw": GaLoreOptimizerSpec(ApolloAdamW, "adamw", layerwise=False),
    "apollo_adamw_layerwise": GaLoreOptimizerSpec(ApolloAdamW, "adamw", layerwise=True),
}
# `--optim_args` keys an optimizer takes beyond the GaLore ones, with their defaults
_EXTRA_OPTIM_ARGS: dict[type, dict[str, Any]] = {GaLoreAdamW8bit: {"min_8bit_size": MIN_8BIT_SIZE}}


def optim_name(args: TrainingArguments) -> str:
    return getattr(args.optim, "value", args.optim)


def _accelerate_state() -> dict[str, Any]:
    from accelerate.state import AcceleratorState

    return AcceleratorState._shared_state  # read without initialising: the Trainer has set it up by now


def fsdp_version(args: TrainingArguments) -> int | None:
    """1 or 2 when the run shards with FSDP (accelerate's plugin, else `--fsdp` + `fsdp_config`), None otherwise."""
    state = _accelerate_state()
    plugin = state.get("fsdp_plugin")
    if plugin is not None:
        return int(getattr(plugin, "fsdp_version", 1))
    if args.fsdp:
        return int((args.fsdp_config or {}).get("version", 2))
    return 1 if "FSDP" in str(state.get("distributed_type") or "") else None


def check_others(name: str, others: str, fsdp: int | None) -> None:
    """Refuse an `others` form the run cannot honour; shared by training and `hf-galore estimate` (its `--fsdp`)."""
    if others == FROZEN and fsdp is not None:
        raise NotImplementedError(
            f"--optim {name} with others=frozen cannot run under FSDP: the optimizer is built after the model is "
            "sharded, too late to turn requires_grad off. Freeze the parameters in the model before training "
            "(`param.requires_grad_(False)`), or pick others=adafactor, which keeps a few KiB per table."
        )


def check_supported(args: TrainingArguments, name: str, layerwise: bool, others: str = "same") -> None:
    """Refuse, with the reason, the combinations hf_galore cannot run correctly."""
    version = fsdp_version(args)
    check_others(name, others, version)
    if version is not None and version != 2:
        raise NotImplementedError(
            f"--optim {name} cannot run on FSDP version {version}: FSDP1 hands the optimizer flat parameters (many "
            "weights concatenated into one 1-D tensor per rank), which have no matrix shape to project. Use FSDP2, "
            "which shards each weight by rows: fsdp_config={'version': 2} (transformers' default) or "
            "`fsdp_version: 2` in the accelerate config (examples/fsdp2.yaml)."
        )
    if args.deepspeed or "DEEPSPEED" in str(_accelerate_state().get("distributed_type") or ""):
        raise NotImplementedError(
            f"--optim {name} cannot run under DeepSpeed: ZeRO stages 1-3 hand the optimizer flat partitions that cut "
            "across weights, so no weight keeps its matrix shape, and ZeRO-0 is plain data parallelism, which DDP "
            "gives without DeepSpeed. Use FSDP2 to shard (`accelerate launch --config_file examples/fsdp2.yaml`), "
            "or DDP."
        )
    if not layerwise:
        return
    if str(args.parallel_mode.value) == "distributed" and version is None:
        raise NotImplementedError(
            f"--optim {name} does not support DDP: a layer-wise update would run before DDP averages that gradient. "
            f"Use --optim {name.removesuffix('_layerwise')} under DDP, or shard with FSDP2, where each weight's "
            "update runs on its reduced gradient shard."
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


def log_others(model: Any, target_ids: set[int], config: GaLoreConfig, form: InnerForm, min_8bit_size: int) -> None:
    """Log how the trainable parameters that are not targets are trained and the state they will hold."""
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in target_ids]
    if not others:
        return
    rule = others_rule(form, config.others, min_8bit_size=min_8bit_size)
    adamw = sum(2 * p.numel() * p.element_size() for p in others)
    held = 0 if rule is None else sum(rule.state_bytes(tuple(p.shape), p.dtype) for p in others)
    logger.info(
        "Other parameters (not targets): %d tensors, %s weights, others=%s (%s): state %s vs full-rank AdamW %s.",
        len(others),
        f"{sum(p.numel() for p in others):,}",
        config.others,
        "frozen: requires_grad turned off" if rule is None else rule.form,
        human_bytes(held),
        human_bytes(adamw),
    )


def galore_optimizer_handler(ctx: OptimizerContext) -> tuple[type, dict[str, Any]]:
    """transformers optimizer handler for the six `galore_*` and two `apollo_adamw*` names (`_OPTIMIZER_HANDLERS`)."""
    args, name = ctx.args, optim_name(ctx.args)
    optimizer_cls, form, layerwise = GALORE_OPTIMIZERS[name]
    if ctx.model is None:
        raise ValueError(f"--optim {name} needs the model to choose its target modules; pass `model` to Trainer.")
    # The raw string, parsed strictly: transformers' ctx.optim_args silently keeps the last of a repeated key.
    config, extra = parse_optim_args(
        split_optim_args(args.optim_args),
        extra=_EXTRA_OPTIM_ARGS.get(optimizer_cls),
        config_cls=optimizer_cls.outer.config_cls,
    )
    check_supported(args, name, layerwise, config.others)
    targets = select_targets(
        ctx.model,
        args.optim_target_modules,
        optimizer_name=name,
        rank=config.rank,
        form=form,
        proj_type=config.proj_type,
        row_sharded=fsdp_version(args) == 2,  # FSDP2 shards rows: the table shows the side each weight gets there
        **optimizer_cls.outer.state_options(config),
        **extra,
    )
    kwargs: dict[str, Any] = {**ctx.optimizer_kwargs, "weight_decay": args.weight_decay, **extra}
    if optimizer_cls is GaLoreAdafactor:  # as transformers' own adafactor: a fixed, scheduled lr
        kwargs.update(scale_parameter=False, relative_step=False)
    else:
        kwargs.update(ctx.adam_kwargs)
    log_others(ctx.model, {id(t.param) for t in targets}, config, form, extra.get("min_8bit_size", MIN_8BIT_SIZE))
    kwargs.update(galore_params=[t.param for t in targets], galore_config=config, layerwise=layerwise)
    kwargs["param_names"] = {param: name for name, param in ctx.model.named_parameters()}
    return optimizer_cls, kwargs
