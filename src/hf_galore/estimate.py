"""`hf-galore estimate`: what a training run will hold in memory, planned before any weight is loaded.

The model is built on the meta device from its config (nothing is allocated), the GaLore targets are picked by the
same `select_targets` the Trainer integration uses, and the optimizer state is counted with `expected_state_bytes`,
the formula the tests hold equal, byte for byte, to what the optimizers allocate. Weights, gradients and optimizer
state are exact counts; activations and the basis-refresh workspace are estimates:

* activations, per decoder layer, s·b·h·(34 + 5·a·s/h) bytes at 16 bits (Korthikanti et al. 2022, "Reducing
  Activation Recomputation in Large Transformer Models", no recomputation; doubled at 32 bits), plus the head:
  2·s·b·h values in the model dtype (final norm and LM-head inputs) and s·b·V·(dtype bytes + 8) for the logits, their
  float32 copy and the loss's float32 log-softmax. With gradient checkpointing every layer keeps only its input
  (s·b·h values) and one layer's activations are alive during its recomputation.
* refresh workspace: the SVD of the largest target, `torch.linalg.svd(G.float(), full_matrices=False)`: a float32
  copy of G (m×n) plus U (m×k), S (k) and Vᵀ (k×n), k = min(m, n); the solver's own scratch is not counted.

Not counted: the CUDA context, allocator fragmentation and kernel temporaries (add them with `--overhead`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .config import GaLoreConfig, parse_optim_args
from .memory import expected_state_bytes
from .presets import PRESETS, preset_config
from .targets import select_targets
from .trainer_factory import _EXTRA_OPTIM_ARGS, GALORE_OPTIMIZERS

__all__ = [
    "DTYPES",
    "PLAIN_OPTIMIZERS",
    "MemoryPlan",
    "activation_bytes",
    "build_meta_model",
    "estimate",
    "estimate_command_parser",
    "format_plan",
    "load_model_config",
    "parse_memory_size",
    "resolve_dtype",
]

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

# transformers `--optim` names without GaLore that the planner models -> how their state is counted.
PLAIN_OPTIMIZERS: dict[str, str] = {
    "adamw_torch": "torch_adamw",
    "adamw_torch_fused": "torch_adamw",
    "adamw_bnb_8bit": "bnb_adamw8bit",
    "adamw_8bit": "bnb_adamw8bit",
    "adafactor": "adafactor",
}
_COMPARED_GALORE = ("galore_adamw", "galore_adamw_8bit", "galore_adafactor")
_COMPARED_PLAIN = ("adamw_torch", "adamw_bnb_8bit")
_TORCH_STEP_BYTES = 4  # torch.optim.AdamW keeps `step` as a float32 scalar tensor per parameter
_ADAFACTOR_RMS_BYTES = 4  # transformers' Adafactor keeps the weight's RMS as a float32 scalar tensor per parameter
_BNB_QMAP_BYTES = 2 * 256 * 4  # bitsandbytes' two 256-entry float32 quantization maps, shared by all 8-bit tensors
_BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes' default; transformers' adamw_bnb_8bit does not change it
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


@dataclass(frozen=True)
class _Tensor:
    """A kind of trainable tensor: the planner counts tensors by (shape, dtype, GaLore target or not)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    target: bool

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class MemoryPlan:
    """Every figure of a plan, in bytes (None where it cannot be computed); `asdict` gives the `--json` output."""

    model: dict[str, Any]
    optimizer: dict[str, Any]
    batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    weights: int
    gradients: int
    gradients_full: int
    gradients_layerwise: int
    optimizer_state: int
    refresh_workspace: int
    activations: int | None
    overhead: int
    total: int
    state_by_optimizer: dict[str, int]
    device_memory: int | None = None
    fits: bool | None = None
    largest_rank: int | None = None
    largest_batch_size: int | None = None
    notes: list[str] = field(default_factory=list)


