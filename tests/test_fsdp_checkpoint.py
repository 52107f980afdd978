"""Saving and resuming an FSDP2 run with torch.distributed.checkpoint, through accelerate's own FSDP2 save and load
functions (`save_fsdp_model` / `save_fsdp_optimizer` and their `load_*`: `get_optimizer_state_dict` + `dcp.save`,
then a template from `get_optimizer_state_dict`, `dcp.load` into it and `set_optimizer_state_dict`).

The run saves after step 4 of 8 with update_proj_gap=3: mid-interval (refreshes at steps 0, 3 and 6), so the resumed
run must keep the bases, the moments and the schedule. On the same 2 ranks it must continue bit-identically. Loaded
into one process (2 -> 1) it is held to the sharded-versus-one-process tolerance of tests/test_fsdp.py (1e-4: float
sums in another order), against one process trained all 8 steps on the same global batch with proj_type right;
8-bit moments are requantized there, and held to what that adds (see the test). Every 2-rank case runs in one pair
of processes (a module fixture): starting one costs seconds.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from ranks import WORLD, run_on_ranks, shard_linears
from torch.distributed.tensor import DTensor

from hf_galore import ApolloAdamW, ApolloConfig, GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit, GaLoreConfig
from hf_galore.core import NEXT_REFRESH, STEP
from hf_galore.inner.adamw8bit import BLOCKSIZE, AdamW8bitUpdate
from hf_galore.sharding import block_scales_by_value, blocks_by_row, blocks_from_rows

STEPS, SAVE_AT, GAP, RANK = 8, 4, 3, 3
FORMS = {
    "adamw": lambda params, **kw: GaLoreAdamW(params, lr=1e-2, weight_decay=0.01, **kw),
    "adamw_layerwise": lambda params, **kw: GaLoreAdamW(params, lr=1e-2, weight_decay=0.01, layerwise=True, **kw),
    "adamw8bit": lambda params, **kw: GaLoreAdamW8bit(params, lr=1e-2, min_8bit_size=16, **kw),
    "adafactor": lambda params, **kw: GaLoreAdafactor(
        params, lr=1e-2, beta1=0.9, relative_step=False, scale_parameter=False, **kw
    ),
    "apollo": lambda params, **kw: ApolloAdamW(params, lr=1e-2, weight_decay=0.01, **kw),
}
METHODS = ("exact", "randomized")  # the refresh method; APOLLO's case is its random projection (seed + draw in state)
GROUP = {"betas": (0.9, 0.999), "eps": 1e-8}
ONE_METHOD = {"adamw8bit": "exact", "adamw_layerwise": "randomized"}  # forms saved with one refresh method only
CASES = [
    (form, method)
    for form in FORMS
    if form != "apollo"
    for method in METHODS
    if ONE_METHOD.get(form, method) == method
]
# plus Fira's residual and APOLLO: their limiter's norm must come back too (it exists from the template step on)
CASES += [("adamw", "fira"), ("apollo", "random")]
IDS = [f"{form}-{method}" for form, method in CASES]


def _model(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(10, 24), torch.nn.Tanh(), torch.nn.Linear(24, 7), torch.nn.Tanh(), torch.nn.Linear(7, 12)
    )


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 10, generator=gen), torch.randn(8, 12, generator=gen)) for _ in range(STEPS)]


def _config(method: str, proj_type: str = "std") -> GaLoreConfig:
    if method == "random":
        return ApolloConfig(rank=RANK, update_proj_gap=GAP, scale=0.5, proj_type=proj_type)
    if method == "fira":
        return GaLoreConfig(rank=RANK, update_proj_gap=GAP, scale=0.5, residual="fira", proj_type=proj_type)
    return GaLoreConfig(rank=RANK, update_proj_gap=GAP, scale=0.5, refresh_method=method, proj_type=proj_type)


def _optimizer(model, form: str, config: GaLoreConfig):
    targets = [p for p in model.parameters() if p.dim() == 2]
    names = {p: n for n, p in model.named_parameters()}
    return FORMS[form](model.parameters(), galore_params=targets, galore_config=config, param_names=names)


def _train(model, optimizer, steps: range, rank: int | None) -> None:
    batches = _batches()
    for step in steps:
        x, y = batches[step]
        if rank is not None:  # each rank its share of the global batch
            x, y = x[rank :: dist.get_world_size()], y[rank :: dist.get_world_size()]
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def _accelerate(rank: int, world: int) -> tuple[SimpleNamespace, SimpleNamespace]:
    """The two objects accelerate's FSDP2 checkpoint functions read: its plugin (sharded state dict, FSDP2) and
    the accelerator (rank, barrier). Its logging wants the process state set up (the process group, if any, is up)."""
    from accelerate import PartialState
    from torch.distributed.fsdp import StateDictType

    if world > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
    PartialState(cpu=True)

    plugin = SimpleNamespace(
        fsdp_version=2,
        state_dict_type=StateDictType.SHARDED_STATE_DICT,
        state_dict_config=SimpleNamespace(),
        optim_state_dict_config=SimpleNamespace(),
    )
    barrier = dist.barrier if world > 1 else lambda: None
    accelerator = SimpleNamespace(
        process_index=rank, num_processes=world, is_main_process=rank == 0, is_fsdp2=True, wait_for_everyone=barrier
    )
    return plugin, accelerator


def _save(model, optimizer, directory: Path, rank: int, world: int) -> None:
    from accelerate.utils.fsdp_utils import save_fsdp_model, save_fsdp_optimizer

    plugin, accelerator = _accelerate(rank, world)
    save_fsdp_model(plugin, accelerator, model, str(directory))
    save_fsdp_optimizer(plugin, accelerator, optimizer, model, str(directory))


def _load(model, optimizer, directory: Path, rank: int, world: int) -> None:
    from accelerate.utils.fsdp_utils import load_fsdp_model, load_fsdp_optimizer

    plugin, accelerator = _accelerate(rank, world)
    load_fsdp_model(plugin, accelerator, model, str(directory))
    load_fsdp_optimizer(plugin, accelerator, optimizer, model, str(directory))


def _sharded(form: str, config: GaLoreConfig, seed: int = 0):
    model = shard_linears(_model(seed))
    return model, _optimizer(model, form, config)


def _schedule(optimizer) -> list[tuple[int, int | None]]:
    """Each parameter's step and next refresh, in the groups' order (layer-wise state is created in backward order)."""
    states = [optimizer.state[p] for group in optimizer.param_groups for p in group["params"]]
    return [(s[STEP], s.get(NEXT_REFRESH)) for s in states]


def _save_and_resume(rank: int, form: str, method: str, directory: Path) -> dict:
    """8 uninterrupted steps that save after step 4, then a fresh model and optimizer (other initial weights) that
    load that checkpoint and train steps 5 to 8."""
    model, optimizer = _sharded(form, _config(method))
    _train(model, optimizer, range(SAVE_AT), rank)
    _save(model, optimizer, directory, rank, WORLD)
    saved_schedule = _schedule(optimizer)
    _train(model, optimizer, range(SAVE_AT, STEPS), rank)
    straight = {name: p.full_tensor() for name, p in model.named_parameters()}

    model, optimizer = _sharded(form, _config(method), seed=1)
    _load(model, optimizer, directory, rank, WORLD)
    loaded = {
        "schedule": _schedule(optimizer) == saved_schedule,
        "refreshes": optimizer.pop_refresh_stats().count,  # the template step's refresh is not reported
        "skipped": optimizer.pop_skipped_updates(),
    }
    _train(model, optimizer, range(SAVE_AT, STEPS), rank)
    resumed = {name: p.full_tensor() for name, p in model.named_parameters()}
    return {"straight": straight, "resumed": resumed, **loaded}


def _corrupt_one_rank(rank: int, directory: Path) -> str:
    """A checkpoint with NaN in rank 1's rows only: every rank must raise (none may wait in a collective)."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    model, optimizer = _sharded("adamw", _config("randomized"))
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    load(state, storage_reader=FileSystemReader(str(directory / "optimizer_0")))
    if rank == 1:
        state["optimizer"]["state"]["2.weight"]["exp_avg"].to_local()[0, 0] = float("nan")
    try:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
    except ValueError as error:
        return str(error)
    return "loaded"


