"""`hf-galore estimate`: what a training run will hold in memory, planned before any weight is loaded.

The model is built on the meta device from its config (nothing is allocated), the GaLore targets are picked by the
same `select_targets` the Trainer integration uses, and the optimizer state is counted by the inner rules'
`state_bytes`, the figures the tests hold equal, byte for byte, to what the optimizers allocate. Weights, gradients and
optimizer state are exact counts; activations and the basis-refresh workspace are estimates (`hf_galore.planner`).

Not counted: the CUDA context, allocator fragmentation and kernel temporaries (add them with `--overhead`).
"""

from __future__ import annotations

import json
import math
import os
import re
from argparse import Namespace
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

import torch

from .config import GaLoreConfig, parse_optim_args, split_optim_args
from .inner import FROZEN, MIN_8BIT_SIZE, AdamW8bitUpdate
from .meta_model import (
    TASKS,
    build_meta_model,
    check_causal_lm,
    check_seq_len,
    check_task,
    fsdp_wrap_units,
    load_model_config,
)
from .planner import (
    PLAIN_OPTIMIZERS,
    TensorKind,
    activation_bytes,
    largest_batch,
    largest_rank,
    refresh_communication,
    refresh_workspace,
    state_bytes,
    step_communication,
)
from .report import format_table, gib, human_bytes, mib
from .targets import GaLoreTarget, select_targets
from .trainer_factory import _EXTRA_OPTIM_ARGS, GALORE_OPTIMIZERS, check_others

__all__ = [
    "DTYPES",
    "PLAIN_OPTIMIZERS",
    "TASKS",
    "MemoryPlan",
    "activation_bytes",
    "build_meta_model",
    "check_causal_lm",
    "check_task",
    "estimate",
    "run_estimate",
    "format_plan",
    "load_model_config",
    "parse_memory_size",
    "resolve_dtype",
]

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_COMPARED_GALORE = ("galore_adamw", "galore_adamw_8bit", "galore_adafactor")
_COMPARED_PLAIN = ("adamw_torch", "adamw_bnb_8bit")
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
    fsdp: int | None = None
    fsdp_buffers: int = 0
    refresh_communication: int | None = None
    step_communication: int | None = None
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


def _optimizer_setup(
    model: torch.nn.Module,
    optim: str,
    target_modules: Any,
    optim_args: str | Mapping[str, str] | None,
    fsdp: int | None = None,
) -> tuple[GaLoreConfig | None, int, list[GaLoreTarget]]:
    """GaLore config, min_8bit_size and targets, parsed and validated by the Trainer integration's own functions
    (`split_optim_args`, `parse_optim_args`, `check_others`, `select_targets`), so the planner refuses what training
    refuses."""
    accepted = [*GALORE_OPTIMIZERS, *PLAIN_OPTIMIZERS]
    if optim not in accepted:
        raise ValueError(f"Invalid optim={optim!r}. The planner knows: {', '.join(accepted)}.")
    if isinstance(optim_args, str) or optim_args is None:
        optim_args = split_optim_args(optim_args)
    galore = optim in GALORE_OPTIMIZERS
    if optim_args and not galore:
        raise ValueError(
            f"Invalid optim_args={dict(optim_args)!r} with optim={optim!r}: the planner reads optim_args for the "
            f"galore_* optimizers only ({', '.join(GALORE_OPTIMIZERS)})."
        )
    extra = _EXTRA_OPTIM_ARGS.get(GALORE_OPTIMIZERS[optim].optimizer_cls, {}) if galore else {}
    config_cls = GALORE_OPTIMIZERS[optim].optimizer_cls.outer.config_cls if galore else GaLoreConfig
    config, extras = parse_optim_args(dict(optim_args or {}), extra=extra, config_cls=config_cls)
    if galore:
        check_others(optim, config.others, fsdp)
    min_8bit_size = AdamW8bitUpdate(min_8bit_size=extras.get("min_8bit_size", MIN_8BIT_SIZE)).min_8bit_size
    if not galore and target_modules is None:
        return None, min_8bit_size, []
    form = GALORE_OPTIMIZERS[optim].form if galore else "adamw"
    targets = select_targets(model, target_modules, optimizer_name=optim, rank=config.rank, form=form)
    return config, min_8bit_size, targets


