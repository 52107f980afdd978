"""Row-sharded (FSDP2) GaLore: where a weight's rows live, the few collectives the maths needs, and counting them.

FSDP2 (`torch.distributed.fsdp.fully_shard`) holds each parameter and its gradient as a DTensor `Shard(0)`: rank j
owns a contiguous block of rows, cut with `torch.chunk` semantics (blocks of ⌈m/W⌉ rows, the last one shorter, and
empty blocks when the rows run out, e.g. m=1 or m=5 over W=4). `RowShard` says where a local block sits; every
helper here takes one, and `shard=None` (or a group of one rank) means "not sharded: no collective".

What each piece of GaLore costs on a row-sharded m×n gradient G (k = rank + oversample, r = rank, 4-byte floats):

- right projection R_i = G_i Qᵀ and its back-projection N_i Q: local once Q (r×n) is whole on the rank. Q is kept
  sharded (`shard_whole_like`: ⌈r/W⌉ of its rows per rank, a DTensor) and gathered just in time for its target
  (`gather_whole`: one all-gather, r·n values received per target and step, dropped after the update); moments are
  row-sharded like the weight. So every rank holds ~1/W of every target's state, bases included.
- the step's finite check (`finite_flags`): one all-reduce of one float per parameter stepped, for the whole step.
- randomized right-basis refresh (`projector.randomized_right_basis`): 1 + power_iters all-reduces of n×k, one of a
  k×k float64 Gram matrix and one of n×r — O(n·k) bytes, never m×n, and nothing that grows with W.
- exact refresh (`gather_rows`): one all-gather of the m×n gradient (padded to W·⌈m/W⌉ rows), then the same full
  SVD on every rank; one target at a time, so the transient is one m×n gradient whatever W.
- left projection (`project_left`): Pᵀ G = Σ_i P_iᵀ G_i, an all-reduce of r×n every step, P row-sharded;
  back-projection P_i N is local.
- Adafactor on R_i (m_i×r): row statistic local; column statistic = mean over all m rows (all-reduce of r floats);
  the row statistic's mean, the update's RMS and (with `scale_parameter`) the weight's RMS need one float each
  (`mean_over_rows`, `global_mean`, `global_rms`).
- 8-bit Adam: bitsandbytes quantises the local shard in blocks of 256 values, no collective. The block boundaries
  match an unsharded run only when every shard but the last holds a multiple of 256 values, so 8-bit parity with
  one process is to quantisation tolerance, not float error. Choose 8-bit vs 32-bit state (`min_8bit_size`) from
  the global numel, not the shard's, or ranks (and an empty shard) disagree on the state's dtype.

Decisions that must agree on every rank must use replicated values: a non-finite check on the local shard alone
would make one rank skip an update (or a refresh, or an Adafactor reduction) the others take, so the step's flags are
agreed in one all-reduce (`finite_flags`). The bases are computed from all-reduced (identical) inputs, so checking
them is enough.

Layouts: FSDP2 (a 1-D mesh, `Shard(0)`) and HSDP (a 2-D replicate × shard mesh, `(Replicate(), Shard(0))`: the
collectives run over the shard dimension, and the replicas compute the same bases from the same reduced gradient).
Anything else (tensor parallelism's column shards, strided shards, a weight sharded over two mesh dimensions) is
refused by `row_shard`: GaLore's right projection needs each rank to hold whole rows of one contiguous block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = [
    "CommCounter",
    "CommRecord",
    "RowShard",
    "all_gather_stacked",
    "any_rank",
    "block_scales_by_value",
    "blocks_by_row",
    "blocks_from_rows",
    "count_collectives",
    "finite_flags",
    "gather_rows",
    "gather_whole",
    "global_mean",
    "global_rms",
    "global_sum",
    "local_tensor",
    "mean_over_rows",
    "one_ahead",
    "project_left",
    "row_shard",
    "shard_like",
    "shard_whole_like",
    "world_size",
]


@dataclass(frozen=True)
class RowShard:
    """Where a local block of rows sits in its global m×n tensor: rows [offset, offset + local rows) of
    `global_rows`, split over `group` with `torch.chunk` semantics (None: a single process, not sharded)."""

    offset: int
    global_rows: int
    group: Any = None  # torch.distributed.ProcessGroup | None


def local_tensor(tensor: Tensor) -> Tensor:
    """The rank's own block: `tensor.to_local()` for a DTensor, `tensor` itself otherwise."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def row_shard(tensor: Tensor) -> RowShard | None:
    """The `RowShard` of a DTensor sharded on dim 0 over one mesh dimension (FSDP2, or HSDP's shard dimension with
    the others replicated); None for a plain tensor or a fully replicated DTensor.

    Raises ValueError for layouts whose rows are not one contiguous block per rank (other sharded dims, strided
    shards from FSDP2 + tensor parallelism).
    """
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(tensor, DTensor):
        return None
    mesh, placements = tensor.device_mesh, tensor.placements
    sharded = [dim for dim, p in enumerate(placements) if not isinstance(p, Replicate)]
    if not sharded:
        return None
    if len(sharded) != 1 or type(placements[sharded[0]]) is not Shard or placements[sharded[0]].dim != 0:
        raise ValueError(
            f"Invalid placements {placements} for GaLore's row sharding: expected Shard(0) on one mesh dimension "
            "and Replicate() on the others (FSDP2, or HSDP's replicate x shard mesh). GaLore projects each rank's "
            "whole rows; tensor parallelism (column shards, or rows split over two mesh dimensions) leaves a rank "
            "pieces of rows, so it is not supported: shard the optimized weights with fully_shard only."
        )
    mesh_dim = sharded[0]
    _, offset = Shard.local_shard_size_and_offset(tensor.shape[0], mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim))
    return RowShard(offset=int(offset), global_rows=tensor.shape[0], group=mesh.get_group(mesh_dim))


