"""Refresh cost and quality: exact SVD vs randomized range finder, and how many refreshes lazy refresh saves.

    python benchmarks/refresh_cost.py            # LLaMA-60M and LLaMA-7B-sized gradients (several minutes)
    python benchmarks/refresh_cost.py --quick    # small shapes, seconds (what the test suite runs)

Part 1 times one basis refresh at rank 128 (8 with --quick) and reports the fraction of the exact top-r gradient
energy each method captures (‖Pᵀ G‖² / ‖P*ᵀ G‖², P* from the exact SVD), on real gradients (a LLaMA-shaped model,
one forward/backward on English text: the paper's 60M config, and one layer of the 7B config for 4096×4096 and
4096×11008) and on synthetic matrices with a decaying spectrum. Part 2 trains a small LLaMA on the same text with
exact, randomized and lazy refresh and reports refreshes, refresh seconds and the final loss.
Prints tables and writes JSON (default benchmarks/results/refresh_cost.json).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from datetime import date
from pathlib import Path

import torch
from common import SAMPLE_TEXT, machine, quiet_library_logs, write_report
from transformers import LlamaConfig, LlamaForCausalLM

from hf_galore import GaLoreAdamW, GaLoreConfig, select_targets
from hf_galore.projector import compute_bases, project
from hf_galore.report import format_table as render_table

METHODS = {
    "exact": {"refresh_method": "exact"},
    "randomized q=1": {"refresh_method": "randomized", "power_iters": 1},
    "randomized q=2": {"refresh_method": "randomized", "power_iters": 2},
}


def byte_tokens(length: int, batch: int = 1) -> torch.Tensor:
    data = torch.tensor(list(SAMPLE_TEXT.encode()), dtype=torch.long)
    reps = -(-length * batch // len(data)) + 1
    return data.repeat(reps)[: length * batch].view(batch, length)


def real_gradients(sizes: dict, layers: int, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Gradients of a random-init LLaMA's language-model loss on English text, by weight name suffix."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, num_hidden_layers=layers, max_position_embeddings=256, **sizes)
    model = LlamaForCausalLM(config)
    tokens = byte_tokens(128, batch=2)
    model(tokens, labels=tokens).loss.backward()
    found = {}
    for name, param in model.named_parameters():
        for suffix in names:
            if name.endswith(suffix) and suffix not in found:
                found[suffix] = param.grad.detach().clone()
    del model
    return found


def synthetic(shape: tuple[int, int], decay: float = 0.97) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    k = min(shape)
    u, _ = torch.linalg.qr(torch.randn(shape[0], k, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(shape[1], k, generator=gen))
    return (u * decay ** torch.arange(k, dtype=torch.float32)) @ v.T


def time_refresh(grad: torch.Tensor, rank: int, options: dict, repeats: int) -> tuple[float, tuple]:
    times, bases = [], None
    for seed in range(repeats):
        start = time.perf_counter()
        bases = compute_bases(grad, rank, "std", options["refresh_method"], seed=seed, **_randomized(options))
        times.append(time.perf_counter() - start)
    return statistics.median(times), bases


def _randomized(options: dict) -> dict:
    return {"power_iters": options.get("power_iters", 2), "oversample": options.get("oversample", 8)}


def matrix_rows(quick: bool, rank: int) -> list[dict]:
    if quick:
        cases = {"real 64x64 (q_proj)": real_gradients(_TINY, 1, ("q_proj.weight",))["q_proj.weight"]}
        cases["synthetic 96x160"] = synthetic((96, 160))
    else:
        small = real_gradients(_LLAMA_60M, 1, ("q_proj.weight", "up_proj.weight"))
        big = real_gradients(_LLAMA_7B_LAYER, 1, ("q_proj.weight", "up_proj.weight"))
        cases = {
            "LLaMA-60M real 512x512 (q_proj)": small["q_proj.weight"],
            "LLaMA-60M real 1376x512 (up_proj)": small["up_proj.weight"],
            "LLaMA-7B real 4096x4096 (q_proj)": big["q_proj.weight"],
            "LLaMA-7B real 11008x4096 (up_proj)": big["up_proj.weight"],
            "synthetic 4096x11008": synthetic((4096, 11008)),
        }
    rows = []
    for name, grad in cases.items():
        exact_time, exact_bases = time_refresh(grad, rank, METHODS["exact"], repeats=1 if grad.numel() > 1e7 else 3)
        best = project(grad, *exact_bases).norm() ** 2
        for method, options in METHODS.items():
            seconds, bases = (exact_time, exact_bases) if method == "exact" else time_refresh(grad, rank, options, 3)
            rows.append(
                {
                    "matrix": name,
                    "method": method,
                    "seconds": seconds,
                    "speedup_vs_exact": exact_time / seconds,
                    "energy_vs_exact": float(project(grad, *bases).norm() ** 2 / best),
                }
            )
    return rows


def training_rows(quick: bool) -> list[dict]:
    """Train the same small LLaMA with each refresh policy; count refreshes and their time, report the loss."""
    steps, gap, rank = (30, 5, 8) if quick else (300, 20, 32)
    policies = {
        "exact": {"refresh_method": "exact"},
        "randomized": {"refresh_method": "randomized"},
        "randomized + lazy 0.4": {"refresh_method": "randomized", "lazy_threshold": 0.4},
        "randomized + lazy 0.4 + stagger": {"refresh_method": "randomized", "lazy_threshold": 0.4, "stagger": True},
    }
    tokens = byte_tokens(64, batch=8 * steps).view(steps, 8, 64)
    rows = []
    for policy, options in policies.items():
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=256, num_hidden_layers=2, max_position_embeddings=64, **_TINY)
        model = LlamaForCausalLM(config)
        targets = [t.param for t in select_targets(model, "attn,mlp")]
        config = GaLoreConfig(rank=rank, update_proj_gap=gap, scale=0.25, **options)
        opt = GaLoreAdamW(model.parameters(), lr=3e-3, weight_decay=0.0, galore_params=targets, galore_config=config)
        refreshes, seconds, loss = 0, 0.0, None
        for batch in tokens:
            loss = model(batch, labels=batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            stats = opt.pop_refresh_stats()
            refreshes, seconds = refreshes + stats.count, seconds + stats.seconds
        rows.append(
            {
                "policy": policy,
                "steps": steps,
                "update_proj_gap": gap,
                "refreshes": refreshes,
                "refresh_seconds": seconds,
                "final_loss": float(loss),
            }
        )
    return rows


_TINY = {"hidden_size": 64, "intermediate_size": 172, "num_attention_heads": 4}
_LLAMA_60M = {"hidden_size": 512, "intermediate_size": 1376, "num_attention_heads": 8}
_LLAMA_7B_LAYER = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32}


def format_tables(report: dict) -> str:
    lines = [f"Refresh at rank {report['rank']} ({report['machine']}, {report['date']})"]
    matrices = [
        (
            row["matrix"],
            row["method"],
            f"{row['seconds']:.3f}",
            f"{row['speedup_vs_exact']:.1f}x",
            f"{row['energy_vs_exact']:.4f}",
        )
        for row in report["matrices"]
    ]
    header = ("matrix", "method", "seconds", "speed-up", "energy vs exact")
    lines += [render_table(header, matrices, right={2, 3, 4}), ""]
    training = [
        (
            row["policy"],
            str(row["steps"]),
            str(row["update_proj_gap"]),
            str(row["refreshes"]),
            f"{row['refresh_seconds']:.2f}",
            f"{row['final_loss']:.4f}",
        )
        for row in report["training"]
    ]
    header = ("policy", "steps", "gap", "refreshes", "refresh s", "final loss")
    lines.append(render_table(header, training, right=range(1, 6)))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, seconds")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "refresh_cost.json")
    args = parser.parse_args(argv)
    rank = 8 if args.quick else 128
    with quiet_library_logs(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = {
            "rank": rank,
            "machine": machine(),
            "date": date.today().isoformat(),
            "matrices": matrix_rows(args.quick, rank),
            "training": training_rows(args.quick),
        }
    print(format_tables(report))
    write_report(report, args.output)
    return report


if __name__ == "__main__":
    main()
