"""GaLore optimizers for Hugging Face users: low-rank optimizer state, full-rank weights.

Importing the package registers hf_galore as what transformers' `--optim galore_*` and `apollo_adamw*` names build.
"""

from .callback import GaLoreCallback
from .config import PROJ_TYPES, ApolloConfig, GaLoreConfig
from .core import GaLoreOptimizer, RefreshStats
from .integration import register
from .log import configure_library_logger
from .memory import expected_state_bytes, optimizer_state_bytes
from .optimizers import ApolloAdamW, ApolloAdamW8bit, GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit
from .targets import select_targets

configure_library_logger()
register()

__all__ = [
    "PROJ_TYPES",
    "ApolloAdamW",
    "ApolloAdamW8bit",
    "ApolloConfig",
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "GaLoreCallback",
    "GaLoreConfig",
    "GaLoreOptimizer",
    "RefreshStats",
    "expected_state_bytes",
    "optimizer_state_bytes",
    "register",
    "select_targets",
]
