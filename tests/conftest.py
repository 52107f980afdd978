"""Shared tiny models and a deterministic training loop for optimizer tests."""

import io
import logging
import sys
import warnings
from pathlib import Path

import pytest
import torch

from hf_galore import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit

# Benchmark scripts import their shared helpers as `common`, as they do when run from benchmarks/.
sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))

IN, HIDDEN, OUT = 16, 48, 8  # first weight 48×16 (tall), second 8×48 (wide)
LLAMA_VOCAB = 128


def tiny_mlp(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, OUT))


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    """A random-init LLaMA small enough for CPU tests: 2 layers, hidden 32, MLP 64, 4 heads, vocabulary 128.

    Its 14 attention and MLP weights are 32x32 (q, k, v, o) and 64x32 / 32x64 (gate, up, down).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=LLAMA_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    return LlamaForCausalLM(config)


@pytest.fixture(name="tiny_llama")
def tiny_llama_fixture() -> torch.nn.Module:
    """`tiny_llama()` as a fixture: a fresh model per test."""
    return tiny_llama()


def galore_groups(model: torch.nn.Sequential, **galore) -> list[dict]:
    """Weights in a GaLore group, biases in a plain one (the usual split)."""
    options = {"rank": 4, "update_proj_gap": 10, "scale": 0.5, "proj_type": "std", **galore}
    return [
        {"params": [model[0].weight, model[2].weight], **options},
        {"params": [model[0].bias, model[2].bias]},
    ]


def batches(steps: int, seed: int = 1):
    """Inputs with targets from a fixed random teacher, so there is something to learn."""
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(IN, OUT, generator=torch.Generator().manual_seed(99))
    inputs = [torch.randn(32, IN, generator=gen) for _ in range(steps)]
    return [(x, torch.tanh(x @ teacher)) for x in inputs]


def train(model, optimizer, data) -> list[float]:
    losses = []
    for x, y in data:
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


ADAFACTOR_FIXED_LR = {"lr": 1e-2, "scale_parameter": False, "relative_step": False, "weight_decay": 0.0}

# The three inner forms on the tiny MLP, each with state small enough to exercise its 8-bit / factored paths.
OPTIMIZERS = {
    "adamw": lambda groups, **kw: GaLoreAdamW(groups, lr=1e-2, **kw),
    "adamw8bit": lambda groups, **kw: GaLoreAdamW8bit(groups, lr=1e-2, min_8bit_size=128, **kw),
    "adafactor": lambda groups, **kw: GaLoreAdafactor(groups, **{**ADAFACTOR_FIXED_LR, "beta1": 0.9}, **kw),
}


@pytest.fixture(autouse=True)
def _quiet_reference_warnings():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def galore_log():
    """Every record the `hf_galore` logger emits during the test, read from a handler of our own.

    Independent of pytest's capture internals (pytest 9.2 attaches its handler differently), and of propagation.
    """
    logger = logging.getLogger("hf_galore")
    handler, level = _Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def resume_through_weights_only_checkpoint(model, optimizer, make_optimizer):
    """Save model + optimizer, load with weights_only=True into a freshly built (differently seeded) pair."""
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model = tiny_mlp(seed=123)
    resumed_model.load_state_dict(saved["model"])
    resumed_optimizer = make_optimizer(resumed_model)
    resumed_optimizer.load_state_dict(saved["optimizer"])
    return resumed_model, resumed_optimizer
