"""The pre-training quality benchmark runs in quick mode (tiny model, built-in text) so it cannot rot."""

import importlib.util
import json
import math
from pathlib import Path

BENCHMARK = Path(__file__).parent.parent / "benchmarks" / "pretraining_quality.py"


def test_pretraining_quality_benchmark_quick(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("pretraining_quality", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
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
    for name in ("GaLore", "GaLore 8-bit", "GaLore randomized"):
        assert runs[name]["state_mb"] < adamw
    assert runs["GaLore 8-bit"]["state_mb"] < runs["GaLore"]["state_mb"]
    assert runs["LoRA"]["trainable_params"] < runs["AdamW"]["trainable_params"]