def _every_case(rank: int, directory: Path) -> dict:
    """All cases in one pair of processes (starting one costs seconds): checkpoints under directory/form/method."""
    results = {
        (form, method): _save_and_resume(rank, form, method, directory / form / method) for form, method in CASES
    }
    results["corrupt"] = _corrupt_one_rank(rank, directory / "adamw" / "randomized")
    return results


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory) -> tuple[list[dict], Path]:
    directory = tmp_path_factory.mktemp("fsdp_checkpoint")
    return run_on_ranks(directory, _every_case, directory), directory


@pytest.mark.parametrize(("form", "method"), CASES, ids=IDS)
def test_an_fsdp2_checkpoint_resumes_mid_interval_bit_for_bit(sharded_runs, form, method):
    for result in sharded_runs[0]:
        run = result[form, method]
        assert run["schedule"] and run["refreshes"] == 0 and run["skipped"] == []
        for name, weight in run["straight"].items():
            assert torch.equal(run["resumed"][name], weight), name


@pytest.mark.parametrize(("form", "method"), CASES, ids=IDS)
def test_an_fsdp2_checkpoint_continues_in_one_process(sharded_runs, form, method):
    """2 -> 1, against one process trained all 8 steps. 8-bit moments are requantized in the blocks of the whole
    tensor; quantizing in 2 ranks' blocks for 8 steps already moves the weights ~1e-3 from one process (test_fsdp.py),
    so 8-bit is held to what the requantization adds: 1e-3 from the uninterrupted 2-rank run."""
    reference = _model()
    _train(reference, _optimizer(reference, form, _config(method, "right")), range(STEPS), None)
    if form == "adamw8bit":
        reference.load_state_dict(sharded_runs[0][0][form, method]["straight"])
    model = _model(seed=1)
    optimizer = _optimizer(model, form, _config(method, "right"))  # FSDP2 projected every weight from the right
    _load(model, optimizer, sharded_runs[1] / form / method, 0, 1)
    _train(model, optimizer, range(SAVE_AT, STEPS), None)
    atol = 1e-3 if form == "adamw8bit" else 1e-4
    for name, param in reference.named_parameters():
        resumed = dict(model.named_parameters())[name]
        torch.testing.assert_close(resumed, param, atol=atol, rtol=0, msg=lambda m, name=name: f"{name}: {m}")