def shard_like(local: Tensor, param: Tensor) -> Tensor:
    """`local` (this rank's rows of an m×c state tensor, e.g. a moment of the projected gradient) as a DTensor laid
    out like the row-sharded `param` (same mesh and placements, global shape (m, c)); `local` itself when `param`
    is not a DTensor.

    Keep the row-sharded optimizer state as DTensors: torch.distributed.checkpoint treats a plain tensor as
    replicated and saves one rank's copy (the others' rows are lost, or loading fails on uneven shapes), while
    DTensor state reshards on load, to another world size too. Replicated bases and plain ints survive as they are.
    """
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return local
    shape = (param.shape[0], *local.shape[1:])
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False, shape=shape, stride=stride)


def shard_whole_like(whole: Tensor, param: Tensor) -> Tensor:
    """`whole` (a tensor every rank computed whole: a basis Q, r×n) kept as a DTensor cut along its own rows over
    the mesh dimension that shards `param` (replicated over HSDP's other one): each rank stores a ⌈r/W⌉×n block, so
    per-rank basis memory falls as 1/W, and torch.distributed.checkpoint saves and reshards it like the moments.
    `whole` itself when `param` is not a DTensor. `gather_whole` gives it back whole."""
    from torch.distributed.tensor import DTensor, Shard

    if row_shard(param) is None:
        return whole
    mesh, placements = param.device_mesh, param.placements
    mesh_dim = next(dim for dim, p in enumerate(placements) if isinstance(p, Shard))
    size, index = mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
    rows, offset = Shard.local_shard_size_and_offset(whole.shape[0], size, index)
    local = whole[offset : offset + rows].clone(memory_format=torch.contiguous_format)
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=whole.shape, stride=whole.stride())