@dataclass
class _Run:
    """The run being planned, its model and optimizer resolved; every figure of the plan is a method of it."""

    model_config: Any
    meta: torch.nn.Module
    optim: str
    galore_config: GaLoreConfig | None
    min_8bit_size: int
    targets: list[GaLoreTarget]
    dtype: torch.dtype
    seq_len: int
    gradient_checkpointing: bool
    overhead: int
    task: str = "causal-lm"
    num_labels: int = 2
    fsdp: int | None = None
    tensors: Counter[TensorKind] = field(init=False)

    def __post_init__(self) -> None:
        target_ids = {id(t.param) for t in self.targets}
        self.tensors = Counter(
            TensorKind(tuple(p.shape), p.dtype, id(p) in target_ids)
            for p in self.meta.parameters()
            if p.requires_grad and p.numel()
        )

    @property
    def others(self) -> str:
        return "same" if self.galore_config is None else self.galore_config.others

    def _trains(self, kind: TensorKind) -> bool:
        """Whether the planned optimizer trains (computes a gradient for) this kind: all but frozen non-targets."""
        return kind.target or not (self.galore and self.others == FROZEN)

    def _nbytes(self, kind: TensorKind) -> int:
        """A tensor's bytes in this process: all of it, or the largest rank's rows under FSDP2."""
        return kind.nbytes if self.fsdp is None else kind.local_nbytes(self.fsdp)

    @property
    def galore(self) -> bool:
        return self.optim in GALORE_OPTIMIZERS

    @property
    def layerwise(self) -> bool:
        return self.galore and GALORE_OPTIMIZERS[self.optim].layerwise

    @property
    def rank(self) -> int | None:
        """The configured rank (of the galore_* rows too when a plain optimizer is planned with targets)."""
        return None if self.galore_config is None else self.galore_config.rank

    @cached_property
    def weights(self) -> int:
        """Parameters (each rank's rows under FSDP2) and buffers (replicated)."""
        params = [TensorKind(tuple(p.shape), p.dtype, False) for p in self.meta.parameters() if p.numel()]
        buffers = sum(t.numel() * t.dtype.itemsize for t in self.meta.buffers())
        if self.fsdp is None:
            return sum(t.numel() * t.dtype.itemsize for t in self.meta.parameters()) + buffers
        return sum(self._nbytes(kind) for kind in params) + buffers

    @property
    def gradients_full(self) -> int:
        return sum(self._nbytes(t) * count for t, count in self.tensors.items() if self._trains(t))

    @property
    def gradients_layerwise(self) -> int:
        return max((self._nbytes(t) for t in self.tensors if self._trains(t)), default=0)

    @cached_property
    def fsdp_buffers(self) -> int:
        """FSDP2's unsharded parameters and gradients alive at the peak of backward (0 without FSDP2): the root
        unit (everything outside the wrapped layers: embeddings, final norm, head), gathered through forward and
        backward and reduce-scattered at its end, plus the largest wrapped layer with its gradient."""
        return 0 if self.fsdp is None else sum(fsdp_wrap_units(self.meta))

    @property
    def refresh_communication(self) -> int | None:
        if self.fsdp is None or not self.galore:
            return None
        return refresh_communication(self.tensors, self.galore_config, self.rank, self.fsdp)

    @property
    def step_communication(self) -> int | None:
        return None if self.fsdp is None else step_communication(self.tensors, self.optim, self.rank, self.fsdp)

    @property
    def gradients(self) -> int:
        return self.gradients_layerwise if self.layerwise else self.gradients_full

    def state(self, optim: str, rank: int | None = None) -> int:
        rank = self.rank if rank is None else rank
        proj_type = "std" if self.galore_config is None else self.galore_config.proj_type
        outer = GALORE_OPTIMIZERS[optim].optimizer_cls.outer if optim in GALORE_OPTIMIZERS else None
        options = outer.state_options(self.galore_config) if outer and self.galore_config else {}
        return state_bytes(
            self.tensors,
            optim,
            rank=rank,
            proj_type=proj_type,
            min_8bit_size=self.min_8bit_size,
            world=self.fsdp,
            others=self.others,
            target_options=options,
        )

    def workspace(self, rank: int | None = None) -> int:
        if not self.galore:
            return 0
        return refresh_workspace(self.tensors, self.galore_config, rank or self.rank, world=self.fsdp)

    def activations(self, batch_size: int) -> int | None:
        return activation_bytes(
            self.model_config,
            batch_size=batch_size,
            seq_len=self.seq_len,
            dtype=self.dtype,
            gradient_checkpointing=self.gradient_checkpointing,
            task=self.task,
            num_labels=self.num_labels,
        )

    def without_activations(self, rank: int | None = None) -> int:
        """Everything but the activations, at the configured rank or `rank`."""
        fixed = self.weights + self.gradients + self.fsdp_buffers + self.overhead
        return fixed + self.state(self.optim, rank) + self.workspace(rank)


