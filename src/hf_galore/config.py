"""The GaLore options, one definition shared by the optimizers, the Trainer factory and the CLI."""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

ProjType = Literal["std", "reverse_std", "left", "right", "full"]
PROJ_TYPES: tuple[str, ...] = get_args(ProjType)
RefreshMethod = Literal["exact", "randomized"]
REFRESH_METHODS: tuple[str, ...] = get_args(RefreshMethod)
Residual = Literal["none", "fira"]
RESIDUALS: tuple[str, ...] = get_args(Residual)
Others = Literal["same", "adamw", "adamw8bit", "adafactor", "frozen"]
OTHERS: tuple[str, ...] = get_args(Others)
Proj = Literal["random", "svd"]
PROJS: tuple[str, ...] = get_args(Proj)
ScaleType = Literal["channel", "tensor"]
SCALE_TYPES: tuple[str, ...] = get_args(ScaleType)
# Options of the whole optimizer, not of a GaLore param group: they are not copied into the GaLore groups.
OPTIMIZER_OPTIONS = ("others",)


INT_OPTIONS = ("rank", "update_proj_gap", "power_iters", "oversample")
REAL_OPTIONS = ("scale", "lazy_threshold")


def as_int(value: Any) -> int | None:
    """`value` as a Python int when it is an integer (an int, a numpy integer, a 0-d integer tensor), else None.

    Ranks often come out of numpy or torch arithmetic (`np.int64(64)`, `torch.tensor(64)`); they mean the same int.
    Booleans and floats (even 2.0) are not integers here.
    """
    if isinstance(value, bool) or getattr(value, "ndim", 0) != 0 or str(getattr(value, "dtype", "")) == "torch.bool":
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def as_real(value: Any) -> float | None:
    """`value` as a Python float when it is a real number (int, float, numpy scalar; not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def checked_rank(rank: Any) -> int:
    """`rank` as a Python int (see `as_int`), or a `ValueError` naming it: every reader of a rank goes through here."""
    value = as_int(rank)
    if value is None or value < 1:
        raise ValueError(f"Invalid rank={rank!r}. Must be an int >= 1.")
    return value


def validate_galore_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Raise a `ValueError` naming the first bad option, its value and what would be accepted; return the numeric
    options as plain Python numbers (a numpy or 0-d torch integer rank becomes an int)."""
    parsed = {key: as_int(options[key]) for key in INT_OPTIONS}
    parsed.update({key: as_real(options[key]) for key in REAL_OPTIONS})
    parsed["rank"] = checked_rank(options["rank"])
    gap, scale = parsed["update_proj_gap"], parsed["scale"]
    if gap is None or gap <= 0:
        raise ValueError(
            f"Invalid update_proj_gap={options['update_proj_gap']!r}. Must be an int >= 1 (optimizer steps between "
            "refreshes)."
        )
    if scale is None or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"Invalid scale={options['scale']!r}. Must be a finite number > 0.")
    if options["proj_type"] not in PROJ_TYPES:
        raise ValueError(f"Invalid proj_type={options['proj_type']!r}. Must be one of {', '.join(PROJ_TYPES)}.")
    if options["refresh_method"] not in REFRESH_METHODS:
        method = options["refresh_method"]
        raise ValueError(f"Invalid refresh_method={method!r}. Must be one of {', '.join(REFRESH_METHODS)}.")
    for key in ("power_iters", "oversample"):
        if parsed[key] is None or parsed[key] < 0:
            raise ValueError(f"Invalid {key}={options[key]!r}. Must be an int >= 0.")
    threshold = parsed["lazy_threshold"]
    if threshold is None or not 0.0 <= threshold <= 1.0:
        raise ValueError(
            f"Invalid lazy_threshold={options['lazy_threshold']!r}. Must be a number in [0, 1] (0 turns lazy "
            "refresh off)."
        )
    if not isinstance(options["stagger"], bool):
        raise ValueError(f"Invalid stagger={options['stagger']!r}. Must be true or false.")
    if options["residual"] not in RESIDUALS:
        residual = options["residual"]
        raise ValueError(f"Invalid residual={residual!r}. Must be one of {', '.join(RESIDUALS)}.")
    if options.get("others", "same") not in OTHERS:
        raise ValueError(
            f"Invalid others={options['others']!r}. Must be one of {', '.join(OTHERS)} (how the parameters that are "
            "not GaLore targets are trained)."
        )
    return parsed


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
    refresh_method: RefreshMethod = field(
        default="randomized",
        metadata={"help": "How a refresh finds the basis: exact (full SVD) or randomized (range finder)."},
    )
    power_iters: int = field(default=2, metadata={"help": "Randomized refresh: power iterations (accuracy)."})
    oversample: int = field(default=8, metadata={"help": "Randomized refresh: extra sketch columns beyond rank."})
    lazy_threshold: float = field(
        default=0.0,
        metadata={
            "help": "Lazy refresh: while the new basis overlaps the old by at least this much, double the interval "
            "(up to 8 x update_proj_gap); 0 turns it off."
        },
    )
    stagger: bool = field(
        default=False, metadata={"help": "Spread the targets' refreshes over the interval instead of one step."}
    )

    residual: Residual = field(
        default="none",
        metadata={
            "help": "Add back the gradient outside the subspace: none (GaLore) or fira (scaled like the subspace "
            "update, column-wise, with a norm-growth limiter; Chen et al., 2024)."
        },
    )

    others: Others = field(
        default="same",
        metadata={
            "help": "How the parameters that are not targets (embeddings, norms, biases, heads) are trained: same "
            "(the optimizer's own rule on the full gradient), adamw, adamw8bit, adafactor (factored second moment, no "
            "first moment: a few KiB for an embedding table), or frozen (requires_grad=False, no state)."
        },
    )

    def __post_init__(self) -> None:
        for key, value in validate_galore_options(asdict(self)).items():
            setattr(self, key, value)

    def group_options(self) -> dict[str, Any]:
        """The keys a param group carries to be optimized with GaLore."""
        return {k: v for k, v in asdict(self).items() if k not in OPTIMIZER_OPTIONS}


