"""GaLore on FSDP2-sharded parameters (2 gloo ranks, CPU) against one process on the same global batch; APOLLO
sharded and under plain DDP too.

Each rank holds a block of every weight's rows (torch.chunk layout: the 7-row weight splits 4 + 3). The tolerance:
float32 sums run in another order (FSDP2's reduce-scatter, the refresh's all-reduces), which moves the weakest
basis direction by ~1e-5; Adam's normalised steps at lr 1e-2 carry that into the weights at < 1e-4 over these 7
steps. A wrong projection side, scale, missing reduction or desynchronised refresh shows at > 1e-2. 8-bit moments
are quantised in blocks of each rank's rows instead of the whole tensor's (≤ 1/127 relative per block), so that
form is held to 1e-3.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from ranks import WORLD, run_on_ranks, shard_linears

from hf_galore import (
    ApolloAdamW,
    ApolloConfig,
    GaLoreAdafactor,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    GaLoreConfig,
    optimizer_state_bytes,
)
from hf_galore.core import LEFT_BASIS, RIGHT_BASIS
from hf_galore.sharding import count_collectives, local_tensor

STEPS, GAP, RANK = 7, 3, 3  # refreshes at steps 0, 3 and 6: two inside the run after the first
FORMS = {
    "adamw": (lambda params, **kw: GaLoreAdamW(params, lr=1e-2, weight_decay=0.01, **kw), 1e-4),
    "adamw_layerwise": (
        lambda params, **kw: GaLoreAdamW(params, lr=1e-2, weight_decay=0.01, layerwise=True, **kw),
        1e-4,
    ),
    "adamw8bit": (lambda params, **kw: GaLoreAdamW8bit(params, lr=1e-2, min_8bit_size=16, **kw), 1e-3),
    "adafactor": (
        lambda params, **kw: GaLoreAdafactor(
            params, lr=1e-2, beta1=0.9, relative_step=False, scale_parameter=False, **kw
        ),
        1e-4,
    ),
}
# APOLLO beside them, kept apart so the GaLore-only tests above do not run it with a GaLoreConfig
APOLLO_FORMS = {"apollo": (lambda params, **kw: ApolloAdamW(params, lr=1e-2, weight_decay=0.01, **kw), 1e-4)}


def _model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(10, 24), torch.nn.Tanh(), torch.nn.Linear(24, 7), torch.nn.Tanh(), torch.nn.Linear(7, 12)
    )


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 10, generator=gen), torch.randn(8, 12, generator=gen)) for _ in range(STEPS)]


def _optimizer(model, form: str, config: GaLoreConfig, targets: int | None = None):
    """GaLore on the first `targets` weights (all of them by default); the rest by the rule `config.others` names."""
    targets = [p for p in model.parameters() if p.dim() == 2][:targets]
    names = {p: n for n, p in model.named_parameters()}
    build = {**FORMS, **APOLLO_FORMS}[form][0]
    return build(model.parameters(), galore_params=targets, galore_config=config, param_names=names)


def _state_bytes(optimizer) -> dict[str, int]:
    """Bytes this process holds, by kind: bases, per-row moments (DTensors when sharded: their local rows), other."""
    kinds = {"bases": 0, "row_wise": 0, "other": 0}
    for state in optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value):
                kind = "bases" if key in (LEFT_BASIS, RIGHT_BASIS) else "row_wise"
                kind = "other" if kind == "row_wise" and key not in optimizer.inner.row_wise_state else kind
                kinds[kind] += local_tensor(value).numel() * value.element_size()
    return kinds


def _poison_at(model, poison: dict | None, row_of) -> list[int]:
    """Hooks that put a NaN in row `row_of(param)` of the named parameter's gradient (skipped where None) at the steps
    `poison` (step -> name) says, registered before the optimizer's own (layer-wise) ones so they run first. Returns
    the step counter the caller advances."""
    clock = [0]
    for name, param in model.named_parameters():
        if name in (poison or {}).values():

            def hook(param, name=name):
                row = row_of(param)
                if poison.get(clock[0]) == name and row is not None:
                    local_tensor(param.grad)[row, 0] = float("nan")

            param.register_post_accumulate_grad_hook(hook)
    return clock


def _sharded_run(
    rank: int, form: str, config: GaLoreConfig, targets: int | None = None, poison: dict | None = None, mesh=None
) -> dict:
    """`poison`: step -> parameter name whose gradient gets a NaN in the last rank's first row at that step."""
    world = torch.distributed.get_world_size()
    model = shard_linears(_model(), mesh)
    clock = _poison_at(model, poison, lambda param: 0 if rank == world - 1 else None)
    optimizer = _optimizer(model, form, config, targets)
    params = dict(model.named_parameters())
    traffic, skipped = [], []
    for clock[0], (x, y) in enumerate(_batches()):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x[rank::world]), y[rank::world]).backward()  # layer-wise: updates here
        with count_collectives() as counter:
            optimizer.step()
        traffic.append([(r.op, r.input_bytes, r.output_bytes) for r in counter.records])
        skipped.append(optimizer.pop_skipped_updates())
    weights = {name: p.full_tensor() for name, p in model.named_parameters()}
    steps = {name: optimizer.state[p]["step"] for name, p in params.items()}
    bases = {name: optimizer.state[p].get(RIGHT_BASIS) for name, p in params.items()}
    return {
        "weights": weights,
        "state_bytes": _state_bytes(optimizer),
        "optimizer_bytes": optimizer_state_bytes(optimizer),
        "traffic": traffic,
        "skipped": skipped,
        "steps": steps,
        "bases": {name: local_tensor(b) for name, b in bases.items() if b is not None},
    }


