"""GaLore optimizers for Hugging Face users: low-rank optimizer state, full-rank weights."""

from .config import PROJ_TYPES, GaLoreConfig
from .core import GaLoreOptimizer, RefreshStats
from .memory import expected_state_bytes, optimizer_state_bytes
from .optimizers import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit

__all__ = [
    "PROJ_TYPES",
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "GaLoreConfig",
    "GaLoreOptimizer",
    "RefreshStats",
    "expected_state_bytes",
    "optimizer_state_bytes",
]
