"""APOLLO and APOLLO-Mini (Zhu et al., 2025, arXiv 2412.05270) against a reference written here from the paper;
their state (plain ints for the projection, bytes = formula, safe loading), exact resume, and the errors."""

import io
import math

import pytest
import torch
from conftest import batches, resume_through_weights_only_checkpoint, tiny_mlp, train

from hf_galore import (
    ApolloAdamW,
    ApolloAdamW8bit,
    ApolloConfig,
    GaLoreAdamW,
    expected_state_bytes,
    optimizer_state_bytes,
)
from hf_galore.inner import AdamW8bitUpdate
from hf_galore.state_keys import LIMITER_NORM, PROJ_DRAW, PROJ_SEED, RIGHT_BASIS

LR, GAP, STEPS = 1e-2, 3, 8
TARGETS = (0, 2)  # the 48×16 weight (tall: projected from the right) and the 8×48 one (wide: from the left)


def apollo(model, **config):
    options = {"rank": 4, "update_proj_gap": GAP, **config}
    params = [model[i].weight for i in TARGETS]
    return ApolloAdamW(model.parameters(), lr=LR, weight_decay=0.1, galore_params=params, galore_config=options)


def paper_projection(shape, rank, seed, draw):
    """P with N(0, 1/r) entries, from the per-parameter seed and draw (hf_galore's convention for the seed): r×m
    for a wide weight (R = P·G), r×n for a tall one (R = G·Pᵀ)."""
    m, n = shape
    generator = torch.Generator().manual_seed(seed * 2**32 + draw)
    return torch.randn((rank, n) if m >= n else (m, rank), generator=generator).div_(math.sqrt(rank))


