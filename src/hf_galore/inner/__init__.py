"""Update rules the GaLore core runs on projected gradients."""

from .adafactor import AdafactorUpdate
from .adamw import AdamWUpdate
from .adamw8bit import MIN_8BIT_SIZE, AdamW8bitUpdate
from .base import InnerForm, InnerUpdate

__all__ = [
    "MIN_8BIT_SIZE",
    "AdafactorUpdate",
    "AdamW8bitUpdate",
    "AdamWUpdate",
    "InnerForm",
    "InnerUpdate",
    "inner_rule",
]


def inner_rule(form: InnerForm, *, min_8bit_size: int = MIN_8BIT_SIZE, adafactor_beta1: bool = False) -> InnerUpdate:
    """The rule named `form` (the names `GALORE_OPTIMIZERS` and the memory figures use), configured for accounting."""
    if form == "adamw":
        return AdamWUpdate()
    if form == "adamw8bit":
        return AdamW8bitUpdate(min_8bit_size=min_8bit_size)
    if form == "adafactor":
        return AdafactorUpdate(first_moment=adafactor_beta1)
    raise ValueError(f"Invalid {form=}. Must be one of adamw, adamw8bit, adafactor.")
