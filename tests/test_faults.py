"""Nothing silently wrong after an interruption, a fault or a partial checkpoint (issue 20).

An interrupted `train()` (KeyboardInterrupt, a notebook's stop button) leaves no layer-wise hooks, no frozen model and
no stale accumulation flag; a resume loads only a complete checkpoint (a half-written newest one is skipped with a
warning naming it, an explicit one is refused naming the file), never a fresh optimizer unless asked
(HF_GALORE_FRESH_OPTIMIZER), never an optimizer file saved with another step; a changed gradient accumulation warns.
"""

import contextlib
import io
import json
import multiprocessing
import os
import random
import shutil
import signal
import time
import warnings

import pytest
import torch
from accelerate.state import GradientState
from conftest import OPTIMIZERS, batches, galore_groups, tiny_llama, tiny_mlp
from conftest import train as train_loop
from ranks import FORKSERVER_PRELOAD, WORLD, run_on_ranks
from test_trainer import NaNAtStep3, RandomTokens, losses, make_args, train
from transformers import Trainer

from hf_galore import GaLoreAdamW, GaLoreConfig
from hf_galore.callback import optimizer_steps
from hf_galore.checkpoints import checkpoint_problem
from hf_galore.state_keys import is_frozen_group

SAVED = {"max_steps": 6, "save_strategy": "steps", "save_steps": 2, "max_grad_norm": 0.0}


class StopAtMicroBatch(Trainer):
    """Raises KeyboardInterrupt in the forward of micro-batch `stop_at` (1-based), as a notebook's stop button does."""

    stop_at = 3

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def _interrupted(tmp_path, optim, model=None, **overrides):
    trainer = StopAtMicroBatch(
        model=model or tiny_llama(), args=make_args(tmp_path, optim, **overrides), train_dataset=RandomTokens()
    )
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    return trainer


def _backward(model):
    batch = RandomTokens()[0]
    model(input_ids=batch["input_ids"][None], labels=batch["labels"][None]).loss.backward()


def _clone(model):
    return [p.detach().clone() for p in model.parameters()]


def _adamw_at_lr_0(tmp_path, model):
    args = make_args(tmp_path, "adamw_torch", optim_target_modules=None, optim_args=None, learning_rate=0.0)
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens())
    trainer.train()
    return trainer


# ---- interrupted training ------------------------------------------------------------------------------------------


def test_an_interrupted_layerwise_train_leaves_no_hooks_and_a_later_adamw_trainer_is_untouched(tmp_path):
    trainer = _interrupted(tmp_path / "first", "galore_adamw_layerwise", max_grad_norm=0.0)
    assert trainer.state.global_step == 2 and not trainer.optimizer.optimizer.has_hooks
    model, before = trainer.model, _clone(trainer.model)
    _backward(model)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # no update outside training
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.zero_grad()
    later = _adamw_at_lr_0(tmp_path / "later", model)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # lr 0 moves nothing
    assert len(later.optimizer.optimizer.state) == sum(1 for p in model.parameters() if p.requires_grad)


def test_a_trainer_takes_its_model_back_from_hooks_an_abandoned_plain_loop_left(tmp_path):
    model = tiny_llama()
    abandoned = GaLoreAdamW(model.parameters(), lr=1e-2, layerwise=True)  # a plain loop stopped before remove_hooks
    before = _clone(model)
    with pytest.warns(UserWarning, match="Removed the layer-wise hooks an earlier GaLore optimizer left"):
        later = _adamw_at_lr_0(tmp_path, model)
    assert not abandoned.has_hooks and len(abandoned.state) == 0
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert len(later.optimizer.optimizer.state) == sum(1 for p in model.parameters() if p.requires_grad)


