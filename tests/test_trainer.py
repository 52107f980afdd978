"""Trainer integration: the six optim names, settings forwarded, memory figures, exact resume, layer-wise."""

import math
import types

import pytest
import torch
from conftest import LLAMA_VOCAB, tiny_llama
from transformers import Trainer, TrainingArguments

import hf_galore
from hf_galore import ApolloAdamW, GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit, expected_state_bytes
from hf_galore.callback import GaLoreCallback
from hf_galore.trainer_factory import GALORE_OPTIMIZERS, check_supported, fsdp_version

VOCAB = LLAMA_VOCAB


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, count=64, length=16):
        self.tokens = torch.randint(0, VOCAB, (count, length), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, index):
        return {"input_ids": self.tokens[index], "labels": self.tokens[index]}


class NotebookTrainer(Trainer):
    """A Trainer subclass as people write them in notebooks."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def make_args(tmp_path, optim="galore_adamw", **overrides):
    options = {
        "output_dir": str(tmp_path),
        "optim": optim,
        "optim_target_modules": "attn,mlp",
        "optim_args": "rank=4,update_proj_gap=4,scale=0.5",
        "learning_rate": 1e-2,
        "per_device_train_batch_size": 4,
        "max_steps": 6,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
        "data_seed": 0,
    }
    return TrainingArguments(**{**options, **overrides})


def train(tmp_path, optim="galore_adamw", trainer_cls=Trainer, resume=None, **overrides):
    trainer = trainer_cls(
        model=tiny_llama(), args=make_args(tmp_path, optim, **overrides), train_dataset=RandomTokens()
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def losses(trainer):
    return [(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("optim", list(GALORE_OPTIMIZERS))
def test_notebook_trainer_subclass_trains_with_each_name(optim, tmp_path):
    trainer = train(tmp_path, optim, trainer_cls=NotebookTrainer, max_grad_norm=0.0)
    optimizer = trainer.optimizer.optimizer
    cls, _, layerwise = GALORE_OPTIMIZERS[optim]
    assert type(optimizer) is cls and optimizer.layerwise is layerwise
    logged = losses(trainer)
    assert len(logged) == 6 and all(math.isfinite(loss) for _, loss in logged)
    galore_groups = [g for g in optimizer.param_groups if g.get("rank")]
    assert sum(len(g["params"]) for g in galore_groups) == 14  # 2 layers × (4 attention + 3 MLP)
    assert all(g["rank"] == 4 and g["update_proj_gap"] == 4 and g["scale"] == 0.5 for g in galore_groups)
    assert any(isinstance(c, GaLoreCallback) for c in trainer.callback_handler.callbacks)
    if layerwise:  # the real norm, not the 0 the built-in layer-wise path logs
        assert all(entry["grad_norm"] > 0 for entry in trainer.state.log_history if "loss" in entry)


def test_training_arguments_reach_the_param_groups(tmp_path):
    args = {"weight_decay": 0.05, "adam_beta1": 0.8, "adam_beta2": 0.95, "adam_epsilon": 1e-6, "max_steps": 1}
    trainer = train(tmp_path, "galore_adamw_8bit", **args)
    optimizer = trainer.optimizer.optimizer
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    for group in optimizer.param_groups:
        assert group["betas"] == (0.8, 0.95) and group["eps"] == 1e-6 and group["lr"] >= 0
        for param in group["params"]:
            excluded = "norm" in names[id(param)] or "bias" in names[id(param)]
            assert group["weight_decay"] == (0.0 if excluded else 0.05), names[id(param)]
    assert {g["weight_decay"] for g in optimizer.param_groups if g.get("rank")} == {0.05}


def test_adafactor_gets_a_fixed_scheduled_lr(tmp_path):
    trainer = train(tmp_path, "galore_adafactor", max_steps=1)
    group = trainer.optimizer.optimizer.param_groups[0]
    assert group["relative_step"] is False and group["scale_parameter"] is False


@pytest.mark.parametrize("optim", ["galore_adamw", "apollo_adamw"])
def test_memory_figures_in_log_history_equal_the_analytic_count(tmp_path, optim):
    trainer = train(tmp_path, optim, max_steps=2)
    optimizer = trainer.optimizer.optimizer
    member = {"stored_basis": False, "limiter": True} if optim == "apollo_adamw" else {}  # APOLLO: P regenerated
    expected = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            options = member if "rank" in group else {}
            expected += expected_state_bytes(tuple(p.shape), form="adamw", rank=group.get("rank"), **options)
    entry = next(e for e in trainer.state.log_history if "loss" in e)
    assert entry["galore/optimizer_state_mb"] == pytest.approx(expected / 2**20, rel=1e-12)
    adamw = sum(2 * 4 * p.numel() for p in trainer.model.parameters())
    assert entry["galore/adamw_equivalent_mb"] == pytest.approx(adamw / 2**20, rel=1e-12)
    assert entry["galore/state_saving_pct"] == pytest.approx(100 * (1 - expected / adamw))
    assert entry["galore/peak_memory_mb"] > 0 and entry["galore/refresh_seconds"] > 0  # step 0 refreshes (draws)


@pytest.mark.parametrize(
    "optim", ["galore_adamw", "galore_adamw_8bit", "galore_adamw_layerwise", "apollo_adamw", "apollo_adamw_layerwise"]
)
def test_resume_mid_interval_reproduces_the_uninterrupted_run(optim, tmp_path):
    # update_proj_gap=4: refreshes at global steps 0, 4, 8; the checkpoint at step 6 is mid-interval.
    common = {"max_steps": 10, "save_strategy": "steps", "save_steps": 6, "max_grad_norm": 0.0}
    full = train(tmp_path / "full", optim, **common)
    resumed = train(tmp_path / "full", optim, resume=str(tmp_path / "full" / "checkpoint-6"), **common)
    assert losses(resumed)[-4:] == losses(full)[-4:]
    assert [s for s, _ in losses(resumed)] == list(range(1, 11))
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("optim", ["galore_adamw", "apollo_adamw"])
def test_layerwise_with_accumulation_matches_the_whole_model_form(tmp_path, optim):
    common = {"gradient_accumulation_steps": 4, "per_device_train_batch_size": 2, "max_steps": 5, "max_grad_norm": 0.0}
    whole = train(tmp_path / "whole", optim, **common)
    layerwise = train(tmp_path / "layerwise", f"{optim}_layerwise", **common)
    # Same arithmetic in a different order of parameters: per-parameter updates are independent, so the
    # weights agree to float32 rounding (the gradient sums are identical; only loss logging differs).
    for p, q in zip(whole.model.parameters(), layerwise.model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    # grad_norm logged by the layer-wise run is the real one, the same the whole-model run computes
    whole_norms = [e["grad_norm"] for e in whole.state.log_history if "loss" in e]
    layer_norms = [e["grad_norm"] for e in layerwise.state.log_history if "loss" in e]
    assert layer_norms == pytest.approx(whole_norms, rel=1e-4)
    lrs = [e["learning_rate"] for e in layerwise.state.log_history if "loss" in e]
    assert lrs == [e["learning_rate"] for e in whole.state.log_history if "loss" in e]


def test_layerwise_warns_that_max_grad_norm_cannot_clip(tmp_path):
    with pytest.warns(UserWarning, match="max_grad_norm=1.0 cannot clip"):
        train(tmp_path, "galore_adamw_layerwise", max_steps=1)


@pytest.mark.parametrize(
    "overrides,error,message",
    [
        ({"optim_args": "rank=4,color=blue"}, ValueError, r"Unknown optim_args key\(s\) 'color'. Valid keys: rank"),
        ({"optim_args": "rank=abc"}, ValueError, r"Invalid optim_args rank='abc'. Must be an int"),
        ({"optim_args": "rank=0"}, ValueError, r"Invalid rank=0"),
        ({"optim_args": "min_8bit_size=10"}, ValueError, r"Unknown optim_args key\(s\) 'min_8bit_size'"),
        ({"optim_target_modules": ""}, ValueError, r"Invalid optim_target_modules=''"),
        ({"optim_target_modules": "(q"}, ValueError, r"does not compile"),
        ({"optim_target_modules": "embed_tokens"}, ValueError, r"matched only non-linear modules"),
        ({"optim_target_modules": "norm"}, ValueError, r"matched only non-linear modules"),
    ],
    ids=["unknown-key", "non-numeric-rank", "rank-0", "8bit-key-on-adamw", "empty", "bad-regex", "embeddings", "1-d"],
)
def test_bad_inputs_raise_clear_errors(overrides, error, message, tmp_path):
    with pytest.raises(error, match=message):
        train(tmp_path, "galore_adamw", max_steps=1, **overrides)


DISTRIBUTED = types.SimpleNamespace(value="distributed")


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"deepspeed": "ds_config.json"}, r"cannot run under DeepSpeed: ZeRO stages 1-3 hand the optimizer flat"),
        (
            {"fsdp": [1], "fsdp_config": {"version": 1}},
            r"cannot run on FSDP version 1: FSDP1 hands the optimizer flat parameters .* Use FSDP2",
        ),
        ({"parallel_mode": DISTRIBUTED}, r"does not support DDP: a layer-wise update would run before DDP averages"),
        ({"fp16": True}, "cannot run with --fp16"),
    ],
    ids=["deepspeed", "fsdp1", "layerwise+ddp", "layerwise+fp16"],
)
def test_unsupported_combinations_raise(settings, message):
    args = {"fsdp": [], "fsdp_config": {}, "deepspeed": None, "fp16": False, "max_grad_norm": 0.0}
    args["parallel_mode"] = types.SimpleNamespace(value="not_distributed")
    with pytest.raises((NotImplementedError, ValueError), match=message):
        check_supported(types.SimpleNamespace(**{**args, **settings}), "galore_adamw_layerwise", layerwise=True)


@pytest.mark.parametrize("layerwise", [False, True])
def test_fsdp2_is_accepted_for_every_form_layerwise_included(layerwise):
    args = {"fsdp": [1], "fsdp_config": {"version": 2}, "deepspeed": None, "fp16": False, "max_grad_norm": 0.0}
    check_supported(types.SimpleNamespace(**args, parallel_mode=DISTRIBUTED), "galore_adamw", layerwise=layerwise)
    assert fsdp_version(types.SimpleNamespace(fsdp=[1], fsdp_config={})) == 2  # transformers' default version


# The names transformers' argument parser accepts, and what each must build: the spec, written independently of
# hf_galore's own table.
EXPECTED_BUILDS = {
    "galore_adamw": (GaLoreAdamW, False),
    "galore_adamw_8bit": (GaLoreAdamW8bit, False),
    "galore_adafactor": (GaLoreAdafactor, False),
    "galore_adamw_layerwise": (GaLoreAdamW, True),
    "galore_adamw_8bit_layerwise": (GaLoreAdamW8bit, True),
    "galore_adafactor_layerwise": (GaLoreAdafactor, True),
    "apollo_adamw": (ApolloAdamW, False),
    "apollo_adamw_layerwise": (ApolloAdamW, True),
}


@pytest.mark.parametrize("optim", list(EXPECTED_BUILDS))
def test_registration_is_idempotent_and_transformers_builds_ours_for_every_name(optim):
    hf_galore.register()
    hf_galore.register()
    assert hf_galore.integration.is_registered()
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(make_args("unused", optim), tiny_llama())
    assert (cls, kwargs["layerwise"]) == EXPECTED_BUILDS[optim]
    assert "params" not in kwargs and kwargs["galore_config"].rank == 4
    assert len(kwargs["galore_params"]) == 14 and kwargs["param_names"][kwargs["galore_params"][0]].endswith(
        "q_proj.weight"
    )


@pytest.mark.parametrize(
    "optim_args,message",
    [
        ("rank=4,", r"Invalid optim_args entry '' in 'rank=4,' \(a trailing or doubled comma\?\)"),
        ("rank=4,scale", r"Invalid optim_args entry 'scale' in 'rank=4,scale'"),
        ("rank=4,rank=8", r"rank is given twice \('4' and '8'\)"),
    ],
    ids=["trailing-comma", "no-value", "duplicate"],
)
def test_malformed_optim_args_name_the_entry(optim_args, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        train(tmp_path, "galore_adamw", max_steps=1, optim_args=optim_args)


def test_layerwise_hooks_end_with_training_and_a_second_trainer_trains(tmp_path):
    first = train(tmp_path / "first", "galore_adamw_layerwise", max_steps=2, max_grad_norm=0.0)
    model = first.model
    before = [p.detach().clone() for p in model.parameters()]
    batch = RandomTokens()[0]
    model(input_ids=batch["input_ids"][None], labels=batch["labels"][None]).loss.backward()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # no update after training ended
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.zero_grad()
    second = Trainer(
        model=model, args=make_args(tmp_path / "second", "galore_adamw", max_steps=2), train_dataset=RandomTokens()
    )
    second.train()
    assert len(second.optimizer.optimizer.state) == sum(1 for p in model.parameters() if p.requires_grad)
    assert not any(torch.equal(p, b) for p, b in zip(model.parameters(), before) if p.dim() == 2)
    first.train()  # training the first Trainer again takes its hooks back
    assert first.optimizer.optimizer.has_hooks is False  # ... and drops them at the end again
    assert losses(first)[-1][0] == 2


class NaNAtStep3(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return loss * float("nan") if self.state.global_step == 2 else loss


def test_non_finite_gradients_are_skipped_and_counted_in_the_logs(tmp_path):
    with pytest.warns(
        UserWarning, match=r"skipped the update of model\.embed_tokens\.weight, .* and \d+ more"
    ) as seen:
        trainer = train(tmp_path, "galore_adamw", trainer_cls=NaNAtStep3, max_steps=4, max_grad_norm=0.0)
    assert sum("skipped the update" in str(w.message) for w in seen) == 1  # one warning for the step
    counts = [e["galore/skipped_updates"] for e in trainer.state.log_history if "loss" in e]
    trainable = sum(1 for p in trainer.model.parameters() if p.requires_grad)
    assert counts == [0, 0, trainable, 0]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_resume_with_a_new_rank_raises_before_training_and_a_new_scale_is_taken(tmp_path, galore_log):
    common = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2, "max_grad_norm": 0.0}
    train(tmp_path, "galore_adamw", **common)
    checkpoint = str(tmp_path / "checkpoint-2")
    with pytest.raises(ValueError, match=r"Cannot resume with rank=8: the checkpoint was saved with rank=4"):
        train(tmp_path, "galore_adamw", resume=checkpoint, **{**common, "optim_args": "rank=8,update_proj_gap=4"})
    with pytest.raises(ValueError, match=r"different --optim"):
        train(tmp_path, "galore_adafactor", resume=checkpoint, **common)
    resumed = train(tmp_path, "galore_adamw", resume=checkpoint, **{**common, "optim_args": "rank=4,scale=2"})
    assert {g["scale"] for g in resumed.optimizer.optimizer.param_groups if g.get("rank")} == {2.0}
    assert any("scale 0.5 -> 2.0" in r.getMessage() for r in galore_log)


def test_a_truncated_optimizer_checkpoint_is_named_before_anything_loads(tmp_path):
    common = {"max_steps": 2, "save_strategy": "steps", "save_steps": 2, "max_grad_norm": 0.0}
    train(tmp_path, "galore_adamw", **common)
    path = tmp_path / "checkpoint-2" / "optimizer.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    trainer = Trainer(model=tiny_llama(seed=1), args=make_args(tmp_path, **common), train_dataset=RandomTokens())
    with pytest.raises(
        ValueError,
        match=r"optimizer\.pt is truncated \([\d,]+ bytes, its zip directory is missing\).* or set "
        r"HF_GALORE_FRESH_OPTIMIZER=1 to load its weights and start the optimizer afresh",
    ):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert all(torch.equal(p, q) for p, q in zip(trainer.model.parameters(), tiny_llama(seed=1).parameters()))


def test_peft_wrapped_model_trains_unfrozen_weights_and_never_the_adapters(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    for name, param in model.named_parameters():
        if ".mlp." in name and "lora" not in name:
            param.requires_grad_(True)  # train the MLP fully next to the attention adapters
    trainer = Trainer(model=model, args=make_args(tmp_path, "galore_adamw", max_steps=2), train_dataset=RandomTokens())
    trainer.train()
    optimizer = trainer.optimizer.optimizer
    names = {id(p): n for n, p in model.named_parameters()}
    galore = sorted(names[id(p)] for g in optimizer.param_groups if g.get("rank") for p in g["params"])
    assert len(galore) == 6 and all(".mlp." in n for n in galore)  # attn's base weights are frozen, adapters skipped
    plain = [names[id(p)] for g in optimizer.param_groups if not g.get("rank") for p in g["params"]]
    assert sum("lora_A" in n or "lora_B" in n for n in plain) == 8


def test_subclass_decay_rules_are_respected(tmp_path):
    class NoDecayTrainer(Trainer):
        def get_decay_parameter_names(self, model):
            return []

    trainer = train(tmp_path, "galore_adamw", trainer_cls=NoDecayTrainer, max_steps=1, weight_decay=0.3)
    assert {g["weight_decay"] for g in trainer.optimizer.optimizer.param_groups} == {0.0}


def test_training_again_with_the_same_trainer_keeps_the_refresh_cadence_and_a_fresh_summary(tmp_path, galore_log):
    # update_proj_gap=4, 6 steps: refreshes at 0 and 4, the next due 2 steps after the run ends
    trainer = train(tmp_path, "galore_adamw", max_steps=6, max_grad_norm=0.0)
    optimizer = trainer.optimizer.optimizer
    weight = next(p for g in optimizer.param_groups if g.get("rank") for p in g["params"])
    assert optimizer.state[weight]["next_refresh"] == 8
    trainer.train()  # transformers restarts global_step at 0 and keeps the optimizer
    assert optimizer.state[weight]["step"] == 12
    assert optimizer.state[weight]["next_refresh"] == 6  # refreshed at its global step 2 (8 - 6), next due at 6
    refreshes = [e["galore/refresh_seconds"] > 0 for e in trainer.state.log_history if "loss" in e]
    assert refreshes == [False, False, True, False, False, False]
    summaries = [r.getMessage() for r in galore_log if "basis refreshes took" in r.getMessage()]
    assert len(summaries) == 2 and "; 14 basis refreshes" in summaries[-1]  # this call's refreshes only


def test_apollo_names_take_transformers_keys_and_defaults_without_apollo_torch(tmp_path):
    """transformers' own `apollo_adamw` keys (rank, proj, scale_type, update_proj_gap, scale, proj_type) with its
    defaults, hf_galore's `others`, and APOLLO-Mini by its two keys; apollo-torch is not installed here."""
    from transformers.utils import is_apollo_torch_available

    assert not is_apollo_torch_available()
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(
        make_args(tmp_path, "apollo_adamw", optim_args=None), tiny_llama()
    )
    config = kwargs["galore_config"]
    assert cls is ApolloAdamW and (config.rank, config.proj, config.scale_type) == (128, "random", "channel")
    assert (config.update_proj_gap, config.scale, config.proj_type) == (200, 1.0, "std")
    mini = "rank=1,proj=random,scale_type=tensor,update_proj_gap=50,scale=11.3,proj_type=std,others=adafactor"
    _, kwargs = Trainer.get_optimizer_cls_and_kwargs(
        make_args(tmp_path, "apollo_adamw", optim_args=mini), tiny_llama()
    )
    config = kwargs["galore_config"]
    assert (config.rank, config.scale_type, config.update_proj_gap, config.scale, config.others) == (
        1, "tensor", 50, 11.3, "adafactor"
    )  # fmt: skip
    trainer = train(tmp_path, "apollo_adamw", optim_args="rank=1,scale_type=tensor,update_proj_gap=2", max_steps=3)
    assert isinstance(trainer.optimizer.optimizer, ApolloAdamW) and losses(trainer)[-1][1] < losses(trainer)[0][1]
    with pytest.raises(ValueError, match=r"Invalid residual='fira' for APOLLO"):
        Trainer.get_optimizer_cls_and_kwargs(
            make_args(tmp_path, "apollo_adamw", optim_args="residual=fira"), tiny_llama()
        )
