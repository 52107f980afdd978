"""GaLore on FSDP2 (2 or 4 gloo processes on CPU): state, memory, optimizer traffic and step time per rank.

    python benchmarks/fsdp.py            # the LLaMA-60M preset, rank 128 (about 5 minutes on 2 CPU cores)
    python benchmarks/fsdp.py --world 4  # the same over 4 processes (writes results/fsdp_w4.json)
    python benchmarks/fsdp.py --quick    # the llama-tiny preset, rank 8 (seconds; what the test suite runs)

Every rank builds the same random-init model, shards each decoder layer and then the model with `fully_shard` (what
accelerate's transformer_based_wrap does) and trains on its own sequence of a global batch of random tokens. Four
optimizers run side by side in the same two processes, one model each, stepping in turn (interleaved, so machine
noise hits them alike):

- FSDP2 + torch AdamW: the baseline.
- galore_adamw (randomized) and galore_adamw (exact): hf_galore's row-sharded design (attn + mlp targets).
- gather-everything: what GaLore costs when each rank all-gathers every target's m×n gradient (`full_tensor()`)
  at every step and runs one-process GaLoreAdamW on it (replicated moments and bases, plus a replicated copy of
  the target weights to apply the update to; each rank then copies back its own rows).

Bytes are counted with `hf_galore.sharding.count_collectives()` around `optimizer.step()` only: FSDP2's own
all-gathers and reduce-scatters happen in forward/backward and are the same for every optimizer. "Bytes moved" is
what one rank receives under the ring algorithms: (W−1)/W of an all-gather's result, 2·(W−1)/W of an all-reduce's
tensor, (W−1)/W of a reduce-scatter's input; so gathering an m×n float32 gradient moves 4·m·n·(W−1)/W bytes, the
formula the report checks the count against. The first refresh cycle is counted, the later ones are timed (the
counting mode adds dispatch overhead). A barrier precedes each timed step, so one rank's slower backward is not
charged to the other's first collective; a step's time is the slower rank's, and the table shows medians.

Memory: a fresh 2-rank run and a fresh one-process run (same global batch) of galore_adamw (randomized) each report
the peak resident set (`ru_maxrss`), which includes the imported libraries, the model, gradients and activations,
not only the optimizer. Writes JSON (default benchmarks/results/fsdp.json).
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import machine, quiet_library_logs, write_report
from transformers import LlamaForCausalLM

from hf_galore import GaLoreAdamW, GaLoreConfig, optimizer_state_bytes, select_targets
from hf_galore.presets import PRESETS, preset_config
from hf_galore.report import MIB
from hf_galore.report import format_table as render_table
from hf_galore.sharding import CommRecord, count_collectives, row_shard

ADAMW = "FSDP2 + torch AdamW"
RANDOMIZED = "galore_adamw (randomized)"
EXACT = "galore_adamw (exact)"
GATHER = "gather-everything"
LR = 1e-3
INTERVAL = 200  # the default update_proj_gap: the table also shows the bytes of one refresh + 199 steps


def moved_bytes(record: CommRecord, world: int) -> int:
    """Bytes one rank receives for one collective under the ring algorithms (see the module docstring)."""
    op = record.op.rsplit(".", 1)[-1]
    if "all_reduce" in op or "allreduce" in op:
        return 2 * (world - 1) * record.input_bytes // world
    if "gather" in op:
        return record.output_bytes - record.input_bytes
    if "reduce_scatter" in op:
        return record.input_bytes - record.output_bytes
    raise ValueError(f"Invalid collective {record.op!r} for this benchmark's byte count.")


def build_model(preset: str, mesh: Any | None) -> LlamaForCausalLM:
    """The preset's random-init LLaMA (the same on every rank); sharded like accelerate's transformer_based_wrap."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = LlamaForCausalLM(preset_config(preset))
    if mesh is not None:
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def galore_adamw(model: torch.nn.Module, config: GaLoreConfig) -> GaLoreAdamW:
    targets = [t.param for t in select_targets(model, ["attn", "mlp"])]
    names = {p: n for n, p in model.named_parameters()}
    return GaLoreAdamW(
        model.parameters(), lr=LR, weight_decay=0.0, galore_params=targets, galore_config=config, param_names=names
    )