def test_an_interrupted_accumulation_leaves_accelerates_sync_flag_true(tmp_path):
    # 4 micro-batches per step; stopped in the 2nd, where the Trainer has set sync_gradients False
    _interrupted(tmp_path, "galore_adamw", gradient_accumulation_steps=4, per_device_train_batch_size=2)
    assert GradientState().sync_gradients is True
    model = tiny_mlp()
    optimizer = OPTIMIZERS["adamw"](galore_groups(model), layerwise=True)
    before = _clone(model)
    train_loop(model, optimizer, batches(1))
    assert not any(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    optimizer.remove_hooks()


def test_a_stale_sync_flag_is_reset_with_a_warning_when_hooks_are_registered():
    GradientState()._set_sync_gradients(False)  # as an interrupted plain accelerate loop leaves it
    model = tiny_mlp()
    with pytest.warns(UserWarning, match=r"GradientState.sync_gradients was False .* set back to True"):
        optimizer = OPTIMIZERS["adamw"](galore_groups(model), layerwise=True)
    before = _clone(model)
    train_loop(model, optimizer, batches(1))
    assert not any(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    optimizer.remove_hooks()


def test_a_group_added_after_construction_is_updated_from_backward():
    model = tiny_mlp()
    optimizer = OPTIMIZERS["adamw"]([galore_groups(model)[0]], layerwise=True)  # the weights only
    optimizer.add_param_group({"params": [model[0].bias, model[2].bias]})
    optimizer.register_hooks()  # again: changes nothing
    assert len(optimizer._layerwise_hooks) == 4
    biases = [model[0].bias.detach().clone(), model[2].bias.detach().clone()]
    x, y = batches(1)[0]
    torch.nn.functional.mse_loss(model(x), y).backward()
    assert model[0].bias.grad is None and model[2].bias.grad is None  # updated and freed in backward
    assert not torch.equal(model[0].bias, biases[0]) and not torch.equal(model[2].bias, biases[1])
    optimizer.remove_hooks()


# ---- others=frozen -------------------------------------------------------------------------------------------------


def test_others_frozen_is_given_back_when_train_ends_and_taken_again_when_it_runs_again(tmp_path):
    trainer = train(tmp_path, "galore_adamw", optim_args="rank=4,others=frozen", max_steps=2)
    optimizer = trainer.optimizer.optimizer
    frozen = [p for g in optimizer.param_groups if is_frozen_group(g) for p in g["params"]]
    assert frozen and all(p.requires_grad for p in frozen)
    before = [p.detach().clone() for p in frozen]
    trainer.train()  # the same optimizer again: frozen while it trains, given back at the end
    assert all(torch.equal(p, b) for p, b in zip(frozen, before)) and all(p.requires_grad for p in frozen)
    interrupted = _interrupted(tmp_path / "stopped", "galore_adamw", optim_args="rank=4,others=frozen")
    assert all(p.requires_grad for p in interrupted.model.parameters())


def test_unfreeze_others_gives_back_only_what_others_frozen_took():
    model = tiny_mlp()
    model[0].bias.requires_grad_(False)  # frozen by the user
    config = GaLoreConfig(rank=2, others="frozen")
    optimizer = GaLoreAdamW(model.parameters(), lr=1e-2, galore_params=[model[0].weight], galore_config=config)
    assert not model[2].weight.requires_grad
    optimizer.unfreeze_others()
    assert model[2].weight.requires_grad and model[2].bias.requires_grad and not model[0].bias.requires_grad


# ---- checkpoints ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A 6-step galore_adamw run with checkpoints at 2, 4 and 6, and its final weights."""
    folder = tmp_path_factory.mktemp("saved")
    trainer = train(folder, "galore_adamw", **SAVED)
    return folder, _clone(trainer.model)


@pytest.fixture
def run_dir(saved_run, tmp_path):
    """A copy of the saved run's output folder, free to damage."""
    return shutil.copytree(saved_run[0], tmp_path / "run")


def _resume(run_dir, resume=True, optim="galore_adamw", **overrides):
    return train(run_dir, optim, resume=resume, **{**SAVED, **overrides})


def _cut(path, keep=0.5):
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


def _keep_only(folder, *names):
    for name in set(os.listdir(folder)) - set(names):
        (folder / name).unlink()


def _killed_in_weights(folder):
    _keep_only(folder, "model.safetensors")
    _cut(folder / "model.safetensors")


def _killed_in_optimizer(folder):
    _keep_only(folder, "model.safetensors", "training_args.bin", "config.json", "generation_config.json")
    (folder / "optimizer.pt").write_bytes(b"")  # created, killed before its bytes


# How a save killed at each moment leaves checkpoint-6 (transformers writes weights, optimizer, scheduler, RNG state,
# then trainer_state.json), or a file damaged later, and what the warning or error says about it.
HALF_WRITTEN = {
    "killed-in-weights": (
        _killed_in_weights,
        r"checkpoint-6 has no trainer_state\.json \(the Trainer writes it last: its save was cut short\)",
    ),
    "killed-in-optimizer": (_killed_in_optimizer, r"checkpoint-6 has no trainer_state\.json"),
    "killed-in-trainer-state": (
        lambda folder: _cut(folder / "trainer_state.json"),
        r"checkpoint-6/trainer_state\.json is not valid JSON \([\d,]+ bytes\): its save was cut short",
    ),
    "empty-optimizer": (
        lambda folder: (folder / "optimizer.pt").write_bytes(b""),
        r"checkpoint-6/optimizer\.pt is empty \(0 bytes\): the save that created it was cut short",
    ),
    "random-optimizer": (
        lambda folder: (folder / "optimizer.pt").write_bytes(bytes(range(256)) * 16),
        r"checkpoint-6/optimizer\.pt is not a file torch\.save wrote \(4,096 bytes, no zip archive\)",
    ),
    "cut-weights": (
        lambda folder: _cut(folder / "model.safetensors", 0.9),
        r"checkpoint-6/model\.safetensors is truncated \([\d,]+ of its [\d,]+ bytes\)",
    ),
}


@pytest.mark.parametrize("damage", list(HALF_WRITTEN))
def test_resume_skips_a_half_written_newest_checkpoint_naming_it_and_reaches_the_same_weights(
    damage, run_dir, saved_run
):
    damage_fn, reason = HALF_WRITTEN[damage]
    damage_fn(run_dir / "checkpoint-6")
    with pytest.warns(UserWarning, match=r"Resuming from .*checkpoint-4, the newest complete checkpoint, .*" + reason):
        resumed = _resume(run_dir)
    assert [step for step, _ in losses(resumed)] == list(range(1, 7))  # 1-4 from checkpoint-4's history
    assert all(torch.equal(p, q) for p, q in zip(resumed.model.parameters(), saved_run[1]))


@pytest.mark.parametrize("damage", ["killed-in-trainer-state", "empty-optimizer", "random-optimizer"])
def test_resume_from_a_half_written_checkpoint_by_path_is_refused_naming_the_file_and_what_to_do(damage, run_dir):
    damage_fn, reason = HALF_WRITTEN[damage]
    damage_fn(run_dir / "checkpoint-6")
    with pytest.raises(
        ValueError, match=reason + r"[^.]*\. Resume from .*checkpoint-4 \(resume_from_checkpoint=True"
    ) as err:
        _resume(run_dir, str(run_dir / "checkpoint-6"))
    fresh = "or set HF_GALORE_FRESH_OPTIMIZER=1 to load its weights and start the optimizer afresh"
    assert (fresh in str(err.value)) == ("optimizer" in damage)  # only where the weights can still be used


def test_resume_when_no_checkpoint_is_complete_names_them_all(run_dir):
    for step in (2, 4, 6):
        (run_dir / f"checkpoint-{step}" / "trainer_state.json").unlink()
    with pytest.raises(ValueError, match=r"none of its 3 checkpoint folder\(s\) is complete: .*checkpoint-6 has no"):
        _resume(run_dir)


@pytest.mark.parametrize("missing", ["optimizer.pt", "scheduler.pt"])
def test_a_missing_optimizer_or_scheduler_file_is_refused_for_galore_and_warned_for_others(missing, run_dir):
    (run_dir / "checkpoint-4" / missing).unlink()
    with pytest.raises(ValueError, match=rf"Cannot resume: .*checkpoint-4 has no {missing} .*HF_GALORE_FRESH_OPTIM"):
        _resume(run_dir, str(run_dir / "checkpoint-4"))
    plain = {"optim_target_modules": None, "optim_args": None}
    with pytest.warns(UserWarning, match=rf"Resuming without the optimizer: .*checkpoint-4 has no {missing}"):
        _resume(run_dir, str(run_dir / "checkpoint-4"), "adamw_torch", **plain)


@pytest.mark.parametrize("scheduler", ["kept", "missing"])
def test_a_fresh_optimizer_on_request_keeps_the_learning_rate_schedule(scheduler, run_dir, saved_run, monkeypatch):
    checkpoint = run_dir / "checkpoint-4"
    (checkpoint / "optimizer.pt").unlink()
    if scheduler == "missing":
        (checkpoint / "scheduler.pt").unlink()
    history = json.loads((run_dir / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    monkeypatch.setenv("HF_GALORE_FRESH_OPTIMIZER", "1")
    source = r"\(scheduler\.pt\)" if scheduler == "kept" else r"\(the schedule stepped forward 4 steps\)"
    with pytest.warns(UserWarning, match=r"resuming .*checkpoint-4 with a fresh optimizer .* at step 4 " + source):
        resumed = _resume(run_dir, str(checkpoint))
    assert optimizer_steps(resumed.optimizer.optimizer) == 2  # started empty at step 4
    logged = [(e["step"], e["learning_rate"]) for e in resumed.state.log_history if "loss" in e]
    assert logged == [(e["step"], e["learning_rate"]) for e in history if "loss" in e]  # steps 5, 6 new


def test_an_invalid_fresh_optimizer_setting_is_named(run_dir, monkeypatch):
    monkeypatch.setenv("HF_GALORE_FRESH_OPTIMIZER", "maybe")
    with pytest.raises(ValueError, match=r"Invalid HF_GALORE_FRESH_OPTIMIZER='maybe': must be 1/true/yes/on"):
        _resume(run_dir)


def test_an_optimizer_file_from_another_step_is_refused(run_dir):
    shutil.copy(run_dir / "checkpoint-2" / "optimizer.pt", run_dir / "checkpoint-4" / "optimizer.pt")
    with pytest.raises(
        ValueError,
        match=r"its optimizer\.pt has trained 2 steps, but trainer_state\.json beside it was saved after 4 \(global "
        r"step 4\), so the optimizer file belongs to another checkpoint",
    ):
        _resume(run_dir, str(run_dir / "checkpoint-4"))


def test_without_the_record_an_optimizer_file_from_another_step_is_warned(run_dir, galore_log):
    # a checkpoint saved before hf_galore recorded the optimizer's step count in trainer_state.json
    checkpoint = run_dir / "checkpoint-4"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    del state["stateful_callbacks"]["GaLoreCallback"]
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    shutil.copy(run_dir / "checkpoint-2" / "optimizer.pt", checkpoint / "optimizer.pt")
    _resume(run_dir, str(checkpoint))
    warned = [r.getMessage() for r in galore_log if r.levelname == "WARNING"]
    assert any("optimizer.pt has trained 2 steps and trainer_state.json says global step 4" in m for m in warned)


def test_steps_whose_updates_were_all_skipped_do_not_make_a_checkpoint_look_foreign(tmp_path, galore_log):
    # NaNAtStep3: every update of step 3 skipped, so the optimizer has trained 3 steps at global step 4
    common = {**SAVED, "save_steps": 4}
    with pytest.warns(UserWarning, match="skipped the update"):
        train(tmp_path, "galore_adamw", trainer_cls=NaNAtStep3, **{**common, "max_steps": 4})
    resumed = train(tmp_path, "galore_adamw", resume=str(tmp_path / "checkpoint-4"), **common)
    assert optimizer_steps(resumed.optimizer.optimizer) == 5
    assert not [r for r in galore_log if r.levelname == "WARNING"]


def test_a_changed_gradient_accumulation_warns_on_resume(run_dir, galore_log):
    _resume(run_dir, str(run_dir / "checkpoint-4"), gradient_accumulation_steps=2, max_steps=5)
    warned = [r.getMessage() for r in galore_log if r.levelname == "WARNING"]
    assert any("with gradient_accumulation_steps=2; it was saved with 1" in m for m in warned), warned


# ---- a real training process killed mid-save -----------------------------------------------------------------------


def _kill_while_saving(step):
    """SIGKILL this process once half of checkpoint-`step`/optimizer.pt is on disk (the bytes a killed save leaves)."""
    save = torch.save

    def save_then_die(obj, f, *args, **kwargs):
        if str(f).endswith(os.path.join(f"checkpoint-{step}", "optimizer.pt")):
            buffer = io.BytesIO()
            save(obj, buffer, *args, **kwargs)
            with open(f, "wb") as handle:
                handle.write(buffer.getvalue()[: buffer.tell() // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        return save(obj, f, *args, **kwargs)

    torch.save = save_then_die


def _train_in_child(folder, kill_step):
    if kill_step is not None:
        _kill_while_saving(kill_step)
    train(folder, "galore_adamw", **SAVED)


def _start_training(folder, kill_step=None):
    """The saved run in a process of its own, started by the fork server tests/ranks.py uses (torch and hf_galore
    imported once; a plain fork of this process, which has used OpenMP, can hang)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(FORKSERVER_PRELOAD)
    process = context.Process(target=_train_in_child, args=(folder, kill_step))
    process.start()
    return process


def test_a_training_process_killed_mid_save_resumes_from_its_last_complete_checkpoint(tmp_path, saved_run):
    process = _start_training(tmp_path, kill_step=6)
    process.join(timeout=120)
    assert process.exitcode == -signal.SIGKILL
    assert not (tmp_path / "checkpoint-6" / "trainer_state.json").exists()
    with pytest.warns(UserWarning, match=r"Resuming from .*checkpoint-4, .*checkpoint-6 has no trainer_state\.json"):
        resumed = _resume(tmp_path)
    assert all(torch.equal(p, q) for p, q in zip(resumed.model.parameters(), saved_run[1]))


@pytest.mark.slow  # about 10 s a trial: training processes killed at random moments, as the crash trial did
@pytest.mark.parametrize("trial", range(4))
def test_a_training_process_killed_at_a_random_moment_resumes_to_the_same_weights(trial, tmp_path, saved_run):
    process = _start_training(tmp_path)
    deadline = time.monotonic() + 120
    while not (tmp_path / "checkpoint-2").exists() and process.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(random.Random(trial).uniform(0.0, 1.0))  # the 4 steps left take about a second
    with contextlib.suppress(ProcessLookupError):  # it may have finished
        os.kill(process.pid, signal.SIGKILL)
    process.join(timeout=30)
    if not any(checkpoint_problem(str(c)) is None for c in tmp_path.glob("checkpoint-*")):
        with pytest.raises(ValueError, match=r"none of its \d checkpoint folder\(s\) is complete"):
            _resume(tmp_path)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a skipped half-written folder, when the kill came mid-save
        resumed = _resume(tmp_path)
    assert all(torch.equal(p, q) for p, q in zip(resumed.model.parameters(), saved_run[1]))


# ---- layer-wise on a model the prepare replicated ------------------------------------------------------------------


def _layerwise_under_fsdp_flag(rank, folder):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    args = make_args(folder / str(rank), "galore_adamw_layerwise", fsdp="full_shard", max_grad_norm=0.0, max_steps=2)
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=RandomTokens())
    before = _clone(trainer.model)
    try:
        trainer.train()
        error = None
    except NotImplementedError as err:
        error = str(err)
    return {
        "error": error,
        "prepared": type(trainer.model_wrapped).__name__,
        "hooks": trainer.optimizer.optimizer.has_hooks,
        "unchanged": all(torch.equal(p, b) for p, b in zip(trainer.model.parameters(), before)),
    }


def test_layerwise_is_refused_when_the_fsdp_flag_ends_in_ddp(tmp_path):
    # On CPU accelerate cannot shard and wraps the model in DDP, though --fsdp passed the flag-based check.
    for outcome in run_on_ranks(tmp_path, _layerwise_under_fsdp_flag, tmp_path):
        assert outcome["prepared"] == "DistributedDataParallel"
        assert "Layer-wise galore_adamw_layerwise cannot run on parameters replicated over 2 processes (DDP)" in (
            outcome["error"] or ""
        )
        assert outcome["unchanged"] and not outcome["hooks"]
