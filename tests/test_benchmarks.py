"""The benchmarks run in quick mode so they cannot rot; figures are checked for shape and sense, never time."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as `python benchmarks/NAME.py` would: worker processes unpickle its functions by name
    spec.loader.exec_module(module)
    return module


def test_optimizer_state_benchmark_quick(tmp_path, capsys):
    output = tmp_path / "state.json"
    report = _load("optimizer_state").main(["--quick", "--output", str(output)])
    assert json.loads(output.read_text()) == report
    results = report["results"]
    assert "torch AdamW" in capsys.readouterr().out
    adamw = results["torch AdamW"]["state_mb"]
    names = ("GaLoreAdamW", "GaLoreAdamW8bit", "GaLoreAdafactor", "ApolloAdamW", "ApolloAdamW (Mini)")
    for name in (f"hf_galore {name}" for name in names):
        assert 0 < results[name]["state_mb"] < adamw
        assert results[name]["between_s"] > 0 and results[name]["refresh_s"] > 0
    assert results["hf_galore GaLoreAdamW8bit"]["state_mb"] < results["hf_galore GaLoreAdamW"]["state_mb"]
    # APOLLO keeps GaLore's moments without the bases; APOLLO-Mini (rank 1) far less
    assert results["hf_galore ApolloAdamW"]["state_mb"] < results["hf_galore GaLoreAdamW"]["state_mb"]
    assert results["hf_galore ApolloAdamW (Mini)"]["state_mb"] < results["hf_galore ApolloAdamW"]["state_mb"]
    # The reference's 8-bit optimizer calls torch.cuda.synchronize(): on a CPU-only torch it cannot step.
    import torch

    if not torch.cuda.is_available():
        assert "error" in results["galore-torch GaLoreAdamW8bit"]
    else:  # pragma: no cover - GPU machines only
        pytest.skip("reference 8-bit runs on CUDA")


def test_refresh_cost_benchmark_quick(tmp_path):
    output = tmp_path / "refresh.json"
    report = _load("refresh_cost").main(["--quick", "--output", str(output)])
    assert json.loads(output.read_text()) == report
    methods = {row["method"] for row in report["matrices"]}
    assert methods == {"exact", "randomized q=1", "randomized q=2"}
    for row in report["matrices"]:
        assert row["seconds"] > 0 and 0.5 < row["energy_vs_exact"] <= 1.0 + 1e-4
    policies = {row["policy"]: row for row in report["training"]}
    exact, lazy = policies["exact"], policies["randomized + lazy 0.4"]
    assert lazy["refreshes"] <= exact["refreshes"]
    assert all(row["final_loss"] > 0 for row in report["training"])


def test_fsdp_plan_benchmark_quick(tmp_path, capsys):
    output = tmp_path / "fsdp.json"
    report = _load("fsdp_plan").main(["--quick", "--output", str(output)])
    assert json.loads(output.read_text()) == report
    plans = {(run["optimizer"], run["gpus"]): run["plan"] for run in report["runs"]}
    assert len(plans) == 4 * 2 and "8-bit GaLore, layer-wise" in capsys.readouterr().out
    for optimizer in ("AdamW", "8-bit AdamW", "GaLore", "8-bit GaLore, layer-wise"):
        one, two = plans[optimizer, 1], plans[optimizer, 2]
        assert one["fsdp"] is None and one["fsdp_buffers"] == 0 and two["fsdp"] == 2 and two["fsdp_buffers"] > 0
        assert two["weights"] < one["weights"] and two["gradients"] < one["gradients"]
    # GaLore's bases are sharded too: its state halves as AdamW's does (⌈·/2⌉ rows: at most a little more; one
    # process's `std` keeps r×min(m, n) bases where FSDP2 keeps r×n, so GaLore's ratio may also come out lower)
    galore, adamw = (
        plans["GaLore", 2]["optimizer_state"] / plans["GaLore", 1]["optimizer_state"],
        plans["AdamW", 2]["optimizer_state"] / plans["AdamW", 1]["optimizer_state"],
    )
    assert 0.45 <= galore <= 0.51 and 0.45 <= adamw <= 0.51
    assert plans["GaLore", 2]["refresh_communication"] > 0 and plans["AdamW", 2]["refresh_communication"] is None


def test_fsdp_benchmark_quick(tmp_path, capsys):
    output = tmp_path / "fsdp.json"
    report = _load("fsdp").main(["--quick", "--output", str(output)])
    assert json.loads(output.read_text()) == report
    assert "gather-everything" in capsys.readouterr().out
    results, gap, formula = report["results"], report["update_proj_gap"], report["gather_formula_bytes"]
    adamw, gather = results["FSDP2 + torch AdamW"], results["gather-everything"]
    randomized, exact = results["galore_adamw (randomized)"], results["galore_adamw (exact)"]
    # Counted bytes, per step of the first cycle (refresh, between..., refresh).
    assert adamw["bytes_per_step"] == [0] * (gap + 1)
    for row in (randomized, exact):  # between refreshes: the finite flags, then each target's basis gathered
        assert row["calls_per_step"][1:gap] == [1 + 14] * (gap - 1)
        assert 0 < row["between_bytes"] < gather["between_bytes"] / 2
        assert row["refresh_bytes"] > 0 and row["bytes_per_step"][0] > 0
    # Gathering every m×n float32 gradient moves 4·m·n·(W−1)/W per target at every step, counted, not assumed;
    # the exact refresh gathers each gradient once, beside the step's flags and the old bases (for their overlap).
    assert gather["bytes_per_step"] == [formula] * (gap + 1)
    assert exact["refresh_bytes"] == formula + exact["between_bytes"]
    assert randomized["refresh_bytes"] < gap * gather["between_bytes"]  # less than gathering over one interval
    # State per rank: below one process; AdamW's moments split exactly; gathering keeps GaLore's state whole.
    for row in (adamw, randomized, exact, gather):
        assert 0 < max(row["state_mib_per_rank"]) < row["state_mib_one_process"]
    split = (sum(adamw["state_mib_per_rank"]) - adamw["state_mib_one_process"]) * 2**20
    assert 0 <= split <= 4 * 32  # moments halved exactly; each rank keeps its own 4-byte step per parameter (21)
    assert min(gather["state_mib_per_rank"]) > max(randomized["state_mib_per_rank"])
    memory = report["memory"]
    assert all(peak > 0 for peak in [*memory["peak_rss_mib_per_rank"], memory["peak_rss_mib_one_process"]])
    assert all(row["between_s"] > 0 and row["refresh_s"] > 0 for row in results.values())


def test_eight_bit_gap_benchmark_quick(tmp_path, capsys):
    module = _load("eight_bit_gap")
    output = tmp_path / "gap.json"
    report = module.main(["--quick", "--output", str(output)])
    assert json.loads(output.read_text()) == report
    assert "equals GaLoreAdamW to float error" in capsys.readouterr().out
    default, everywhere, none = module.VARIANTS  # min_8bit_size 4096, 0, 2**62
    # Every moment 32-bit: bitsandbytes' 32-bit kernel is torch's AdamW (same eps and bias correction), to rounding.
    assert report["all_tensors"][none]["rel_error"] < module.FLOAT_TOLERANCE
    # The first step updates with the fresh moments and only stores them quantized: no 8-bit error yet.
    assert all(error < module.FLOAT_TOLERANCE for error in report["error_by_step"][0].values())
    kinds = report["kinds"]
    # At rank 8 only the MLP's projected moments (1536x8, 8x1536: 12,288 entries) reach min_8bit_size=4096; the
    # attention and pooler ones (384x8 = 3,072) and every bias/LayerNorm/classifier tensor stay 32-bit.
    eight = {name for name, row in kinds.items() if row["bits"][default] == [8]}
    assert eight == {"MLP in 1536x384", "MLP out 384x1536"}
    for name, row in kinds.items():
        assert row["bits"][everywhere] == [8] and row["bits"][none] == [32]
        for variant in (default, everywhere):
            figures = row["vs_32bit"][variant]
            if row["bits"][variant] == [32]:
                assert figures["rel_error"] < module.FLOAT_TOLERANCE, (name, variant)
                continue
            # 8-bit: block-wise dynamic quantization keeps each stored moment to a few percent of its value (worse
            # far below its block's absmax); Adam's normalised step turns that into an error of the same order, and
            # step-to-step errors partly cancel: 2-15% per kind here, 3.7-14% in the full MiniLM run. 30% leaves
            # room, while an eps or bias-correction mismatch, or moments lost to the quantizer, would give errors of
            # order 1 (cosine << 1).
            assert 1e-3 < figures["rel_error"] < 0.3, (name, variant, figures)
            assert figures["cosine"] > 0.95, (name, variant, figures)
    assert report["state_mib"][everywhere] < report["state_mib"][default] < report["state_mib"][none]


@pytest.mark.parametrize("devices", [0, 1])
def test_fsdp_trainer_cuda_refuses_without_two_gpus(devices):
    module = _load("fsdp_trainer_cuda")
    with pytest.raises(SystemExit, match=f"needs at least 2 CUDA devices; this machine has {devices}"):
        module.main(["--optim", "galore_adamw_8bit"], device_count=devices)


def test_fsdp_trainer_cuda_refuses_here():
    """What `python benchmarks/fsdp_trainer_cuda.py` does on this CPU machine: refuse before building anything."""
    import torch

    if torch.cuda.device_count() >= 2:  # pragma: no cover - multi-GPU machines only
        pytest.skip("this machine has GPUs: the script would train")
    with pytest.raises(SystemExit, match="needs at least 2 CUDA devices"):
        _load("fsdp_trainer_cuda").main([])


def test_fsdp_trainer_cuda_refuses_a_single_process_launch(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit, match="needs a distributed launch"):
        _load("fsdp_trainer_cuda").main(["--optim", "galore_adafactor"], device_count=8)