def test_a_corrupt_shard_is_refused_on_every_rank(sharded_runs):
    messages = [result["corrupt"] for result in sharded_runs[0]]
    assert all("Cannot resume 2.weight: the checkpoint's exp_avg holds NaN or inf" in m for m in messages), messages


@pytest.mark.parametrize(("rows", "cols", "slots"), [(0, 3, 2), (1, 1, 1), (7, 3, 2), (12, 300, 3), (100, 256, 2)])
def test_block_constants_by_row_round_trip(rows, cols, slots):
    """A row of `cols` values touches at most `slots` blocks of 256 (300 values starting at 255: blocks 0, 1, 2)."""
    constants = torch.rand(-(-rows * cols // 256)) + 1
    table = blocks_by_row(constants, rows, cols, 256)
    assert table.shape == (rows, slots)
    assert torch.equal(blocks_from_rows(table, cols, 256), constants)


def test_requantizing_8bit_moments_moves_them_by_at_most_one_code_step():
    """Requantized in the same blocks, the codes come back, and each block constant is the largest dequantized
    magnitude: the same, or 0.7% less where the largest value was negative (the signed map's lowest code is
    -0.993, its highest 1.0), which is where 2 -> 1 resharding's one extra quantization shows."""
    rule, state = AdamW8bitUpdate(min_8bit_size=16), {}
    for step in range(1, 4):
        rule.update(torch.randn(300, 3, generator=torch.Generator().manual_seed(step)), state, GROUP, step, 1e-2)
    for constants_key, moment_key in rule.block_wise_state.items():
        scales = block_scales_by_value(blocks_by_row(state[constants_key], 300, 3, BLOCKSIZE), 0, 300, 1, 3, BLOCKSIZE)
        codes, constants = rule.requantize(moment_key, state[moment_key], scales)
        assert torch.equal(codes, state[moment_key])
        assert (constants <= state[constants_key]).all() and (constants >= 0.992 * state[constants_key]).all()


# Resharding: checkpoints saved over 1, 2 and 4 processes, loaded over another number and continued, against one
# process trained all 8 steps (the tolerance of tests/test_fsdp.py). AdamW with randomized refresh (the default).
RESHARD = ("adamw", "randomized")


def _continue_from(rank: int, directory: Path) -> dict[str, torch.Tensor]:
    """A fresh sharded model and optimizer (other initial weights) load `directory` and train steps 5 to 8."""
    model, optimizer = _sharded(*RESHARD[:1], _config(RESHARD[1]), seed=1)
    _load(model, optimizer, directory, rank, dist.get_world_size())
    _train(model, optimizer, range(SAVE_AT, STEPS), rank)
    return {name: p.full_tensor() for name, p in model.named_parameters()}


def _four_ranks(rank: int, two_rank_checkpoint: Path, directory: Path) -> dict:
    """2 -> 4 from the module's 2-rank checkpoint; and a 4-rank run that saves after step 4 (for 4 -> 2)."""
    resumed = _continue_from(rank, two_rank_checkpoint)
    model, optimizer = _sharded(*RESHARD[:1], _config(RESHARD[1]))
    _train(model, optimizer, range(SAVE_AT), rank)
    _save(model, optimizer, directory, rank, dist.get_world_size())
    return {"2->4": resumed}


def _two_ranks(rank: int, four_rank_checkpoint: Path, one_process_checkpoint: Path) -> dict:
    return {"4->2": _continue_from(rank, four_rank_checkpoint), "1->2": _continue_from(rank, one_process_checkpoint)}


@pytest.mark.slow  # 4 + 2 processes, ~20 s on 2 cores
def test_fsdp2_checkpoints_reshard_between_1_2_and_4_processes(sharded_runs, tmp_path):
    form, method = RESHARD
    reference = _model()
    _train(reference, _optimizer(reference, form, _config(method, "right")), range(STEPS), None)
    single = _model()  # 1 -> 2: one process (projected from the right, as FSDP2 projects) saves after step 4
    optimizer = _optimizer(single, form, _config(method, "right"))
    _train(single, optimizer, range(SAVE_AT), None)
    _save(single, optimizer, tmp_path / "one", 0, 1)
    four = run_on_ranks(tmp_path, _four_ranks, sharded_runs[1] / form / method, tmp_path / "four", world=4)
    two = run_on_ranks(tmp_path, _two_ranks, tmp_path / "four", tmp_path / "one")
    for case, weights in [*(("2->4", r["2->4"]) for r in four), *(c for r in two for c in r.items())]:
        for name, param in reference.named_parameters():
            torch.testing.assert_close(weights[name], param.detach(), atol=1e-4, rtol=0, msg=f"{case} {name}")


def _from_replicated_bases(rank: int, directory: Path) -> dict:
    """A run whose every rank keeps each basis whole as a plain tensor (the layout before bases were sharded: the
    sharding helper patched to leave them whole) saves after step 4; the current code loads it and continues."""
    import hf_galore.core

    sharded_helper = hf_galore.core.shard_whole_like
    hf_galore.core.shard_whole_like = lambda whole, param: whole
    try:
        model, optimizer = _sharded("adamw", _config("randomized"))
        _train(model, optimizer, range(SAVE_AT), rank)
        replicated = all(
            not isinstance(s["right_basis"], DTensor) for s in optimizer.state.values() if "right_basis" in s
        )
        _save(model, optimizer, directory, rank, WORLD)
        _train(model, optimizer, range(SAVE_AT, STEPS), rank)
    finally:
        hf_galore.core.shard_whole_like = sharded_helper
    straight = {name: p.full_tensor() for name, p in model.named_parameters()}
    model, optimizer = _sharded("adamw", _config("randomized"), seed=1)
    _load(model, optimizer, directory, rank, WORLD)
    _train(model, optimizer, range(SAVE_AT, STEPS), rank)
    sharded = all(isinstance(s["right_basis"], DTensor) for s in optimizer.state.values() if "right_basis" in s)
    resumed = {name: p.full_tensor() for name, p in model.named_parameters()}
    return {"replicated": replicated, "sharded": sharded, "straight": straight, "resumed": resumed}


def test_a_checkpoint_with_replicated_bases_resumes_into_sharded_bases(tmp_path):
    """Checkpoints written before the bases were sharded (every rank's whole basis, a plain tensor) still load: the
    distributed checkpointer cuts each rank's rows out of the saved basis, and the run continues as it would have."""
    for result in run_on_ranks(tmp_path, _from_replicated_bases, tmp_path / "checkpoint"):
        assert result["replicated"] and result["sharded"]
        for name, weight in result["straight"].items():
            torch.testing.assert_close(result["resumed"][name], weight, atol=1e-6, rtol=0, msg=name)
