"""Run a function on 2 gloo ranks (CPU), each test starting and cleaning up its own process group."""

from __future__ import annotations

import socket
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
FORKSERVER_PRELOAD = ["torch", "torch.distributed", "hf_galore", "pytest"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int, out_dir: Path, body, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    try:
        torch.save(body(rank, *args), out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_on_ranks(tmp_path: Path, body, *args) -> list:
    """Run `body(rank, *args)` on WORLD gloo ranks and return what each rank returned (tensors and plain values).

    A fork server that has imported torch and hf_galore starts the ranks: a fresh interpreter per rank would import
    transformers (through hf_galore) every time, and fork from the test process is unsafe once it has used OpenMP.
    (Python 3.11's fork server ignores the parent's sys.path, so it cannot preload this test module itself.)
    """
    mp.get_context("forkserver").set_forkserver_preload(FORKSERVER_PRELOAD)
    mp.start_processes(
        _worker, args=(_free_port(), tmp_path, body, args), nprocs=WORLD, join=True, start_method="forkserver"
    )
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]


def shard_linears(model: torch.nn.Sequential) -> torch.nn.Sequential:
    """FSDP2 on this rank's 1-D mesh: each Linear its own unit, then the model (as accelerate wraps layers)."""
    from torch.distributed.fsdp import fully_shard

    mesh = dist.device_mesh.init_device_mesh("cpu", (WORLD,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model
