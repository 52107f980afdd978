"""The Trainer's FSDP2 path end to end on several CUDA GPUs: a galore_* optimizer against adamw_torch, same run.

    accelerate launch --config_file examples/fsdp2.yaml benchmarks/fsdp_trainer_cuda.py --optim galore_adamw_8bit
    torchrun --standalone --nproc_per_node 8 benchmarks/fsdp_trainer_cuda.py --optim galore_adamw --preset llama-130m

(set `num_processes` in examples/fsdp2.yaml to your GPU count.) Needs at least 2 CUDA devices and a distributed
launch; anything else is refused before a model is built. Each optimizer trains a random-init LLaMA of the chosen
preset (the same init and the same synthetic token batches) with `fsdp=True`, FSDP2, each decoder layer sharded
(transformer_based_wrap) and bf16 autocast where the GPUs support it; `adamw_torch` runs second in the same
processes. Prints, per optimizer: each GPU's peak allocated memory (model, gradients, activations and optimizer
state), the median and slowest step times (the slowest is usually a refresh step), the final loss and the logged
`galore/*` figures; rank 0 writes JSON (default benchmarks/results/fsdp_trainer_cuda.json).

Written for the CUDA path, which this project's CPU machine cannot run: there, only the refusal is tested
(tests/test_benchmarks.py); benchmarks/fsdp.py measures the same design on 2 CPU processes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments
from transformers.training_args import OptimizerNames

import hf_galore  # noqa: F401  (registers hf_galore as what the galore_* names build)
from hf_galore.presets import PRESETS, preset_config

GALORE_NAMES = sorted(name.value for name in OptimizerNames if name.value.startswith("galore"))
BASELINE = "adamw_torch"
MIB = 2**20


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (forward, backward, step), synchronised with the GPU at both ends."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - self._start)


class TokenBatches(torch.utils.data.Dataset):
    """Random token sequences (the same for every optimizer): enough to exercise memory and speed, not quality."""

    def __init__(self, vocab: int, count: int, length: int) -> None:
        self.ids = torch.randint(0, vocab, (count, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def refuse_unless_runnable(device_count: int, world_size: int) -> None:
    """Raise SystemExit saying what is missing, before anything is built."""
    if device_count < 2:
        raise SystemExit(
            f"fsdp_trainer_cuda.py needs at least 2 CUDA devices; this machine has {device_count}. Run it on a "
            "multi-GPU machine with `accelerate launch --config_file examples/fsdp2.yaml "
            "benchmarks/fsdp_trainer_cuda.py --optim galore_adamw`, or run benchmarks/fsdp.py (2 CPU processes)."
        )
    if world_size < 2:
        raise SystemExit(
            f"fsdp_trainer_cuda.py needs a distributed launch (WORLD_SIZE={world_size}): start it with "
            "`accelerate launch --config_file examples/fsdp2.yaml ...` or `torchrun --nproc_per_node N ...`."
        )


def train_once(options: argparse.Namespace, optim: str) -> dict:
    """One Trainer run of `optim` on FSDP2; its figures, with every rank's peak memory (identical on every rank)."""
    import torch.distributed as dist

    torch.manual_seed(options.seed)
    config = preset_config(options.preset)
    model = LlamaForCausalLM(config)
    world = int(os.environ["WORLD_SIZE"])
    data = TokenBatches(config.vocab_size, options.steps * options.batch_size * world, options.seq_len)
    galore = optim.startswith("galore")
    layerwise = "layerwise" in options.optim
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir=output_dir,
            max_steps=options.steps,
            per_device_train_batch_size=options.batch_size,
            learning_rate=options.lr,
            lr_scheduler_type="cosine",
            warmup_steps=max(1, options.steps // 10),
            weight_decay=0.0,
            max_grad_norm=0.0 if layerwise else 1.0,  # layer-wise forms cannot clip; the baseline matches them
            bf16=torch.cuda.is_bf16_supported(),
            optim=optim,
            optim_target_modules=["attn", "mlp"] if galore else None,
            optim_args=(
                f"rank={options.rank},update_proj_gap={options.update_proj_gap},scale={options.scale}"
                if galore
                else None
            ),
            fsdp=True,
            fsdp_config={
                "version": 2,
                "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                "reshard_after_forward": True,
            },
            logging_steps=options.logging_steps,
            save_strategy="no",
            report_to="none",
            seed=options.seed,
            dataloader_num_workers=0,
        )
        timer = StepTimer()
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[timer])
        torch.cuda.reset_peak_memory_stats()
        trainer.train()
        peak = torch.cuda.max_memory_allocated() / MIB
        history = trainer.state.log_history
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, peak)
    losses = [entry["loss"] for entry in history if "loss" in entry]
    logged = [entry for entry in history if any(key.startswith("galore/") for key in entry)]
    figures = {key: value for key, value in (logged[-1] if logged else {}).items() if key.startswith("galore/")}
    if logged:
        figures["galore/refresh_seconds"] = sum(entry.get("galore/refresh_seconds", 0.0) for entry in logged)
    steady = timer.seconds[1:] or timer.seconds  # the first step allocates state and compiles kernels
    result = {
        "peak_mib_per_gpu": peaks,
        "median_step_s": statistics.median(steady),
        "slowest_step_s": max(steady),
        "final_loss": losses[-1] if losses else None,
        "galore": figures,
    }
    del trainer, model
    gc.collect()
    torch.cuda.empty_cache()
    return result


