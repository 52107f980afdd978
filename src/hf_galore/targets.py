"""Which weight matrices of a model get GaLore: the library's single target-matching function.

The spec follows ``TrainingArguments.optim_target_modules`` (transformers) and PEFT's ``target_modules``:

* a list of keys: a key selects every module whose name contains it (transformers' substring rule, which
  includes PEFT's exact-name and ``.endswith("." + key)`` rules); a key containing regex metacharacters is also
  full-matched as a regex (transformers does the same for list entries);
* the aliases ``attn`` (attention projections) and ``mlp`` (feed-forward projections), usable as list keys;
* one regex string, full-matched against module names (``re.fullmatch``, as in PEFT and transformers);
* ``"all-linear"``: every linear layer except output/classifier heads (as PEFT's ``all-linear``).

Only the 2-D ``weight`` of ``torch.nn.Linear`` and of GPT-2's ``transformers.pytorch_utils.Conv1D`` (stored
transposed, in x out) is ever a target, never a bias, embedding or norm, and only when it requires grad.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.pytorch_utils import Conv1D

from .config import checked_rank
from .inner import InnerForm, InnerUpdate
from .log import warn_at_caller
from .memory import expected_state_bytes
from .projector import projection_sides, resolve_proj_type
from .report import format_table, human_bytes

__all__ = ["GaLoreTarget", "format_target_table", "parse_target_modules", "select_targets"]

logger = logging.getLogger(__name__)

ALL_LINEAR = "all-linear"
_ALIASES = ("attn", "mlp")
_ACCEPTED_FORMS = (
    "a list of module-name keys (a key selects modules whose name contains it, e.g. 'q_proj'), "
    "the aliases 'attn' and 'mlp' (also inside the list or a comma-separated string such as 'attn,mlp'), "
    f"'{ALL_LINEAR}', or one regex full-matched against module names (e.g. r'.*\\.(q|v)_proj')"
)
# "." is left out on purpose: dotted module names ("self_attn.q_proj") are keys, not regexes.
_REGEX_METACHARS = frozenset("^$*+?{}[]\\|()")

# Alias rules, checked from the module's parent up to the root: the nearest container that classifies decides, so
# BERT's ``attention.output.dense`` is attention while the layer-level ``output.dense`` falls to the name rules below.
_ALIAS_CONTAINERS: tuple[tuple[str, re.Pattern[str]], ...] = (
    # self_attn, attn, attention, self_attention, SelfAttention, EncDecAttention, crossattention, encoder_attn, ...
    ("attn", re.compile(r"[a-z_]*att(?:n|ention)[a-z_]*", re.IGNORECASE)),
    # mlp, ffn, feed_forward, DenseReluDense (T5, gated T5 too), intermediate (BERT), block_sparse_moe, experts, ...
    (
        "mlp",
        re.compile(
            r"[a-z_]*(?:mlp|ffn|moe)[a-z_]*|feed_?forward|dense_?relu_?dense|dense_?gated_?act_?dense|intermediate"
            r"|(?:shared_)?experts?",
            re.IGNORECASE,
        ),
    ),
)
# Full-name rules for feed-forward layers that sit directly in a numbered layer, without a container.
_ALIAS_NAMES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("mlp", re.compile(r"(?:.*\.)?\d+\.output\.dense")),  # BERT/RoBERTa/ViT layer output (not attention.output)
    ("mlp", re.compile(r"(?:.*\.)?\d+\.fc[12]")),  # OPT, BART, Whisper
)
# MoE routers (out_features = number of experts) are not feed-forward projections; all-linear still takes them.
_ROUTER_LEAVES = frozenset({"gate", "router", "shared_expert_gate"})
# Task heads: never selected unless the pattern's text names them. The pooler is treated as a head on purpose: it
# only feeds BERT's [CLS] classifier (RoBERTa's equivalent lives in ``classifier.dense``), is one hidden x hidden
# matrix that GaLore barely saves memory on, and GaLore is meant for the transformer blocks.
_HEAD_COMPONENTS = frozenset(
    {"lm_head", "classifier", "pre_classifier", "classification_head", "score", "qa_outputs", "pooler", "cls"}
)
_MAX_LISTED = 20


@dataclass(frozen=True)
class GaLoreTarget:
    """One weight matrix selected for GaLore, with what is needed to project it and to report the choice.

    ``name`` is the parameter's ``named_parameters()`` name (for a tied weight, its first owner's), so it can be
    matched against state dicts; ``transposed`` marks Conv1D weights, stored (in, out) instead of (out, in).
    """

    name: str
    module_name: str
    pattern: str
    param: torch.nn.Parameter = field(compare=False, repr=False)
    shape: tuple[int, int]
    transposed: bool


def _is_regex(text: str) -> bool:
    return any(char in _REGEX_METACHARS for char in text)


def _compile(pattern: str, spec: object) -> None:
    try:
        re.compile(pattern)
    except re.error as error:
        raise ValueError(
            f"Invalid optim_target_modules={spec!r}: regex {pattern!r} does not compile: {error}."
        ) from None


def parse_target_modules(spec: str | list[str] | tuple[str, ...] | set[str] | None) -> list[str] | str:
    """Normalise ``optim_target_modules``, whose command-line form is one string, into a list of keys or one regex.

    ``"attn,mlp"`` -> ``["attn", "mlp"]``; ``"all_linear"`` -> ``"all-linear"``; a string with regex metacharacters
    (other than ".") stays one regex string, commas included; any other string is a comma-separated key list, so
    ``"q_proj"`` -> ``["q_proj"]`` (transformers would full-match it as a regex and find nothing). Empty entries
    are errors rather than dropped.
    """
    if spec is None:
        raise ValueError(
            f"Invalid optim_target_modules={spec!r}: GaLore needs target modules. Accepted: {_ACCEPTED_FORMS}."
        )
    if isinstance(spec, str):
        text = spec.strip()
        if text.lower().replace("_", "-") == ALL_LINEAR:
            return ALL_LINEAR
        if _is_regex(text):
            _compile(text, spec)
            return text
        keys = [key.strip() for key in text.split(",")]
    elif isinstance(spec, (list, tuple, set, frozenset)):
        items = sorted(spec) if isinstance(spec, (set, frozenset)) else list(spec)
        for item in items:
            if not isinstance(item, str):
                raise TypeError(f"Invalid optim_target_modules={spec!r}: entry {item!r} is not a string.")
        keys = [item.strip() for item in items]
        if len(keys) == 1 and keys[0].lower().replace("_", "-") == ALL_LINEAR:
            return ALL_LINEAR
    else:
        raise TypeError(
            f"Invalid optim_target_modules={spec!r} of type {type(spec).__name__}: expected a string or a list of "
            f"strings. Accepted: {_ACCEPTED_FORMS}."
        )
    if not keys or any(not key for key in keys):
        raise ValueError(
            f"Invalid optim_target_modules={spec!r}: it is empty or has an empty entry. Accepted: {_ACCEPTED_FORMS}."
        )
    if any(key.lower().replace("_", "-") == ALL_LINEAR for key in keys):
        raise ValueError(
            f"Invalid optim_target_modules={spec!r}: '{ALL_LINEAR}' already selects every linear layer and cannot be "
            f"combined with other keys. Accepted: {_ACCEPTED_FORMS}."
        )
    for key in keys:
        if _is_regex(key):
            _compile(key, spec)
    return keys


def _alias_of(module_name: str) -> str | None:
    """Classify a module as ``attn``, ``mlp`` or neither, from its nearest classifying container then its name."""
    parts = module_name.split(".")
    for component in reversed(parts[:-1]):
        for alias, container in _ALIAS_CONTAINERS:
            if container.fullmatch(component):
                return None if alias == "mlp" and parts[-1] in _ROUTER_LEAVES else alias
    for alias, rule in _ALIAS_NAMES:
        if rule.fullmatch(module_name):
            return alias
    return None


def _matching_pattern(spec: list[str] | str, module_name: str) -> str | None:
    """The pattern (key, alias, regex or all-linear) that selects ``module_name``, or None."""
    if spec == ALL_LINEAR:
        return ALL_LINEAR
    if isinstance(spec, str):
        return spec if re.fullmatch(spec, module_name) else None
    for key in spec:
        if key in _ALIASES:
            if _alias_of(module_name) == key:
                return key
        elif key in module_name or (_is_regex(key) and re.fullmatch(key, module_name)):
            return key
    return None


def _head_names(module_name: str, output_name: str | None) -> set[str]:
    """Names that mark ``module_name`` as a task head (empty when it is not one)."""
    names = {part for part in module_name.split(".") if part in _HEAD_COMPONENTS}
    if output_name is not None and (module_name == output_name or module_name.startswith(output_name + ".")):
        names.add(output_name.rsplit(".", 1)[-1])
    return names


def _peft_adapter_prefixes(model: torch.nn.Module) -> tuple[str, ...]:
    """Name prefixes of the adapter modules inside PEFT tuner layers (everything there but ``base_layer``)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return tuple(
        f"{name}.{child}."
        for name, module in model.named_modules()
        if isinstance(module, BaseTunerLayer)
        for child, _ in module.named_children()
        if child != "base_layer"
    )


