"""The pre-training quality benchmark runs in quick mode (tiny model, built-in text) so it cannot rot."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).parent.parent / "benchmarks" / "pretraining_quality.py"


def _load():
    spec = importlib.util.spec_from_file_location("pretraining_quality", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pretraining_quality_benchmark_quick(tmp_path, capsys):
    module = _load()
    output, png = tmp_path / "quality.json", tmp_path / "quality.png"
    report = module.main(["--quick", "--output", str(output), "--plot", str(png)])
    assert json.loads(output.read_text()) == report
    assert png.stat().st_size > 0
    assert "GaLore 8-bit" in capsys.readouterr().out
    runs = {run["method"]: run for run in report["runs"]}
    assert set(runs) == set(module.METHODS)
    for run in runs.values():
        assert math.isfinite(run["eval_loss"]) and run["eval_loss"] > 0
        assert len(run["eval_curve"]) >= 2 and all(math.isfinite(loss) for _, loss in run["eval_curve"])
        assert run["state_mb"] > 0
    adamw = runs["AdamW"]["state_mb"]
    galore_rows = ("GaLore", "GaLore 8-bit", "GaLore randomized", "GaLore + Fira", "GaLore 8-bit + Fira")
    for name in galore_rows:
        assert runs[name]["state_mb"] < adamw
        assert runs[name]["state_bytes"] == runs[name]["state_mb"] * 2**20
    assert runs["GaLore 8-bit"]["state_mb"] < runs["GaLore"]["state_mb"]
    # The residual keeps one 0-d float32 tensor per target (core.RESIDUAL_NORM, the limiter's last norm): 4 bytes each.
    targets = report["galore_targets"]
    assert runs["GaLore + Fira"]["state_bytes"] == runs["GaLore"]["state_bytes"] + 4 * targets
    assert runs["GaLore 8-bit + Fira"]["state_bytes"] == runs["GaLore 8-bit"]["state_bytes"] + 4 * targets
    # ... and moves the weights: its curve is not GaLore's
    assert runs["GaLore + Fira"]["eval_curve"][1:] != runs["GaLore"]["eval_curve"][1:]
    assert runs["LoRA"]["trainable_params"] < runs["AdamW"]["trainable_params"]


def test_pretraining_quality_methods_filter(tmp_path):
    module = _load()
    output, png = tmp_path / "subset.json", tmp_path / "subset.png"
    report = module.main(["--quick", "--methods", "GaLore + Fira, LoRA", "--output", str(output), "--plot", str(png)])
    assert [run["method"] for run in report["runs"]] == ["GaLore + Fira", "LoRA"]
    assert report["summary"]["best_adamw"] is None and report["runs"][0]["vs_adamw_pct"] is None
    with pytest.raises(SystemExit, match=r"unknown 'Fira'\. Must be comma-separated names from: AdamW, GaLore, "):
        module.main(["--quick", "--methods", "AdamW,Fira", "--output", str(output)])