GROUP_DEFAULTS: dict[str, Any] = {k: v for k, v in GaLoreConfig().group_options().items() if k != "rank"}


def validate_apollo_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """`validate_galore_options` plus APOLLO's own keys and the GaLore options that mean nothing to it; returns the
    numeric options as plain Python numbers, as `validate_galore_options` does."""
    parsed = validate_galore_options(options)
    if options["proj"] not in PROJS:
        raise ValueError(f"Invalid proj={options['proj']!r}. Must be one of {', '.join(PROJS)}.")
    if options["scale_type"] not in SCALE_TYPES:
        raise ValueError(f"Invalid scale_type={options['scale_type']!r}. Must be one of {', '.join(SCALE_TYPES)}.")
    if options["residual"] != "none":
        raise ValueError(
            f"Invalid residual={options['residual']!r} for APOLLO: its update is the whole gradient, scaled, so "
            "nothing is left outside a subspace to add back. Use residual='none' (or GaLore with residual='fira')."
        )
    if options["proj_type"] == "full":
        raise ValueError(
            "Invalid proj_type='full' for APOLLO: its scaling factors are per channel of the one projected side. "
            "Use std, reverse_std, left or right."
        )
    if options["proj"] == "random" and options["lazy_threshold"] != 0:
        raise ValueError(
            f"Invalid lazy_threshold={options['lazy_threshold']!r} with proj='random': independent random draws "
            "have no overlap to measure. Use lazy_threshold=0, or proj='svd'."
        )
    return parsed


