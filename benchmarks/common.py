"""What every benchmark shares: the sample text, the machine line, and writing the JSON report."""

from __future__ import annotations

import json
import logging
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

# The opening of Pride and Prejudice (public domain): real English text that needs no download.
SAMPLE_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
    "of a wife. However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered "
    "the rightful property of some one or other of their daughters. My dear Mr. Bennet, said his lady to him one "
    "day, have you heard that Netherfield Park is let at last? Mr. Bennet replied that he had not. But it is, "
    "returned she; for Mrs. Long has just been here, and she told me all about it."
)


def machine() -> str:
    """The machine line every report carries, so figures are read against what produced them."""
    return f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def write_report(report: dict, output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2))
    print(f"wrote {output}")


@contextmanager
def quiet_library_logs() -> Iterator[None]:
    """No target tables between a benchmark's rows; the level comes back after (tests run benchmarks in-process)."""
    logger = logging.getLogger("hf_galore")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
