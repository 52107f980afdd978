"""Optimizer-state bytes equal the analytic count: 2·r·max(m, n) moments + r·min(m, n) basis per target."""

import inspect

import pytest
import torch
from conftest import LLAMA_VOCAB, tiny_llama

from hf_galore import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit, expected_state_bytes, optimizer_state_bytes
from hf_galore.inner import MIN_8BIT_SIZE, AdafactorUpdate, AdamW8bitUpdate, AdamWUpdate

RANK = 4


def _groups(model):
    targets = [p for n, p in model.named_parameters() if p.dim() == 2 and ("self_attn" in n or "mlp" in n)]
    ids = {id(p) for p in targets}
    others = [p for p in model.parameters() if id(p) not in ids]
    return targets, others, [{"params": targets, "rank": RANK}, {"params": others}]


FORMS = {
    "adamw": (lambda g: GaLoreAdamW(g, lr=1e-3), {}),
    # min_8bit_size=256: the projected 64x32 / 32x64 targets (256 entries) hold 8-bit moments and block constants,
    # the projected 32x32 ones (128) keep 32-bit moments
    "adamw8bit": (lambda g: GaLoreAdamW8bit(g, lr=1e-3, min_8bit_size=256), {"min_8bit_size": 256}),
    "adafactor": (lambda g: GaLoreAdafactor(g, lr=1e-3, relative_step=False, beta1=0.9), {"adafactor_beta1": True}),
}


@pytest.mark.parametrize("form", FORMS)
def test_state_bytes_equal_analytic_count_on_tiny_llama(form):
    model = tiny_llama()
    targets, others, groups = _groups(model)
    make, extra = FORMS[form]
    optimizer = make(groups)
    tokens = torch.randint(0, LLAMA_VOCAB, (2, 16))
    model(tokens, labels=tokens).loss.backward()
    optimizer.step()
    expected = sum(expected_state_bytes(tuple(p.shape), form=form, rank=RANK, **extra) for p in targets)
    expected += sum(expected_state_bytes(tuple(p.shape), form=form, **extra) for p in others)
    assert optimizer_state_bytes(optimizer) == expected


def test_analytic_count_is_the_paper_formula():
    m, n = 172, 64  # down_proj-like, tall: projected from the right
    assert expected_state_bytes((m, n), form="adamw", rank=RANK) == 4 * (2 * RANK * max(m, n) + RANK * min(m, n))
    assert expected_state_bytes((n, m), form="adamw", rank=RANK) == 4 * (2 * RANK * max(m, n) + RANK * min(m, n))
    # 8-bit: one byte per moment entry plus one float32 absmax per block of 256 entries per moment.
    moments = RANK * 4096
    assert (
        expected_state_bytes((4096, 64), form="adamw8bit", rank=RANK)
        == 2 * moments + 2 * 4 * (moments // 256) + 4 * RANK * 64
    )
    assert expected_state_bytes((10, 10), form="adamw", rank=RANK, proj_type="full") == 4 * (
        2 * RANK * RANK + 2 * RANK * 10
    )


def test_galore_saves_most_of_adamw_state_on_the_targets():
    model = tiny_llama()
    targets, _, _ = _groups(model)
    galore = sum(expected_state_bytes(tuple(p.shape), form="adamw", rank=RANK) for p in targets)
    adamw = sum(expected_state_bytes(tuple(p.shape), form="adamw") for p in targets)
    assert galore < 0.3 * adamw


def test_unknown_form_raises():
    with pytest.raises(ValueError, match="Invalid form='sgd'. Must be one of adamw, adamw8bit, adafactor"):
        expected_state_bytes((4, 4), form="sgd")


def test_each_rule_counts_its_own_state_as_the_named_form():
    """`expected_state_bytes` takes the rule itself; a rule configured like the named form gives the same bytes."""
    shape = (64, 32)
    cases = [
        (AdamWUpdate(), {"form": "adamw"}),
        (AdamW8bitUpdate(min_8bit_size=256), {"form": "adamw8bit", "min_8bit_size": 256}),
        (AdamW8bitUpdate(), {"form": "adamw8bit"}),  # 8 x 64 = 512 entries < 4096: 32-bit moments
        (AdafactorUpdate(first_moment=True), {"form": "adafactor", "adafactor_beta1": True}),
    ]
    for rule, named in cases:
        for rank in (None, RANK):
            assert expected_state_bytes(shape, form=rule, rank=rank) == expected_state_bytes(shape, rank=rank, **named)
    assert AdamW8bitUpdate(min_8bit_size=256).state_bytes((8, 64), torch.float32) == 2 * 512 + 2 * 4 * 2
    assert AdamW8bitUpdate().state_bytes((8, 64), torch.float32) == 2 * 4 * 512
    assert AdamWUpdate().state_bytes((8, 64), torch.bfloat16) == 2 * 2 * 512
    assert AdafactorUpdate(first_moment=False).state_bytes((8, 64), torch.bfloat16) == 4 * (8 + 64)
    with pytest.raises(ValueError, match="Invalid first_moment=None for state_bytes: the state depends on beta1"):
        AdafactorUpdate().state_bytes((8, 64), torch.float32)  # as the optimizer builds it: beta1 is per group


def test_options_for_a_rule_instance_are_refused():
    with pytest.raises(ValueError, match="Invalid min_8bit_size=256 with form=.*configure the rule instance instead"):
        expected_state_bytes((4, 4), form=AdamW8bitUpdate(), min_8bit_size=256)


def test_min_8bit_size_default_is_bitsandbytes_own_everywhere():
    import bitsandbytes

    from hf_galore.trainer_factory import _EXTRA_OPTIM_ARGS

    assert inspect.signature(bitsandbytes.optim.AdamW8bit).parameters["min_8bit_size"].default == MIN_8BIT_SIZE
    assert inspect.signature(GaLoreAdamW8bit).parameters["min_8bit_size"].default == MIN_8BIT_SIZE
    assert AdamW8bitUpdate().min_8bit_size == MIN_8BIT_SIZE
    assert _EXTRA_OPTIM_ARGS[GaLoreAdamW8bit] == {"min_8bit_size": MIN_8BIT_SIZE}
    moments = 2 * 4 * (MIN_8BIT_SIZE - 1)  # one entry below the threshold: float32 moments
    assert expected_state_bytes((1, MIN_8BIT_SIZE - 1), form="adamw8bit") == moments