def parse_memory_size(text: str | int) -> int:
    """Bytes from `24GB` (10⁹), `24GiB` (2³⁰), `80G`, `512MiB` or a plain byte count, as accelerate reads sizes."""
    if isinstance(text, int) and not isinstance(text, bool) and text >= 0:
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"Invalid memory size {text!r}. Must be a number of bytes or a number with a unit: "
            "B, KB, MB, GB, TB (powers of 1000; K, M, G, T too) or KiB, MiB, GiB, TiB (powers of 1024), e.g. 24GB."
        )
    return int(float(match.group(1)) * _UNITS[unit])


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """The torch dtype for `float32`, `bfloat16`, `float16` (or fp32, bf16, fp16); anything else is an error."""
    if isinstance(name, torch.dtype) and name in DTYPES.values():
        return name
    key = _DTYPE_ALIASES.get(str(name).lower(), str(name).lower())
    if key not in DTYPES:
        accepted = ", ".join([*DTYPES, *_DTYPE_ALIASES])
        raise ValueError(f"Invalid dtype={name!r}. Must be one of {accepted}.")
    return DTYPES[key]


def load_model_config(
    *, preset: str | None = None, config: str | os.PathLike | None = None, model: str | None = None
) -> tuple[Any, str]:
    """The model config and a label for it, from exactly one of: a preset, a local config.json (or its folder), or
    a model id / folder for `AutoConfig.from_pretrained` (a hub id needs the network or the local cache)."""
    from transformers import AutoConfig

    if sum(source is not None for source in (preset, config, model)) != 1:
        raise ValueError(
            "Give exactly one model source: preset=, config= (a config.json path) or model= (a model id)."
        )
    if preset is not None:
        return preset_config(preset), f"{preset} (preset)"
    if config is not None:
        path = os.fspath(config)
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise ValueError(f"Invalid config={path!r}: no such file {file!r}. Pass a config.json or its folder.")
        try:
            return AutoConfig.from_pretrained(file), file
        except (ValueError, OSError, KeyError) as error:
            raise ValueError(f"Invalid config={file!r}: transformers cannot read it ({error}).") from None
    try:
        return AutoConfig.from_pretrained(model, local_files_only=True), model  # a folder, or the cache: no network
    except (ValueError, OSError):
        pass
    try:
        return AutoConfig.from_pretrained(model), model
    except (ValueError, OSError) as error:
        raise ValueError(
            f"Cannot load the config of model={model!r} ({str(error).splitlines()[0]}). A hub id needs the network "
            "or the local Hugging Face cache (HF_HUB_OFFLINE=1 skips the network); offline, pass "
            "--config PATH/config.json or --preset NAME."
        ) from None


def build_meta_model(config: Any, dtype: torch.dtype) -> torch.nn.Module:
    """The model on the meta device, in `dtype`: every shape and dtype, no memory. A causal LM where the config has
    one, else the bare `AutoModel`."""
    from transformers import AutoModel, AutoModelForCausalLM

    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
        except ValueError:
            return AutoModel.from_config(config, dtype=dtype)


