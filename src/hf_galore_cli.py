"""`hf-galore`, the console script: a small dispatcher (accelerate's CLI layout), each subcommand adds its parser.

It lives outside the `hf_galore` package on purpose: importing anything inside the package runs its `__init__`, which
registers hf_galore with transformers' Trainer (transformers, peft and bitsandbytes: seconds). Parsing, `--help` and
the usage errors need none of that, so this module imports only the standard library; a subcommand imports
`hf_galore` when it runs (`run` needs the registration, `estimate` the planner).
"""

from __future__ import annotations

import argparse

__all__ = ["ESTIMATE_OPTIMIZERS", "PRESET_NAMES", "estimate_command_parser", "main", "run_command_parser"]

# The names `hf-galore estimate --help` lists, written here so that the help imports nothing heavy;
# tests/test_cli.py holds them equal to hf_galore.estimate's and hf_galore.presets' own tables.
ESTIMATE_OPTIMIZERS = (
    "galore_adamw",
    "galore_adamw_8bit",
    "galore_adafactor",
    "galore_adamw_layerwise",
    "galore_adamw_8bit_layerwise",
    "galore_adafactor_layerwise",
    "apollo_adamw",
    "apollo_adamw_layerwise",
    "adamw_torch",
    "adamw_torch_fused",
    "adamw_bnb_8bit",
    "adamw_8bit",
    "adafactor",
)
PRESET_NAMES = (
    "llama-tiny",
    "llama-60m",
    "llama-130m",
    "llama-350m",
    "llama-1b",
    "llama-7b",
    "llama-13b",
    "llama-70b",
)


def _run(args: argparse.Namespace) -> None:
    from hf_galore.cli import run_script

    run_script(args.target, args.script_args, module=args.module)


def run_command_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add `hf-galore run SCRIPT.py|-m MODULE ARGS...`."""
    parser = subparsers.add_parser(
        "run",
        help="run a Hugging Face training script with --optim galore_* served by hf_galore",
        description="Run SCRIPT.py (or -m MODULE) with hf_galore registered; ARGS go to the script unchanged.",
    )
    parser.add_argument("-m", dest="module", action="store_true", help="TARGET is a module name, as python -m")
    parser.add_argument("target", metavar="SCRIPT.py|MODULE")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, metavar="ARGS")
    parser.set_defaults(func=_run)


def _flag(text: str) -> bool:
    """`--gradient_checkpointing` alone, or with true/false as the Trainer's parser accepts."""
    value = text.lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"Invalid boolean {text!r}. Must be true or false.")


def _estimate(args: argparse.Namespace) -> None:
    from hf_galore.estimate import run_estimate

    run_estimate(args)


def estimate_command_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add `hf-galore estimate`; it takes the training flags `--optim`, `--optim_target_modules`, `--optim_args`."""
    parser = subparsers.add_parser(
        "estimate",
        help="plan the memory of a training run (weights, gradients, optimizer state, activations) offline",
        description="Plan a training run's memory on the meta device (no weights loaded). Paste your training flags.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help=f"a named config: {', '.join(PRESET_NAMES)}")
    source.add_argument("--config", metavar="PATH", help="a local config.json, or a folder holding one")
    source.add_argument("--model", metavar="ID", help="a model id or folder (a hub id needs the network or the cache)")
    accepted = ", ".join(ESTIMATE_OPTIMIZERS)
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
    parser.add_argument(
        "--seq-len",
        "--seq_len",
        "--max_length",
        type=int,
        default=256,
        help="tokens per sample (at most the config's max_position_embeddings)",
    )
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
    parser.add_argument(
        "--task",
        default="causal-lm",
        choices=("causal-lm", "sequence-classification"),
        help="the head planned: AutoModelForCausalLM or AutoModelForSequenceClassification",
    )
    parser.add_argument(
        "--num-labels",
        "--num_labels",
        type=int,
        metavar="N",
        help="labels of the classification head (--task sequence-classification only; 2 when not given)",
    )
    parser.add_argument(
        "--fsdp",
        type=int,
        metavar="N",
        help="plan one rank of FSDP2 over N processes (the largest rank's rows); not given: one process, no FSDP2",
    )
    parser.add_argument("--overhead", default="0", metavar="SIZE", help="added to the total (CUDA context, slack)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON only")
    parser.set_defaults(func=_estimate)


def main(argv: list[str] | None = None) -> None:
    """`hf-galore run ...` or `hf-galore estimate ...`; `argv` defaults to the command line."""
    parser = argparse.ArgumentParser(prog="hf-galore", description="GaLore for Hugging Face training scripts.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    run_command_parser(subparsers)
    estimate_command_parser(subparsers)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
