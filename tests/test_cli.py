"""`hf-galore run` and `python -m hf_galore` make an unmodified script's `--optim galore_*` flags work.

Argument handling runs in-process (`hf_galore.cli.main`, `hf_galore.__main__.dispatch`); one end-to-end training
run per launcher (`hf-galore run`, `torchrun -m hf_galore`, `accelerate launch -m hf_galore`) runs in a subprocess,
plus the stock-transformers negative control and the real refusal of layer-wise forms under DDP.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import hf_galore_cli
from hf_galore.__main__ import USAGE, dispatch
from hf_galore.cli import main
from hf_galore.estimate import PLAIN_OPTIMIZERS
from hf_galore.presets import PRESETS
from hf_galore.trainer_factory import GALORE_OPTIMIZERS

SCRIPT = Path(__file__).parent / "scripts" / "train_tiny.py"
OPTIMIZER_LINE = "optimizer: hf_galore.optimizers.GaLoreAdamW8bit"

# A script (and a module) that reports how it was run: its argv, __name__, and whether hf_galore was registered.
RECORDER = """
import json, sys
from hf_galore.integration import is_registered
with open({out!r}, "w") as file:
    json.dump({{"argv": sys.argv, "name": __name__, "registered": is_registered(), "path0": sys.path[0]}}, file)
