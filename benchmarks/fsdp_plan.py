"""Per-GPU memory of LLaMA-7B, 13B and 70B pre-training on 1, 8 and 64 GPUs (FSDP2), planned by `hf-galore estimate`.

    python benchmarks/fsdp_plan.py            # 7B, 13B, 70B; 1, 8, 64 GPUs; 24 GiB and 80 GiB cards (a few seconds)
    python benchmarks/fsdp_plan.py --quick    # llama-tiny, 1 and 2 GPUs, tiny cards (what the test suite runs)

Settings: the GaLore paper's 7B pre-training run (bf16 weights, gradients and moments; attention + MLP targets;
T = update_proj_gap = 500; sequence 256, batch 1 per GPU), rank 1024 for 7B as in the paper and hidden/4 for the
others (13B: 1280, 70B: 2048; the paper's rule of thumb, its own runs stop at 7B). Activation checkpointing is off for
7B (the paper's run) and on for 13B and 70B, as runs of that size use it (without it their activations would add
2.0 and 6.5 GiB per GPU at batch 1: 2.23 instead of 0.23 GiB, and 6.96 instead of 0.48).
One GPU is planned without FSDP2; 8 and 64 GPUs as FSDP2 over that many processes, for the largest rank (`--fsdp`).
Optimizers: AdamW (torch), 8-bit AdamW (bitsandbytes, planned on each rank's rows as torch's AdamW keeps its
DTensor moments), GaLore (galore_adamw) and 8-bit layer-wise GaLore (galore_adamw_8bit_layerwise). Cards: 24 GiB
(RTX 4090: 24,564 MiB) and 80 GiB (A100/H100 80GB: 81,920 MiB). Prints a table and writes JSON (default
benchmarks/results/fsdp_plan.json).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from datetime import date
from pathlib import Path

from common import quiet_library_logs, write_report

from hf_galore.estimate import estimate, parse_memory_size
from hf_galore.report import format_table, gib, mib

MODELS = {  # preset -> (GaLore rank, activation checkpointing)
    "llama-7b": (1024, False),
    "llama-13b": (1280, True),
    "llama-70b": (2048, True),
}
QUICK_MODELS = {"llama-tiny": (16, False)}
GPUS, QUICK_GPUS = (1, 8, 64), (1, 2)
DEVICES, QUICK_DEVICES = ("24GiB", "80GiB"), ("2MiB", "16MiB")
OPTIMIZERS = {  # label -> --optim
    "AdamW": "adamw_torch",
    "8-bit AdamW": "adamw_bnb_8bit",
    "GaLore": "galore_adamw",
    "8-bit GaLore, layer-wise": "galore_adamw_8bit_layerwise",
}


def plan_runs(quick: bool) -> dict:
    models, gpus, devices = (QUICK_MODELS, QUICK_GPUS, QUICK_DEVICES) if quick else (MODELS, GPUS, DEVICES)
    runs = []
    for preset, (rank, checkpointing) in models.items():
        for label, optim in OPTIMIZERS.items():
            galore = optim.startswith("galore")
            for count in gpus:
                flags = {
                    "preset": preset,
                    "optim": optim,
                    "optim_target_modules": "attn,mlp" if galore else None,
                    "optim_args": f"rank={rank},update_proj_gap=500" if galore else None,
                    "dtype": "bfloat16",
                    "seq_len": 256,
                    "batch_size": 1,
                    "gradient_checkpointing": checkpointing,
                    "fsdp": None if count == 1 else count,
                }
                plan = asdict(estimate(**flags))
                fits = {device: plan["total"] <= parse_memory_size(device) for device in devices}
                runs.append({"model": preset, "optimizer": label, "gpus": count, "flags": flags, "fits": fits})
                runs[-1]["plan"] = plan
    return {
        "settings": {
            "dtype": "bfloat16",
            "seq_len": 256,
            "batch_size_per_gpu": 1,
            "update_proj_gap": 500,
            "targets": "attn,mlp",
            "ranks": {preset: rank for preset, (rank, _) in models.items()},
            "gradient_checkpointing": {preset: ckpt for preset, (_, ckpt) in models.items()},
            "devices": list(devices),
        },
        "quick": quick,
        "date": date.today().isoformat(),
        "runs": runs,
    }


def format_report(report: dict) -> str:
    """One row per model and optimizer; per GPU count the total GiB per GPU and whether it fits each card."""
    devices = report["settings"]["devices"]
    unit, size = ("MiB", mib) if report["quick"] else ("GiB", gib)
    gpus = sorted({run["gpus"] for run in report["runs"]})
    rows: dict[tuple[str, str], list[str]] = {}
    for run in report["runs"]:
        verdict = "/".join("yes" if run["fits"][device] else "no" for device in devices)
        rows.setdefault((run["model"], run["optimizer"]), []).append(f"{size(run['plan']['total'])} {verdict}")
    header = ("model", "optimizer", *(f"{n} GPU" + ("s" if n > 1 else "") for n in gpus))
    table = format_table(header, [(*key, *cells) for key, cells in rows.items()], right=range(2, 2 + len(gpus)))
    ranks = ", ".join(f"{preset} rank {rank}" for preset, rank in report["settings"]["ranks"].items())
    return f"{unit} per GPU, then fits {' / '.join(devices)} (yes/no); {ranks}\n{table}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="llama-tiny on 1 and 2 GPUs (seconds)")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "fsdp_plan.json")
    args = parser.parse_args(argv)
    with quiet_library_logs():  # the target table would be logged once per run
        report = plan_runs(args.quick)
    print(format_report(report))
    write_report(report, args.output)
    return report


if __name__ == "__main__":
    main()
