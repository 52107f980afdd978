"""`others=`: how a GaLore optimizer trains the parameters that are not targets (embeddings, norms, biases, heads).

Each rule is checked against the optimizer it claims to be (transformers' Adafactor with a fixed lr, bitsandbytes'
AdamW8bit, torch's AdamW), its state bytes against the analytic count, and save -> load -> continue against the
uninterrupted run; changing `others` on resume, a bad value and an Adam rule without lr raise.
"""

import io
import math
import types

import bitsandbytes as bnb
import pytest
import torch
from conftest import LLAMA_VOCAB, tiny_llama
from transformers import Trainer, TrainingArguments
from transformers.optimization import Adafactor

import hf_galore
from hf_galore import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit, GaLoreConfig
from hf_galore.callback import memory_figures
from hf_galore.trainer_factory import check_supported

EMBED = (300, 16)  # 4,800 entries: on bitsandbytes' 8-bit path (>= 4096)


def _params(seed: int = 0) -> tuple[torch.nn.Parameter, torch.nn.Parameter, torch.nn.Parameter]:
    """An embedding-like table, a target weight and a bias."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.nn.Parameter(torch.randn(*shape, generator=gen)) for shape in (EMBED, (16, 24), (16,)))


def _grads(steps: int, seed: int = 1) -> list[tuple[torch.Tensor, ...]]:
    gen = torch.Generator().manual_seed(seed)
    return [tuple(torch.randn(*shape, generator=gen) for shape in (EMBED, (16, 24), (16,))) for _ in range(steps)]


def _run(optimizer, params, grads) -> None:
    for step_grads in grads:
        for param, grad in zip(params, step_grads):
            if param.requires_grad:
                param.grad = grad.clone()
        optimizer.step()


def _galore(cls, params, others, **kwargs):
    table, weight, bias = params
    config = GaLoreConfig(rank=4, update_proj_gap=3, others=others)
    return cls([table, weight, bias], galore_params=[weight], galore_config=config, **kwargs)


# others -> (GaLore optimizer, its kwargs, the plain optimizer the non-targets must follow, its kwargs, tolerance)
REFERENCES = {
    "adamw-adafactor": (
        GaLoreAdamW,
        {"lr": 1e-2, "weight_decay": 0.1},
        "adafactor",
        lambda ps: Adafactor(ps, lr=1e-2, weight_decay=0.1, scale_parameter=False, relative_step=False),
        1e-6,
    ),
    "adafactor-adamw": (
        GaLoreAdafactor,
        {"lr": 1e-2, "weight_decay": 0.1, "scale_parameter": False, "relative_step": False},
        "adamw",
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
        1e-6,
    ),
    "adamw-adamw8bit": (
        GaLoreAdamW,
        {"lr": 1e-2, "weight_decay": 0.1, "betas": (0.8, 0.99)},
        "adamw8bit",
        lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-2, weight_decay=0.1, betas=(0.8, 0.99)),
        1e-6,
    ),
    "adamw8bit-adamw": (
        GaLoreAdamW8bit,
        {"lr": 1e-2, "weight_decay": 0.1, "betas": (0.8, 0.99)},
        "adamw",
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, betas=(0.8, 0.99)),
        1e-6,
    ),
}


@pytest.mark.parametrize("case", REFERENCES, ids=REFERENCES)
def test_non_targets_follow_the_optimizer_others_names(case):
    cls, kwargs, others, reference, atol = REFERENCES[case]
    params, twins = _params(), _params()
    grads = _grads(6)
    _run(_galore(cls, params, others, **kwargs), params, grads)
    plain = [twins[0], twins[2]]
    optimizer = reference(plain)
    for step_grads in grads:
        for param, grad in zip(plain, (step_grads[0], step_grads[2])):
            param.grad = grad.clone()
        optimizer.step()
    for ours, theirs in ((params[0], twins[0]), (params[2], twins[2])):
        torch.testing.assert_close(ours, theirs, atol=atol, rtol=0)
    assert not torch.equal(params[0], _params()[0])  # it trained


def test_others_same_keeps_the_optimizers_own_rule_and_changes_nothing():
    a, b = _params(), _params()
    grads = _grads(5)
    _run(_galore(GaLoreAdamW, a, "same", lr=1e-2), a, grads)
    _run(_galore(GaLoreAdamW, b, "adamw", lr=1e-2), b, grads)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def _analytic_bytes(others: str, shape: tuple[int, ...]) -> int:
    """What each rule keeps for a float32 tensor: the formulas the README states."""
    n = math.prod(shape)
    if others == "frozen":
        return 0
    if others == "adamw":
        return 2 * 4 * n
    if others == "adamw8bit":
        return 2 * n + 2 * 4 * math.ceil(n / 256) if n >= 4096 else 2 * 4 * n
    if others == "adafactor":  # rows + columns for a matrix, the full second moment for a vector (float32)
        return 4 * (shape[0] + shape[1]) if len(shape) == 2 else 4 * n
    raise AssertionError(others)


@pytest.mark.parametrize("others", ["adamw", "adamw8bit", "adafactor", "frozen"])
def test_state_bytes_of_the_non_targets_equal_the_analytic_count(others):
    params = _params()
    optimizer = _galore(GaLoreAdamW, params, others, lr=1e-2)
    _run(optimizer, params, _grads(2))
    table, weight, bias = params
    held = {
        name: sum(v.numel() * v.element_size() for v in optimizer.state[p].values() if isinstance(v, torch.Tensor))
        for name, p in (("table", table), ("bias", bias))
    }
    assert held == {"table": _analytic_bytes(others, EMBED), "bias": _analytic_bytes(others, (16,))}
    assert (table.requires_grad, bias.requires_grad, weight.requires_grad) == (others != "frozen",) * 2 + (True,)
    if others == "frozen":
        assert torch.equal(table, _params()[0]) and torch.equal(bias, _params()[2])
    trained = weight.numel() + (0 if others == "frozen" else table.numel() + bias.numel())
    assert memory_figures(optimizer)["galore/adamw_equivalent_mb"] == 2 * 4 * trained / 2**20


@pytest.mark.parametrize("others", ["adamw8bit", "adafactor", "frozen"])
def test_resume_continues_bit_identically(others):
    grads = _grads(8)
    straight = _params()
    _run(_galore(GaLoreAdamW, straight, others, lr=1e-2, weight_decay=0.1), straight, grads)

    params = _params()
    first = _galore(GaLoreAdamW, params, others, lr=1e-2, weight_decay=0.1)
    _run(first, params, grads[:4])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = _galore(GaLoreAdamW, params, others, lr=1e-2, weight_decay=0.1)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    _run(resumed, params, grads[4:])
    for x, y in zip(straight, params):
        assert torch.equal(x, y)


def test_resume_with_other_others_raises_naming_it():
    params = _params()
    optimizer = _galore(GaLoreAdamW, params, "adafactor", lr=1e-2)
    _run(optimizer, params, _grads(2))
    with pytest.raises(ValueError, match=r"exp_avg_sq_row \(300,\).*keeps exp_avg \(300, 16\).*others"):
        _galore(GaLoreAdamW, params, "same", lr=1e-2).load_state_dict(optimizer.state_dict())


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda ps: _galore(GaLoreAdamW, ps, "lean"), r"Invalid others='lean'. Must be one of same, adamw, adamw8bit"),
        (lambda ps: _galore(GaLoreAdafactor, ps, "adamw"), r"Invalid lr=None for inner='adamw'"),
        (lambda ps: GaLoreAdamW([{"params": [ps[1]], "rank": 4, "inner": "adafactor"}]), r"in a GaLore group"),
        (lambda ps: GaLoreAdamW([{"params": [ps[0]], "inner": "sgd"}]), r"Invalid param group inner='sgd'"),
    ],
    ids=["bad-value", "adam-without-lr", "inner-on-galore-group", "bad-inner"],
)
def test_bad_others_raise(make, message):
    with pytest.raises(ValueError, match=message):
        make(_params())


def test_optim_args_others_reach_the_trainers_optimizer_and_are_logged(tmp_path, galore_log):
    model = tiny_llama()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        optim="galore_adamw",
        optim_target_modules="attn,mlp",
        optim_args="rank=4,others=adafactor",
        use_cpu=True,
        report_to="none",
    )
    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    optimizer = optimizer_cls(model.parameters(), **kwargs)
    plain = [g for g in optimizer.param_groups if g.get("rank") is None]
    assert plain and all(g["inner"] == "adafactor" for g in plain)
    tokens = torch.randint(0, LLAMA_VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    model(tokens, labels=tokens).loss.backward()
    optimizer.step()
    embed = model.get_input_embeddings().weight
    assert set(optimizer.state[embed]) == {"step", "exp_avg_sq_row", "exp_avg_sq_col"}
    others = [p for g in plain for p in g["params"]]
    held = sum(v.numel() * v.element_size() for p in others for v in optimizer.state[p].values() if torch.is_tensor(v))
    expected = sum(_analytic_bytes("adafactor", tuple(p.shape)) for p in others)
    assert held == expected
    line = next(r.getMessage() for r in galore_log if r.getMessage().startswith("Other parameters"))
    assert f"{len(others)} tensors" in line and "others=adafactor" in line
    assert hf_galore.report.human_bytes(expected) in line


def test_others_frozen_is_refused_under_fsdp():
    args = types.SimpleNamespace(fsdp="full_shard", fsdp_config={"version": 2}, deepspeed=None)
    with pytest.raises(NotImplementedError, match=r"others=frozen cannot run under FSDP"):
        check_supported(args, "galore_adamw", layerwise=False, others="frozen")
