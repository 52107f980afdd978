"""A fair hyper-parameter search for compare.py: every method gets the same number of configurations, on a dev split.

    python examples/glue/sweep.py --quick                                   # 2 configurations per method, 200 rows
    python examples/glue/sweep.py --budget 12                               # Rotten Tomatoes, CPU: hours
    python examples/glue/sweep.py --budget 12 --jobs 6 --methods full,lora,galore \
        --work_dir outputs/sweep_party --offline_task convention_party      # the other task, 6 runs at once (GPU)
    python examples/glue/compare.py --recipe outputs/glue_sweep/recipe.json --seeds 0,1,2   # then the final table

For each method, `--budget` configurations are drawn from its space in SPACES below by seeded random search without
replacement (the same number for every method, so no method wins by being tuned harder), each trained by
run_glue.py (through compare.py's `run_method`) with `--eval_split dev`: scored on a fixed part of the training
data that the run does not train on, never on the validation split that compare.py reports. A configuration's
score is its mean dev score over `--sweep_seeds`. 8-bit GaLore is not swept: it takes GaLore's chosen settings.

Writes under --work_dir: every run's folder (its results.json and log.txt), sweep.json (every run, every
configuration's mean dev score, the best per method), recipe.json (each method's best flags, for
`compare.py --recipe`) and sweep.md, the table it prints (per method: budget, failed runs, best configuration,
best and median dev score). A run that fails is recorded with the end of its log; the sweep goes on. Flags it does
not know go to every run_glue.py run (`--offline_task`, `--max_train_samples`, `--model_name_or_path`, ...).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import shlex
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # compare.py lies beside this file
from compare import parse_methods, parse_seeds, run_method  # noqa: E402

# -- config: each method's search space; 8-bit GaLore takes GaLore's choice. LoRA alpha = 2 r. GaLore's non_targets:
# freeze_embeddings (--freeze_embeddings, the rest AdamW) or adafactor (`others=adafactor`: every non-target, the
# embeddings included, trained with a factored Adafactor state). Ranks stop at 16 for both LoRA and GaLore: the
# comparison is at about LoRA r=8's optimizer memory (GaLore at most 2x it, the issue's bar). GaLore's targets are
# part of the space, last (so a single value leaves the draws as they were): stages 1 and 2 ran with the pooler as a
# target; compare.py's recipe dropped it in stage 3 (examples/glue/sweep_results). APOLLO (swept later) has GaLore's
# keys but the residual, and starts from stage 3's targets -----------------------------------------------------
SPACES: dict[str, dict[str, list]] = {
    "full": {"learning_rate": [1e-5, 1.5e-5, 2e-5, 3e-5, 5e-5, 7e-5, 1e-4, 1.5e-4, 2e-4, 3e-4, 4e-4, 5e-4]},
    "lora": {"learning_rate": [1e-4, 2e-4, 3e-4, 5e-4, 1e-3, 2e-3, 3e-3, 5e-3], "lora_r": [4, 8, 16]},
    "galore": {
        "learning_rate": [1e-4, 2e-4, 3e-4, 5e-4, 1e-3, 2e-3],
        "scale": [1, 2, 4, 8],
        "rank": [4, 8, 16],
        "update_proj_gap": [25, 50, 100, 200],
        "residual": ["none", "fira"],
        "non_targets": ["freeze_embeddings", "adafactor"],
        "targets": ["attn,mlp,pooler"],
    },
    "apollo": {
        "learning_rate": [5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3],
        "scale": [1, 2, 4, 8],
        "rank": [4, 8, 16],
        "update_proj_gap": [25, 50, 100, 200],
        "non_targets": ["freeze_embeddings", "adafactor"],
        "targets": ["attn,mlp"],
    },
}
LOW_RANK_KEYS = ("rank", "update_proj_gap", "scale")  # the --optim_args keys of a configuration, in this order
LOW_RANK = {  # method -> its --optim name and its configuration's --optim_args keys
    "galore": ("galore_adamw", (*LOW_RANK_KEYS, "residual")),
    "galore_8bit": ("galore_adamw_8bit", (*LOW_RANK_KEYS, "residual")),
    "apollo": ("apollo_adamw", LOW_RANK_KEYS),
}
BUDGET = 12  # configurations per method; full's space has exactly 12
QUICK_BUDGET, QUICK_FLAGS = 2, ["--max_train_samples", "200", "--max_eval_samples", "200"]
# ------------------------------------------------------------------------------------------------------------------


def method_flags(method: str, config: dict[str, Any]) -> list[str]:
    """run_glue.py flags of one configuration (galore_8bit: GaLore's configuration with the 8-bit optimizer)."""
    lr = ["--learning_rate", str(config["learning_rate"])]
    if method == "full":
        return ["--method", "full", "--optim", "adamw_torch", *lr]
    if method == "lora":
        r = config["lora_r"]
        return ["--method", "lora", "--lora_r", str(r), "--lora_alpha", str(2 * r), *lr]
    if method in LOW_RANK:
        optim, keys = LOW_RANK[method]
        others = ",others=adafactor" if config["non_targets"] == "adafactor" else ""
        optim_args = ",".join(f"{key}={config[key]}" for key in keys) + others
        frozen = ["--freeze_embeddings"] if config["non_targets"] == "freeze_embeddings" else []
        targets = ["--optim_target_modules", config["targets"]]
        return ["--optim", optim, *targets, "--optim_args", optim_args, *frozen, *lr]
    raise ValueError(f"Invalid method {method!r}. Choose from {', '.join(SPACES)}.")


def load_spaces(path: Path | None) -> dict[str, dict[str, list]]:
    """SPACES, with the methods a `--spaces` file names replaced by its spaces (same keys, other values)."""
    if path is None:
        return SPACES
    given = json.loads(path.read_text())
    for method, space in given.items():
        if method not in SPACES:
            raise ValueError(f"Invalid method {method!r} in {path}. Choose from {', '.join(SPACES)}.")
        if set(space) != set(SPACES[method]):
            raise ValueError(
                f"Invalid space for {method} in {path}: keys {sorted(space)}, expected {sorted(SPACES[method])}."
            )
    return {**SPACES, **given}


def draw(space: dict[str, list], budget: int, seed: int) -> list[dict[str, Any]]:
    """`budget` distinct configurations of `space`, drawn at random (seeded) without replacement."""
    keys = list(space)
    grid = [dict(zip(keys, values)) for values in itertools.product(*(space[key] for key in keys))]
    if budget > len(grid):
        raise ValueError(f"Invalid budget={budget}: the space {keys} has only {len(grid)} configurations.")
    return random.Random(seed).sample(grid, budget)


def run_one(job: dict[str, Any], extra: list[str]) -> dict[str, Any]:
    """Train and score one (method, configuration, seed) on dev; a failure is recorded, not raised."""
    flags = [*job["flags"], *extra, "--eval_split", "dev", "--seed", str(job["seed"])]
    try:
        result = run_method(f"{job['method']} c{job['config']:02d} seed {job['seed']}", [], flags, job["output_dir"])
    except RuntimeError as error:
        return {**job, "status": "failed", "score": None, "error": str(error)[-3000:]}
    return {**job, "status": "ok", "score": result["score"], "metric": result["metric"], "results": result}


def score_configs(method: str, configs: list[dict], runs: list[dict]) -> list[dict[str, Any]]:
    """Each configuration's mean dev score over its seeds (None when one of its runs failed)."""
    rows = []
    for index, config in enumerate(configs):
        mine = [run for run in runs if run["method"] == method and run["config"] == index]
        scores = [run["score"] for run in mine]
        failed = any(score is None for score in scores)
        rows.append(
            {
                "config": config,
                "flags": method_flags(method, config),
                "scores": scores,
                "score": None if failed else statistics.mean(scores),
            }
        )
    return rows


def best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The configuration with the highest mean dev score (the first drawn among equals); None if all failed."""
    scored = [row for row in rows if row["score"] is not None]
    return max(scored, key=lambda row: row["score"]) if scored else None


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| method | budget | failed | best configuration | best dev score | median dev score |",
        "|---|---|---|---|---|---|",
    ]
    for method, entry in results.items():
        scores = [row["score"] for row in entry["configs"] if row["score"] is not None]
        failed = len(entry["configs"]) - len(scores)
        top = entry["best"]
        config = ", ".join(f"{k}={v}" for k, v in top["config"].items()) if top else "(all failed)"
        best_score = f"{100 * top['score']:.2f}%" if top else "-"
        median = f"{100 * statistics.median(scores):.2f}%" if scores else "-"
        lines.append(f"| {method} | {len(entry['configs'])} | {failed} | {config} | {best_score} | {median} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """This script's own flags (every other flag goes to run_glue.py)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], epilog="Other flags go to run_glue.py.", allow_abbrev=False
    )
    parser.add_argument("--methods", default=",".join(SPACES), help=f"comma-separated, from {', '.join(SPACES)}")
    parser.add_argument("--budget", type=int, default=None, help=f"configurations per method (default {BUDGET})")
    parser.add_argument("--sweep_seeds", default="0", help="training seeds per configuration, comma-separated")
    parser.add_argument("--search_seed", type=int, default=0, help="seed of the random draw of configurations")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (for a GPU machine)")
    parser.add_argument("--work_dir", type=Path, default=Path("outputs/glue_sweep"), help="runs and outputs")
    parser.add_argument(
        "--spaces",
        type=Path,
        default=None,
        help="JSON {method: {key: [values]}} replacing SPACES for those methods (a second, finer stage); the keys "
        "must be SPACES' keys",
    )
    parser.add_argument("--quick", action="store_true", help=f"budget {QUICK_BUDGET} and {shlex.join(QUICK_FLAGS)}")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Sweep every method, write sweep.json, recipe.json and sweep.md, print the table; returns sweep.json's data."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args, extra = parser.parse_known_args(argv)
    try:
        note = " (galore_8bit takes galore's settings and is written to the recipe whenever galore is swept)"
        methods = parse_methods(args.methods, SPACES, note)
    except ValueError as error:
        parser.error(str(error))
    for flag in ("--seed", "--eval_split", "--output_dir"):
        if flag in extra:
            parser.error(f"Invalid flag {flag}: sweep.py sets it for every run (--sweep_seeds for seeds).")
    if args.jobs < 1:
        parser.error(f"Invalid --jobs {args.jobs}. Must be >= 1.")
    budget = args.budget or (QUICK_BUDGET if args.quick else BUDGET)
    extra = [*QUICK_FLAGS, *extra] if args.quick else extra
    try:
        spaces = load_spaces(args.spaces)
        seeds = parse_seeds(args.sweep_seeds)
        configs = {method: draw(spaces[method], budget, args.search_seed) for method in methods}
    except ValueError as error:
        parser.error(str(error))

    jobs = [
        {
            "method": method,
            "config": index,
            "seed": seed,
            "flags": method_flags(method, config),
            "output_dir": args.work_dir / method / f"c{index:02d}_seed{seed}",
        }
        for method in methods
        for index, config in enumerate(configs[method])
        for seed in seeds
    ]
    print(
        f"{len(jobs)} runs ({budget} configurations x {len(seeds)} seeds x {len(methods)} methods), "
        f"{args.jobs} at once"
    )
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        runs = list(pool.map(lambda job: run_one(job, extra), jobs))

    results = {}
    for method in methods:
        rows = score_configs(method, configs[method], runs)
        results[method] = {"configs": rows, "best": best(rows)}
    recipe = {method: entry["best"]["flags"] for method, entry in results.items() if entry["best"]}
    if "galore" in recipe:
        recipe["galore_8bit"] = method_flags("galore_8bit", results["galore"]["best"]["config"])

    args.work_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "command": shlex.join(["python", "examples/glue/sweep.py", *argv]),
        "budget": budget,
        "sweep_seeds": seeds,
        "search_seed": args.search_seed,
        "spaces": {method: spaces[method] for method in methods},
        "run_glue_flags": extra,
        "methods": results,
        "recipe": recipe,
        "runs": runs,
    }
    (args.work_dir / "sweep.json").write_text(json.dumps(record, indent=2, default=str))
    (args.work_dir / "recipe.json").write_text(json.dumps(recipe, indent=2))
    text = table(results)
    next_step = shlex.join(
        ["python", "examples/glue/compare.py", "--recipe", str(args.work_dir / "recipe.json"), "--seeds", "0,1,2"]
    )
    (args.work_dir / "sweep.md").write_text(
        f"# Sweep: {record['command']}\n\nDev-split scores (mean over seeds {seeds}).\n\n{text}\n\nNext: "
        f"`{next_step}` (plus the same run_glue.py flags).\n"
    )
    print(f"\n{text}\n\nwritten: {args.work_dir / 'sweep.json'}, {args.work_dir / 'recipe.json'}")
    print(f"next: {next_step} {shlex.join(extra)}".rstrip())
    return record


if __name__ == "__main__":
    main()
