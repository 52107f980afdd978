"""`hf-galore run` and `python -m hf_galore` make an unmodified script's `--optim galore_*` flags work."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "train_tiny.py"


def _run(prefix, tmp_path, optim="galore_adamw_8bit"):
    flags = ["--optim", optim, "--optim_target_modules", "attn,mlp"]
    common = ["--output_dir", str(tmp_path), "--max_steps", "2", "--per_device_train_batch_size", "4"]
    common += ["--report_to", "none", "--use_cpu", "--save_strategy", "no", "--disable_tqdm", "true"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [*prefix, str(SCRIPT), *flags, *common], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.mark.parametrize(
    "prefix",
    [[sys.executable, "-m", "hf_galore.cli", "run"], [sys.executable, "-m", "hf_galore"]],
    ids=["hf-galore-run", "python-m-hf_galore"],
)
def test_unmodified_script_trains_through_the_plugin(prefix, tmp_path):
    result = _run(prefix, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "optimizer: hf_galore.optimizers.GaLoreAdamW8bit" in result.stdout
    # the selection table: both aliases, the LLaMA projections, the total line
    assert "galore_adamw_8bit selected 14 weight matrices" in result.stderr
    assert "model.layers.{0..1}.self_attn.q_proj" in result.stderr and "mlp" in result.stderr
    assert "GaLore: optimizer state" in result.stderr  # the end-of-training summary


def test_ddp_under_torchrun_module_form(tmp_path):
    """Two CPU processes (gloo): the whole-model form trains under DDP; only rank 0 prints the table."""
    prefix = ["torchrun", "--nproc_per_node", "2", "--master_port", "29533", "-m", "hf_galore"]
    result = _run(prefix, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("optimizer: hf_galore.optimizers.GaLoreAdamW8bit") == 2
    assert result.stderr.count("selected 14 weight matrices") == 1


def test_layerwise_under_ddp_is_refused(tmp_path):
    prefix = ["torchrun", "--nproc_per_node", "2", "--master_port", "29534", "-m", "hf_galore"]
    result = _run(prefix, tmp_path, optim="galore_adamw_layerwise")
    assert result.returncode != 0
    assert "does not support multi-process training" in result.stderr


def test_accelerate_launch_module_form(tmp_path):
    prefix = ["accelerate", "launch", "--cpu", "--num_processes", "1", "--num_machines", "1"]
    prefix += ["--mixed_precision", "no", "--dynamo_backend", "no", "-m", "hf_galore"]
    result = _run(prefix, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "optimizer: hf_galore.optimizers.GaLoreAdamW8bit" in result.stdout


def test_same_flags_fail_on_stock_transformers(tmp_path):
    """Pins that the plugin is what made the run above work: transformers alone takes 'attn,mlp' as one regex."""
    result = _run([sys.executable], tmp_path)
    assert result.returncode != 0
    assert "No target modules found" in result.stderr or "galore_torch" in result.stderr


def test_console_script_is_installed():
    result = subprocess.run(["hf-galore", "run", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "SCRIPT.py" in result.stdout


def test_missing_script_is_a_clear_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "hf_galore", str(tmp_path / "nope.py")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0 and "no such script" in result.stderr
