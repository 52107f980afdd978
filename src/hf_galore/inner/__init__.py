"""Update rules the GaLore core runs on projected gradients."""

from .adafactor import AdafactorUpdate
from .adamw import AdamWUpdate
from .adamw8bit import AdamW8bitUpdate
from .base import InnerUpdate

__all__ = ["AdafactorUpdate", "AdamW8bitUpdate", "AdamWUpdate", "InnerUpdate"]