def format_table(report: dict) -> str:
    lines = [
        f"{report['preset']}, {report['world']} GPUs ({report['device']}), {report['steps']} steps, batch "
        f"{report['batch_size']}×{report['seq_len']} tokens per GPU, GaLore rank {report['rank']}, "
        f"update_proj_gap {report['update_proj_gap']}"
    ]
    base = report["results"][BASELINE]["median_step_s"]
    for name, row in report["results"].items():
        peaks = ", ".join(f"{p:.0f}" for p in row["peak_mib_per_gpu"])
        lines.append(
            f"{name:<28} peak MiB per GPU [{peaks}]  median step {row['median_step_s']:.3f}s "
            f"({row['median_step_s'] / base:.2f}x adamw_torch)  slowest {row['slowest_step_s']:.3f}s  "
            f"final loss {row['final_loss']:.4f}"
        )
        for key, value in row["galore"].items():
            lines.append(f"    {key} = {value:.4g}")
    return "\n".join(lines)


def main(argv: list[str] | None = None, device_count: int | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optim", choices=GALORE_NAMES, default="galore_adamw")
    parser.add_argument("--preset", choices=list(PRESETS), default="llama-60m")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=8, help="sequences per GPU per step")
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--update_proj_gap", type=int, default=100, help="small enough to refresh during the run")
    parser.add_argument("--scale", type=float, default=0.25)
    parser.add_argument("--logging_steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "fsdp_trainer_cuda.json")
    options = parser.parse_args(argv)
    refuse_unless_runnable(
        torch.cuda.device_count() if device_count is None else device_count, int(os.environ.get("WORLD_SIZE", "1"))
    )
    import torch.distributed as dist

    results = {name: train_once(options, name) for name in (options.optim, BASELINE)}
    report = {
        "preset": options.preset,
        "world": dist.get_world_size(),
        "device": torch.cuda.get_device_name(),
        "steps": options.steps,
        "batch_size": options.batch_size,
        "seq_len": options.seq_len,
        "rank": options.rank,
        "update_proj_gap": options.update_proj_gap,
        "torch": torch.__version__,
        "results": results,
    }
    if dist.get_rank() == 0:
        print(format_table(report))
        options.output.parent.mkdir(parents=True, exist_ok=True)
        options.output.write_text(json.dumps(report, indent=2))
        print(f"wrote {options.output}")
    return report


if __name__ == "__main__":
    main()