class GatherEverything:
    """GaLore by gathering: each target's sharded gradient is all-gathered (`full_tensor()`) every step, and
    one-process GaLoreAdamW updates a replicated copy of the full weight, whose rows each rank copies back into its
    shard. The other parameters get torch AdamW on their shards (no collective). Not part of the library."""

    def __init__(self, model: torch.nn.Module, config: GaLoreConfig) -> None:
        self.targets = [t.param for t in select_targets(model, ["attn", "mlp"])]
        chosen = {id(p) for p in self.targets}
        self.full = [torch.nn.Parameter(p.full_tensor().detach()) for p in self.targets]  # once, before training
        self.galore = GaLoreAdamW(self.full, lr=LR, weight_decay=0.0, galore_params=self.full, galore_config=config)
        rest = [p for p in model.parameters() if id(p) not in chosen]
        self.rest = torch.optim.AdamW(rest, lr=LR, weight_decay=0.0)
        self.model = model

    @torch.no_grad()
    def step(self) -> None:
        for param, full in zip(self.targets, self.full):
            full.grad = param.grad.full_tensor()  # the all-gather of the m×n gradient
        self.galore.step()
        for param, full in zip(self.targets, self.full):
            local = param.to_local()
            offset = row_shard(param).offset
            local.copy_(full[offset : offset + local.shape[0]])
            full.grad = None
        self.rest.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.model.zero_grad(set_to_none=set_to_none)

    def state_bytes(self) -> int:
        return optimizer_state_bytes(self.galore) + optimizer_state_bytes(self.rest)

    def weight_copy_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.full)


def optimizers(galore_rank: int, gap: int) -> dict[str, Callable[[torch.nn.Module], Any]]:
    """name -> build(sharded model)."""

    def config(method: str) -> GaLoreConfig:
        return GaLoreConfig(rank=galore_rank, update_proj_gap=gap, scale=0.25, refresh_method=method)

    return {
        ADAMW: lambda m: torch.optim.AdamW(m.parameters(), lr=LR, weight_decay=0.0),
        RANDOMIZED: lambda m: galore_adamw(m, config("randomized")),
        EXACT: lambda m: galore_adamw(m, config("exact")),
        GATHER: lambda m: GatherEverything(m, config("randomized")),
    }


def tokens(vocab: int, steps: int, world: int, seq: int) -> torch.Tensor:
    """steps × world × seq random token ids: a global batch of `world` sequences per step."""
    return torch.randint(0, vocab, (steps, world, seq), generator=torch.Generator().manual_seed(0))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---------------------------------------------------------------------------------------------------------------
# What each process runs


