"""GaLore optimizers against the reference (galore-torch 1.0) and the plain optimizers they stand for."""

import copy
import math
import pickle

import bitsandbytes as bnb
import galore_torch
import pytest
import torch
from conftest import (
    ADAFACTOR_FIXED_LR,
    OPTIMIZERS,
    batches,
    galore_groups,
    resume_through_weights_only_checkpoint,
    tiny_mlp,
    train,
)
from transformers.optimization import Adafactor

from hf_galore import PROJ_TYPES, GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit, GaLoreConfig
from hf_galore.core import LEFT_BASIS, NEXT_REFRESH, REFRESH_INTERVAL, RIGHT_BASIS

STEPS = 60  # > 50 steps, 6 refreshes at update_proj_gap=10


def _max_param_diff(a, b):
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


# The reference AdamW adds eps to √v before bias correction (torch adds it after), and applies weight decay after
# the update (torch before). With eps=0 and weight_decay=0 both conventions are the same maths, so only float32
# rounding separates the trajectories: ~1e-7 relative per step, compounding over 60 steps at lr 1e-2 to < 1e-5
# on weights of magnitude ~0.3. A wrong refresh step, side or scale shows up at 1e-2.
@pytest.mark.parametrize("proj_type", PROJ_TYPES)
@pytest.mark.parametrize(
    "ours,reference,kwargs",
    [
        (GaLoreAdamW, galore_torch.GaLoreAdamW, {"lr": 1e-2, "eps": 0.0, "weight_decay": 0.0}),
        (GaLoreAdafactor, galore_torch.GaLoreAdafactor, {**ADAFACTOR_FIXED_LR, "beta1": 0.9}),
        (GaLoreAdafactor, galore_torch.GaLoreAdafactor, ADAFACTOR_FIXED_LR),
    ],
    ids=["adamw", "adafactor-beta1", "adafactor"],
)
def test_trajectory_matches_reference(ours, reference, kwargs, proj_type):
    data = batches(STEPS)
    model_ours, model_ref = tiny_mlp(), tiny_mlp()
    exact = {"proj_type": proj_type, "refresh_method": "exact"}  # the reference refresh; galore-torch ignores the key
    losses_ours = train(model_ours, ours(galore_groups(model_ours, **exact), **kwargs), data)
    losses_ref = train(model_ref, reference(galore_groups(model_ref, **exact), **kwargs), data)
    assert losses_ours[-1] < losses_ours[0]
    torch.testing.assert_close(losses_ours, losses_ref, atol=1e-5, rtol=1e-5)
    assert _max_param_diff(model_ours, model_ref) < 1e-5


def test_adamw_eps_convention_differs_from_reference_as_documented():
    """With eps > 0 the conventions differ (eps vs eps/√(1-β2^t)): pin that the difference is real."""
    data = batches(5)
    model_ours, model_ref = tiny_mlp(), tiny_mlp()
    train(model_ours, GaLoreAdamW(galore_groups(model_ours), lr=1e-2, eps=1e-3, weight_decay=0.0), data)
    train(model_ref, galore_torch.GaLoreAdamW(galore_groups(model_ref), lr=1e-2, eps=1e-3), data)
    assert _max_param_diff(model_ours, model_ref) > 1e-5


@pytest.mark.parametrize(
    "ours,plain,kwargs,atol",
    [
        (GaLoreAdamW, torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1, "eps": 1e-8}, 1e-6),
        (GaLoreAdamW8bit, bnb.optim.AdamW8bit, {"lr": 1e-2, "weight_decay": 0.1}, 1e-6),
        (GaLoreAdafactor, Adafactor, {"weight_decay": 0.1}, 1e-6),
        (GaLoreAdafactor, Adafactor, {**ADAFACTOR_FIXED_LR, "beta1": 0.9, "weight_decay": 0.1}, 1e-6),
    ],
    ids=["adamw-vs-torch", "adamw8bit-vs-bnb", "adafactor-relative-vs-transformers", "adafactor-fixed-beta1"],
)
def test_groups_without_rank_equal_plain_optimizer(ours, plain, kwargs, atol):
    data = batches(STEPS)
    model_ours, model_plain = tiny_mlp(), tiny_mlp()
    if plain is bnb.optim.AdamW8bit:  # force 8-bit states on these small weights, on both sides
        kwargs = {**kwargs, "min_8bit_size": 256}
    train(model_ours, ours(model_ours.parameters(), **kwargs), data)
    train(model_plain, plain(model_plain.parameters(), **kwargs), data)
    assert _max_param_diff(model_ours, model_plain) < atol


