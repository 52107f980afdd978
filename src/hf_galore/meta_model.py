"""The model a memory plan is built on: its config (preset, config.json or model id), the check that it can be
built for the planned task, the model itself on the meta device, and the units FSDP2 wraps it in."""

from __future__ import annotations

import copy
import os
from typing import Any

import torch

from .presets import preset_config

__all__ = [
    "TASKS",
    "build_meta_model",
    "check_causal_lm",
    "check_seq_len",
    "check_task",
    "fsdp_wrap_units",
    "load_model_config",
]

# task -> the transformers Auto class that builds the planned model
TASKS: dict[str, str] = {
    "causal-lm": "AutoModelForCausalLM",
    "sequence-classification": "AutoModelForSequenceClassification",
}


def load_model_config(
    *, preset: str | None = None, config: str | os.PathLike | None = None, model: str | None = None
) -> tuple[Any, str]:
    """The model config and a label for it, from exactly one of: a preset, a local config.json (or its folder), or
    a model id / folder for `AutoConfig.from_pretrained` (a hub id needs the network or the local cache)."""
    from huggingface_hub.errors import HFValidationError, StrictDataclassError
    from huggingface_hub.utils import validate_repo_id
    from transformers import AutoConfig

    unreadable = (ValueError, OSError, KeyError, StrictDataclassError)  # StrictDataclassError: a field's bad value
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
        except unreadable as error:
            raise ValueError(f"Invalid config={file!r}: transformers cannot read it ({one_line(error)}).") from None
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise ValueError(
                f"Invalid model={model!r}: the folder holds no config.json. Pass a folder written by "
                "save_pretrained (it holds config.json), or --config PATH/config.json."
            )
        try:
            return AutoConfig.from_pretrained(model, local_files_only=True), model
        except unreadable as error:
            raise ValueError(
                f"Invalid model={model!r}: transformers cannot read its config ({one_line(error)})."
            ) from None
    try:
        validate_repo_id(model)
    except HFValidationError:
        raise ValueError(
            f"Invalid model={model!r}: no such folder, and not a hub id (name or org/name). Pass an existing model "
            "folder, a hub id, --config PATH/config.json or --preset NAME."
        ) from None
    try:
        return AutoConfig.from_pretrained(model, local_files_only=True), model  # a folder, or the cache: no network
    except (ValueError, OSError):
        pass
    try:
        return AutoConfig.from_pretrained(model), model
    except unreadable as error:
        raise ValueError(
            f"Cannot load the config of model={model!r}: no such folder here, and as a hub id: "
            f"{str(error).splitlines()[0]} A hub id needs the network "
            "or the local Hugging Face cache (HF_HUB_OFFLINE=1 skips the network); offline, pass "
            "--config PATH/config.json or --preset NAME."
        ) from None


def one_line(error: BaseException) -> str:
    """An exception's message on one line (huggingface_hub's validation errors span several)."""
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


def check_task(config: Any, task: str) -> None:
    """Refuse, naming the model type and the task, a config the planner cannot plan for `task` (`TASKS`):
    encoder-decoder models (the activation formula is one stack's), for `causal-lm` encoders (masked LMs) not marked
    `is_decoder`, and model types the task's Auto class cannot build."""
    from transformers import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_FOR_MASKED_LM_MAPPING,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
    )

    if task not in TASKS:
        raise ValueError(f"Invalid task={task!r}. Must be one of {', '.join(TASKS)}.")
    mapping = MODEL_FOR_CAUSAL_LM_MAPPING if task == "causal-lm" else MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING
    if getattr(config, "is_encoder_decoder", False):
        reason = "an encoder-decoder model"
    elif (
        task == "causal-lm"
        and type(config) in MODEL_FOR_MASKED_LM_MAPPING
        and not getattr(config, "is_decoder", False)
    ):
        reason = "an encoder (masked LM) and its config has is_decoder=false"
    elif type(config) not in mapping:
        reason = f"not a model type {TASKS[task]} can build"
    else:
        return
    raise ValueError(
        f"Cannot plan model_type={getattr(config, 'model_type', None)!r} ({type(config).__name__}) for "
        f"task={task!r}: it is {reason}. task='causal-lm' plans causal language models as AutoModelForCausalLM "
        "builds them (llama, mistral, qwen2, gpt2, ...; an encoder such as BERT only with is_decoder=true in its "
        "config); task='sequence-classification' (--task sequence-classification) plans an encoder or decoder with "
        "a classification head as AutoModelForSequenceClassification builds it."
    )


def check_causal_lm(config: Any) -> None:
    """`check_task(config, "causal-lm")`."""
    check_task(config, "causal-lm")


def check_seq_len(config: Any, seq_len: int) -> None:
    """Refuse a sequence longer than the config's max_position_embeddings, naming both."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text, "max_position_embeddings", None)
    if isinstance(limit, int) and limit < 1:
        raise ValueError(f"Invalid config: max_position_embeddings={limit}. Must be an int >= 1; fix the config.")
    if isinstance(limit, int) and seq_len > limit:
        raise ValueError(
            f"Invalid seq_len={seq_len}: longer than the model's max_position_embeddings={limit}. "
            f"Pass --seq-len {limit} or less."
        )


def build_meta_model(
    config: Any, dtype: torch.dtype, *, task: str = "causal-lm", num_labels: int = 2
) -> torch.nn.Module:
    """The model of `config` for `task` on the meta device, in `dtype`: every shape and dtype, no memory. For
    `sequence-classification` the head has `num_labels` outputs (the config itself is not changed). A config that
    cannot be built for the task raises a `ValueError` (see `check_task`)."""
    import transformers

    check_task(config, task)
    if task == "sequence-classification":
        config = copy.deepcopy(config)
        config.num_labels = num_labels
    auto_class = getattr(transformers, TASKS[task])
    try:
        with torch.device("meta"):
            return auto_class.from_config(config, dtype=dtype)
    except (ValueError, TypeError, RuntimeError, AttributeError) as error:  # e.g. a negative size in the config
        raise ValueError(
            f"Cannot build {TASKS[task]} from this {config.model_type} config ({one_line(error)}). Check its sizes "
            "(hidden_size, num_attention_heads, intermediate_size, vocab_size, ...)."
        ) from None


def fsdp_wrap_units(meta: torch.nn.Module) -> tuple[int, int, int, int]:
    """FSDP2's wrap units as accelerate and transformers build them (`fully_shard` on every module of a class in
    `_no_split_modules`, then on the root): (root parameters, root gradients, largest layer's parameters, its
    gradients), unsharded bytes."""
    classes = set(getattr(meta, "_no_split_modules", None) or ())
    layers: list[torch.nn.Module] = []
    inside: set[int] = set()
    for module in meta.modules():
        if id(module) in inside or module is meta or type(module).__name__ not in classes:
            continue
        layers.append(module)
        inside.update(id(sub) for sub in module.modules())

    def sizes(params: list[torch.nn.Parameter]) -> tuple[int, int]:
        weights = sum(p.numel() * p.dtype.itemsize for p in params)
        return weights, sum(p.numel() * p.dtype.itemsize for p in params if p.requires_grad)

    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    root = sizes([p for p in meta.parameters() if id(p) not in in_layers])
    largest = max((sizes(list(layer.parameters())) for layer in layers), default=(0, 0))
    return (*root, *largest)
