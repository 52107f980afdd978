"""GaLore on FSDP2-sharded parameters (2 gloo ranks, CPU) against one process on the same global batch.

Each rank holds a block of every weight's rows (torch.chunk layout: the 7-row weight splits 4 + 3). The tolerance:
float32 sums run in another order (FSDP2's reduce-scatter, the refresh's all-reduces), which moves the weakest
basis direction by ~1e-5; Adam's normalised steps at lr 1e-2 carry that into the weights at < 1e-4 over these 7
steps. A wrong projection side, scale, missing reduction or desynchronised refresh shows at > 1e-2. 8-bit moments
are quantised in blocks of each rank's rows instead of the whole tensor's (≤ 1/127 relative per block), so that
form is held to 1e-3.
"""

from __future__ import annotations

import pytest
import torch
from ranks import WORLD, run_on_ranks, shard_linears

from hf_galore import ApolloAdamW, ApolloConfig, GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit, GaLoreConfig
from hf_galore.core import LEFT_BASIS, RIGHT_BASIS
from hf_galore.sharding import count_collectives, local_tensor

STEPS, GAP, RANK = 7, 3, 3  # refreshes at steps 0, 3 and 6: two inside the run after the first
FORMS = {
    "adamw": (lambda params, **kw: GaLoreAdamW(params, lr=1e-2, weight_decay=0.01, **kw), 1e-4),
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


def _sharded_run(rank: int, form: str, config: GaLoreConfig, targets: int | None = None) -> dict:
    model = shard_linears(_model())
    optimizer = _optimizer(model, form, config, targets)
    traffic = []
    for x, y in _batches():
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x[rank::WORLD]), y[rank::WORLD]).backward()
        with count_collectives() as counter:
            optimizer.step()
        traffic.append([(r.op, r.input_bytes, r.output_bytes) for r in counter.records])
    weights = {name: p.full_tensor() for name, p in model.named_parameters()}
    return {"weights": weights, "state_bytes": _state_bytes(optimizer), "traffic": traffic}


def _single_run(form: str, config: GaLoreConfig, targets: int | None = None):
    model = _model()
    optimizer = _optimizer(model, form, config, targets)
    for x, y in _batches():
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
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
    for result in results:
        assert result["state_bytes"]["bases"] == single["bases"]  # replicated on every rank
        assert result["state_bytes"]["row_wise"] <= 0.6 * single["row_wise"]  # half the rows each (4 of 7, 12 of 24)
    assert sum(r["state_bytes"]["row_wise"] for r in results) == single["row_wise"]
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


def test_default_settings_run_sharded_and_steps_between_refreshes_move_nothing(tmp_path):
    config = GaLoreConfig(rank=RANK, update_proj_gap=GAP)  # std, randomized: the defaults
    results = run_on_ranks(tmp_path, _sharded_run, "adamw", config)
    largest_weight = 4 * 24 * 10
    for result in results:
        for step, records in enumerate(result["traffic"]):
            if step % GAP:  # between refreshes: no collective at all
                assert records == [], (step, records)
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


@pytest.mark.parametrize("scale_type", ["channel", "tensor"], ids=["apollo", "apollo-mini"])
def test_apollo_sharded_equals_one_process_and_gathers_nothing(tmp_path, scale_type):
    """Every rank draws the same r×n P from the seed, so nothing is ever gathered: the channel factors are per row
    (local), and the only collectives are all-reduces of one float (the limiter's norm; tensor-wise also ‖U‖ and
    ‖R‖; a refresh step's finiteness vote)."""
    rank = 1 if scale_type == "tensor" else RANK
    config = ApolloConfig(rank=rank, update_proj_gap=GAP, scale_type=scale_type)
    results = run_on_ranks(tmp_path, _sharded_run, "apollo", config)
    model, optimizer = _single_run("apollo", ApolloConfig(**{**config.group_options(), "proj_type": "right"}))
    for result in results:
        for name, param in model.named_parameters():
            torch.testing.assert_close(result["weights"][name], param.detach(), atol=1e-4, rtol=0)
        assert result["state_bytes"]["bases"] == 0
        records = [record for step in result["traffic"] for record in step]
        assert records and {op for op, _, _ in records} == {"c10d.allreduce_"}
        assert {sent for _, sent, _ in records} == {4}, records
    single = _state_bytes(optimizer)
    assert sum(r["state_bytes"]["row_wise"] for r in results) == single["row_wise"]
    assert not torch.equal(model[0].weight, _model()[0].weight)