def _plan(run: _Run, label: str, batch_size: int, target_modules: Any) -> MemoryPlan:
    """The breakdown of `run` at `batch_size`, with the state of the compared optimizers beside the chosen one."""
    compared = [*(_COMPARED_GALORE if run.targets else ()), *_COMPARED_PLAIN]
    by_optimizer = {name: run.state(name) for name in compared}
    by_optimizer.setdefault(run.optim, run.state(run.optim))
    activations = run.activations(batch_size)
    plan = MemoryPlan(
        model={
            "source": label,
            "architecture": type(run.meta).__name__,
            "task": run.task,
            **({"num_labels": run.num_labels} if run.task == "sequence-classification" else {}),
            "parameters": sum(p.numel() for p in run.meta.parameters()),
            "trainable_parameters": sum(math.prod(t.shape) * count for t, count in run.tensors.items()),
            "dtype": str(run.dtype).removeprefix("torch."),
        },
        optimizer={
            "name": run.optim,
            "layerwise": run.layerwise,
            "galore": None
            if run.galore_config is None
            else {**asdict(run.galore_config), "min_8bit_size": run.min_8bit_size},
            "target_modules": target_modules,
            "targets": len(run.targets),
            "target_parameters": sum(t.param.numel() for t in run.targets),
        },
        batch_size=batch_size,
        seq_len=run.seq_len,
        gradient_checkpointing=run.gradient_checkpointing,
        weights=run.weights,
        gradients=run.gradients,
        gradients_full=run.gradients_full,
        gradients_layerwise=run.gradients_layerwise,
        optimizer_state=by_optimizer[run.optim],
        refresh_workspace=run.workspace(),
        activations=activations,
        overhead=run.overhead,
        total=run.without_activations() + (activations or 0),
        state_by_optimizer=by_optimizer,
        fsdp=run.fsdp,
        fsdp_buffers=run.fsdp_buffers,
        refresh_communication=run.refresh_communication,
        step_communication=run.step_communication,
    )
    if activations is None:
        plan.notes.append(
            "activations unknown: the config lacks hidden_size, num_hidden_layers, num_attention_heads or vocab_size"
        )
    return plan


