"""Resuming with changed settings: what can change takes the new value (and is logged); what cannot raises."""

import io
import math

import pytest
import torch
from conftest import ADAFACTOR_FIXED_LR, batches, galore_groups, tiny_mlp, train

from hf_galore import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit
from hf_galore.core import RIGHT_BASIS


def _checkpoint(make, steps=3, **galore):
    model = tiny_mlp()
    opt = make(galore_groups(model, **galore))
    train(model, opt, batches(steps))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def adamw(groups, **kw):
    return GaLoreAdamW(groups, lr=1e-2, **kw)


def test_settings_that_keep_the_layout_take_the_new_value_and_are_logged(galore_log):
    saved = _checkpoint(adamw, update_proj_gap=3, scale=0.25)
    model = tiny_mlp()
    opt = GaLoreAdamW(galore_groups(model, update_proj_gap=1, scale=2.0), lr=5e-3, weight_decay=0.1)
    opt.load_state_dict(saved)
    galore = opt.param_groups[0]
    assert (galore["update_proj_gap"], galore["scale"], galore["weight_decay"]) == (1, 2.0, 0.1)
    assert galore["lr"] == 1e-2  # the learning rate is the checkpoint's (its scheduler owns it)
    messages = [r.getMessage() for r in galore_log]
    assert any("update_proj_gap 3 -> 1" in m and "scale 0.25 -> 2.0" in m for m in messages), messages
    next_refresh = opt.state[model[0].weight]["next_refresh"]
    train(model, opt, batches(1, seed=4))  # the schedule saved in the checkpoint still holds for the due refresh
    assert opt.state[model[0].weight]["next_refresh"] == next_refresh + 1


@pytest.mark.parametrize(
    "make,galore,message",
    [
        (adamw, {"rank": 2}, r"Cannot resume with rank=2: the checkpoint was saved with rank=4"),
        (adamw, {"proj_type": "left"}, r"Cannot resume with proj_type='left': the checkpoint was saved with "),
        (
            lambda groups: GaLoreAdamW8bit(groups, lr=1e-2, min_8bit_size=128),
            {},
            r"the checkpoint holds exp_avg \(48, 4\) float32.*keeps exp_avg \(48, 4\) uint8.*different --optim",
        ),
        (
            lambda groups: GaLoreAdafactor(groups, **ADAFACTOR_FIXED_LR),
            {},
            r"the checkpoint holds exp_avg .* keeps exp_avg_sq_row \(48,\) float32, exp_avg_sq_col \(4,\)",
        ),
    ],
    ids=["rank", "proj_type", "adamw->8bit", "adamw->adafactor"],
)
def test_settings_that_fix_the_layout_raise_before_anything_loads(make, galore, message):
    saved = _checkpoint(adamw)
    model = tiny_mlp()
    opt = make(galore_groups(model, **galore))
    groups_before = [dict(g) for g in opt.param_groups]
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(saved)
    assert len(opt.state) == 0 and [dict(g) for g in opt.param_groups] == groups_before


def test_min_8bit_size_change_raises():
    saved = _checkpoint(lambda groups: GaLoreAdamW8bit(groups, lr=1e-2, min_8bit_size=128))
    opt = GaLoreAdamW8bit(galore_groups(tiny_mlp()), lr=1e-2)  # default 4096: these moments would be 32-bit
    with pytest.raises(ValueError, match=r"holds exp_avg \(48, 4\) uint8.*min_8bit_size"):
        opt.load_state_dict(saved)


def test_a_plain_adamw_checkpoint_does_not_silently_turn_galore_off():
    model = tiny_mlp()
    plain = torch.optim.AdamW([g["params"] for g in galore_groups(model)][0], lr=1e-2)
    plain.add_param_group({"params": galore_groups(model)[1]["params"]})
    train(model, plain, batches(2))
    opt = adamw(galore_groups(tiny_mlp()))
    message = r"the optimizer changed\. The checkpoint was saved by a plain optimizer .*this one is GaLoreAdamW"
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(plain.state_dict())


def test_a_different_number_of_groups_or_tensors_is_named():
    saved = _checkpoint(adamw)
    model = tiny_mlp()
    with pytest.raises(ValueError, match=r"has 2 param groups, this one has 1"):
        adamw([{"params": [model[0].weight], "rank": 4}]).load_state_dict(saved)
    with pytest.raises(ValueError, match=r"param group 0 \(1 tensors.*held 2 tensors in the checkpoint"):
        adamw([{"params": [model[0].weight], "rank": 4}, {"params": [model[0].bias]}]).load_state_dict(saved)


def test_a_non_finite_basis_in_the_checkpoint_is_reported_as_a_corrupt_checkpoint():
    saved = _checkpoint(adamw)
    saved["state"][0][RIGHT_BASIS][0, 0] = math.nan
    model = tiny_mlp()
    opt = adamw(galore_groups(model), param_names={p: n for n, p in model.named_parameters()})
    with pytest.raises(ValueError, match=r"Cannot resume 0\.weight: the checkpoint's right_basis holds NaN .*corrupt"):
        opt.load_state_dict(saved)
