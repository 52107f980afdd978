"""A NaN or inf gradient never reaches weights, moments or bases: the parameter's update is skipped, and said so."""

import math

import pytest
import torch
from conftest import OPTIMIZERS, batches, galore_groups, tiny_mlp, train

from hf_galore.core import RIGHT_BASIS


def _snapshot(model, opt):
    weights = [p.detach().clone() for p in model.parameters()]
    state = {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()} for p in opt.state}
    return weights, state


def _poisoned_step(model, opt, value, which):
    """One step on a real batch whose gradient of parameter `which` gets a non-finite entry."""
    x, y = batches(1, seed=7)[0]
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    list(model.parameters())[which].grad[0, 0] = value
    opt.step()


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_poisoned_parameter_is_left_exactly_as_it_was(name, value):
    """At a refresh step and between refreshes: weights, moments, basis, step count and due refresh untouched."""
    model = tiny_mlp()
    names = {p: n for n, p in model.named_parameters()}
    opt = OPTIMIZERS[name](galore_groups(model, update_proj_gap=4), param_names=names)
    train(model, opt, batches(4))  # steps 0..3; the next refresh is due at step 4
    for _ in ("at a refresh step", "between refreshes"):
        weights, state = _snapshot(model, opt)
        with pytest.warns(UserWarning, match=r"skipped the update of 0\.weight: the gradient has NaN or inf"):
            _poisoned_step(model, opt, value, which=0)
        after_weights, after_state = _snapshot(model, opt)
        first = id(model[0].weight)
        assert torch.equal(after_weights[0], weights[0])
        assert after_state[first].keys() == state[first].keys()
        for key, saved in state[first].items():
            assert (
                torch.equal(after_state[first][key], saved)
                if torch.is_tensor(saved)
                else after_state[first][key] == saved
            )
        assert not torch.equal(after_weights[2], weights[2])  # the finite parameters did update
        assert opt.pop_skipped_updates() == ["0.weight"]
        train(model, opt, batches(1, seed=11))  # a clean step: the due refresh happens now
    assert torch.isfinite(model[0].weight).all()


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_fully_poisoned_step_leaves_the_run_identical_to_one_without_it(name):
    clean, poisoned = tiny_mlp(), tiny_mlp()
    opt_clean = OPTIMIZERS[name](galore_groups(clean, update_proj_gap=3))
    opt_poisoned = OPTIMIZERS[name](galore_groups(poisoned, update_proj_gap=3))
    data = batches(9)
    train(clean, opt_clean, data)
    for index, (x, y) in enumerate(data):
        train(poisoned, opt_poisoned, [(x, y)])
        if index in (2, 5):  # just before the refreshes at steps 3 and 6
            for p in poisoned.parameters():
                p.grad = torch.full_like(p, math.nan)
            with pytest.warns(UserWarning, match="skipped the update"):
                opt_poisoned.step()
    for p, q in zip(clean.parameters(), poisoned.parameters()):
        assert torch.equal(p, q)
    assert len(opt_poisoned.pop_skipped_updates()) == 8


def test_a_non_finite_first_gradient_creates_no_state_and_no_fallback_basis():
    model = tiny_mlp()
    opt = OPTIMIZERS["adamw"](galore_groups(model))
    for p in model.parameters():
        p.grad = torch.full_like(p, math.inf)
    with pytest.warns(UserWarning, match="skipped the update") as record:
        opt.step()
    assert len(record) == 1
    assert len(opt.state) == 0 and len(opt.pop_skipped_updates()) == 4
    train(model, opt, batches(1))  # the first finite step takes the SVD basis, not coordinate axes
    basis = opt.state[model[0].weight][RIGHT_BASIS]
    assert not torch.equal(basis.abs(), torch.eye(4, 16))


def test_layerwise_skips_the_poisoned_parameter_too():
    model = tiny_mlp()
    opt = OPTIMIZERS["adamw"](galore_groups(model), layerwise=True)
    train(model, opt, batches(2))
    before = model[2].weight.detach().clone()
    x, y = batches(1, seed=3)[0]
    model[2].weight.register_hook(lambda g: torch.full_like(g, math.nan))
    torch.nn.functional.mse_loss(model(x), y).backward()
    with pytest.warns(UserWarning, match="skipped the update of a parameter shaped \\(8, 48\\)"):
        opt.step()  # one warning per step, for what the hooks skipped in the backward before it
    assert torch.equal(model[2].weight, before)
    assert model[2].weight.grad is None  # freed like every other layer-wise gradient


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_step_between_refreshes_reads_the_device_once(monkeypatch, name):
    """The finite check is one batched read per step (`.tolist()` of every flag), not one host sync per parameter:
    on CUDA each of these reads waits for the device. Counted on CPU through the Tensor methods that read a value."""
    model = tiny_mlp()
    opt = OPTIMIZERS[name](galore_groups(model, update_proj_gap=10))
    train(model, opt, batches(2))  # past the first refresh
    reads = []
    for method in ("tolist", "item", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, method)

        def counted(self, *args, _original=original, _method=method, **kwargs):
            reads.append(_method)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, counted)
    x, y = batches(1, seed=5)[0]
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    reads.clear()
    opt.step()
    assert reads == ["tolist"]