"""


def _console_script(name: str) -> str:
    """The console script installed next to this interpreter (the venv's), else the one on PATH."""
    found = shutil.which(name, path=sysconfig.get_path("scripts")) or shutil.which(name)
    if found is None:
        pytest.fail(f"console script {name!r} is not installed; install the package with its test extra")
    return found


def _train(prefix: list[str], tmp_path: Path, optim: str = "galore_adamw_8bit", script: Path = SCRIPT):
    """Run the unmodified training script for two steps under `prefix` (a launcher's console script is looked up)."""
    if prefix[0] in ("hf-galore", "torchrun", "accelerate"):
        prefix = [_console_script(prefix[0]), *prefix[1:]]
    flags = ["--optim", optim, "--optim_target_modules", "attn,mlp"]
    common = ["--output_dir", str(tmp_path), "--max_steps", "2", "--per_device_train_batch_size", "4"]
    common += ["--report_to", "none", "--use_cpu", "--save_strategy", "no", "--disable_tqdm", "true"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [*prefix, str(script), *flags, *common], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.fixture
def recorder(tmp_path, monkeypatch):
    """Writes `record.py` and module `record_mod` into tmp_path; returns a reader of what the last run recorded.

    sys.argv and sys.path are restored after the test (run_script sets both, as `python SCRIPT.py` would).
    """
    out = tmp_path / "recorded.json"
    (tmp_path / "record.py").write_text(RECORDER.format(out=str(out)))
    (tmp_path / "record_mod.py").write_text(RECORDER.format(out=str(out)))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    monkeypatch.delitem(sys.modules, "record_mod", raising=False)
    return lambda: json.loads(out.read_text())


ARGS = ["--optim", "galore_adamw", "-m", "x", "--", "last"]  # flags the script must receive untouched


@pytest.mark.parametrize(
    "run",
    [
        pytest.param(lambda script, args: dispatch([script, *args]), id="python-m-hf_galore"),
        pytest.param(lambda script, args: main(["run", script, *args]), id="hf-galore-run"),
    ],
)
def test_script_runs_as_main_with_its_own_argv(recorder, tmp_path, run):
    script = str(tmp_path / "record.py")
    run(script, ARGS)
    recorded = recorder()
    assert recorded == {"argv": [script, *ARGS], "name": "__main__", "registered": True, "path0": str(tmp_path)}


@pytest.mark.parametrize(
    "run",
    [
        pytest.param(lambda args: dispatch(["-m", "record_mod", *args]), id="python-m-hf_galore-m"),
        pytest.param(lambda args: main(["run", "-m", "record_mod", *args]), id="hf-galore-run-m"),
    ],
)
def test_module_runs_as_main_with_its_own_argv(recorder, tmp_path, run):
    run(ARGS)
    recorded = recorder()
    assert recorded["argv"] == [str(tmp_path / "record_mod.py"), *ARGS]  # runpy puts the module's file in argv[0]
    assert recorded["name"] == "__main__" and recorded["registered"] is True


@pytest.mark.parametrize(
    ("run", "message"),
    [
        pytest.param(lambda: dispatch([]), USAGE, id="no-arguments"),
        pytest.param(lambda: dispatch(["--help"]), USAGE, id="help"),
        pytest.param(lambda: dispatch(["-m"]), USAGE, id="m-without-module"),
        pytest.param(lambda: dispatch(["nope.py", "--x"]), "hf-galore run: no such script 'nope.py'", id="missing"),
        pytest.param(lambda: main(["run", "nope.py"]), "hf-galore run: no such script 'nope.py'", id="run-missing"),
    ],
)
def test_bad_invocations_exit_with_the_reason(run, message, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exited:
        run()
    assert str(exited.value).startswith(message)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        pytest.param(["--help"], ["run", "estimate"], id="hf-galore"),
        pytest.param(["run", "--help"], ["SCRIPT.py|MODULE", "ARGS"], id="run"),
        pytest.param(["estimate", "--help"], ["--preset", "--optim_target_modules", "--device-memory"], id="estimate"),
    ],
)
def test_help(argv, expected, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert all(text in out for text in expected), out


def test_help_imports_neither_torch_nor_the_package():
    """The console script's module answers --help with the standard library alone (hf_galore's __init__ registers
    with transformers, seconds of imports)."""
    code = (
        "import sys, hf_galore_cli\n"
        "for argv in (['--help'], ['run', '--help'], ['estimate', '--help']):\n"
        "    try:\n"
        "        hf_galore_cli.main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'hf_galore') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"


def test_help_lists_the_planner_own_names():
    assert hf_galore_cli.ESTIMATE_OPTIMIZERS == (*GALORE_OPTIMIZERS, *PLAIN_OPTIMIZERS)
    assert hf_galore_cli.PRESET_NAMES == tuple(PRESETS)


def test_subcommand_is_required(capsys):
    with pytest.raises(SystemExit) as exited:
        main([])
    assert exited.value.code == 2 and "the following arguments are required: command" in capsys.readouterr().err


def test_python_m_hf_galore_dispatches_estimate(capsys):
    dispatch(["estimate", "--preset", "llama-tiny", "--json"])
    assert json.loads(capsys.readouterr().out)["model"]["parameters"] == 156_480  # 2 x 512 x 64 + 2 x 45,440 + 64


# End to end: one subprocess per launcher. --standalone: torchrun picks a free port itself.
TORCHRUN_2 = ["torchrun", "--standalone", "--nproc_per_node", "2"]


def test_console_script_trains_an_unmodified_script(tmp_path):
    result = _train(["hf-galore", "run"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert OPTIMIZER_LINE in result.stdout
    # the selection table: both aliases, the LLaMA projections, the total line
    assert "galore_adamw_8bit selected 14 weight matrices" in result.stderr
    assert "model.layers.{0..1}.self_attn.q_proj" in result.stderr and "mlp" in result.stderr
    assert "GaLore: optimizer state" in result.stderr  # the end-of-training summary


def test_console_script_serves_apollo_without_apollo_torch(tmp_path):
    result = _train(["hf-galore", "run"], tmp_path, optim="apollo_adamw")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "optimizer: hf_galore.optimizers.ApolloAdamW" in result.stdout
    assert "apollo_adamw selected 14 weight matrices" in result.stderr
    assert "APOLLO: optimizer state" in result.stderr  # the end-of-training summary names the member


def test_ddp_under_torchrun_module_form(tmp_path):
    """Two CPU processes (gloo): the whole-model form trains under DDP; only rank 0 prints the table."""
    result = _train([*TORCHRUN_2, "-m", "hf_galore"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(OPTIMIZER_LINE) == 2
    assert result.stderr.count("selected 14 weight matrices") == 1


def test_layerwise_under_ddp_is_refused(tmp_path):
    """The refusal's logic is tested in-process (tests/test_trainer.py, a faked parallel_mode); this run pins that a
    real torchrun launch is detected as multi-process, so a layer-wise form never updates before DDP averages."""
    result = _train([*TORCHRUN_2, "-m", "hf_galore"], tmp_path, optim="galore_adamw_layerwise")
    assert result.returncode != 0
    assert (
        "NotImplementedError: --optim galore_adamw_layerwise does not support DDP: a layer-wise update would run "
        "before DDP averages that gradient. Use --optim galore_adamw under DDP, or shard with FSDP2" in result.stderr
    )


def test_accelerate_launch_module_form(tmp_path):
    prefix = ["accelerate", "launch", "--cpu", "--num_processes", "1", "--num_machines", "1"]
    prefix += ["--mixed_precision", "no", "--dynamo_backend", "no", "-m", "hf_galore"]
    result = _train(prefix, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert OPTIMIZER_LINE in result.stdout


def test_same_flags_fail_on_stock_transformers(tmp_path):
    """Pins that the plugin is what made the runs above work: transformers alone takes 'attn,mlp' as one regex."""
    result = _train([sys.executable], tmp_path)
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    # transformers' own galore handler (hf_galore's error would name optim_target_modules= and list the modules)
    assert last_line == "ValueError: No target modules found for OptimizerNames.GALORE_ADAMW_8BIT (attn,mlp)."