def compare_on_ranks(rank: int, world: int, setup: dict) -> dict:
    """All four optimizers in this rank, interleaved: bytes over the first refresh cycle, then timed steps."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    runs = {}
    for name, build in optimizers(setup["galore_rank"], setup["gap"]).items():
        model = build_model(setup["preset"], mesh)
        runs[name] = (model, build(model))
    data = tokens(runs[ADAMW][0].config.vocab_size, setup["steps"], world, setup["seq"])
    out = {name: {"bytes": [], "calls": [], "seconds": []} for name in runs}
    for step in range(setup["steps"]):
        for name, (model, optimizer) in runs.items():
            ids = data[step, rank : rank + 1]
            model(input_ids=ids, labels=ids).loss.backward()
            if step <= setup["gap"]:  # the first cycle: refresh, between, ..., refresh
                with count_collectives() as counter:
                    optimizer.step()
                out[name]["bytes"].append(sum(moved_bytes(r, world) for r in counter.records))
                out[name]["calls"].append(counter.calls)
            else:
                dist.barrier()
                start = time.perf_counter()
                optimizer.step()
                out[name]["seconds"].append(time.perf_counter() - start)
            optimizer.zero_grad(set_to_none=True)
        if rank == 0 and not setup["quiet"]:
            print(f"step {step + 1}/{setup['steps']} done for every optimizer", file=sys.stderr, flush=True)
    for name, (_, optimizer) in runs.items():
        gather = isinstance(optimizer, GatherEverything)
        out[name]["state_bytes"] = optimizer.state_bytes() if gather else optimizer_state_bytes(optimizer)
        out[name]["weight_copy_bytes"] = optimizer.weight_copy_bytes() if gather else 0
    targets = select_targets(runs[ADAMW][0], ["attn", "mlp"])
    out["targets"] = {
        "count": len(targets),
        "gather_formula_bytes": sum(4 * t.param.shape[0] * t.param.shape[1] * (world - 1) // world for t in targets),
    }
    return out


def memory_on_ranks(rank: int, world: int, setup: dict) -> dict:
    """galore_adamw (randomized) alone, for its peak RSS: sharded over the ranks, or one process (world 1) on the
    same global batch. One process also counts the one-process optimizer state, AdamW's after reading its RSS."""
    from torch.distributed.device_mesh import init_device_mesh

    at_start = peak_rss_mib()
    mesh = init_device_mesh("cpu", (world,)) if world > 1 else None
    model = build_model(setup["preset"], mesh)
    after_model = peak_rss_mib()
    optimizer = optimizers(setup["galore_rank"], setup["gap"])[RANDOMIZED](model)
    steps = setup["gap"] + 1  # includes a refresh after the first
    data = tokens(model.config.vocab_size, steps, setup["world"], setup["seq"])
    after_backward = 0.0
    for step in range(steps):
        ids = data[step] if world == 1 else data[step, rank : rank + 1]
        model(input_ids=ids, labels=ids).loss.backward()
        if step == 0:
            after_backward = peak_rss_mib()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    result = {
        "rss_at_start_mib": at_start,
        "peak_rss_after_model_mib": after_model,  # the full model is built on every rank, then sharded
        "peak_rss_after_first_backward_mib": after_backward,  # before the optimizer holds anything
        "peak_rss_mib": peak_rss_mib(),
    }
    if world == 1:
        result["galore_state_bytes"] = optimizer_state_bytes(optimizer)
        del optimizer
        adamw = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
        model(input_ids=data[0], labels=data[0]).loss.backward()
        adamw.step()
        result["adamw_state_bytes"] = optimizer_state_bytes(adamw)
        result["params"] = sum(p.numel() for p in model.parameters())
    return result


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: Path, body: Callable, setup: dict) -> None:
    torch.set_num_threads(1)  # one core per rank
    warnings.simplefilter("ignore")
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(minutes=10)
        )
    try:
        with quiet_library_logs():
            (out_dir / f"rank{rank}.json").write_text(json.dumps(body(rank, world, setup)))
    finally:
        if world > 1:
            dist.destroy_process_group()


def launch(world: int, body: Callable, setup: dict) -> list[dict]:
    """Run `body(rank, world, setup)` in `world` fresh processes (a gloo group when world > 1); their results."""
    mp.get_context("forkserver").set_forkserver_preload(["torch", "torch.distributed", "transformers", "hf_galore"])
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            _worker, args=(world, _free_port(), Path(tmp), body, setup), nprocs=world, start_method="forkserver"
        )
        return [json.loads((Path(tmp) / f"rank{rank}.json").read_text()) for rank in range(world)]


# ---------------------------------------------------------------------------------------------------------------
# The report