def gather_whole(tensor: Tensor | None) -> Tensor | None:
    """The whole tensor on this rank, just in time: a DTensor redistributed to `Replicate()` (one all-gather of its
    rows over the shard dimension, W·⌈r/W⌉×n for a basis: r·n elements received per target and step, r/m of FSDP2's
    own gather of the m×n weight); a plain tensor (or None) as it is. The gather is issued asynchronously (a
    functional collective, waited on at first use: `full_tensor()` would wait at once), so work done before that
    use overlaps it."""
    from torch.distributed.tensor import DTensor, Replicate

    if not isinstance(tensor, DTensor):
        return tensor
    return tensor.redistribute(placements=[Replicate()] * tensor.device_mesh.ndim, async_op=True).to_local()


def one_ahead(items: Sequence[Any], start: Callable[[Any], Any]) -> Iterator[tuple[Any, Any]]:
    """Each item with `start(item)`, where `start` of the next item runs before the current one is handed out: a
    collective it issues (DTensor lowers `gather_whole` to functional collectives, waited on first use) can run while
    the caller works on the current item. At most two results are alive at a time."""
    pending = start(items[0]) if items else None
    for index, item in enumerate(items):
        current, pending = pending, start(items[index + 1]) if index + 1 < len(items) else None
        yield item, current


def world_size(shard: RowShard | None) -> int:
    """How many ranks share the rows (1 when not sharded)."""
    return 1 if shard is None or shard.group is None else dist.get_world_size(shard.group)


def global_sum(tensor: Tensor, shard: RowShard | None) -> Tensor:
    """Σ over the ranks of `tensor` (a new tensor; all-reduce of tensor.numel() values); `tensor` when unsharded."""
    if world_size(shard) == 1:
        return tensor
    total = tensor.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=shard.group)
    return total


def all_gather_stacked(tensor: Tensor, shard: RowShard | None) -> Tensor:
    """Every rank's `tensor` (same shape everywhere) stacked along dim 0 in rank order: W·a×b from a×b."""
    size = world_size(shard)
    if size == 1:
        return tensor
    tensor = tensor.contiguous()
    out = tensor.new_empty((size * tensor.shape[0], *tensor.shape[1:]))
    # torch 2.13 renamed all_gather_into_tensor (deprecated there) to all_gather_single; same collective.
    getattr(dist, "all_gather_single", dist.all_gather_into_tensor)(out, tensor, group=shard.group)
    return out


