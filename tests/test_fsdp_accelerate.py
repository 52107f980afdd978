"""The Trainer's FSDP2 sequence on CPU: the optimizer is built first (by transformers' handler), then accelerate's
`_prepare_fsdp2` swaps every group's parameters for the sharded ones. accelerate never shards on CPU by itself
(it reports DistributedType.NO), so the plugin is set by hand, as the Trainer's accelerator would hold it on GPUs.
Tolerance as in tests/test_fsdp.py.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import LLAMA_VOCAB, tiny_llama
from ranks import WORLD, run_on_ranks
from transformers import Trainer, TrainerState, TrainingArguments

from hf_galore.callback import GaLoreCallback
from hf_galore.sharding import local_tensor

STEPS, MICRO = 4, 2


def _args(optim: str) -> TrainingArguments:
    return TrainingArguments(
        output_dir="unused",
        optim=optim,
        optim_target_modules="attn,mlp",
        optim_args="rank=4,update_proj_gap=2,scale=0.5,refresh_method=exact",
        learning_rate=1e-2,
        weight_decay=0.01,
        use_cpu=True,
        report_to="none",
    )


def _tokens() -> torch.Tensor:
    return torch.randint(0, LLAMA_VOCAB, (STEPS, MICRO, WORLD, 8), generator=torch.Generator().manual_seed(0))


def _build(args: TrainingArguments):
    model = tiny_llama()
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    return model, cls(model.parameters(), **kwargs)


def _accelerate_run(rank: int, optim: str) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin

    # accelerate reads these; the process group itself is already up (gloo, started by run_on_ranks)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    args = _args(optim)  # sets up accelerate's process state, as the Trainer's arguments do
    accelerator = Accelerator(cpu=True)
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["LlamaDecoderLayer"]
    )
    model, optimizer = _build(args)  # as the Trainer: the accelerator exists, the optimizer is built before sharding
    galore = optimizer
    model, optimizer = accelerator._prepare_fsdp2(model, optimizer)
    GaLoreCallback().on_train_begin(args, TrainerState(), None, optimizer=optimizer)  # as in the Trainer
    boundary, freed = {"now": True}, []
    galore._should_step = lambda: boundary["now"]
    for step_tokens in _tokens():
        for micro, tokens in enumerate(step_tokens):
            boundary["now"] = micro == MICRO - 1
            model.set_requires_gradient_sync(boundary["now"])
            ids = tokens[rank : rank + 1]
            (model(input_ids=ids, labels=ids).loss / MICRO).backward()
        freed.append(all(p.grad is None for p in model.parameters()))  # layer-wise: the hooks updated and freed
        optimizer.step()
        optimizer.zero_grad()
    hooked = galore.has_hooks
    GaLoreCallback().on_train_end(args, TrainerState(), None, optimizer=optimizer)
    return {
        "weights": {name: p.full_tensor() for name, p in model.named_parameters()},
        "sharded_state": all(
            isinstance(v, torch.distributed.tensor.DTensor)
            for state in galore.state.values()
            for k, v in state.items()
            if k in galore.inner.row_wise_state
        ),
        "hooked": hooked,
        "freed": freed,
        "state_entries": len(galore.state),
        "local_rows": {name: local_tensor(p).shape[0] for name, p in model.named_parameters()},
    }


@pytest.mark.parametrize(
    "optim", ["galore_adamw", "galore_adamw_layerwise", "galore_adafactor", "apollo_adamw", "apollo_adamw_layerwise"]
)
def test_the_trainers_fsdp2_sequence_equals_one_process(tmp_path, optim):
    results = run_on_ranks(tmp_path, _accelerate_run, optim)
    reference, optimizer = _build(_args(optim.removesuffix("_layerwise")))
    for group in optimizer.param_groups:  # sharded weights are projected from the right
        if group.get("rank"):
            group["proj_type"] = "right"
    for step_tokens in _tokens():
        for tokens in step_tokens:
            ids = tokens.reshape(WORLD, -1)  # each rank's row: the same global batch, mean over ranks
            (reference(input_ids=ids, labels=ids).loss / MICRO).backward()
        optimizer.step()
        optimizer.zero_grad()
    for result in results:
        layerwise = optim.endswith("_layerwise")
        assert result["sharded_state"] and result["hooked"] == layerwise and result["freed"] == [layerwise] * STEPS
        for name, param in reference.named_parameters():
            torch.testing.assert_close(result["weights"][name], param.detach(), atol=1e-4, rtol=0, msg=name)
    assert results[0]["state_entries"] == sum(1 for p in reference.parameters() if p.requires_grad)


# Odd sizes (vocabulary 127, MLP 63), so rank 0 holds one row more than rank 1: the rank the planner plans.
ODD_LLAMA = {"vocab_size": 127, "hidden_size": 32, "intermediate_size": 63, "num_hidden_layers": 2}
ODD_LLAMA.update(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
# optim -> optim_args; min_8bit_size=200 puts the 63x32 targets' projected moments (252 values whole, 128 on
# rank 0) on the 8-bit path by the whole tensor's size
PLANNED = {
    "galore_adamw": "rank=4,refresh_method=exact",
    "galore_adamw_8bit": "rank=4,min_8bit_size=200",
    "galore_adafactor": "rank=4",
    "apollo_adamw": "rank=4",
    "apollo_adamw_layerwise": "rank=1,scale_type=tensor",
    "adamw_torch": None,
}


def _state_after_one_step(rank: int, world: int) -> dict[str, int]:
    """Each optimizer of PLANNED, built as the Trainer builds it and sharded by accelerate's FSDP2 preparation, one
    step: the bytes its state holds on this rank."""
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_galore import optimizer_state_bytes

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    held = {}
    for optim, optim_args in PLANNED.items():
        args = TrainingArguments(
            output_dir="unused",
            optim=optim,
            optim_target_modules="attn,mlp" if optim_args else None,
            optim_args=optim_args,
            use_cpu=True,
            report_to="none",
        )
        accelerator = Accelerator(cpu=True)
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
        )
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**ODD_LLAMA))
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
        optimizer = cls(model.parameters(), **kwargs)
        inner = optimizer
        model, optimizer = accelerator._prepare_fsdp2(model, optimizer)
        ids = torch.randint(0, ODD_LLAMA["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(rank))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        held[optim] = optimizer_state_bytes(inner)
    return held


@pytest.mark.parametrize("world", [WORLD, pytest.param(4, marks=pytest.mark.slow)])  # 4 processes: ~30 s
def test_planned_fsdp_state_per_rank_equals_the_sharded_optimizers(tmp_path, world):
    """Byte for byte, the largest rank (rank 0: the extra rows, and a basis row more where W does not divide r)."""
    from transformers import LlamaConfig

    from hf_galore.estimate import estimate

    ranks = run_on_ranks(tmp_path, _state_after_one_step, world, world=world)
    LlamaConfig(**ODD_LLAMA).save_pretrained(tmp_path / "model")
    for optim, optim_args in PLANNED.items():
        plan = estimate(
            config=tmp_path / "model",
            optim=optim,
            optim_target_modules="attn,mlp" if optim_args else None,
            optim_args=optim_args,
            seq_len=16,
            fsdp=world,
        )
        assert ranks[0][optim] > ranks[-1][optim], optim  # rank 0 holds the extra rows
        assert plan.optimizer_state == ranks[0][optim], optim
