"""Layer-wise hooks end with training, never keep the optimizer alive, never steal a later optimizer's gradients."""

import gc
import weakref

import pytest
import torch
from conftest import OPTIMIZERS, batches, galore_groups, tiny_mlp, train


def _backward(model, seed=3):
    x, y = batches(1, seed=seed)[0]
    torch.nn.functional.mse_loss(model(x), y).backward()


def test_remove_hooks_leaves_later_backward_passes_alone():
    model = tiny_mlp()
    opt = OPTIMIZERS["adamw"](galore_groups(model), layerwise=True)
    train(model, opt, batches(2))
    assert opt.has_hooks
    opt.remove_hooks()
    before = [p.detach().clone() for p in model.parameters()]
    _backward(model)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(p.grad is not None for p in model.parameters())  # gradients stay for whoever steps next
    opt.register_hooks()  # a later train() call takes them back
    opt.zero_grad()
    _backward(model)
    assert all(p.grad is None for p in model.parameters())


def test_hooks_do_not_keep_the_optimizer_alive():
    model = tiny_mlp()
    opt = OPTIMIZERS["adamw"](galore_groups(model), layerwise=True)
    train(model, opt, batches(1))
    alive = weakref.ref(opt)
    del opt
    gc.collect()
    assert alive() is None
    before = [p.detach().clone() for p in model.parameters()]
    _backward(model)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("later", ["galore", "galore-layerwise"])
def test_a_later_optimizer_takes_its_parameters_back_from_abandoned_hooks(later):
    model = tiny_mlp()
    abandoned = OPTIMIZERS["adamw"](galore_groups(model), layerwise=True)  # e.g. training interrupted
    with pytest.warns(UserWarning, match="Removed the layer-wise hooks an earlier GaLore optimizer left"):
        opt = OPTIMIZERS["adamw"](galore_groups(model), layerwise=later == "galore-layerwise")
    assert not abandoned.has_hooks
    train(model, opt, batches(2))
    assert len(opt.state) == 4 and len(abandoned.state) == 0
