"""The library's log output: `[hf_galore]` lines on stderr at INFO, like transformers' own library logger."""

from __future__ import annotations

import logging
import os

VERBOSITY_ENV = "HF_GALORE_VERBOSITY"


def configure_library_logger() -> None:
    """Show hf_galore's INFO lines (the target table, the end-of-training summary) unless told otherwise.

    `HF_GALORE_VERBOSITY` = debug | info (default) | warning | error. In multi-process runs only the first
    process (RANK 0) logs below WARNING, as transformers does for replicas. Does nothing if the application
    already gave the `hf_galore` logger a handler.
    """
    logger = logging.getLogger("hf_galore")
    if logger.handlers:
        return
    level = os.environ.get(VERBOSITY_ENV, "info").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError(f"Invalid {VERBOSITY_ENV}={level.lower()!r}. Must be one of debug, info, warning, error.")
    if os.environ.get("RANK", "0") != "0" and level in ("DEBUG", "INFO"):
        level = "WARNING"
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[hf_galore] %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