def test_weight_decay_is_decoupled_and_applied_to_the_full_weight():
    model_decay, model_plain = tiny_mlp(), tiny_mlp()
    before = model_decay[0].weight.detach().clone()
    lr, wd = 1e-2, 0.5
    data = batches(1)
    train(model_decay, GaLoreAdamW(galore_groups(model_decay), lr=lr, weight_decay=wd), data)
    train(model_plain, GaLoreAdamW(galore_groups(model_plain), lr=lr, weight_decay=0.0), data)
    expected = model_plain[0].weight - before * lr * wd  # (1 - lr·wd)·W + ΔW
    torch.testing.assert_close(model_decay[0].weight, expected, atol=1e-7, rtol=0)


def _relative_drift(model, reference, start):
    """‖W − W_ref‖ / ‖W_ref − W_0‖ over all parameters: how far a run strays, against how far it went."""
    drift = sum((p - q).square().sum() for p, q in zip(model.parameters(), reference.parameters()))
    travel = sum((q - s).square().sum() for q, s in zip(reference.parameters(), start.parameters()))
    return float((drift / travel).sqrt().detach())


def test_8bit_stores_uint8_moments_and_tracks_fp32():
    """8-bit GaLore strays from fp32 GaLore no more than bitsandbytes' AdamW8bit strays from torch's AdamW.

    That yardstick is measured here, on the same data (~3% relative drift after 50 steps). The basis is refreshed
    only on the first step (same gradient in both runs): a later refresh on gradients that differ by quantization
    noise may order near-equal singular directions differently, which tests the SVD, not the 8-bit moments.
    """
    data, lr = batches(50), 1e-2
    model_bnb, model_torch = tiny_mlp(), tiny_mlp()
    train(model_bnb, bnb.optim.AdamW8bit(model_bnb.parameters(), lr=lr, weight_decay=0.0, min_8bit_size=128), data)
    train(model_torch, torch.optim.AdamW(model_torch.parameters(), lr=lr, weight_decay=0.0), data)
    yardstick = _relative_drift(model_bnb, model_torch, tiny_mlp())

    model_8, model_32 = tiny_mlp(), tiny_mlp()
    groups_8, groups_32 = (galore_groups(m, rank=8, update_proj_gap=100) for m in (model_8, model_32))
    opt_8 = GaLoreAdamW8bit(groups_8, lr=lr, weight_decay=0.0, min_8bit_size=128)
    losses_8 = train(model_8, opt_8, data)
    losses_32 = train(model_32, GaLoreAdamW(groups_32, lr=lr, weight_decay=0.0), data)
    state = opt_8.state[model_8[0].weight]
    assert state["exp_avg"].dtype == torch.uint8 and state["exp_avg_sq"].dtype == torch.uint8
    assert state["exp_avg"].shape == (48, 8)  # projected: 48×16 from the right at rank 8
    assert 0.0 < _relative_drift(model_8, model_32, tiny_mlp()) < 1.5 * yardstick
    torch.testing.assert_close(losses_8, losses_32, rtol=1e-2, atol=0)


