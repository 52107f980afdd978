"""The Fira residual against a reference written here, for every inner form, with and without weight decay."""

import pytest
import torch
from conftest import galore_groups, tiny_mlp

from hf_galore import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit, GaLoreConfig
from hf_galore.core import LEFT_BASIS, RIGHT_BASIS

STEPS, LR, SCALE = 8, 1e-2, 0.5
FORMS = {
    "adamw": lambda groups, wd: GaLoreAdamW(groups, lr=LR, weight_decay=wd),
    "adamw8bit": lambda groups, wd: GaLoreAdamW8bit(groups, lr=LR, weight_decay=wd, min_8bit_size=128),
    "adafactor": lambda groups, wd: GaLoreAdafactor(
        groups, lr=LR, weight_decay=wd, beta1=0.9, relative_step=False, scale_parameter=False
    ),
}


def reference_residual(grad, low, update, left, right, previous):
    """Fira's scaled residual at unit lr (`update` is D / lr), column by column (left projection) or row by row
    (right), then the 1.01 limiter."""
    back = low if left is None else left @ low
    back = back if right is None else back @ right
    residual = grad - back
    if left is not None and right is not None:
        scaled = residual * (update.norm() / (low.norm() + 1e-8))
    elif left is not None:
        columns = [residual[:, j] * update[:, j].norm() / (low[:, j].norm() + 1e-8) for j in range(grad.shape[1])]
        scaled = torch.stack(columns, dim=1)
    else:
        scaled = torch.stack([residual[i] * update[i].norm() / (low[i].norm() + 1e-8) for i in range(grad.shape[0])])
    norm = scaled.norm()
    if previous is not None and norm / (previous + 1e-8) > 1.01:
        factor = 1.01 / (norm / (previous + 1e-8))
        scaled, norm = scaled * factor, norm * factor
    return scaled, norm


@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["no-decay", "decay"])
@pytest.mark.parametrize("proj_type", ["std", "full"])
@pytest.mark.parametrize("form", list(FORMS))
def test_fira_residual_equals_the_reference(form, proj_type, weight_decay):
    """Both optimizers see the same gradients, so their bases and inner updates D agree; the Fira weights must be the
    plain GaLore trajectory plus the reference residual at every step (std: the 48×16 weight is projected from the
    right, the 8×48 from the left)."""
    options = {"update_proj_gap": 3, "scale": SCALE, "proj_type": proj_type}
    fira_model, plain_model = tiny_mlp(), tiny_mlp()
    fira = FORMS[form](galore_groups(fira_model, **options, residual="fira"), weight_decay)
    plain = FORMS[form](galore_groups(plain_model, **options), weight_decay)
    updates = []
    inner_update = plain.inner.update
    plain.inner.update = lambda *args, **kw: updates.append(inner_update(*args, **kw).clone()) or updates[-1]
    targets = [0, 2]  # the two Linear weights, the first group: updated first, in this order
    expected = [fira_model[i].weight.detach().clone() for i in targets]
    previous = [None, None]
    gen = torch.Generator().manual_seed(3)
    for step in range(STEPS):
        lr = LR * (step + 1) / STEPS  # a warm-up: the limiter must see the residual's growth, not the schedule's
        for group in (*fira.param_groups, *plain.param_groups):
            group["lr"] = lr
        grads = [torch.randn(p.shape, generator=gen) for p in fira_model.parameters()]
        for model in (fira_model, plain_model):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
        updates.clear()
        fira.step()
        plain.step()
        for k, i in enumerate(targets):
            weight = plain_model[i].weight
            left, right = plain.state[weight].get(LEFT_BASIS), plain.state[weight].get(RIGHT_BASIS)
            grad = grads[2 * k]
            low = grad if left is None else left.T @ grad
            low = low if right is None else low @ right.T
            residual, previous[k] = reference_residual(grad, low, updates[k] / lr, left, right, previous[k])
            back = updates[k] if left is None else left @ updates[k]
            back = back if right is None else back @ right
            expected[k] = expected[k] * (1 - lr * weight_decay) - SCALE * (back + lr * residual)
    for k, i in enumerate(targets):
        torch.testing.assert_close(fira_model[i].weight.detach(), expected[k], atol=2e-6, rtol=1e-5)
    assert not torch.allclose(fira_model[0].weight, plain_model[0].weight)  # the residual did something


def test_residual_is_off_by_default_and_a_full_rank_basis_leaves_nothing_to_add():
    assert GaLoreConfig().residual == "none"
    models = [tiny_mlp(), tiny_mlp()]
    # rank 16 spans every column of the 48×16 weight: its residual is zero, so Fira equals GaLore there
    opts = [FORMS["adamw"](galore_groups(m, rank=16, residual=r), 0.0) for m, r in zip(models, ("none", "fira"))]
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        grads = [torch.randn(p.shape, generator=gen) for p in models[0].parameters()]
        for model, opt in zip(models, opts):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            opt.step()
    torch.testing.assert_close(models[0][0].weight, models[1][0].weight, atol=1e-6, rtol=0)


def test_an_unknown_residual_is_named():
    with pytest.raises(ValueError, match=r"Invalid residual='lora'. Must be one of none, fira"):
        GaLoreConfig(residual="lora")
