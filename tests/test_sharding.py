"""Row-sharded GaLore maths on 2 gloo processes (CPU) against one process on the whole matrix.

Each test spawns its own 2 ranks (`run_on_ranks`), which save what they computed; the assertions run here.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from ranks import WORLD, run_on_ranks, shard_linears

from hf_galore.inner.adafactor import AdafactorUpdate
from hf_galore.projector import add_projected_back_, compute_bases, project, randomized_right_basis
from hf_galore.sharding import (
    RowShard,
    count_collectives,
    global_mean,
    global_rms,
    local_tensor,
    mean_over_rows,
    project_left,
    row_shard,
    shard_like,
)


def _matrix(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Low rank plus noise, the same on every rank."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.randn(rows, 3, generator=gen) @ torch.randn(3, cols, generator=gen)
    return low + 0.1 * torch.randn(rows, cols, generator=gen)


def _rows_of(full: torch.Tensor, rank: int) -> tuple[torch.Tensor, RowShard]:
    """This rank's rows as FSDP2 cuts them (torch.chunk: ⌈m/W⌉ rows per block, empty blocks past the end)."""
    chunk = -(-full.shape[0] // dist.get_world_size())
    start = min(rank * chunk, full.shape[0])
    local = full[start : start + chunk].clone()
    return local, RowShard(offset=start, global_rows=full.shape[0], group=dist.group.WORLD)


def _records(counter) -> list[tuple[str, int, int]]:
    return [(r.op, r.input_bytes, r.output_bytes) for r in counter.records]


RANDOMIZED = {"oversample": 2, "power_iters": 2, "seed": 5}
SHAPES = [(12, 10), (7, 10), (7, 30), (1, 10)]  # even, uneven, fewer local rows than k, one empty shard
SHAPE_IDS = ["even-12x10", "uneven-7x10", "short-block-7x30", "empty-shard-1x10"]


def _randomized_body(rank: int, shape: tuple[int, int], r: int) -> dict:
    local, shard = _rows_of(_matrix(*shape), rank)
    return {
        "rows": local.shape[0],
        "basis": randomized_right_basis(local, r, shard=shard, **RANDOMIZED),
        "bases": compute_bases(local, r, "right", "randomized", shard=shard, **RANDOMIZED),
    }


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_randomized_right_basis_from_row_shards_equals_one_process(tmp_path, shape):
    r = 4
    results = run_on_ranks(tmp_path, _randomized_body, shape, r)
    expected = randomized_right_basis(_matrix(*shape), r, **RANDOMIZED)
    if shape[0] == 1:
        assert [res["rows"] for res in results] == [1, 0]  # torch.chunk leaves rank 1 without rows
    for res in results:
        # float32 sums in another order: the 4th direction (noise, small singular gap) moves by ~1e-5
        torch.testing.assert_close(res["basis"], expected, atol=1e-4, rtol=0)
        assert res["bases"][0] is None
        torch.testing.assert_close(res["bases"][1], expected, atol=1e-4, rtol=0)
    assert torch.equal(results[0]["basis"], results[1]["basis"])  # bitwise: every rank holds the same basis
    assert torch.equal(results[0]["bases"][1], results[1]["bases"][1])


def _exact_body(rank: int, shape: tuple[int, int], proj_type: str) -> dict:
    local, shard = _rows_of(_matrix(*shape), rank)
    left, right = compute_bases(local, 3, proj_type, "exact", shard=shard)
    return {"offset": shard.offset, "rows": local.shape[0], "left": left, "right": right}


@pytest.mark.parametrize("shape", [(7, 10), (10, 7)], ids=["uneven-7x10", "tall-10x7"])
def test_exact_refresh_gathers_once_and_equals_one_process(tmp_path, shape):
    results = run_on_ranks(tmp_path, _exact_body, shape, "full")
    left, right = compute_bases(_matrix(*shape), 3, "full", "exact")
    for res in results:
        torch.testing.assert_close(res["right"], right, atol=1e-6, rtol=0)
        rows = slice(res["offset"], res["offset"] + res["rows"])
        torch.testing.assert_close(res["left"], left[rows], atol=1e-6, rtol=0)  # P is row-sharded like G
    assert torch.equal(results[0]["right"], results[1]["right"])


def _comm_body(rank: int, shape: tuple[int, int], r: int) -> dict:
    local, shard = _rows_of(_matrix(*shape), rank)
    with count_collectives() as randomized:
        _, right = compute_bases(local, r, "right", "randomized", shard=shard, **RANDOMIZED)
    with count_collectives() as exact:
        left, _ = compute_bases(local, r, "left", "exact", shard=shard)
    weight = torch.zeros_like(local)
    with count_collectives() as between:  # a step between refreshes: project, (inner update), project back
        add_projected_back_(weight, project(local, None, right), None, right, alpha=-0.1)
    with count_collectives() as left_step:
        projected = project_left(local, left, shard)
    return {
        "randomized": _records(randomized),
        "exact": _records(exact),
        "between": _records(between),
        "left_step": _records(left_step),
        "projected": projected,
    }


def test_randomized_refresh_moves_sketches_only_and_a_step_moves_nothing(tmp_path):
    (m, n), r = (40, 24), 2
    k = r + RANDOMIZED["oversample"]
    results = run_on_ranks(tmp_path, _comm_body, (m, n), r)
    full_bytes = 4 * m * n
    left = compute_bases(_matrix(m, n), r, "left", "exact")[0]
    for res in results:
        assert res["between"] == []
        ops = [op for op, _, _ in res["randomized"]]
        sketches = 1 + RANDOMIZED["power_iters"]
        assert ops == ["c10d.allreduce_"] * (sketches + 2)  # sizes independent of the world size
        assert [sent for _, sent, _ in res["randomized"]] == [4 * n * k] * sketches + [8 * k * k, 4 * n * r]
        assert max(received for _, _, received in res["randomized"]) < full_bytes
        assert [(op, received) for op, _, received in res["exact"]] == [("c10d._allgather_base_", full_bytes)]
        assert [(op, sent) for op, sent, _ in res["left_step"]] == [("c10d.allreduce_", 4 * r * n)]
        torch.testing.assert_close(res["projected"], left.T @ _matrix(m, n), atol=1e-5, rtol=1e-5)


def _refresh_traffic_body(rank: int, shape: tuple[int, int], r: int) -> dict:
    local, shard = _rows_of(_matrix(*shape), rank)
    with count_collectives() as counter:
        _, right = compute_bases(local, r, "right", "randomized", shard=shard, **RANDOMIZED)
    return {"records": _records(counter), "largest": counter.largest_output_bytes, "right": right}


def test_randomized_refresh_traffic_and_buffers_are_the_same_at_2_and_4_ranks(tmp_path):
    """Issue 18 item 2: the refresh exchanges the same collectives, of the same sizes, at W = 2 and W = 4 (no W·k×k
    gather), and the ranks' bases agree with one process's."""
    shape, r = (40, 24), 2
    (tmp_path / "two").mkdir(), (tmp_path / "four").mkdir()
    two = run_on_ranks(tmp_path / "two", _refresh_traffic_body, shape, r)
    four = run_on_ranks(tmp_path / "four", _refresh_traffic_body, shape, r, world=4)
    expected = randomized_right_basis(_matrix(*shape), r, **RANDOMIZED)
    assert all(res["records"] == two[0]["records"] and res["largest"] == two[0]["largest"] for res in two + four)
    for res in two + four:
        torch.testing.assert_close(res["right"], expected, atol=1e-4, rtol=0)


ADAFACTOR = {"eps": (1e-30, 1e-3), "beta1": None, "clip_threshold": 1.0, "decay_rate": -0.8}


def _sharded_adafactor(grad, row, col, step, shard, rows):
    """The factored Adafactor update of `AdafactorUpdate` on row blocks, its three reductions from `sharding`."""
    beta2t = 1.0 - step ** ADAFACTOR["decay_rate"]
    update = grad.square().add_(ADAFACTOR["eps"][0])
    row.mul_(beta2t).add_(update.mean(dim=-1), alpha=1.0 - beta2t)
    col.mul_(beta2t).add_(mean_over_rows(update, shard), alpha=1.0 - beta2t)
    row_factor = (row / global_mean(row, rows, shard)).rsqrt_().unsqueeze(-1)
    update = row_factor.mul(col.unsqueeze(-2).rsqrt()).mul_(grad)
    return update.div_((global_rms(update, update.shape[-1] * rows, shard) / ADAFACTOR["clip_threshold"]).clamp_(1.0))


def _adafactor_body(rank: int, shape: tuple[int, int]) -> dict:
    updates = []
    row, col = None, None
    for step in (1, 2, 3):
        local, shard = _rows_of(_matrix(*shape, seed=step), rank)
        if row is None:
            row, col = local.new_zeros(local.shape[0]), local.new_zeros(shape[1])
        updates.append(_sharded_adafactor(local, row, col, step, shard, shape[0]))
    weight, _ = _rows_of(_matrix(*shape, seed=9), rank)
    return {
        "offset": shard.offset,
        "updates": updates,
        "col": col,
        "weight_rms": global_rms(weight, shape[0] * shape[1], shard),
    }


def test_adafactor_reductions_give_the_unsharded_statistics(tmp_path):
    shape = (7, 3)  # a projected gradient R (m×r), rows split 4 + 3
    results = run_on_ranks(tmp_path, _adafactor_body, shape)
    inner, state = AdafactorUpdate(), {}
    group = {**ADAFACTOR, "lr": 1.0, "relative_step": False, "warmup_init": False, "scale_parameter": False}
    expected = [inner.update(_matrix(*shape, seed=step), state, group, step, lr=1.0) for step in (1, 2, 3)]
    weight = _matrix(*shape, seed=9)
    for res in results:
        rows = slice(res["offset"], res["offset"] + res["updates"][0].shape[0])
        for got, want in zip(res["updates"], expected):
            torch.testing.assert_close(got, want[rows], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(res["col"], state["exp_avg_sq_col"], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(res["weight_rms"], weight.norm() / weight.numel() ** 0.5)


class _Twin(torch.nn.Sequential):
    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__(torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.Linear(7, 5), torch.nn.Tanh())
        self.append(torch.nn.Linear(5, 1))  # a 1×5 weight: rank 1's shard is empty


def _twin_inputs() -> torch.Tensor:
    return torch.randn(4, 6, generator=torch.Generator().manual_seed(1))


def _fully_shard_body(rank: int) -> dict:
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    model = shard_linears(_Twin())
    model(_twin_inputs()).square().sum().backward()  # the same batch on both ranks: the mean is the one-rank grad
    found = {}
    for name, param in model.named_parameters():
        grad = param.grad
        assert isinstance(grad, DTensor) and grad.placements == (Shard(0),), (name, grad)
        shard = row_shard(grad)
        local_shape, offset = compute_local_shape_and_global_offset(grad.shape, grad.device_mesh, grad.placements)
        assert (shard.offset, tuple(local_tensor(grad).shape)) == (offset[0], tuple(local_shape)), name
        found[name] = {"offset": shard.offset, "rows": shard.global_rows, "grad": local_tensor(grad).clone()}
        if grad.dim() == 2:
            right = compute_bases(local_tensor(grad), 2, "right", "randomized", shard=shard)[1]
            found[name]["right"] = right
            moment = shard_like(local_tensor(grad) @ right.T, param)  # a projected moment, sharded like the weight
            found[name]["moment"] = moment.full_tensor()
    return found


def test_fully_shard_gradients_are_row_blocks_at_the_offsets_row_shard_gives(tmp_path):
    results = run_on_ranks(tmp_path, _fully_shard_body)
    twin = _Twin()
    twin(_twin_inputs()).square().sum().backward()
    for found in results:
        for name, param in twin.named_parameters():
            got = found[name]
            assert got["rows"] == param.shape[0]
            rows = slice(got["offset"], got["offset"] + got["grad"].shape[0])
            torch.testing.assert_close(got["grad"], param.grad[rows], atol=1e-6, rtol=1e-5)
            if param.dim() == 2:
                expected = randomized_right_basis(param.grad, 2, oversample=8, power_iters=2, seed=0)
                torch.testing.assert_close(got["right"], expected, atol=1e-5, rtol=0)
                torch.testing.assert_close(got["moment"], param.grad @ expected.T, atol=1e-5, rtol=1e-5)
    assert results[1]["4.weight"]["grad"].shape == (0, 5)  # FSDP2's empty shard: no rows, columns kept
    assert sum(found["0.weight"]["grad"].shape[0] for found in results) == 7


def _accumulation_hook_body(rank: int) -> dict:
    model = shard_linears(_Twin())
    fired: list[tuple[int, str, torch.Tensor]] = []
    names = {param: name for name, param in model.named_parameters()}
    for param in model.parameters():
        param.register_post_accumulate_grad_hook(
            lambda p: fired.append((micro, names[p], local_tensor(p.grad).clone()))
        )
    for micro in range(2):  # this rank's two micro-batches; FSDP2 reduces only on the last one
        model.set_requires_gradient_sync(micro == 1)
        model(_twin_inputs()[2 * rank + micro :][:1]).square().sum().backward()
    return {"fired": fired, "offsets": {name: row_shard(p).offset for name, p in model.named_parameters()}}


def test_fsdp2_fires_post_accumulate_grad_hooks_once_with_the_reduced_accumulated_shard(tmp_path):
    results = run_on_ranks(tmp_path, _accumulation_hook_body)
    twin = _Twin()
    for row in range(4):  # both ranks' micro-batches; FSDP2 averages over ranks
        twin(_twin_inputs()[row:][:1]).square().sum().backward()
    expected = {name: param.grad / WORLD for name, param in twin.named_parameters()}
    for res in results:
        assert sorted(name for _, name, _ in res["fired"]) == sorted(expected)  # each parameter once
        assert {micro for micro, _, _ in res["fired"]} == {1}  # not on the micro-batch without sync
        for _, name, grad in res["fired"]:
            offset = res["offsets"][name]
            torch.testing.assert_close(grad, expected[name][offset : offset + grad.shape[0]], atol=1e-6, rtol=1e-5)