def _single_run(form: str, config: GaLoreConfig, targets: int | None = None, poison: dict | None = None, world=WORLD):
    """One process on the global batch; `poison` as in `_sharded_run`, in the rows the last of `world` ranks holds."""
    model = _model()
    clock = _poison_at(model, poison, lambda param: -(-param.shape[0] // world) * (world - 1))
    optimizer = _optimizer(model, form, config, targets)
    skipped = []
    for clock[0], (x, y) in enumerate(_batches()):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the skip warning, asserted through pop_skipped_updates
            optimizer.step()
        skipped.append(optimizer.pop_skipped_updates())
    optimizer.skipped_per_step = skipped
    return model, optimizer


@pytest.mark.parametrize("method", ["exact", "randomized"])
@pytest.mark.parametrize("form", list(FORMS))
def test_sharded_training_equals_one_process_with_half_the_state_per_rank(tmp_path, form, method):
    config = GaLoreConfig(rank=RANK, update_proj_gap=GAP, scale=0.5, refresh_method=method)
    results = run_on_ranks(tmp_path, _sharded_run, form, config)
    # Sharded weights are projected from the right (std would pick the left for the wide 7×24 weight).
    model, optimizer = _single_run(form, GaLoreConfig(**{**config.group_options(), "proj_type": "right"}))
    for result in results:
        for name, param in model.named_parameters():
            torch.testing.assert_close(result["weights"][name], param.detach(), atol=FORMS[form][1], rtol=0)
    single = _state_bytes(optimizer)
    for result in results:  # rank 3: 2 of each basis' 3 rows on rank 0, 1 on rank 1
        assert result["state_bytes"]["bases"] <= 2 / 3 * single["bases"]
        assert result["state_bytes"]["row_wise"] <= 0.6 * single["row_wise"]  # half the rows each (4 of 7, 12 of 24)
    for kind in ("bases", "row_wise"):  # every byte once, nothing replicated
        assert sum(r["state_bytes"][kind] for r in results) == single[kind]
    others = [r["state_bytes"]["other"] for r in results]
    if form == "adafactor":  # the column statistics: r floats per target, the same on every rank
        assert others == [single["other"]] * WORLD
    else:  # 8-bit block constants: each rank quantises its own rows, so a block may split in two: at most one more
        # constant (4 bytes) per moment, per 8-bit tensor (3 projected weights, the 24-entry bias), per extra rank
        assert single["other"] <= sum(others) <= single["other"] + 4 * 2 * 4 * (WORLD - 1)


@pytest.mark.parametrize("form,others", [("adamw8bit", "adafactor"), ("adafactor", "adamw")])
def test_non_targets_with_another_rule_train_sharded_as_in_one_process(tmp_path, form, others):
    """`others=`: the sharded non-target weights (24x10 is the one target) follow one process's run."""
    config = GaLoreConfig(rank=RANK, update_proj_gap=GAP, scale=0.5, proj_type="right", others=others)
    results = run_on_ranks(tmp_path, _sharded_run, form, config, 1)
    model, _ = _single_run(form, config, 1)
    for result in results:
        for name, param in model.named_parameters():
            torch.testing.assert_close(result["weights"][name], param.detach(), atol=FORMS[form][1], rtol=0)
    assert not torch.equal(model[2].weight, _model()[2].weight)  # the non-target weights trained


def test_default_settings_run_sharded_and_steps_between_refreshes_gather_only_the_bases(tmp_path):
    config = GaLoreConfig(rank=RANK, update_proj_gap=GAP)  # std, randomized: the defaults
    results = run_on_ranks(tmp_path, _sharded_run, "adamw", config)
    largest_weight = 4 * 24 * 10
    chunk = -(-RANK // WORLD)  # each rank keeps ⌈r/W⌉ rows of every r×n basis
    for result in results:
        for step, records in enumerate(result["traffic"]):
            if step % GAP:  # between refreshes: the step's finite check (one flag per parameter), then each
                # target's basis gathered just in time (padded to W·⌈r/W⌉ rows), in the order of the groups
                gather = "_c10d_functional.all_gather_into_tensor"
                expected = [("c10d.allreduce_", 4 * 6, 4 * 6)]
                expected += [(gather, 4 * chunk * n, 4 * WORLD * chunk * n) for n in (10, 24, 7)]
                assert records == expected, (step, records)
            else:  # a randomized refresh exchanges sketches only, never a whole gradient
                assert records and max(out for _, _, out in records) < largest_weight, (step, records)


def test_a_left_projection_of_a_sharded_weight_is_refused(tmp_path):
    config = GaLoreConfig(rank=RANK, update_proj_gap=GAP, proj_type="left")
    with pytest.raises(Exception, match="0.weight: Invalid proj_type='left' for a weight row-sharded by FSDP2"):
        run_on_ranks(tmp_path, _sharded_run, "adamw", config)


def test_the_shipped_accelerate_config_shards_with_fsdp2():
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    config = load_config_from_file(str(Path(__file__).parent.parent / "examples" / "fsdp2.yaml"))
    assert config.distributed_type == DistributedType.FSDP and config.fsdp_config["fsdp_version"] == 2


# step -> the parameter poisoned in the last rank's rows: at a refresh (step 3) and between refreshes (step 4)
POISON = {3: "0.weight", 4: "2.weight"}


@pytest.mark.parametrize(
    "form,others",
    [("adamw", "same"), ("adafactor", "same"), ("adamw", "adafactor"), ("adamw_layerwise", "same")],
    ids=["adamw", "adafactor", "others-adafactor", "adamw-layerwise"],
)
def test_a_nan_in_one_ranks_rows_skips_the_whole_parameter_on_every_rank(tmp_path, form, others):
    """Issue 20 item 5: every rank skips what one process skips, whole (the flags are agreed in one all-reduce per
    step), with its step count untouched; Adafactor (target or `others=`) does not hang in a collective the
    skipping rank never joins. 2.weight (7x24) is a target except with `others=`, where only 0.weight is."""
    config = GaLoreConfig(rank=RANK, update_proj_gap=GAP, scale=0.5, proj_type="right", others=others)
    targets = 1 if others != "same" else None
    results = run_on_ranks(tmp_path, _sharded_run, form, config, targets, POISON, timeout=20)
    model, optimizer = _single_run(form, config, targets, POISON)
    expected_skips = [[POISON[s]] if s in POISON else [] for s in range(STEPS)]
    assert optimizer.skipped_per_step == expected_skips
    for result in results:
        assert result["skipped"] == expected_skips
        assert result["steps"]["0.weight"] == result["steps"]["2.weight"] == STEPS - 1
        for name, param in model.named_parameters():
            torch.testing.assert_close(result["weights"][name], param.detach(), atol=FORMS[form][1], rtol=0)
        if form.endswith("layerwise"):  # the hooks stepped in backward, each with its own flag
            continue
        for step, records in enumerate(result["traffic"]):  # one batched all-reduce of one flag per parameter
            assert records[0] == ("c10d.allreduce_", 4 * 6, 4 * 6), (step, records)


def _check_parity(results: list[dict], form: str, config: GaLoreConfig):
    """Every rank's weights equal one process's on the global batch (projected from the right); returns that
    process's optimizer."""
    model, optimizer = _single_run(form, GaLoreConfig(**{**config.group_options(), "proj_type": "right"}))
    for rank, result in enumerate(results):
        for name, param in model.named_parameters():
            torch.testing.assert_close(
                result["weights"][name], param.detach(), atol=FORMS[form][1], rtol=0, msg=f"rank {rank} {name}"
            )
    return optimizer


FOUR = GaLoreConfig(rank=4, update_proj_gap=GAP, scale=0.5)  # rank 4: each of 4 ranks keeps one row of a basis


@pytest.mark.slow  # 4 processes, ~10 s on 2 cores
@pytest.mark.parametrize("form", ["adamw", "adafactor"])
def test_four_ranks_equal_one_process_each_holding_a_quarter_of_the_state(tmp_path, form):
    """Issue 18 item 1 at W = 4, rows uneven (7 rows: 2, 2, 2, 1): every byte of state once, the largest rank at
    most 0.30 of one process's."""
    results = run_on_ranks(tmp_path, _sharded_run, form, FOUR, world=4)
    single = optimizer_state_bytes(_check_parity(results, form, FOUR))
    held = [result["optimizer_bytes"] for result in results]
    assert max(held) <= 0.30 * single, (held, single)
    if form == "adamw":  # Adafactor's column statistics (r floats per target) are kept whole on every rank
        assert sum(held) == single


def test_hsdp_on_a_2x2_mesh_equals_one_process_with_bases_consistent_across_replicas(tmp_path):
    """Issue 18 item 3: HSDP (replicate 2 x shard 2). Ranks 0 and 2 hold shard 0 of the two replicas, 1 and 3 shard
    1: their bases must be identical, bit for bit, and each rank holds about half the state (1/shard size)."""
    results = run_on_ranks(tmp_path, _sharded_run, "adamw", FOUR, None, None, (2, 2), world=4)
    single = optimizer_state_bytes(_check_parity(results, "adamw", FOUR))
    for shard in (0, 1):
        replicas = results[shard], results[2 + shard]
        assert replicas[0]["bases"].keys() == {"0.weight", "2.weight", "4.weight"}
        for name, basis in replicas[0]["bases"].items():
            assert basis.shape[0] == 2 and torch.equal(basis, replicas[1]["bases"][name]), name
    held = [result["optimizer_bytes"] for result in results]
    assert held[0] == held[2] and held[1] == held[3] and held[0] + held[1] == single
    assert max(held) <= 0.55 * single, (held, single)


def _tensor_parallel_run(rank: int) -> str:
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (WORLD,))
    weight = torch.nn.Parameter(distribute_tensor(torch.randn(8, 6), mesh, [Shard(1)]))  # column-parallel
    optimizer = GaLoreAdamW([weight], lr=1e-2, galore_params=[weight], galore_config=GaLoreConfig(rank=2))
    weight.grad = distribute_tensor(torch.randn(8, 6), mesh, [Shard(1)])
    try:
        optimizer.step()
    except ValueError as error:
        return str(error)
    return "stepped"


def test_a_tensor_parallel_weight_is_refused_on_every_rank_with_the_reason(tmp_path):
    messages = run_on_ranks(tmp_path, _tensor_parallel_run, timeout=20)
    for message in messages:
        assert "Invalid placements (Shard(dim=1),) for GaLore's row sharding" in message
        assert "tensor parallelism (column shards, or rows split over two mesh dimensions)" in message


@pytest.mark.parametrize("form", ["adamw", "adafactor"])
def test_the_fira_residual_trains_sharded_as_in_one_process(tmp_path, form):
    """`residual=fira`: the residual G - back(R) needs the whole basis on each rank's rows (gathered just in time)."""
    config = GaLoreConfig(rank=RANK, update_proj_gap=GAP, scale=0.5, residual="fira")
    _check_parity(run_on_ranks(tmp_path, _sharded_run, form, config), form, config)


@pytest.mark.parametrize("scale_type", ["channel", "tensor"], ids=["apollo", "apollo-mini"])
def test_apollo_sharded_equals_one_process_and_gathers_nothing(tmp_path, scale_type):
    """Every rank draws the same r×n P from the seed, so nothing is ever gathered: the channel factors are per row
    (local), and the only collectives are the step's finite flags (one all-reduce of one float per parameter) and
    all-reduces of one float (the limiter's norm; tensor-wise also ‖U‖ and ‖R‖)."""
    rank = 1 if scale_type == "tensor" else RANK
    config = ApolloConfig(rank=rank, update_proj_gap=GAP, scale_type=scale_type)
    results = run_on_ranks(tmp_path, _sharded_run, "apollo", config)
    model, optimizer = _single_run("apollo", ApolloConfig(**{**config.group_options(), "proj_type": "right"}))
    for result in results:
        for name, param in model.named_parameters():
            torch.testing.assert_close(result["weights"][name], param.detach(), atol=1e-4, rtol=0)
        assert result["state_bytes"]["bases"] == 0
        assert all(step[0] == ("c10d.allreduce_", 4 * 6, 4 * 6) for step in result["traffic"])  # the flags
        records = [record for step in result["traffic"] for record in step[1:]]
        assert records and {op for op, _, _ in records} == {"c10d.allreduce_"}
        assert {sent for _, sent, _ in records} == {4}, records
    single = _state_bytes(optimizer)
    assert sum(r["state_bytes"]["row_wise"] for r in results) == single["row_wise"]
    assert not torch.equal(model[0].weight, _model()[0].weight)


def _ddp_run(rank: int, form: str, config) -> dict[str, torch.Tensor]:
    """Plain DDP (no sharding): each rank a half of the global batch, gradients averaged by DDP's all-reduce."""
    model = _model()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = _optimizer(model, form, config)
    world = torch.distributed.get_world_size()
    for x, y in _batches():
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(ddp(x[rank::world]), y[rank::world]).backward()
        optimizer.step()
    return {name: p.detach() for name, p in model.named_parameters()}


@pytest.mark.parametrize("scale_type", ["channel", "tensor"], ids=["apollo", "apollo-mini"])
def test_apollo_under_ddp_equals_one_process_on_the_global_batch(tmp_path, scale_type):
    """Issue 19 item 3: `apollo_adamw` (channel-wise) and APOLLO-Mini (rank 1, tensor-wise) under DDP. Every rank
    draws the same P from the same per-parameter seed, so the replicas stay identical and follow one process; only
    the order of DDP's float sums differs (tolerance as above)."""
    rank = 1 if scale_type == "tensor" else RANK
    config = ApolloConfig(rank=rank, update_proj_gap=GAP, scale_type=scale_type)
    results = run_on_ranks(tmp_path, _ddp_run, "apollo", config, timeout=20)
    model, _ = _single_run("apollo", config)
    for name, weight in results[0].items():  # the replicas bit-identical
        assert torch.equal(weight, results[1][name]), name
    for rank_, weights in enumerate(results):
        for name, param in model.named_parameters():
            torch.testing.assert_close(weights[name], param.detach(), atol=1e-4, rtol=0, msg=f"rank {rank_} {name}")
    assert not torch.equal(model[0].weight, _model()[0].weight)