def test_8bit_form_with_32bit_states_equals_galore_adamw():
    """Below `min_8bit_size` bitsandbytes keeps 32-bit moments: then the 8-bit form is GaLoreAdamW exactly."""
    data = batches(STEPS)
    model_8, model_32 = tiny_mlp(), tiny_mlp()
    train(model_8, GaLoreAdamW8bit(galore_groups(model_8), lr=1e-2, weight_decay=0.1, min_8bit_size=10**9), data)
    train(model_32, GaLoreAdamW(galore_groups(model_32), lr=1e-2, weight_decay=0.1), data)
    assert _max_param_diff(model_8, model_32) < 1e-5


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("stop_at", [10, 17], ids=["on-refresh", "mid-interval"])
def test_weights_only_round_trip_continues_bit_identically(name, stop_at):
    data = batches(30)
    make = OPTIMIZERS[name]
    model_full = tiny_mlp()
    losses_full = train(model_full, make(galore_groups(model_full)), data)

    model = tiny_mlp()
    opt = make(galore_groups(model))
    losses = train(model, opt, data[:stop_at])
    resumed_model, resumed_opt = resume_through_weights_only_checkpoint(model, opt, lambda m: make(galore_groups(m)))
    state = resumed_opt.state[resumed_model[0].weight]
    assert state[RIGHT_BASIS].dtype == torch.float32
    if name == "adamw8bit":
        assert state["exp_avg"].dtype == torch.uint8
    losses += train(resumed_model, resumed_opt, data[stop_at:])
    assert losses == losses_full
    for p, q in zip(resumed_model.parameters(), model_full.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("copy_with", ["pickle", "deepcopy"])
@pytest.mark.parametrize("layerwise", [False, True], ids=["whole", "layerwise"])
def test_a_copy_of_model_and_optimizer_continues_exactly_like_the_original(copy_with, layerwise):
    model = tiny_mlp()
    opt = GaLoreAdamW8bit(galore_groups(model), lr=1e-2, min_8bit_size=128, layerwise=layerwise)
    train(model, opt, batches(3))
    if copy_with == "pickle":
        model_copy, opt_copy = pickle.loads(pickle.dumps((model, opt)))
    else:
        model_copy, opt_copy = copy.deepcopy((model, opt))
    assert opt_copy.inner.min_8bit_size == 128 and not opt_copy.has_hooks  # hooks belong to the original's params
    if layerwise:
        opt_copy.register_hooks()
    train(model, opt, batches(4, seed=9))
    train(model_copy, opt_copy, batches(4, seed=9))
    for p, q in zip(model.parameters(), model_copy.parameters()):
        assert torch.equal(p, q)


def test_svd_failure_on_first_refresh_gives_orthonormal_fallback(monkeypatch):
    model = tiny_mlp()
    opt = GaLoreAdamW(galore_groups(model), lr=1e-2)

    def failing_svd(*args, **kwargs):
        raise torch.linalg.LinAlgError("failed to converge")

    for decomposition in ("svd", "eigh"):  # exact refresh: svd; randomized: eigh of the small Gram matrix
        monkeypatch.setattr(torch.linalg, decomposition, failing_svd)
    with pytest.warns(UserWarning, match="the SVD failed .*; starting from coordinate axes"):
        train(model, opt, batches(1))
    basis = opt.state[model[0].weight][RIGHT_BASIS]
    assert torch.isfinite(basis).all()
    torch.testing.assert_close(basis @ basis.T, torch.eye(4))


def test_svd_failure_keeps_previous_basis(monkeypatch):
    model = tiny_mlp()
    opt = GaLoreAdamW(galore_groups(model, update_proj_gap=1), lr=1e-2)
    train(model, opt, batches(1))
    basis = opt.state[model[0].weight][RIGHT_BASIS].clone()

    def failing_svd(*args, **kwargs):
        raise torch.linalg.LinAlgError("failed to converge")

    for decomposition in ("svd", "eigh"):  # exact refresh: svd; randomized: eigh of the small Gram matrix
        monkeypatch.setattr(torch.linalg, decomposition, failing_svd)
    with pytest.warns(UserWarning, match="the SVD failed"):
        train(model, opt, batches(1, seed=5))
    assert torch.equal(opt.state[model[0].weight][RIGHT_BASIS], basis)


def test_rank_above_min_dimension_is_clipped_with_one_warning():
    model = tiny_mlp()
    with pytest.warns(UserWarning, match="exceeds min") as record:
        opt = GaLoreAdamW(galore_groups(model, rank=100), lr=1e-2)
    assert len([w for w in record if "exceeds min" in str(w.message)]) == 1
    train(model, opt, batches(1))
    assert opt.state[model[0].weight][RIGHT_BASIS].shape == (16, 16)
    assert opt.state[model[2].weight][LEFT_BASIS].shape == (8, 8)


def test_refresh_stats_count_refreshes_and_overlap():
    model = tiny_mlp()
    opt = GaLoreAdamW(galore_groups(model, update_proj_gap=5), lr=1e-2)
    train(model, opt, batches(11))  # refreshes at steps 0, 5, 10 for 2 weights
    stats = opt.pop_refresh_stats()
    assert stats.count == 6 and stats.overlap_count == 4
    assert 0.0 <= stats.mean_overlap <= 1.0 + 1e-6
    assert opt.pop_refresh_stats().count == 0


BAD_GROUP_OPTIONS = [
    ({"rank": 0}, "Invalid rank=0. Must be an int >= 1."),
    ({"rank": 2.5}, "Invalid rank=2.5"),
    ({"rank": True}, "Invalid rank=True"),
    ({"update_proj_gap": 0}, "Invalid update_proj_gap=0"),
    ({"scale": 0.0}, "Invalid scale=0.0"),
    ({"scale": math.inf}, "Invalid scale=inf"),
    ({"scale": math.nan}, "Invalid scale=nan"),
    ({"proj_type": "diagonal"}, "Invalid proj_type='diagonal'. Must be one of std, reverse_std, left, right, full."),
]


@pytest.mark.parametrize("options,message", BAD_GROUP_OPTIONS, ids=[m.split(".")[0] for _, m in BAD_GROUP_OPTIONS])
def test_bad_galore_options_raise(options, message):
    model = tiny_mlp()
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        GaLoreAdamW(galore_groups(model, **options))


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda ps: GaLoreAdamW(ps, lr=-1.0), "Invalid lr=-1.0"),
        (lambda ps: GaLoreAdamW(ps, betas=(1.0, 0.999)), r"Invalid beta1=1.0. Must be in \[0, 1\)"),
        (lambda ps: GaLoreAdamW(ps, betas=(0.9, -0.1)), "Invalid beta2=-0.1"),
        (lambda ps: GaLoreAdamW(ps, eps=-1e-8), "Invalid eps=-1e-08"),
        (lambda ps: GaLoreAdamW(ps, weight_decay=-0.1), "Invalid weight_decay=-0.1"),
        (lambda ps: GaLoreAdamW8bit(ps, betas=(0.9, 1.5)), "Invalid beta2=1.5"),
        (lambda ps: GaLoreAdamW8bit(ps, min_8bit_size=-1), "Invalid min_8bit_size=-1"),
        (lambda ps: GaLoreAdafactor(ps, lr=1e-3), "relative_step=True"),
        (lambda ps: GaLoreAdafactor(ps, relative_step=False), "lr=None with relative_step=False"),
        (lambda ps: GaLoreAdafactor(ps, beta1=1.0), "Invalid beta1=1.0"),
        (lambda ps: GaLoreAdafactor(ps, lr=1e-3, relative_step=False, warmup_init=True), "warmup_init"),
        (lambda ps: GaLoreAdamW([{"params": ps, "amsgrad": True}]), "does not support amsgrad"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_hyperparameters_raise(make, message):
    with pytest.raises(ValueError, match=message):
        make(list(tiny_mlp().parameters()))


def test_rank_on_a_non_matrix_parameter_raises():
    model = tiny_mlp()
    with pytest.raises(ValueError, match=r"shape \(48,\): `rank` applies to 2-D weights only"):
        GaLoreAdamW([{"params": [model[0].bias], "rank": 4}])


def test_group_defaults_follow_the_paper():
    model = tiny_mlp()
    opt = GaLoreAdamW([{"params": [model[0].weight], "rank": 4}])
    group = opt.param_groups[0]
    assert (group["update_proj_gap"], group["scale"], group["proj_type"]) == (200, 0.25, "std")


def test_galore_params_split_the_callers_groups():
    model = tiny_mlp()
    groups = [
        {"params": [model[0].weight, model[0].bias], "weight_decay": 0.1},
        {"params": [model[2].weight, model[2].bias], "weight_decay": 0.0},
    ]
    config = GaLoreConfig(rank=4, update_proj_gap=10, scale=0.5)
    opt = GaLoreAdamW(groups, lr=1e-2, galore_params=[model[0].weight, model[2].weight], galore_config=config)
    layout = [([tuple(p.shape) for p in g["params"]], g["weight_decay"], g.get("rank")) for g in opt.param_groups]
    assert layout == [([(48,)], 0.1, None), ([(48, 16)], 0.1, 4), ([(8,)], 0.0, None), ([(8, 48)], 0.0, 4)]
    with pytest.raises(ValueError, match="1 of 1 tensors are not among the optimizer's params"):
        GaLoreAdamW([model[0].bias], galore_params=[model[0].weight])
    with pytest.raises(ValueError, match="galore_config without galore_params"):
        GaLoreAdamW(model.parameters(), galore_config=config)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_layerwise_equals_whole_model_step_with_accumulation(name):
    """Hooks update each weight once its accumulated gradient is complete; the result is the ordinary step."""
    make = OPTIMIZERS[name]
    data = batches(12)
    whole, layerwise = tiny_mlp(), tiny_mlp()
    opt_whole = make(galore_groups(whole))
    boundary = {"now": False}
    opt_layer = make(galore_groups(layerwise), layerwise=True, should_step=lambda: boundary["now"])
    for start in range(0, 12, 3):  # 3 micro-batches per step
        for model, opt in ((whole, opt_whole), (layerwise, opt_layer)):
            for offset, (x, y) in enumerate(data[start : start + 3]):
                boundary["now"] = offset == 2
                torch.nn.functional.mse_loss(model(x), y).div(3).backward()
            if opt is opt_whole:
                norm = torch.sqrt(sum(p.grad.square().sum() for p in model.parameters()))
            opt.step()
            opt.zero_grad()
        assert all(p.grad is None for p in layerwise.parameters())
        assert opt_layer.last_grad_norm == pytest.approx(float(norm), rel=1e-5)
    for p, q in zip(whole.parameters(), layerwise.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)


def test_layerwise_hooks_follow_param_groups_replaced_by_load_state_dict():
    model = tiny_mlp()
    opt = GaLoreAdamW(galore_groups(model), lr=1e-2, layerwise=True)
    opt.load_state_dict(opt.state_dict())  # as accelerate's prepare does: new group dicts
    for group in opt.param_groups:
        group["lr"] = 0.0  # a scheduler writing the new dicts
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batches(1)[0]
    torch.nn.functional.mse_loss(model(x), y).backward()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_refresh_clock_overrides_each_tensors_own_count():
    model = tiny_mlp()
    opt = GaLoreAdamW(galore_groups(model, update_proj_gap=4), lr=1e-2)
    train(model, opt, batches(1))
    opt.pop_refresh_stats()
    opt.set_refresh_clock(8)  # a global step on the refresh schedule, though each tensor has done 1 update
    train(model, opt, batches(1))
    assert opt.pop_refresh_stats().count == 2
    opt.set_refresh_clock(9)
    train(model, opt, batches(1))
    assert opt.pop_refresh_stats().count == 0


def _weight_with_fixed_gradient(direction):
    weight = torch.nn.Parameter(torch.zeros(direction.shape))
    return weight, lambda: setattr(weight, "grad", direction.clone())


def _count_refreshes(opt, set_grad, steps, change=None):
    counts = []
    for step in range(steps):
        if change is not None:
            change(step)
        set_grad()
        opt.step()
        counts.append(opt.pop_refresh_stats().count)
    return counts


def test_lazy_refresh_lengthens_the_interval_while_the_subspace_stays():
    torch.manual_seed(0)
    fixed = torch.randn(24, 4) @ torch.randn(4, 12)  # rank 4: the top-4 subspace never moves
    weight, set_grad = _weight_with_fixed_gradient(fixed)
    opt = GaLoreAdamW([{"params": [weight], "rank": 4, "update_proj_gap": 2, "lazy_threshold": 0.9}], lr=1e-3)
    counts = _count_refreshes(opt, set_grad, 30)
    refresh_steps = [i for i, c in enumerate(counts) if c]
    assert refresh_steps == [0, 2, 6, 14]  # intervals 2, 4, 8, then 16 (the cap, 8 × update_proj_gap)
    assert opt.state[weight][REFRESH_INTERVAL] == 16


def test_lazy_refresh_keeps_the_gap_when_the_subspace_moves():
    weight = torch.nn.Parameter(torch.zeros(24, 12))
    opt = GaLoreAdamW([{"params": [weight], "rank": 2, "update_proj_gap": 2, "lazy_threshold": 0.9}], lr=1e-3)
    gen = torch.Generator().manual_seed(0)

    def new_direction():
        weight.grad = torch.randn(24, 2, generator=gen) @ torch.randn(2, 12, generator=gen)

    counts = _count_refreshes(opt, new_direction, 12)
    assert [i for i, c in enumerate(counts) if c] == [0, 2, 4, 6, 8, 10]  # every T: a fresh random subspace


def test_stagger_spreads_refreshes_over_the_interval():
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8, bias=False) for _ in range(4)])
    opt = GaLoreAdamW([{"params": list(model.parameters()), "rank": 2, "update_proj_gap": 4, "stagger": True}])
    per_step = []
    for _ in range(13):
        model(torch.randn(2, 8)).sum().backward()
        opt.step()
        opt.zero_grad()
        per_step.append(opt.pop_refresh_stats().count)
    # step 0: every target needs a basis; then offsets 0, 1, 2, 3 spread them one per step
    assert per_step == [4, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    assert [opt.state[p][NEXT_REFRESH] for p in model.parameters()] == [16, 13, 14, 15]


REFRESH_POLICIES = {
    "exact": {"refresh_method": "exact"},
    "randomized": {"refresh_method": "randomized", "power_iters": 1, "oversample": 4},
    "lazy": {"refresh_method": "randomized", "lazy_threshold": 0.3},
    "staggered": {"refresh_method": "exact", "stagger": True},
}


@pytest.mark.parametrize("policy", REFRESH_POLICIES)
def test_checkpoint_resumes_identically_under_each_refresh_policy(policy):
    options = {**REFRESH_POLICIES[policy], "update_proj_gap": 3}
    data = batches(20)
    model_full = tiny_mlp()
    losses_full = train(model_full, GaLoreAdamW(galore_groups(model_full, **options), lr=1e-2), data)
    model = tiny_mlp()
    opt = GaLoreAdamW(galore_groups(model, **options), lr=1e-2)
    losses = train(model, opt, data[:8])
    make = lambda m: GaLoreAdamW(galore_groups(m, **options), lr=1e-2)  # noqa: E731
    resumed, resumed_opt = resume_through_weights_only_checkpoint(model, opt, make)
    losses += train(resumed, resumed_opt, data[8:])
    assert losses == losses_full


def test_galore_config_may_be_a_dict_and_bad_ones_are_named():
    model = tiny_mlp()
    weights = [model[0].weight, model[2].weight]
    opt = GaLoreAdamW(model.parameters(), galore_params=weights, galore_config={"rank": 2, "scale": 1.0})
    assert {(g["rank"], g["scale"]) for g in opt.param_groups if g.get("rank")} == {(2, 1.0)}
    with pytest.raises(ValueError, match=r"Invalid galore_config key\(s\) 'rnak'. Valid keys: rank, update_proj_gap"):
        GaLoreAdamW(model.parameters(), galore_params=weights, galore_config={"rnak": 2})
    with pytest.raises(TypeError, match=r"Invalid galore_config=4: must be a GaLoreConfig, a dict of its fields"):
        GaLoreAdamW(model.parameters(), galore_params=weights, galore_config=4)


@pytest.mark.parametrize("selection", ["empty-list", "consumed-generator"])
def test_galore_params_that_select_nothing_raise(selection):
    model = tiny_mlp()
    params = model.parameters()
    galore_params = [] if selection == "empty-list" else params  # the generator is consumed as `params` first
    with pytest.raises(ValueError, match=r"Invalid galore_params: it holds no tensors"):
        GaLoreAdamW(params if selection == "consumed-generator" else list(params), galore_params=galore_params)


def test_should_step_must_be_callable():
    with pytest.raises(TypeError, match=r"Invalid should_step=True: must be a callable"):
        GaLoreAdamW(galore_groups(tiny_mlp()), layerwise=True, should_step=True)


def test_a_parameter_on_the_meta_device_is_named_at_the_first_step():
    with torch.device("meta"):
        model = tiny_mlp()
    opt = GaLoreAdamW(galore_groups(model), param_names={p: n for n, p in model.named_parameters()})
    model[0].weight.grad = torch.zeros_like(model[0].weight)
    with pytest.raises(RuntimeError, match=r"cannot update 0\.weight: it is on the meta device"):
        opt.step()


def test_an_unknown_verbosity_warns_and_keeps_the_default(monkeypatch):
    import logging

    from hf_galore.log import configure_library_logger

    logger = logging.getLogger("hf_galore")
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "level", logger.level)
    monkeypatch.setenv("HF_GALORE_VERBOSITY", "loud")
    with pytest.warns(UserWarning, match=r"Invalid HF_GALORE_VERBOSITY='loud': must be one of debug, info, warning"):
        configure_library_logger()
    assert logger.level == logging.INFO and len(logger.handlers) == 1
