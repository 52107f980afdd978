"""The GaLore options, one definition shared by the optimizers, the Trainer factory and the CLI."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

ProjType = Literal["std", "reverse_std", "left", "right", "full"]
PROJ_TYPES: tuple[str, ...] = get_args(ProjType)

# Keys a param group carries to opt in to GaLore. `rank` is the switch; the others default as below.
GALORE_GROUP_KEYS: tuple[str, ...] = ("rank", "update_proj_gap", "scale", "proj_type")


def validate_galore_options(rank: Any, update_proj_gap: Any, scale: Any, proj_type: Any) -> None:
    """Raise a `ValueError` naming the first bad option, its value and what would be accepted."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"Invalid {rank=}. Must be an int >= 1.")
    if isinstance(update_proj_gap, bool) or not isinstance(update_proj_gap, int) or update_proj_gap <= 0:
        raise ValueError(f"Invalid {update_proj_gap=}. Must be an int >= 1 (optimizer steps between refreshes).")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"Invalid {scale=}. Must be a finite number > 0.")
    if proj_type not in PROJ_TYPES:
        raise ValueError(f"Invalid {proj_type=}. Must be one of {', '.join(PROJ_TYPES)}.")


@dataclass
class GaLoreConfig:
    """How GaLore projects the gradients of the target weights (paper defaults for pre-training)."""

    rank: int = field(default=128, metadata={"help": "Rank r of the gradient subspace (clipped to min(m, n))."})
    update_proj_gap: int = field(
        default=200, metadata={"help": "Optimizer steps between refreshes of the projection basis (paper: T)."}
    )
    scale: float = field(default=0.25, metadata={"help": "Multiplier alpha of the projected-back update."})
    proj_type: ProjType = field(
        default="std",
        metadata={
            "help": "Which side to project: std (the smaller side, as the paper), reverse_std, left, right, full."
        },
    )

    def __post_init__(self) -> None:
        validate_galore_options(self.rank, self.update_proj_gap, self.scale, self.proj_type)

    def group_options(self) -> dict[str, Any]:
        """The keys a param group carries to be optimized with GaLore."""
        return asdict(self)


GROUP_DEFAULTS: dict[str, Any] = {k: v for k, v in asdict(GaLoreConfig()).items() if k != "rank"}


def _convert(key: str, text: str, kind: type) -> Any:
    try:
        return kind(text)
    except ValueError:
        expected = "an int" if kind is int else "a number"
        raise ValueError(f"Invalid optim_args {key}={text!r}. Must be {expected}.") from None


def parse_optim_args(
    optim_args: Mapping[str, str], *, extra: Mapping[str, Any] | None = None
) -> tuple[GaLoreConfig, dict[str, Any]]:
    """Turn `--optim_args` (already split into strings by transformers) into a config plus optimizer keywords.

    `extra` names the keys this optimizer accepts beyond the GaLore ones, with their defaults (typed by them).
    An unknown key, or a value of the wrong kind, raises a `ValueError` listing the valid keys.
    """
    extra = dict(extra or {})
    defaults = asdict(GaLoreConfig())
    valid = {**defaults, **extra}
    unknown = sorted(set(optim_args) - set(valid))
    if unknown:
        listing = ", ".join(f"{key} (default {value})" for key, value in valid.items())
        raise ValueError(f"Unknown optim_args key(s) {', '.join(map(repr, unknown))}. Valid keys: {listing}.")
    typed = {key: _convert(key, text, type(valid[key])) for key, text in optim_args.items()}
    config = GaLoreConfig(**{key: typed.get(key, default) for key, default in defaults.items()})
    return config, {key: typed[key] for key in extra if key in typed}