class PaperApollo:
    """Algorithm 1 of the paper for one weight: R = P·G (along the shorter side), Adam moments of R with the bias
    correction in the step size, s_j = ‖(M/(√V+ε))[:, j]‖ / ‖R[:, j]‖ (or one s for the tensor), W −= η·α·G·diag(s)
    after the norm-growth limiter (γ = 1.01), then decoupled weight decay (applied first, as the core does)."""

    def __init__(self, weight, rank, scale, scale_type, seed):
        self.weight, self.rank, self.scale, self.scale_type, self.seed = weight, rank, scale, scale_type, seed
        self.t, self.m, self.v, self.norm = 0, 0.0, 0.0, None

    def step(self, grad, lr, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8):
        wide = grad.shape[0] < grad.shape[1]
        p = paper_projection(grad.shape, self.rank, self.seed, self.t // GAP)
        low = p.T @ grad if wide else grad @ p.T
        self.t += 1
        self.m = betas[0] * self.m + (1 - betas[0]) * low
        self.v = betas[1] * self.v + (1 - betas[1]) * low * low
        step_size = lr * math.sqrt(1 - betas[1] ** self.t) / (1 - betas[0] ** self.t)
        raw = self.m / (self.v.sqrt() + eps)
        if self.scale_type == "tensor":
            scaled = grad * (raw.norm() / (low.norm() + 1e-8))
        elif wide:
            scaled = grad * (raw.norm(dim=0) / (low.norm(dim=0) + 1e-8))
        else:
            scaled = grad * (raw.norm(dim=1, keepdim=True) / (low.norm(dim=1, keepdim=True) + 1e-8))
        norm = scaled.norm()
        if self.norm is not None and norm > 1.01 * self.norm:
            scaled = scaled * (1.01 * self.norm / norm)
            norm = scaled.norm()
        self.norm = norm
        self.weight.mul_(1 - lr * weight_decay).sub_(scaled, alpha=self.scale * step_size)


@pytest.mark.parametrize(
    "config", [{}, {"rank": 1, "scale_type": "tensor", "scale": math.sqrt(128)}], ids=["apollo", "apollo-mini"]
)
def test_apollo_equals_the_paper_reference(config):
    """Same gradients into both (a warm-up schedule, so the limiter must see the raw ratio, not the lr); the
    projection is redrawn at steps 0, 3, 6 from the seed: the reference draws it from the seed and draw index."""
    model = tiny_mlp()
    optimizer = apollo(model, **config)
    rank, scale = config.get("rank", 4), config.get("scale", 1.0)
    copies = [model[i].weight.detach().clone() for i in TARGETS]
    references = [
        PaperApollo(copy, rank, scale, config.get("scale_type", "channel"), seed=2**20 + k)  # group 1, index k
        for k, copy in enumerate(copies)
    ]
    gen = torch.Generator().manual_seed(3)
    for step in range(STEPS):
        lr = LR * (step + 1) / STEPS
        for group in optimizer.param_groups:
            group["lr"] = lr
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        for reference, i in zip(references, TARGETS):
            reference.step(model[i].weight.grad, lr)
        optimizer.step()
    for copy, i in zip(copies, TARGETS):
        torch.testing.assert_close(model[i].weight.detach(), copy, atol=2e-6, rtol=1e-5)
        assert optimizer.state[model[i].weight][PROJ_DRAW] == (STEPS - 1) // GAP
    assert not torch.equal(model[0].weight, tiny_mlp()[0].weight)


def test_the_projection_is_gaussian_redrawn_every_gap_and_leaves_the_global_rng_alone():
    from hf_galore.family import random_bases

    like = torch.empty(0)
    _, p = random_bases((512, 256), 64, "std", seed=5, draw=0, like=like)
    assert p.shape == (64, 256) and abs(p.var().item() - 1 / 64) < 0.05 / 64 and abs(p.mean().item()) < 2e-3
    _, again = random_bases((512, 256), 64, "std", seed=5, draw=0, like=like)
    _, next_draw = random_bases((512, 256), 64, "std", seed=5, draw=1, like=like)
    left, _ = random_bases((256, 512), 64, "std", seed=5, draw=0, like=like)
    assert torch.equal(p, again) and not torch.equal(p, next_draw) and left.shape == (256, 64)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    model = tiny_mlp()
    torch.manual_seed(0)
    train(model, apollo(model), batches(4))
    assert torch.equal(torch.rand(3), expected)


def test_state_is_moments_a_scalar_and_plain_ints_and_loads_safely():
    model = tiny_mlp()
    optimizer = apollo(model)
    train(model, optimizer, batches(4))
    state = optimizer.state[model[0].weight]
    assert isinstance(state[PROJ_SEED], int) and isinstance(state[PROJ_DRAW], int) and state[PROJ_DRAW] == 1
    assert RIGHT_BASIS not in state and state[LIMITER_NORM].shape == ()
    for i, (m, n) in zip(TARGETS, ((48, 16), (8, 48))):  # 2·r·max(m, n) float32 moments + the limiter's float
        tensors = sum(
            v.numel() * v.element_size() for v in optimizer.state[model[i].weight].values() if torch.is_tensor(v)
        )
        assert tensors == 4 * (2 * 4 * max(m, n) + 1)
        assert tensors == expected_state_bytes((m, n), form="adamw", rank=4, stored_basis=False, limiter=True)
    mini = tiny_mlp()
    mini_optimizer = apollo(mini, rank=1, scale_type="tensor")
    train(mini, mini_optimizer, batches(2))
    assert optimizer_state_bytes(mini_optimizer) < optimizer_state_bytes(optimizer)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["state"][2][PROJ_DRAW] == 1  # the biases' group comes first


@pytest.mark.parametrize("proj", ["random", "svd"])
def test_resume_mid_interval_is_bit_identical(proj):
    """Saved after 5 steps (the draw of step 3 in use, the next at 6), loaded safely into a new optimizer."""
    data = batches(9)
    whole = tiny_mlp()
    train(whole, apollo(whole, proj=proj), data)
    first = tiny_mlp()
    optimizer = apollo(first, proj=proj)
    train(first, optimizer, data[:5])
    resumed, continued = resume_through_weights_only_checkpoint(first, optimizer, lambda m: apollo(m, proj=proj))
    train(resumed, continued, data[5:])
    for p, q in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"proj": "svd"}, r"Cannot resume with proj='svd': the checkpoint was saved with proj='random'"),
        ({"rank": 2}, r"Cannot resume with rank=2: the checkpoint was saved with rank=4"),
    ],
)
def test_resume_with_a_changed_layout_raises(change, message):
    model = tiny_mlp()
    optimizer = apollo(model)
    train(model, optimizer, batches(2))
    with pytest.raises(ValueError, match=message):
        apollo(model, **change).load_state_dict(optimizer.state_dict())


def test_a_galore_checkpoint_is_refused_by_apollo():
    model = tiny_mlp()
    optimizer = GaLoreAdamW(
        model.parameters(), galore_params=[model[i].weight for i in TARGETS], galore_config={"rank": 4}
    )
    train(model, optimizer, batches(2))
    with pytest.raises(
        ValueError, match=r"has no proj in the checkpoint: it was saved by another optimizer of the low"
    ):
        apollo(model).load_state_dict(optimizer.state_dict())
    apollo_optimizer = apollo(model)
    train(model, apollo_optimizer, batches(1))
    with pytest.raises(ValueError, match=r"Cannot resume .*the checkpoint holds .*saved with a different --optim"):
        GaLoreAdamW(
            model.parameters(), galore_params=[model[i].weight for i in TARGETS], galore_config={"rank": 4}
        ).load_state_dict(apollo_optimizer.state_dict())