def activation_bytes(
    config: Any, *, batch_size: int, seq_len: int, dtype: torch.dtype, gradient_checkpointing: bool = False
) -> int | None:
    """Estimated bytes of activations kept for the backward pass (module docstring); None when the config lacks
    hidden_size, num_hidden_layers, num_attention_heads or vocab_size."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    sizes = [getattr(text, key, None) for key in ("hidden_size", "num_hidden_layers", "num_attention_heads")]
    vocab = getattr(text, "vocab_size", None)
    if any(not isinstance(value, int) for value in [*sizes, vocab]):
        return None
    h, layers, heads = sizes
    s, b, k = seq_len, batch_size, dtype.itemsize
    layer = (34 * s * b * h + 5 * heads * s * s * b) * k // 2  # k/2: the formula counts 16-bit values
    head = 2 * s * b * h * k + s * b * vocab * (k + 8)
    if gradient_checkpointing:
        return layers * s * b * h * k + layer + head
    return layers * layer + head


def _state_bytes(
    tensors: Mapping[_Tensor, int], optim: str, *, rank: int | None, proj_type: str, min_8bit_size: int
) -> int:
    """Bytes optimizer `optim` allocates for these trainable tensors (what `optimizer_state_bytes` measures)."""
    total = 0
    if optim in GALORE_OPTIMIZERS:
        form = GALORE_OPTIMIZERS[optim][1]
        for tensor, count in tensors.items():
            galore = {"rank": rank, "proj_type": proj_type} if tensor.target else {}
            total += count * expected_state_bytes(
                tensor.shape, form=form, dtype=tensor.dtype, min_8bit_size=min_8bit_size, **galore
            )
        return total
    kind = PLAIN_OPTIMIZERS[optim]
    for tensor, count in tensors.items():
        if kind == "torch_adamw":
            total += count * (expected_state_bytes(tensor.shape, form="adamw", dtype=tensor.dtype) + _TORCH_STEP_BYTES)
        elif kind == "bnb_adamw8bit":
            total += count * expected_state_bytes(tensor.shape, form="adamw8bit", min_8bit_size=_BNB_MIN_8BIT_SIZE)
        else:
            total += count * (expected_state_bytes(tensor.shape, form="adafactor") + _ADAFACTOR_RMS_BYTES)
    if kind == "bnb_adamw8bit" and any(math.prod(t.shape) >= _BNB_MIN_8BIT_SIZE for t in tensors):
        total += _BNB_QMAP_BYTES
    return total


def _refresh_workspace(tensors: Mapping[_Tensor, int], config: GaLoreConfig, rank: int) -> int:
    """float32 bytes alive during the largest target's basis refresh (one refresh runs at a time).

    exact: `svd(G.float())` holds a float32 G (m×n; torch copies it for LAPACK even when G is float32), U (m×k), S (k)
    and Vᵀ (k×n), k = min(m, n). randomized: G.float() (a copy only when G is not float32), the sketch and its QR
    (2·m·l), the Gaussian test matrix, Gᵀ·Q and Qᵀ·G (3·n·l) and the small SVD (l×l), l = min(rank + oversample, m, n).
    """
    sizes = [0]
    for tensor in tensors:
        if not tensor.target:
            continue
        m, n = tensor.shape
        if config.refresh_method == "exact":
            k = min(m, n)
            sizes.append(4 * (m * n + m * k + k + k * n))
        else:
            sketch = min(rank + config.oversample, m, n)
            copy = 0 if tensor.dtype == torch.float32 else m * n
            sizes.append(4 * (copy + 2 * m * sketch + 3 * n * sketch + sketch * sketch))
    return max(sizes)


def _optimizer_setup(
    model: torch.nn.Module, optim: str, target_modules: Any, optim_args: str | Mapping[str, str] | None
) -> tuple[GaLoreConfig | None, int, list[Any]]:
    """GaLore config, min_8bit_size and targets, parsed and validated as the Trainer integration does."""
    from transformers.trainer_optimizer import _parse_optim_args

    accepted = [*GALORE_OPTIMIZERS, *PLAIN_OPTIMIZERS]
    if optim not in accepted:
        raise ValueError(f"Invalid optim={optim!r}. The planner knows: {', '.join(accepted)}.")
    if isinstance(optim_args, str) or optim_args is None:
        try:
            optim_args = _parse_optim_args(optim_args)
        except ValueError:
            raise ValueError(
                f"Invalid optim_args={optim_args!r}. Must be comma-separated key=value pairs, "
                "e.g. 'rank=128,scale=0.25'."
            ) from None
    galore = optim in GALORE_OPTIMIZERS
    if optim_args and not galore:
        raise ValueError(
            f"Invalid optim_args={dict(optim_args)!r} with optim={optim!r}: the planner reads optim_args for the "
            f"galore_* optimizers only ({', '.join(GALORE_OPTIMIZERS)})."
        )
    extra = _EXTRA_OPTIM_ARGS.get(GALORE_OPTIMIZERS[optim][0], {}) if galore else {}
    config, extras = parse_optim_args(dict(optim_args or {}), extra=extra)
    min_8bit_size = extras.get("min_8bit_size", _BNB_MIN_8BIT_SIZE)
    if isinstance(min_8bit_size, bool) or min_8bit_size < 0:
        raise ValueError(f"Invalid {min_8bit_size=}. Must be an int >= 0.")
    if not galore and target_modules is None:
        return None, min_8bit_size, []
    form = GALORE_OPTIMIZERS[optim][1] if galore else "adamw"
    targets = select_targets(model, target_modules, optimizer_name=optim, rank=config.rank, form=form)
    return config, min_8bit_size, targets


def estimate(
    *,
    preset: str | None = None,
    config: str | os.PathLike | None = None,
    model: str | None = None,
    optim: str = "adamw_torch_fused",
    optim_target_modules: Any = None,
    optim_args: str | Mapping[str, str] | None = None,
    dtype: str | torch.dtype = "float32",
    batch_size: int = 1,
    seq_len: int = 256,
    gradient_checkpointing: bool = False,
    device_memory: str | int | None = None,
    overhead: str | int = 0,
) -> MemoryPlan:
    """Plan a run's memory from the same flags as training (model source, `--optim*`), dtype and batch/sequence,
    so a user learns whether it fits before renting the device."""
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Invalid {name}={value!r}. Must be an int >= 1.")
    torch_dtype = resolve_dtype(dtype)
    device_bytes = None if device_memory is None else parse_memory_size(device_memory)
    overhead_bytes = parse_memory_size(overhead)
    model_config, label = load_model_config(preset=preset, config=config, model=model)
    meta = build_meta_model(model_config, torch_dtype)
    galore_config, min_8bit_size, targets = _optimizer_setup(meta, optim, optim_target_modules, optim_args)

    target_ids = {id(t.param) for t in targets}
    params = list(meta.parameters())
    tensors = Counter(
        _Tensor(tuple(p.shape), p.dtype, id(p) in target_ids) for p in params if p.requires_grad and p.numel()
    )
    weights = sum(p.numel() * p.dtype.itemsize for p in [*params, *meta.buffers()])
    galore = optim in GALORE_OPTIMIZERS
    layerwise = galore and GALORE_OPTIMIZERS[optim][2]
    gradients_full = sum(t.nbytes * count for t, count in tensors.items())
    gradients_layerwise = max((t.nbytes for t in tensors), default=0)
    gradients = gradients_layerwise if layerwise else gradients_full
    configured_rank = galore_config.rank if galore_config is not None else None
    proj_type = galore_config.proj_type if galore_config is not None else "std"

    def state(name: str, rank: int | None = configured_rank) -> int:
        return _state_bytes(tensors, name, rank=rank, proj_type=proj_type, min_8bit_size=min_8bit_size)

    def workspace(rank: int | None = configured_rank) -> int:
        return _refresh_workspace(tensors, galore_config, rank) if galore else 0

    def activations(batch: int = batch_size) -> int | None:
        return activation_bytes(
            model_config,
            batch_size=batch,
            seq_len=seq_len,
            dtype=torch_dtype,
            gradient_checkpointing=gradient_checkpointing,
        )

    def without_activations(rank: int | None = configured_rank) -> int:
        return weights + gradients + state(optim, rank) + workspace(rank) + overhead_bytes

    compared = [*(_COMPARED_GALORE if targets else ()), *_COMPARED_PLAIN]
    by_optimizer = {name: state(name) for name in compared}
    by_optimizer.setdefault(optim, state(optim))
    plan = MemoryPlan(
        model={
            "source": label,
            "architecture": type(meta).__name__,
            "parameters": sum(p.numel() for p in params),
            "trainable_parameters": sum(math.prod(t.shape) * count for t, count in tensors.items()),
            "dtype": str(torch_dtype).removeprefix("torch."),
        },
        optimizer={
            "name": optim,
            "layerwise": layerwise,
            "galore": None if galore_config is None else {**asdict(galore_config), "min_8bit_size": min_8bit_size},
            "target_modules": optim_target_modules,
            "targets": len(targets),
            "target_parameters": sum(t.param.numel() for t in targets),
        },
        batch_size=batch_size,
        seq_len=seq_len,
        gradient_checkpointing=gradient_checkpointing,
        weights=weights,
        gradients=gradients,
        gradients_full=gradients_full,
        gradients_layerwise=gradients_layerwise,
        optimizer_state=by_optimizer[optim],
        refresh_workspace=workspace(),
        activations=activations(),
        overhead=overhead_bytes,
        total=without_activations() + (activations() or 0),
        state_by_optimizer=by_optimizer,
    )
    if plan.activations is None:
        plan.notes.append(
            "activations unknown: the config lacks hidden_size, num_hidden_layers, num_attention_heads or vocab_size"
        )
    if device_bytes is None:
        return plan
    plan.device_memory = device_bytes
    plan.fits = plan.total <= device_bytes
    if galore:  # a linear scan: 8-bit state is not monotone in rank (small tensors keep 32-bit moments)
        max_rank = max(min(t.shape) for t in tensors if t.target)
        acts = activations() or 0
        fitting = [r for r in range(1, max_rank + 1) if without_activations(r) + acts <= device_bytes]
        plan.largest_rank = max(fitting, default=None)
    per_sample = activations(1)
    if per_sample:  # activations grow linearly with the batch
        batch = max(0, (device_bytes - without_activations()) // per_sample)
        while batch > 0 and without_activations() + activations(batch) > device_bytes:
            batch -= 1
        plan.largest_batch_size = batch
    return plan


def _mib(count: int) -> str:
    return f"{count / 2**20:,.1f}"


def _gib(count: int) -> str:
    return f"{count / 2**30:,.2f}"


def format_plan(plan: MemoryPlan) -> str:
    """The plan as a terminal table: the breakdown, the device verdict, and state per optimizer next to AdamW."""
    model, optimizer = plan.model, plan.optimizer
    galore = optimizer["name"] in GALORE_OPTIMIZERS
    lines = [
        f"model: {model['source']}, {model['architecture']}, {model['parameters']:,} parameters "
        f"({model['trainable_parameters']:,} trainable), {model['dtype']}",
        f"optimizer: {optimizer['name']}" + (" (layer-wise updates)" if optimizer["layerwise"] else ""),
    ]
    if optimizer["galore"] is not None:
        options = ", ".join(f"{key}={value}" for key, value in optimizer["galore"].items())
        label = "GaLore" if galore else "GaLore (the galore_* rows below)"
        lines.append(
            f"{label}: {options}; {optimizer['targets']} target matrices ({optimizer['target_parameters']:,} "
            f"parameters) from optim_target_modules={optimizer['target_modules']!r}"
        )
    checkpointing = "with" if plan.gradient_checkpointing else "no"
    lines += [f"batch {plan.batch_size} x sequence {plan.seq_len}, {checkpointing} gradient checkpointing", ""]
    grads = "layer-wise: the largest tensor's" if optimizer["layerwise"] else "full"
    rows = [
        (f"weights and buffers ({model['dtype']})", plan.weights),
        (f"gradients ({grads})", plan.gradients),
        ("optimizer state", plan.optimizer_state),
        ("basis refresh workspace (estimate)", plan.refresh_workspace),
        ("activations (estimate)", plan.activations),
        ("overhead (--overhead)", plan.overhead),
        ("total", plan.total),
    ]
    width = max(len(name) for name, _ in rows)
    lines.append(f"{'memory':{width}}  {'MiB':>12}  {'GiB':>8}")
    for name, count in rows:
        if count is None:
            lines.append(f"{name:{width}}  {'unknown':>12}  {'':>8}")
        else:
            lines.append(f"{name:{width}}  {_mib(count):>12}  {_gib(count):>8}")
    if plan.device_memory is not None:
        spare = plan.device_memory - plan.total
        verdict = f"fits, {_gib(spare)} GiB to spare" if plan.fits else f"does NOT fit, {_gib(-spare)} GiB short"
        lines.append(f"device {plan.device_memory / 1e9:,.2f} GB = {_gib(plan.device_memory)} GiB: {verdict}")
        if galore:
            rank = "none" if plan.largest_rank is None else str(plan.largest_rank)
            lines.append(f"largest rank that fits (batch {plan.batch_size}): {rank}")
        if plan.largest_batch_size is not None:
            at = f"rank {optimizer['galore']['rank']}" if galore else optimizer["name"]
            lines.append(f"largest batch that fits ({at}, sequence {plan.seq_len}): {plan.largest_batch_size}")
    lines += ["", f"{'optimizer state, same parameters':34}  {'MiB':>12}  {'vs adamw_torch':>14}"]
    adamw = plan.state_by_optimizer["adamw_torch"]
    chosen = optimizer["name"].removesuffix("_layerwise")
    chosen = {"adamw_torch_fused": "adamw_torch", "adamw_8bit": "adamw_bnb_8bit"}.get(chosen, chosen)
    for name, count in plan.state_by_optimizer.items():
        if name == optimizer["name"] and name != chosen:
            continue  # the layer-wise / alias name shares its row with the plain name
        mark = f"  <- --optim {optimizer['name']}" if name == chosen else ""
        lines.append(f"{name:34}  {_mib(count):>12}  {count / adamw:>13.1%}{mark}")
    lines += [
        "",
        "Exact: weights, gradients, optimizer state. Estimates: activations (Korthikanti et al. 2022, per layer",
        "s*b*h*(34 + 5*a*s/h) bytes at 16 bits, plus logits and loss) and the SVD refresh workspace. Not counted:",
        "CUDA context, allocator fragmentation, kernel temporaries (add them with --overhead).",
        *plan.notes,
    ]
    return "\n".join(lines)


def _flag(text: str) -> bool:
    """`--gradient_checkpointing` alone, or with true/false as the Trainer's parser accepts."""
    value = text.lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"Invalid boolean {text!r}. Must be true or false.")