def _fit(plan: MemoryPlan, run: _Run, device_bytes: int) -> None:
    """Fill in whether `plan` fits `device_bytes`, and the largest rank and batch that would."""
    plan.device_memory = device_bytes
    plan.fits = plan.total <= device_bytes
    if run.galore:
        activations = plan.activations or 0
        max_rank = max(min(t.shape) for t in run.tensors if t.target)
        plan.largest_rank = largest_rank(lambda r: run.without_activations(r) + activations, max_rank, device_bytes)
    plan.largest_batch_size = largest_batch(run.without_activations(), run.activations, device_bytes)


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
    task: str = "causal-lm",
    num_labels: int | None = None,
    fsdp: int | None = None,
) -> MemoryPlan:
    """Plan a training run's memory from the same flags as training (model source, `--optim*`), dtype and
    batch/sequence, so a user learns whether it fits before renting the device.

    `task`: `causal-lm` (AutoModelForCausalLM) or `sequence-classification` (AutoModelForSequenceClassification,
    with `num_labels` labels, 2 when not given; `num_labels` is refused for `causal-lm`).
    `fsdp`: plan one rank of FSDP2 over that many processes (the largest rank's rows); None plans one process
    without FSDP2."""
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Invalid {name}={value!r}. Must be an int >= 1.")
    if fsdp is not None and (isinstance(fsdp, bool) or not isinstance(fsdp, int) or fsdp < 1):
        raise ValueError(f"Invalid fsdp={fsdp!r}. Must be an int >= 1 (the processes FSDP2 shards over), or None.")
    if task not in TASKS:
        raise ValueError(f"Invalid task={task!r}. Must be one of {', '.join(TASKS)}.")
    if num_labels is not None and task != "sequence-classification":
        raise ValueError(
            f"Invalid num_labels={num_labels!r} with task={task!r}: only task='sequence-classification' has labels."
        )
    num_labels = 2 if num_labels is None else num_labels
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(f"Invalid num_labels={num_labels!r}. Must be an int >= 1.")
    torch_dtype = resolve_dtype(dtype)
    device_bytes = None if device_memory is None else parse_memory_size(device_memory)
    overhead_bytes = parse_memory_size(overhead)
    model_config, label = load_model_config(preset=preset, config=config, model=model)
    check_seq_len(model_config, seq_len)
    meta = build_meta_model(model_config, torch_dtype, task=task, num_labels=num_labels)
    galore_config, min_8bit_size, targets = _optimizer_setup(meta, optim, optim_target_modules, optim_args, fsdp)
    run = _Run(
        model_config,
        meta,
        optim,
        galore_config,
        min_8bit_size,
        targets,
        torch_dtype,
        seq_len,
        gradient_checkpointing,
        overhead_bytes,
        task,
        num_labels,
        fsdp,
    )
    plan = _plan(run, label, batch_size, optim_target_modules)
    if device_bytes is not None:
        _fit(plan, run, device_bytes)
    return plan


