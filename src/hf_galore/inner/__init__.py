"""Update rules the GaLore core runs on projected gradients (and on the full gradient of non-target groups)."""

from __future__ import annotations

from typing import Any

from ..state_keys import FROZEN
from .adafactor import AdafactorUpdate
from .adamw import AdamWUpdate
from .adamw8bit import MIN_8BIT_SIZE, AdamW8bitUpdate
from .base import InnerForm, InnerUpdate

__all__ = [
    "FROZEN",
    "MIN_8BIT_SIZE",
    "AdafactorUpdate",
    "AdamW8bitUpdate",
    "AdamWUpdate",
    "InnerForm",
    "InnerUpdate",
    "inner_rule",
    "others_rule",
    "rule_defaults",
]

# The hyper-parameters a plain group needs when it runs a rule of another family than the optimizer's own: the
# defaults of torch.optim.AdamW, and of transformers.optimization.Adafactor as the Trainer's `--optim adafactor`
# builds it (a fixed lr, scheduled by the Trainer: relative_step=False, scale_parameter=False, no first moment).
_RULE_DEFAULTS: dict[str, dict[str, Any]] = {
    "adamw": {"betas": (0.9, 0.999), "eps": 1e-8},
    "adafactor": {
        "eps": (1e-30, 1e-3),
        "clip_threshold": 1.0,
        "decay_rate": -0.8,
        "beta1": None,
        "scale_parameter": False,
        "relative_step": False,
        "warmup_init": False,
    },
}


def rule_family(form: str) -> str:
    """Rules of one family read the same group hyper-parameters: 8-bit AdamW reads AdamW's."""
    return "adamw" if form == "adamw8bit" else form


def rule_defaults(form: InnerForm) -> dict[str, Any]:
    """The group hyper-parameters rule `form` reads, at their defaults (see `_RULE_DEFAULTS`)."""
    return dict(_RULE_DEFAULTS[rule_family(form)])


def inner_rule(form: InnerForm, *, min_8bit_size: int = MIN_8BIT_SIZE, adafactor_beta1: bool = False) -> InnerUpdate:
    """The rule named `form` (the names `GALORE_OPTIMIZERS` and the memory figures use), configured for accounting."""
    if form == "adamw":
        return AdamWUpdate()
    if form == "adamw8bit":
        return AdamW8bitUpdate(min_8bit_size=min_8bit_size)
    if form == "adafactor":
        return AdafactorUpdate(first_moment=adafactor_beta1)
    raise ValueError(f"Invalid {form=}. Must be one of adamw, adamw8bit, adafactor.")


def others_rule(own: InnerForm, others: str, *, min_8bit_size: int = MIN_8BIT_SIZE) -> InnerUpdate | None:
    """The rule an optimizer whose own rule is `own` runs on the parameters that are not GaLore targets
    (`GaLoreConfig.others`), configured for accounting; None for `frozen`."""
    if others == FROZEN:
        return None
    return inner_rule(own if others == "same" else others, min_8bit_size=min_8bit_size)