def test_svd_projection_falls_out_of_the_shared_projector():
    """proj='svd': GaLore's stored basis (the same refresh), APOLLO's scaled full gradient."""
    model = tiny_mlp()
    optimizer = apollo(model, proj="svd", refresh_method="exact")
    train(model, optimizer, batches(1))
    basis = optimizer.state[model[0].weight][RIGHT_BASIS]
    galore_model = tiny_mlp()
    galore = GaLoreAdamW(
        galore_model.parameters(), galore_params=[galore_model[i].weight for i in TARGETS],
        galore_config={"rank": 4, "refresh_method": "exact"},
    )  # fmt: skip
    train(galore_model, galore, batches(1))
    torch.testing.assert_close(basis, galore.state[galore_model[0].weight][RIGHT_BASIS])


@pytest.mark.parametrize(
    "options,message",
    [
        ({"residual": "fira"}, r"Invalid residual='fira' for APOLLO: its update is the whole gradient"),
        ({"proj_type": "full"}, r"Invalid proj_type='full' for APOLLO"),
        ({"proj": "gaussian"}, r"Invalid proj='gaussian'. Must be one of random, svd"),
        ({"scale_type": "row"}, r"Invalid scale_type='row'. Must be one of channel, tensor"),
        ({"lazy_threshold": 0.5}, r"Invalid lazy_threshold=0.5 with proj='random'"),
    ],
)
def test_invalid_apollo_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        ApolloConfig(**options)


def test_defaults_are_transformers_apollo_defaults_and_configs_do_not_mix():
    config = ApolloConfig()
    assert (config.rank, config.proj, config.scale_type, config.update_proj_gap, config.scale, config.proj_type) == (
        128, "random", "channel", 200, 1.0, "std"
    )  # fmt: skip
    model = tiny_mlp()
    from hf_galore import GaLoreConfig

    with pytest.raises(TypeError, match=r"galore_config of type GaLoreConfig for this optimizer: it takes a Apollo"):
        ApolloAdamW(model.parameters(), galore_params=[model[0].weight], galore_config=GaLoreConfig(rank=4))


def test_a_non_finite_gradient_leaves_weights_moments_and_draw_untouched():
    model = tiny_mlp()
    optimizer = apollo(model)
    train(model, optimizer, batches(3))  # the next step draws a new projection
    weight = model[0].weight
    before = {k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state[weight].items()}
    kept = weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    weight.grad[0, 0] = float("nan")
    with pytest.warns(UserWarning, match=r"skipped the update of 0.weight|skipped the update of a parameter shaped"):
        optimizer.step()
    assert torch.equal(weight, kept)
    for key, value in optimizer.state[weight].items():
        assert torch.equal(value, before[key]) if torch.is_tensor(value) else value == before[key], key


def test_8bit_moments_below_min_size_are_the_fp32_form_and_above_it_uint8_at_the_formula():
    """bitsandbytes' kernels as the inner rule: with 32-bit states (min_8bit_size above every tensor)
    ApolloAdamW8bit is ApolloAdamW; with 8-bit ones the moments are uint8 plus block constants, as
    `expected_state_bytes` counts."""
    data = batches(STEPS)
    params = {"lr": LR, "weight_decay": 0.1}
    options = {"galore_config": {"rank": 4, "update_proj_gap": GAP}}
    models = [tiny_mlp() for _ in range(3)]
    wide = ApolloAdamW8bit(
        models[0].parameters(), min_8bit_size=10**9, galore_params=[models[0][0].weight], **params, **options
    )
    plain = ApolloAdamW(models[1].parameters(), galore_params=[models[1][0].weight], **params, **options)
    eight = ApolloAdamW8bit(
        models[2].parameters(), min_8bit_size=64, galore_params=[models[2][0].weight], **params, **options
    )
    losses = [train(model, optimizer, data) for model, optimizer in zip(models, (wide, plain, eight))]
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=0)
    state = eight.state[models[2][0].weight]
    assert state["exp_avg"].dtype == torch.uint8 and state["exp_avg"].shape == (48, 4)
    held = sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    rule = AdamW8bitUpdate(min_8bit_size=64)
    assert held == expected_state_bytes((48, 16), form=rule, rank=4, stored_basis=False, limiter=True)
    torch.testing.assert_close(losses[2], losses[1], rtol=2e-2, atol=0)