@dataclass
class ApolloConfig(GaLoreConfig):
    """APOLLO (Zhu et al., 2025, arXiv 2412.05270): Adam's moments of a random projection of the gradient give one
    learning-rate scale per channel (or per tensor: APOLLO-Mini) for the full gradient. Defaults are transformers'
    `--optim apollo_adamw` ones; APOLLO-Mini is rank=1, scale_type='tensor' (the paper uses scale=√128 ≈ 11.3 there).

    The refresh options of `GaLoreConfig` (`refresh_method`, `power_iters`, `oversample`, `lazy_threshold`) apply
    with proj='svd' only; `residual` must stay 'none'.
    """

    scale: float = field(default=1.0, metadata={"help": "Multiplier alpha of the scaled gradient (paper Mini: √128)."})
    proj: Proj = field(
        default="random",
        metadata={
            "help": "The projection: random (N(0, 1/r) entries, regenerated from a seed, redrawn every "
            "update_proj_gap steps, never stored) or svd (GaLore's top-r basis, stored, with APOLLO's scaling)."
        },
    )
    scale_type: ScaleType = field(
        default="channel",
        metadata={"help": "channel (one factor per column or row: APOLLO) or tensor (one factor: APOLLO-Mini)."},
    )

    def __post_init__(self) -> None:
        validate_apollo_options(asdict(self))


APOLLO_GROUP_DEFAULTS: dict[str, Any] = {k: v for k, v in ApolloConfig().group_options().items() if k != "rank"}


def _convert(key: str, text: str, kind: type) -> Any:
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"Invalid optim_args {key}={text!r}. Must be true or false.")
        return text.lower() in ("true", "1")
    try:
        return kind(text)
    except ValueError:
        expected = "an int" if kind is int else "a number"
        raise ValueError(f"Invalid optim_args {key}={text!r}. Must be {expected}.") from None


def split_optim_args(text: str | None) -> dict[str, str]:
    """Split `--optim_args` ("key=value,key=value") as transformers does, but say which entry is malformed.

    transformers' own parser crashes on an entry without "=" (`"rank=4,"`: a trailing comma) with a bare unpacking
    error, and silently keeps the last of two values for one key; both raise a `ValueError` naming the entry here.
    """
    if not text:
        return {}
    pairs: dict[str, str] = {}
    for entry in text.replace(" ", "").split(","):
        key, sep, value = entry.partition("=")
        if not sep or not key or "=" in value:
            hint = " (a trailing or doubled comma?)" if not entry else ""
            raise ValueError(
                f"Invalid optim_args entry {entry!r} in {text!r}{hint}: each entry must be key=value, "
                'comma-separated, e.g. "rank=128,update_proj_gap=200,scale=0.25".'
            )
        if key in pairs:
            raise ValueError(
                f"Invalid optim_args {text!r}: {key} is given twice ({pairs[key]!r} and {value!r}). Give it once."
            )
        pairs[key] = value
    return pairs


def parse_optim_args(
    optim_args: Mapping[str, str],
    *,
    extra: Mapping[str, Any] | None = None,
    config_cls: type[GaLoreConfig] = GaLoreConfig,
) -> tuple[GaLoreConfig, dict[str, Any]]:
    """Turn `--optim_args` (already split into strings by transformers) into a config plus optimizer keywords.

    `extra` names the keys this optimizer accepts beyond the config's (`config_cls`: `GaLoreConfig`, or
    `ApolloConfig` for the apollo_* names), with their defaults (typed by them).
    An unknown key, or a value of the wrong kind, raises a `ValueError` listing the valid keys.
    """
    extra = dict(extra or {})
    defaults = asdict(config_cls())
    valid = {**defaults, **extra}
    unknown = sorted(set(optim_args) - set(valid))
    if unknown:
        listing = ", ".join(f"{key} (default {value})" for key, value in valid.items())
        raise ValueError(f"Unknown optim_args key(s) {', '.join(map(repr, unknown))}. Valid keys: {listing}.")
    typed = {key: _convert(key, text, type(valid[key])) for key, text in optim_args.items()}
    config = config_cls(**{key: typed.get(key, default) for key, default in defaults.items()})
    return config, {key: typed[key] for key in extra if key in typed}
