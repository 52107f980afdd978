"""Optimizer-state memory and step time: torch AdamW, bitsandbytes AdamW8bit, galore-torch 1.0 and hf_galore (GaLore,
APOLLO, APOLLO-Mini).

    python benchmarks/optimizer_state.py                 # the paper's LLaMA-60M config, rank 128 (a few minutes)
    python benchmarks/optimizer_state.py --quick         # tiny config, seconds (what the test suite runs)

All optimizers step on the same real gradients (one backward of a random-init model on random tokens), timed in
round-robin so machine noise hits them alike; step times are reported as ratios to torch AdamW measured in the
same run. "between refreshes" times steps that reuse the basis; "refresh step" times steps that recompute it (APOLLO:
that draw a new random projection; it regenerates P from its seed every step either way). APOLLO runs at the same rank
as GaLore, APOLLO-Mini at rank 1 (scale_type=tensor). apollo-torch (CC BY-NC) is not a reference client here.
Prints a table and writes JSON (default benchmarks/results/optimizer_state.json).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch
from common import machine, quiet_library_logs, write_report
from transformers import LlamaConfig, LlamaForCausalLM

from hf_galore import ApolloAdamW, GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit, optimizer_state_bytes
from hf_galore.report import MIB
from hf_galore.report import format_table as render_table
from hf_galore.targets import select_targets

LLAMA_60M = {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8, "num_attention_heads": 8}
QUICK = {"hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2, "num_attention_heads": 4}
NO_REFRESH = 10**9


def build_model(quick: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    sizes = QUICK if quick else LLAMA_60M
    config = LlamaConfig(vocab_size=512 if quick else 32000, max_position_embeddings=256, **sizes)
    return LlamaForCausalLM(config)


def param_groups(model: torch.nn.Module, rank: int, gap: int, **options: object) -> list[dict]:
    targets = {id(t.param) for t in select_targets(model, ["attn", "mlp"])}
    galore = [p for p in model.parameters() if id(p) in targets]
    rest = [p for p in model.parameters() if id(p) not in targets]
    galore_options = {"rank": rank, "update_proj_gap": gap, "scale": 0.25, "proj_type": "std", **options}
    return [{"params": rest}, {"params": galore, **galore_options}]


def candidates(rank: int) -> dict[str, Callable[[torch.nn.Module, int], torch.optim.Optimizer]]:
    """name -> build(model, update_proj_gap). Baselines ignore the gap."""
    import bitsandbytes as bnb
    import galore_torch

    adam = {"lr": 1e-3, "weight_decay": 0.0}
    adafactor = {"lr": 1e-3, "relative_step": False, "scale_parameter": False}
    return {
        "torch AdamW": lambda m, gap: torch.optim.AdamW(m.parameters(), **adam),
        "bitsandbytes AdamW8bit": lambda m, gap: bnb.optim.AdamW8bit(m.parameters(), **adam),
        "galore-torch GaLoreAdamW": lambda m, gap: galore_torch.GaLoreAdamW(param_groups(m, rank, gap), **adam),
        "galore-torch GaLoreAdamW8bit": lambda m, gap: galore_torch.GaLoreAdamW8bit(
            param_groups(m, rank, gap), **adam
        ),
        "hf_galore GaLoreAdamW": lambda m, gap: GaLoreAdamW(param_groups(m, rank, gap), **adam),
        "hf_galore GaLoreAdamW8bit": lambda m, gap: GaLoreAdamW8bit(param_groups(m, rank, gap), **adam),
        "hf_galore GaLoreAdafactor": lambda m, gap: GaLoreAdafactor(param_groups(m, rank, gap), **adafactor),
        "hf_galore ApolloAdamW": lambda m, gap: ApolloAdamW(param_groups(m, rank, gap, scale=1.0), **adam),
        "hf_galore ApolloAdamW (Mini)": lambda m, gap: ApolloAdamW(
            param_groups(m, 1, gap, scale=128**0.5, scale_type="tensor"), **adam
        ),
    }


def clone_with_grads(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the model whose parameters carry copies of the gradients (deepcopy drops `.grad`)."""
    clone = copy.deepcopy(model)
    for source, target in zip(model.parameters(), clone.parameters()):
        target.grad = source.grad.clone()
    return clone


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Tensor state, plus the bases galore-torch keeps inside its projector objects (invisible to a tensor walk)."""
    projectors = [s["projector"] for s in optimizer.state.values() if "projector" in s]
    bases = [b for p in projectors for b in (p.ortho_matrix if isinstance(p.ortho_matrix, list) else [p.ortho_matrix])]
    return optimizer_state_bytes(optimizer) + sum(b.numel() * b.element_size() for b in bases)


def timed_step(optimizer: torch.optim.Optimizer) -> float:
    start = time.perf_counter()
    optimizer.step()
    return time.perf_counter() - start


def measure(quick: bool, rank: int, repeats: int) -> dict:
    model = build_model(quick)
    tokens = torch.randint(
        0, model.config.vocab_size, (2, 64 if quick else 128), generator=torch.Generator().manual_seed(0)
    )
    model(tokens, labels=tokens).loss.backward()  # real gradients, reused by every step
    rows: dict[str, dict] = {}
    runners: dict[str, tuple[torch.optim.Optimizer, torch.optim.Optimizer]] = {}
    for name, build in candidates(rank).items():
        try:
            # each optimizer on its own copy (weights and gradients): a crashing baseline must not corrupt the rest
            between, refresh = build(clone_with_grads(model), NO_REFRESH), build(clone_with_grads(model), 1)
            between.step()  # first step: state allocation and the initial refresh
            refresh.step()
        except Exception as error:  # a baseline that cannot run here is reported, not fatal
            rows[name] = {"error": f"{type(error).__name__}: {error}".splitlines()[0][:160]}
            continue
        runners[name] = (between, refresh)
        rows[name] = {"state_mb": state_bytes(between) / MIB, "between": [], "refresh": []}
    for _ in range(repeats):
        for name, (between, refresh) in runners.items():
            rows[name]["between"].append(timed_step(between))
            rows[name]["refresh"].append(timed_step(refresh))
    base = statistics.median(rows["torch AdamW"]["between"])
    for name in runners:
        row = rows[name]
        row["between_s"] = statistics.median(row.pop("between"))
        row["refresh_s"] = statistics.median(row.pop("refresh"))
        row["between_vs_adamw"] = row["between_s"] / base
        row["refresh_vs_adamw"] = row["refresh_s"] / base
    config = {k: getattr(model.config, k) for k in (*LLAMA_60M, "vocab_size")}
    return {
        "config": config,
        "params": sum(p.numel() for p in model.parameters()),
        "rank": rank,
        "targets": "attn,mlp",
        "repeats": repeats,
        "machine": machine(),
        "date": date.today().isoformat(),
        "results": rows,
    }


def format_table(report: dict) -> str:
    lines = [
        f"LLaMA config {report['config']}, {report['params'] / 1e6:.1f}M params, rank {report['rank']}, "
        f"targets {report['targets']}, median of {report['repeats']} steps, {report['machine']}",
    ]
    header = ("optimizer", "state MiB", "step (s)", "vs AdamW", "refresh (s)", "vs AdamW", "")
    rows = [
        (name, "", "", "", "", "", f"fails here: {row['error']}")
        if "error" in row
        else (
            name,
            f"{row['state_mb']:.1f}",
            f"{row['between_s']:.4f}",
            f"{row['between_vs_adamw']:.2f}x",
            f"{row['refresh_s']:.4f}",
            f"{row['refresh_vs_adamw']:.2f}x",
            "",
        )
        for name, row in report["results"].items()
    ]
    lines.append(render_table(header, rows, right=range(1, 6), free_last=True))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny config, a few steps (seconds)")
    parser.add_argument("--rank", type=int, default=None, help="GaLore rank (default 128; 8 with --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per optimizer (default 7; 2 quick)")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "optimizer_state.json")
    args = parser.parse_args(argv)
    rank = args.rank or (8 if args.quick else 128)
    with quiet_library_logs(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = measure(args.quick, rank, args.repeats or (2 if args.quick else 7))
    print(format_table(report))
    write_report(report, args.output)
    return report


if __name__ == "__main__":
    main()