def measure(setup: dict) -> dict:
    ranks = launch(setup["world"], compare_on_ranks, setup)
    sharded = launch(setup["world"], memory_on_ranks, setup)
    (single,) = launch(1, memory_on_ranks, setup)
    gap, first = setup["gap"], ranks[0]
    one_process = {ADAMW: single["adamw_state_bytes"], RANDOMIZED: single["galore_state_bytes"]}
    one_process[EXACT] = one_process[GATHER] = one_process[RANDOMIZED]  # same layout as one-process GaLoreAdamW
    timed_steps = range(gap + 1, setup["steps"])
    rows: dict[str, dict] = {}
    for name in optimizers(1, 1):
        counted = first[name]["bytes"]
        if any(r[name]["bytes"] != counted for r in ranks):
            raise RuntimeError(f"{name}: the ranks counted different bytes: {[r[name]['bytes'] for r in ranks]}")
        slowest = [max(r[name]["seconds"][i] for r in ranks) for i in range(len(timed_steps))]
        rows[name] = {
            "state_mib_per_rank": [r[name]["state_bytes"] / MIB for r in ranks],
            "state_mib_one_process": one_process[name] / MIB,
            "weight_copy_mib_per_rank": first[name]["weight_copy_bytes"] / MIB,
            "bytes_per_step": counted,  # steps 0..gap: refresh, between..., refresh
            "calls_per_step": first[name]["calls"],
            "between_bytes": int(statistics.median(counted[1:gap])),
            "refresh_bytes": counted[gap],
            "bytes_per_interval": counted[gap] + (INTERVAL - 1) * int(statistics.median(counted[1:gap])),
            "between_s": statistics.median(t for s, t in zip(timed_steps, slowest) if s % gap),
            "refresh_s": statistics.median(t for s, t in zip(timed_steps, slowest) if s % gap == 0),
            "seconds_per_timed_step": slowest,  # steps gap+1, gap+2, ...: the slower rank's
        }
    for row in rows.values():
        row["between_vs_adamw"] = row["between_s"] / rows[ADAMW]["between_s"]
        row["refresh_vs_adamw"] = row["refresh_s"] / rows[ADAMW]["between_s"]
    config = preset_config(setup["preset"])
    return {
        "preset": setup["preset"],
        "config": {
            k: getattr(config, k)
            for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        },
        "params": single["params"],
        "world": setup["world"],
        "rank": setup["galore_rank"],
        "update_proj_gap": gap,
        "targets": f"attn,mlp ({first['targets']['count']} weights)",
        "seq_per_rank": setup["seq"],
        "steps": setup["steps"],
        "timed_steps": len(timed_steps),
        "gather_formula_bytes": first["targets"]["gather_formula_bytes"],
        "memory": {
            "peak_rss_mib_per_rank": [r["peak_rss_mib"] for r in sharded],
            "peak_rss_mib_one_process": single["peak_rss_mib"],
            "rss_at_start_mib_per_rank": [r["rss_at_start_mib"] for r in sharded],
            "rss_at_start_mib_one_process": single["rss_at_start_mib"],
            "peak_rss_after_model_mib_per_rank": [r["peak_rss_after_model_mib"] for r in sharded],
            "peak_rss_after_model_mib_one_process": single["peak_rss_after_model_mib"],
            "peak_rss_after_first_backward_mib_per_rank": [r["peak_rss_after_first_backward_mib"] for r in sharded],
            "peak_rss_after_first_backward_mib_one_process": single["peak_rss_after_first_backward_mib"],
        },
        "machine": machine() + f"; {setup['world']} gloo ranks, 1 thread each",
        "date": date.today().isoformat(),
        "results": rows,
    }


def _mib(value: float) -> str:
    return f"{value:.1f}"


def _bytes(value: float) -> str:
    return f"{value / MIB:.2f} MiB" if value else "0"


