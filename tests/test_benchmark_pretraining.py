"""The pre-training quality benchmark runs in quick mode (tiny model, built-in text) so it cannot rot."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

from hf_galore import expected_state_bytes
from hf_galore.targets import select_targets

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
    # APOLLO: GaLore's moments at the same rank, no stored basis, a limiter float per target; APOLLO-Mini at rank 1
    shapes = [t.shape for t in select_targets(module.build_model(module.QUICK), "attn,mlp")]
    r = report["galore_rank"]

    def apollo(rank):
        return sum(expected_state_bytes(s, form="adamw", rank=rank, stored_basis=False, limiter=True) for s in shapes)

    galore_targets = sum(expected_state_bytes(s, form="adamw", rank=r) for s in shapes)
    assert runs["GaLore"]["state_bytes"] - runs["APOLLO"]["state_bytes"] == galore_targets - apollo(r)
    assert runs["APOLLO"]["state_bytes"] - runs["APOLLO-Mini"]["state_bytes"] == apollo(r) - apollo(1)
    assert runs["APOLLO"]["eval_curve"][1:] != runs["APOLLO-Mini"]["eval_curve"][1:]


def test_pretraining_quality_methods_filter(tmp_path):
    module = _load()
    output, png = tmp_path / "subset.json", tmp_path / "subset.png"
    report = module.main(["--quick", "--methods", "GaLore + Fira, LoRA", "--output", str(output), "--plot", str(png)])
    assert [run["method"] for run in report["runs"]] == ["GaLore + Fira", "LoRA"]
    assert report["summary"]["best_adamw"] is None and report["runs"][0]["vs_adamw_pct"] is None
    with pytest.raises(SystemExit, match=r"unknown 'Fira'\. Must be comma-separated names from: AdamW, GaLore, "):
        module.main(["--quick", "--methods", "AdamW,Fira", "--output", str(output)])


def test_merge_reruns_the_named_methods_and_keeps_the_other_rows(tmp_path):
    module = _load()
    output, png = tmp_path / "merged.json", tmp_path / "merged.png"
    module.main(["--quick", "--methods", "AdamW,GaLore", "--output", str(output), "--plot", str(png)])
    first = json.loads(output.read_text())
    first["runs"][0]["eval_loss"] = 5.0  # markers: AdamW's row must be kept as it is, GaLore's replaced
    first["runs"][1]["eval_loss"] = 99.0
    output.write_text(json.dumps(first))
    report = module.main(
        ["--quick", "--methods", "APOLLO-Mini,GaLore", "--merge", "--output", str(output), "--plot", str(png)]
    )
    assert json.loads(output.read_text()) == report
    assert [run["method"] for run in report["runs"]] == ["AdamW", "GaLore", "APOLLO-Mini"]
    assert report["runs"][0] == first["runs"][0]
    galore, mini = report["runs"][1], report["runs"][2]
    assert galore["eval_loss"] != 99.0 and math.isfinite(galore["eval_loss"])
    assert mini["vs_adamw_pct"] == pytest.approx(100.0 * (mini["eval_loss"] / 5.0 - 1.0))  # against the kept row
    assert report["summary"]["best_adamw"]["eval_loss"] == 5.0
    with pytest.raises(SystemExit, match=r"Invalid --merge: the existing report's setup \{'hidden_size': 64"):
        module.main(["--quick", "--steps", "6", "--methods", "APOLLO", "--merge", "--output", str(output)])
    with pytest.raises(SystemExit, match=r"Invalid --merge: no report at --output='.*missing\.json' to merge into"):
        module.main(["--quick", "--methods", "APOLLO", "--merge", "--output", str(tmp_path / "missing.json")])