def gather_rows(local: Tensor, shard: RowShard | None) -> Tensor:
    """The full m×n tensor on every rank from its row blocks: one all-gather of W·⌈m/W⌉×n (shorter and empty
    blocks are zero-padded, then trimmed). Used by the exact refresh, once per refresh."""
    size = world_size(shard)
    if size == 1:
        return local
    chunk = -(-shard.global_rows // size)
    rank = dist.get_rank(shard.group)
    rows = local.shape[0]
    expected = max(0, min(chunk, shard.global_rows - rank * chunk))
    if rows != expected or (rows and shard.offset != rank * chunk):
        raise ValueError(
            f"Invalid row shard: rank {rank} holds {rows} rows at offset {shard.offset} of {shard.global_rows}; "
            f"torch.chunk over {size} ranks gives {expected} rows at offset {rank * chunk}."
        )
    padded = local.new_zeros((chunk, *local.shape[1:]))
    padded[:rows] = local
    return all_gather_stacked(padded, shard)[: shard.global_rows]


def project_left(local_grad: Tensor, local_left: Tensor, shard: RowShard | None) -> Tensor:
    """R = Pᵀ G for a row-sharded G (m_i×n) and P (m_i×r, the same rows of the m×r left basis): Σ_i P_iᵀ G_i,
    replicated on every rank. Costs an all-reduce of r×n values (4·r·n bytes in float32) per call, i.e. per step:
    the integrator decides whether to offer left projection on sharded weights. The back-projection P_i N is local.
    """
    return global_sum(local_left.T @ local_grad, shard)


def mean_over_rows(tensor: Tensor, shard: RowShard | None) -> Tensor:
    """The mean over all m global rows (dim -2) of a row-sharded tensor: Adafactor's column statistic.
    All-reduce of the last dimension's size (r floats for a projected gradient)."""
    if world_size(shard) == 1:
        return tensor.mean(dim=-2)
    return global_sum(tensor.sum(dim=-2), shard) / shard.global_rows


def global_mean(tensor: Tensor, numel: int, shard: RowShard | None) -> Tensor:
    """The mean of a sharded tensor whose global size is `numel` (0-d): Adafactor's mean of the row statistic
    (numel = m). All-reduce of one float."""
    if world_size(shard) == 1:
        return tensor.mean()
    return global_sum(tensor.sum(), shard) / numel


def global_rms(tensor: Tensor, numel: int, shard: RowShard | None) -> Tensor:
    """√(Σ x² / numel) over every rank's block (0-d): Adafactor's update clipping (numel = m·r) and its
    `scale_parameter` weight RMS (numel = m·n). All-reduce of one float."""
    if world_size(shard) == 1:
        return tensor.norm(2) / numel**0.5
    return (global_sum(tensor.float().square().sum(), shard) / numel).sqrt()


def finite_flags(tensors: list[Tensor], *, agree: bool) -> list[bool]:
    """Whether each tensor is free of NaN and inf, for a whole step at once: each read as its float32 sum (one pass,
    no full-size temporary: any NaN or inf makes the sum non-finite; finite values would need a sum beyond 3e38 to
    look otherwise), the flags stacked, OR-ed over the ranks in one all-reduce of len(tensors) floats when `agree`
    (row shards: each rank holds only its rows, and every rank must take the same decision, or one waits in a
    collective the other skips), and read back in one host sync (`.tolist()`), not one per tensor."""
    if not tensors:
        return []
    sums = [t.sum(dtype=torch.float32) for t in tensors]
    bad = (~torch.isfinite(torch.stack([s.to(sums[0].device) for s in sums]))).float()
    if agree:
        bad = any_rank(bad)
    return [not flag for flag in bad.tolist()]


def any_rank(flags: Tensor) -> Tensor:
    """`flags` (0/1 floats) OR-ed over every rank of the default process group (one all-reduce of flags.numel()
    floats); `flags` itself without a process group. Every rank must call it: a check that raises on one rank only
    would leave the others waiting in their next collective."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return flags
    agreed = flags.clone()
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
    return agreed


# ---------------------------------------------------------------------------------------------------------------
# Block constants of row-sharded quantized state, by row
#
# A tensor quantized in blocks of B consecutive values (bitsandbytes' 8-bit moments: B = 256) keeps one constant per
# block. Row-sharded, each rank quantizes its own rows, so the constants are a per-rank list whose length and block
# boundaries depend on the world size: saved as a plain tensor, torch.distributed.checkpoint would keep one rank's
# list for all. Saved by row instead, a (rows × k) table with row i holding the constants of the blocks its values
# lie in, they shard with the rows like the moments themselves, and the table's global shape does not depend on the
# world size.


def _row_slots(cols: int, blocksize: int) -> int:
    """The most blocks of `blocksize` one row of `cols` consecutive values can touch."""
    return (cols + blocksize - 2) // blocksize + 1


def blocks_by_row(constants: Tensor, rows: int, cols: int, blocksize: int) -> Tensor:
    """The (rows × k) table of a rows×cols tensor's block constants (blocks of `blocksize` over its flat values):
    entry [i, s] is the constant of the s-th block row i's values lie in (0 past the row's last block)."""
    slots = _row_slots(cols, blocksize)
    if rows == 0:  # an empty shard (more ranks than rows)
        return constants.new_zeros((0, slots))
    starts = torch.arange(rows, device=constants.device) * cols
    first, last = starts // blocksize, (starts + cols - 1) // blocksize
    index = first[:, None] + torch.arange(slots, device=constants.device)[None, :]
    inside = index <= last[:, None]
    return torch.where(inside, constants[index.clamp(max=constants.numel() - 1)], 0.0).to(constants.dtype)


def blocks_from_rows(table: Tensor, cols: int, blocksize: int) -> Tensor:
    """The block constants back from `blocks_by_row`'s table (the inverse, for the same rows and cols)."""
    rows = table.shape[0]
    blocks = torch.arange(-(-rows * cols // blocksize), device=table.device)
    row = blocks * blocksize // cols  # the row holding each block's first value
    return table[row, blocks - row * cols // blocksize]


def block_scales_by_value(
    table: Tensor, first_row: int, global_rows: int, shards: int, cols: int, blocksize: int
) -> Tensor:
    """Each value's block constant (rows × cols), for rows [first_row, first_row + table rows) of a tensor that was
    quantized row-sharded over `shards` ranks (torch.chunk split of `global_rows`), from `blocks_by_row`'s table
    of those rows: what dequantizing needs when the rows are now split otherwise."""
    chunk = -(-global_rows // shards)
    rows = torch.arange(first_row, first_row + table.shape[0], device=table.device) % chunk  # row in its old shard
    flat = rows[:, None] * cols + torch.arange(cols, device=table.device)[None, :]
    return table.gather(1, flat // blocksize - (rows[:, None] * cols) // blocksize)


# ---------------------------------------------------------------------------------------------------------------
# Counting collectives


@dataclass(frozen=True)
class CommRecord:
    """One collective as this rank issued it: the op, the bytes it contributed and the bytes of the result."""

    op: str
    input_bytes: int
    output_bytes: int


@dataclass
class CommCounter:
    """The collectives issued inside `count_collectives()`, in order."""

    records: list[CommRecord] = field(default_factory=list)

    @property
    def calls(self) -> int:
        return len(self.records)

    @property
    def input_bytes(self) -> int:
        return sum(r.input_bytes for r in self.records)

    @property
    def largest_output_bytes(self) -> int:
        return max((r.output_bytes for r in self.records), default=0)


def _bytes(value: Any) -> int:
    leaves, _ = tree_flatten(value)
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, Tensor))


def _collective_ops() -> tuple[set, set, set]:
    c10d, funcol = torch.ops.c10d, torch.ops._c10d_functional
    in_place = {c10d.allreduce_, c10d.allreduce_coalesced_, c10d.broadcast_, c10d.reduce_}
    output_first = {
        c10d.allgather_,
        c10d._allgather_base_,
        c10d.allgather_coalesced_,
        c10d.allgather_into_tensor_coalesced_,
        c10d._reduce_scatter_base_,
        c10d.reduce_scatter_,
        c10d.reduce_scatter_tensor_coalesced_,
        c10d.alltoall_,
        c10d.alltoall_base_,
        c10d.gather_,
        c10d.scatter_,
    }
    functional = {
        funcol.all_reduce,
        funcol.all_reduce_coalesced,
        funcol.all_gather_into_tensor,
        funcol.all_gather_into_tensor_coalesced,
        funcol.reduce_scatter_tensor,
        funcol.reduce_scatter_tensor_coalesced,
        funcol.all_to_all_single,
        funcol.broadcast,
    }
    return in_place, output_first, functional


class _CountingMode(TorchDispatchMode):
    def __init__(self, counter: CommCounter) -> None:
        super().__init__()
        self.counter = counter
        self.in_place, self.output_first, self.functional = _collective_ops()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # let DTensor lower itself to the collectives counted below
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = getattr(func, "_overloadpacket", None)
        if packet in self.in_place:
            sent = received = _bytes(args[0])
        elif packet in self.output_first:
            received, sent = _bytes(args[0]), _bytes(args[1])
        elif packet in self.functional:
            sent, received = _bytes(args[0]), _bytes(out)
        else:
            return out
        self.counter.records.append(CommRecord(op=str(packet), input_bytes=sent, output_bytes=received))
        return out


@contextmanager
def count_collectives() -> Iterator[CommCounter]:
    """Count the collectives this rank issues in the block (plain `torch.distributed` calls, which reach the
    dispatcher as `c10d` ops, and the functional collectives DTensor lowers to), with their bytes.

    torch's `CommDebugMode` counts the same ops but not their sizes.
    """
    counter = CommCounter()
    with _CountingMode(counter):
        yield counter