def _output_embeddings_name(model: torch.nn.Module) -> str | None:
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    if not callable(get_output_embeddings):
        return None
    try:
        output = get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if output is None:
        return None
    return next((name for name, module in model.named_modules() if module is output), None)


def _format_indices(values: Iterable[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"{0..2,5}"``; one value stays literal."""
    ordered = sorted(set(values))
    if len(ordered) == 1:
        return str(ordered[0])
    runs: list[str] = []
    start = previous = ordered[0]
    for value in [*ordered[1:], None]:
        if value is not None and value == previous + 1:
            previous = value
            continue
        runs.append(str(start) if start == previous else f"{start}..{previous}")
        if value is not None:
            start = previous = value
    return "{" + ",".join(runs) + "}"


def _abridge(names: Iterable[str]) -> list[str]:
    """Collapse numbered components (layer, block, expert indices) so each module template is listed once."""
    groups: dict[tuple[str, ...], list[tuple[int, ...]]] = {}
    for name in names:
        parts = name.split(".")
        template = tuple("{}" if part.isdigit() else part for part in parts)
        groups.setdefault(template, []).append(tuple(int(part) for part in parts if part.isdigit()))
    lines: list[str] = []
    for template, indices in groups.items():
        unique = list(dict.fromkeys(indices))
        per_position = [sorted({index[i] for index in unique}) for i in range(len(unique[0]))]
        size = 1
        for values in per_position:
            size *= len(values)
        # One line when the indices form a full grid, else one line per value of the inner indices.
        rows = [per_position] if size == len(unique) else _rows_by_inner_indices(unique)
        for row in rows:
            fills = iter(_format_indices(values) for values in row)
            lines.append(".".join(next(fills) if part == "{}" else part for part in template))
    return lines


def _rows_by_inner_indices(indices: list[tuple[int, ...]]) -> list[list[list[int]]]:
    by_inner: dict[tuple[int, ...], list[int]] = {}
    for index in indices:
        by_inner.setdefault(index[1:], []).append(index[0])
    return [[outer, *[[value] for value in inner]] for inner, outer in by_inner.items()]


def _listing(names: Sequence[str], indent: str = "  ") -> str:
    lines = _abridge(names)
    shown = [indent + line for line in lines[:_MAX_LISTED]]
    if len(lines) > _MAX_LISTED:
        shown.append(f"{indent}... ({len(lines) - _MAX_LISTED} more)")
    return "\n".join(shown)


def select_targets(
    model: torch.nn.Module,
    target_modules: str | list[str] | tuple[str, ...] | set[str] | None,
    *,
    optimizer_name: str = "GaLore",
    rank: int | None = None,
    form: InnerForm | InnerUpdate = "adamw",
    row_sharded: bool = False,
    **state_options: Any,
) -> list[GaLoreTarget]:
    """Select the weights that get GaLore, in ``model.named_modules()`` order; log the selection once at INFO.

    ``target_modules`` is anything :func:`parse_target_modules` accepts. Heads (the module returned by
    ``get_output_embeddings()``, and modules under ``lm_head``, ``classifier``, ``pre_classifier``,
    ``classification_head``, ``score``, ``qa_outputs``, ``cls`` or ``pooler``) are selected only when the matching
    pattern's text names them (e.g. the key ``"lm_head"`` or the regex ``r"lm_head|.*q_proj"``), so ``all-linear``,
    the aliases, broad regexes such as ``".*"`` and substring keys such as ``"dense"`` never pick them. The pooler
    counts as a head (PEFT's ``all-linear`` keeps it): it only serves the [CLS] classifier and is one small matrix.
    A weight shared by several modules is selected once. Raises ValueError when nothing is selected, saying what the
    patterns did match (non-linear modules, frozen weights, heads) and listing the model's linear modules.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"Invalid model of type {type(model).__name__}: expected a torch.nn.Module.")
    spec = parse_target_modules(target_modules)
    output_name = _output_embeddings_name(model)
    param_names = {id(param): name for name, param in model.named_parameters()}

    targets: list[GaLoreTarget] = []
    seen: set[int] = set()
    linear_names: list[str] = []
    non_linear: list[str] = []
    frozen: list[str] = []
    heads: list[str] = []
    adapters = _peft_adapter_prefixes(model)
    for module_name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        is_candidate = isinstance(module, (torch.nn.Linear, Conv1D)) and isinstance(weight, torch.Tensor)
        if is_candidate and f"{module_name}.".startswith(adapters):
            continue  # a PEFT adapter's own low-rank factors (lora_A, lora_B, ...) are never GaLore targets
        if is_candidate:
            linear_names.append(module_name)
        elif spec == ALL_LINEAR or not module_name:
            continue  # the root is never a target unless it is itself a linear layer
        pattern = _matching_pattern(spec, module_name)
        if pattern is None:
            continue
        if not is_candidate or weight.ndim != 2:
            non_linear.append(f"{module_name} ({type(module).__name__})")
            continue
        head_names = _head_names(module_name, output_name)
        if head_names and not any(head in pattern for head in head_names):
            heads.append(module_name)
            continue
        if not weight.requires_grad:
            frozen.append(module_name)
            continue
        if id(weight) in seen:
            continue
        seen.add(id(weight))
        weight_name = f"{module_name}.weight" if module_name else "weight"
        targets.append(
            GaLoreTarget(
                name=param_names.get(id(weight), weight_name),
                module_name=module_name,
                pattern=pattern,
                param=weight,
                shape=(int(weight.shape[0]), int(weight.shape[1])),
                transposed=isinstance(module, Conv1D),
            )
        )

    if non_linear:
        logger.debug("%s skips %d matched non-linear modules: %s", optimizer_name, len(non_linear), non_linear)
    skipped = [
        (
            f"non-linear modules ({optimizer_name} projects only the 2-D weight of torch.nn.Linear and Conv1D)",
            non_linear,
        ),
        ("frozen weights (requires_grad=False)", frozen),
        ("output/classifier heads, which need their name in the pattern (e.g. 'lm_head', 'classifier')", heads),
    ]
    skipped = [(label, names) for label, names in skipped if names]
    if not targets:
        if len(skipped) == 1:
            label, names = skipped[0]
            matched = f"It matched only {label}:\n{_listing(names)}\n"
        else:
            matched = "".join(f"It matched {label}:\n{_listing(names)}\n" for label, names in skipped)
        linear_listing = _listing(linear_names) if linear_names else "  (none)"
        raise ValueError(
            f"No target modules found for {optimizer_name} with optim_target_modules={target_modules!r}"
            f" (parsed as {spec!r}).\n{matched}"
            f"Linear modules in this model:\n{linear_listing}\n"
            f"Aliases: 'attn' (attention projections), 'mlp' (feed-forward projections), '{ALL_LINEAR}' (every "
            f"linear layer but the heads). Accepted: {_ACCEPTED_FORMS}."
        )
    _warn_unmatched_keys(model, spec, target_modules, linear_names, len(targets))
    notes = "".join(
        f"\nskipped {len(names)} {label.split(' (')[0]}: {', '.join(_abridge(names))}"
        for label, names in skipped
        if names is not non_linear
    )
    table = format_target_table(targets, rank, form, row_sharded=row_sharded, **state_options)
    logger.info("%s selected %d weight matrices:\n%s%s", optimizer_name, len(targets), table, notes)
    return targets


def _warn_unmatched_keys(
    model: torch.nn.Module, spec: list[str] | str, target_modules: object, linear_names: list[str], selected: int
) -> None:
    """Warn about each key of a key list that matches no module name while the others select targets (PEFT warns
    alike for its unmatched pattern keys and raises only when nothing matches, as `select_targets` does)."""
    if isinstance(spec, str):
        return
    names = [name for name, _ in model.named_modules() if name]
    unmatched = [key for key in spec if not any(_matching_pattern([key], name) for name in names)]
    if unmatched:
        listed = ", ".join(map(repr, unmatched))
        warn_at_caller(
            f"optim_target_modules={target_modules!r}: {listed} {'matches' if len(unmatched) == 1 else 'match'} no "
            f"module of this model, ignored (the other keys selected {selected} weight matrices). Check the spelling "
            "against the linear modules: "
            f"{', '.join(_abridge(linear_names)[:6])}."
        )


def _side(shape: tuple[int, int], proj_type: str) -> str:
    left, right = projection_sides(shape, proj_type)
    return "both" if left and right else "left" if left else "right"


def format_target_table(
    targets: Sequence[GaLoreTarget],
    rank: int | None = None,
    form: InnerForm | InnerUpdate = "adamw",
    *,
    row_sharded: bool = False,
    **state_options: Any,
) -> str:
    """A terminal table, one row per (pattern, shape): module count, abridged names, rank, state bytes and the side
    the gradient is projected from (``row_sharded``: as under FSDP2, where ``std`` projects from the right).

    With ``rank``, the effective rank is ``min(rank, min(shape))`` and the state is what ``expected_state_bytes``
    gives for the inner ``form``, a rule or its name (fp32 AdamW: ``4 * (2*r*max(m, n) + r*min(m, n))`` bytes per
    matrix, two moments of the projected gradient plus the basis); the total line compares it with the ``4 * 2*m*n``
    bytes full-rank AdamW would keep. Shapes are as stored; ``*`` marks Conv1D weights stored in x out.
    """
    rank = None if rank is None else checked_rank(rank)
    groups: dict[tuple[str, tuple[int, int], bool], list[GaLoreTarget]] = {}
    for target in targets:
        groups.setdefault((target.pattern, target.shape, target.transposed), []).append(target)

    header = ("pattern", "modules", "shape", "rank", "state bytes", "side", "names")
    proj_type = state_options.pop("proj_type", "std")
    rows: list[tuple[str, ...]] = []
    total_state = 0
    total_entries = 0
    for (pattern, shape, transposed), members in groups.items():
        effective = None if rank is None else min(rank, *shape)
        try:
            resolved = resolve_proj_type(proj_type, shape, row_sharded=row_sharded)
        except ValueError as err:
            raise ValueError(f"{members[0].module_name}: {err}") from None
        options = {"form": form, "rank": rank, "dtype": members[0].param.dtype, "proj_type": resolved, **state_options}
        state = 0 if effective is None else expected_state_bytes(shape, **options) * len(members)
        total_state += state
        total_entries += len(members) * shape[0] * shape[1]
        names = _abridge(member.module_name for member in members)
        rows.append(
            (
                pattern,
                str(len(members)),
                f"{shape[0]}x{shape[1]}{'*' if transposed else ''}",
                "-" if effective is None else str(effective),
                "-" if effective is None else f"{state:,}",
                "-" if effective is None else _side(shape, resolved),
                names[0],
            )
        )
        rows.extend(("", "", "", "", "", "", name) for name in names[1:])  # the group's further names, one a line

    lines = [format_table(header, rows, right={1, 3, 4}, rule=True, free_last=True)]
    total = f"total: {len(targets)} {'matrix' if len(targets) == 1 else 'matrices'}, {total_entries:,} weights"
    if rank is not None:
        adamw = 4 * 2 * total_entries
        total += (
            f", GaLore state {total_state:,} bytes ({human_bytes(total_state)}) "
            f"vs full-rank AdamW {adamw:,} bytes ({human_bytes(adamw)})"
        )
    lines.append(total)
    if any(target.transposed for target in targets):
        lines.append("* Conv1D weight stored as (in, out)")
    return "\n".join(lines)
