"""The library's log output: `[hf_galore]` lines on stderr at INFO, like transformers' own library logger."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

VERBOSITY_ENV = "HF_GALORE_VERBOSITY"
LEVELS = ("debug", "info", "warning", "error")
DEFAULT_LEVEL = "info"


def configure_library_logger() -> None:
    """Show hf_galore's INFO lines (the target table, the end-of-training summary) unless told otherwise.

    `HF_GALORE_VERBOSITY` = debug | info (default) | warning | error; any other value warns and keeps the default
    (an import must never fail over a log setting: every launch path imports hf_galore). In multi-process runs only
    the first process (RANK 0) logs below WARNING, as transformers does for replicas. Does nothing if the
    `hf_galore` logger already has a handler (the application's, or ours from an earlier call).
    """
    logger = logging.getLogger("hf_galore")
    if logger.handlers:
        return
    level = os.environ.get(VERBOSITY_ENV, DEFAULT_LEVEL).lower()
    if level not in LEVELS:
        warnings.warn(
            f"Invalid {VERBOSITY_ENV}={level!r}: must be one of {', '.join(LEVELS)}. Using {DEFAULT_LEVEL!r}.",
            stacklevel=2,
        )
        level = DEFAULT_LEVEL
    if os.environ.get("RANK", "0") != "0" and level in ("debug", "info"):
        level = "warning"
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[hf_galore] %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False


def _library_dirs() -> tuple[str, ...]:
    """Folders whose frames a warning skips to reach the user's line: hf_galore, torch, transformers, accelerate."""
    dirs = [str(Path(__file__).parent)]
    for name in ("torch", "transformers", "accelerate"):
        module = sys.modules.get(name)
        if module is not None and getattr(module, "__file__", None):
            dirs.append(str(Path(module.__file__).parent))
    return tuple(dirs)


def warn_at_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """`warnings.warn` attributed to the first frame outside hf_galore and the libraries that call it.

    Fixed `stacklevel`s land inside torch's optimizer wrappers or the Trainer; this points at the user's line.
    """
    library = _library_dirs()
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(library):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)