def format_table(report: dict) -> str:
    lines = [
        f"{report['preset']} {report['config']}, {report['params'] / 1e6:.1f}M params, {report['world']} gloo ranks "
        f"(CPU, 1 thread each), GaLore rank {report['rank']} on {report['targets']}, refresh every "
        f"{report['update_proj_gap']} steps; step times: median over {report['timed_steps']} steps of the slower "
        f"rank, all optimizers interleaved in the same processes, {report['machine']}",
    ]
    header = (
        "optimizer",
        "state MiB/rank",
        "1 process",
        "bytes/step",
        "bytes/refresh",
        f"per {INTERVAL} steps",
        "step s",
        "vs AdamW",
        "refresh s",
        "vs AdamW",
    )
    rows = [
        (
            name,
            _mib(max(row["state_mib_per_rank"])),
            _mib(row["state_mib_one_process"]),
            _bytes(row["between_bytes"]),
            _bytes(row["refresh_bytes"]),
            _bytes(row["bytes_per_interval"]),
            f"{row['between_s']:.3f}",
            f"{row['between_vs_adamw']:.2f}x",
            f"{row['refresh_s']:.3f}",
            f"{row['refresh_vs_adamw']:.2f}x",
        )
        for name, row in report["results"].items()
    ]
    lines.append(render_table(header, rows, right=range(1, 10)))
    memory, gather = report["memory"], report["results"][GATHER]
    lines.append(
        "gather-everything also keeps a replicated copy of the target weights: "
        f"{gather['weight_copy_mib_per_rank']:.1f} MiB per rank. Its counted bytes/step vs "
        "4·m·n·(W−1)/W summed over the targets: "
        f"{gather['between_bytes']:,} vs {report['gather_formula_bytes']:,}."
    )

    def rss(key: str) -> str:
        per_rank = " / ".join(_mib(m) for m in memory[f"{key}_mib_per_rank"])
        return f"{per_rank} per rank vs {_mib(memory[f'{key}_mib_one_process'])} one process"

    lines.append(
        "galore_adamw (randomized) alone, fresh processes, same global batch; peak RSS in MiB (libraries + model + "
        f"gradients + activations + optimizer): {rss('peak_rss')}. High-water marks along the way: at start "
        f"{rss('rss_at_start')}; after building (and sharding) the model {rss('peak_rss_after_model')}; after the "
        f"first backward, before the optimizer holds anything, {rss('peak_rss_after_first_backward')}."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the llama-tiny preset, rank 8, 5 short steps (seconds)")
    parser.add_argument("--preset", choices=list(PRESETS), default=None, help="default llama-60m (llama-tiny quick)")
    parser.add_argument("--rank", type=int, default=None, help="GaLore rank (default 128, the paper's 60M; 8 quick)")
    parser.add_argument("--gap", type=int, default=None, help="update_proj_gap (default 3; 2 quick)")
    parser.add_argument("--cycles", type=int, default=None, help="timed refresh cycles after the counted one (3; 1)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per rank per step (default 64; 16 quick)")
    parser.add_argument("--world", type=int, default=2, help="gloo processes FSDP2 shards over (default 2)")
    parser.add_argument("--output", type=Path, default=None, help="default results/fsdp.json (fsdp_w4.json for 4)")
    args = parser.parse_args(argv)
    if args.world < 2:
        parser.error(f"Invalid --world {args.world}: needs >= 2 processes to shard over.")
    name = "fsdp.json" if args.world == 2 else f"fsdp_w{args.world}.json"
    output = args.output or Path(__file__).parent / "results" / name
    gap = args.gap or (2 if args.quick else 3)
    if gap < 2:
        parser.error(f"Invalid --gap {gap}: needs >= 2 for a step between refreshes.")
    setup = {
        "preset": args.preset or ("llama-tiny" if args.quick else "llama-60m"),
        "galore_rank": args.rank or (8 if args.quick else 128),
        "gap": gap,
        "steps": gap * (1 + (args.cycles or (1 if args.quick else 3))) + 1,
        "seq": args.seq or (16 if args.quick else 64),
        "quiet": args.quick,
        "world": args.world,
    }
    report = measure(setup)
    print(format_table(report))
    write_report(report, output)
    return report


if __name__ == "__main__":
    main()