def run_estimate(args: argparse.Namespace) -> None:
    """Run the planner for the parsed flags; print the table (or JSON only); bad input exits with the reason."""
    try:
        plan = estimate(
            preset=args.preset,
            config=args.config,
            model=args.model,
            optim=args.optim,
            optim_target_modules=args.optim_target_modules,
            optim_args=args.optim_args,
            dtype=args.dtype,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            gradient_checkpointing=args.gradient_checkpointing,
            device_memory=args.device_memory,
            overhead=args.overhead,
        )
    except (ValueError, TypeError) as error:
        raise SystemExit(f"hf-galore estimate: error: {error}") from None
    print(json.dumps(asdict(plan), indent=2) if args.json else format_plan(plan))


def estimate_command_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add `hf-galore estimate`; it takes the training flags `--optim`, `--optim_target_modules`, `--optim_args`."""
    parser = subparsers.add_parser(
        "estimate",
        help="plan the memory of a training run (weights, gradients, optimizer state, activations) offline",
        description="Plan a run's memory on the meta device (no weights loaded). Paste your training flags.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help=f"a named config: {', '.join(PRESETS)}")
    source.add_argument("--config", metavar="PATH", help="a local config.json, or a folder holding one")
    source.add_argument("--model", metavar="ID", help="a model id or folder (a hub id needs the network or the cache)")
    accepted = ", ".join([*GALORE_OPTIMIZERS, *PLAIN_OPTIMIZERS])
    parser.add_argument("--optim", default="adamw_torch_fused", help=f"as in training; one of {accepted}")
    parser.add_argument(
        "--optim_target_modules", "--optim-target-modules", metavar="SPEC", help="as in training, e.g. attn,mlp"
    )
    parser.add_argument("--optim_args", "--optim-args", metavar="K=V,...", help="as in training, e.g. rank=128")
    parser.add_argument(
        "--dtype", default="float32", help="of weights, gradients and moments: float32, bfloat16, float16"
    )
    parser.add_argument(
        "--batch-size", "--batch_size", "--per_device_train_batch_size", type=int, default=1, help="samples per step"
    )
    parser.add_argument("--seq-len", "--seq_len", "--max_length", type=int, default=256, help="tokens per sample")
    parser.add_argument(
        "--gradient-checkpointing",
        "--gradient_checkpointing",
        nargs="?",
        const=True,
        default=False,
        type=_flag,
        metavar="BOOL",
        help="estimate activations with checkpointing (alone, or true/false)",
    )
    parser.add_argument(
        "--device-memory", "--device_memory", metavar="SIZE", help="device size: 24GB, 24GiB, 80G or bytes"
    )
    parser.add_argument("--overhead", default="0", metavar="SIZE", help="added to the total (CUDA context, slack)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON only")
    parser.set_defaults(func=run_estimate)