def format_plan(plan: MemoryPlan) -> str:
    """The plan as a terminal table: the breakdown, the device verdict, and state per optimizer next to AdamW."""
    model, optimizer = plan.model, plan.optimizer
    galore = optimizer["name"] in GALORE_OPTIMIZERS
    lines = [
        f"model: {model['source']}, {model['architecture']} ({model['task']}"
        + (f", {model['num_labels']} labels" if "num_labels" in model else "")
        + f"), {model['parameters']:,} parameters "
        f"({model['trainable_parameters']:,} trainable), {model['dtype']}",
        f"optimizer: {optimizer['name']}" + (" (layer-wise updates)" if optimizer["layerwise"] else ""),
    ]
    if optimizer["galore"] is not None:
        options = ", ".join(f"{key}={value}" for key, value in optimizer["galore"].items())
        label = (
            GALORE_OPTIMIZERS[optimizer["name"]].optimizer_cls.outer.title
            if galore
            else "GaLore (the galore_* rows below)"
        )
        lines.append(
            f"{label}: {options}; {optimizer['targets']} target matrices ({optimizer['target_parameters']:,} "
            f"parameters) from optim_target_modules={optimizer['target_modules']!r}"
        )
    checkpointing = "with" if plan.gradient_checkpointing else "no"
    lines.append(f"batch {plan.batch_size} x sequence {plan.seq_len}, {checkpointing} gradient checkpointing")
    if plan.fsdp is not None:
        lines.append(
            f"FSDP2 over {plan.fsdp} processes: figures per rank, for the largest rank (ceil(m/{plan.fsdp}) rows of "
            "every weight, gradient and moment; GaLore bases replicated)"
        )
    lines.append("")
    grads = "layer-wise: the largest tensor's" if optimizer["layerwise"] else "full"
    figures = [
        (f"weights and buffers ({model['dtype']})", plan.weights),
        (f"gradients ({grads})", plan.gradients),
        ("optimizer state", plan.optimizer_state),
        ("basis refresh workspace (estimate)", plan.refresh_workspace),
        ("activations (estimate)", plan.activations),
        *([("FSDP2 unsharded root + one layer, with gradients", plan.fsdp_buffers)] if plan.fsdp is not None else []),
        ("overhead (--overhead)", plan.overhead),
        ("total", plan.total),
    ]
    rows = [(name, "unknown", "") if count is None else (name, mib(count), gib(count)) for name, count in figures]
    lines.append(format_table(("memory", "MiB", "GiB"), rows, right={1, 2}))
    if plan.refresh_communication is not None:
        lines.append(
            f"FSDP2 refresh traffic per rank, every target refreshing once: {human_bytes(plan.refresh_communication)}"
        )
    if plan.step_communication:
        lines.append(f"FSDP2 Adafactor all-reduce per rank and step: {human_bytes(plan.step_communication)}")
    if plan.device_memory is not None:
        spare = plan.device_memory - plan.total
        verdict = f"fits, {gib(spare)} GiB to spare" if plan.fits else f"does NOT fit, {gib(-spare)} GiB short"
        lines.append(f"device {plan.device_memory / 1e9:,.2f} GB = {gib(plan.device_memory)} GiB: {verdict}")
        if galore:
            rank = "none" if plan.largest_rank is None else str(plan.largest_rank)
            lines.append(f"largest rank that fits (batch {plan.batch_size}): {rank}")
        if plan.largest_batch_size is not None:
            at = f"rank {optimizer['galore']['rank']}" if galore else optimizer["name"]
            lines.append(f"largest batch that fits ({at}, sequence {plan.seq_len}): {plan.largest_batch_size}")
    adamw = plan.state_by_optimizer["adamw_torch"]
    chosen = optimizer["name"].removesuffix("_layerwise")
    chosen = {"adamw_torch_fused": "adamw_torch", "adamw_8bit": "adamw_bnb_8bit"}.get(chosen, chosen)
    rows = [
        (name, mib(count), f"{count / adamw:.1%}", f"<- --optim {optimizer['name']}" if name == chosen else "")
        for name, count in plan.state_by_optimizer.items()
        if name != optimizer["name"] or name == chosen  # a layer-wise / alias name shares the plain name's row
    ]
    header = ("optimizer state, same parameters", "MiB", "vs adamw_torch", "")
    lines += ["", format_table(header, rows, right={1, 2}, free_last=True)]
    lines += [
        "",
        "Exact: weights, gradients, optimizer state. Estimates: activations (Korthikanti et al. 2022, per layer",
        "s*b*h*(34 + 5*a*s/h) bytes at 16 bits, plus the head's logits and loss) and the SVD refresh workspace.",
        "Not counted: CUDA context, allocator fragmentation, kernel temporaries (add them with --overhead).",
        *plan.notes,
    ]
    return "\n".join(lines)


def run_estimate(args: Namespace) -> None:
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
            task=args.task,
            num_labels=args.num_labels,
            fsdp=args.fsdp,
        )
    except (ValueError, TypeError, NotImplementedError) as error:
        raise SystemExit(f"hf-galore estimate: error: {error}") from None
    print(json.dumps(asdict(plan), indent=2) if args.json else format_plan(plan))
