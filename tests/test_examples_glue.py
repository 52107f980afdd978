"""examples/glue: run_glue.py trains and evaluates with each method on a tiny random-init RoBERTa; compare.py tables.

No download and no data package: the model, a word-level tokenizer and csv files are written to a temporary folder.
"""

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, RobertaConfig, RobertaForSequenceClassification

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "glue"
POSITIVE = ["good", "great", "fine", "lovely", "superb", "fun"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring", "weak"]
FILLER = ["the", "movie", "was", "a", "plot", "and", "very", "film"]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"examples_glue_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


run_glue = load_script("run_glue")
compare = load_script("compare")


def sentences(count: int, seed: int) -> list[tuple[str, str, int]]:
    """(sentence, paraphrase-ish second sentence, label): the label is the sentiment word's side."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(count):
        label = i % 2
        words = POSITIVE if label else NEGATIVE
        pick = lambda pool: pool[torch.randint(len(pool), (1,), generator=gen).item()]  # noqa: E731
        rows.append((f"the movie was {pick(words)} and {pick(FILLER)}", f"a {pick(words)} film", label))
    return rows


@pytest.fixture(scope="module")
def tiny_roberta(tmp_path_factory) -> Path:
    """A 2-layer, hidden-32 random-init RoBERTa and a word-level tokenizer with RoBERTa's special tokens."""
    folder = tmp_path_factory.mktemp("tiny_roberta")
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    vocab = {token: i for i, token in enumerate([*specials, *POSITIVE, *NEGATIVE, *FILLER])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        cls_token="<s>",
        sep_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
    )
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=40,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    RobertaForSequenceClassification(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def csv_files(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("glue_csv")
    paths = []
    for split, count, seed in (("train", 48, 0), ("validation", 16, 1)):
        path = folder / f"{split}.csv"
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["sentence1", "sentence2", "label"])
            writer.writerows(sentences(count, seed))
        paths.append(path)
    return paths[0], paths[1]


def run(tiny_roberta, csv_files, tmp_path, *flags):
    train, validation = csv_files
    argv = [
        *("--model_name_or_path", str(tiny_roberta), "--train_file", str(train), "--validation_file", str(validation)),
        *("--output_dir", str(tmp_path), "--per_device_train_batch_size", "8", "--num_train_epochs", "1"),
        *("--max_seq_length", "32", "--logging_steps", "2", "--use_cpu", "true", "--disable_tqdm", "true"),
        *flags,
    ]
    return run_glue.main(argv)


CASES = {
    "full-adamw": ["--method", "full", "--optim", "adamw_torch"],
    "lora": ["--method", "lora", "--lora_r", "4", "--lora_target_modules", "query,value", "--learning_rate", "1e-3"],
    "galore-8bit-attn-mlp": [
        *("--optim", "galore_adamw_8bit", "--optim_target_modules", "attn,mlp"),
        *("--optim_args", "rank=8,update_proj_gap=500,scale=4"),
    ],
    "galore-frozen-embeddings-mrpc-metric": [
        *("--optim", "galore_adamw", "--optim_target_modules", "attn,mlp", "--optim_args", "rank=4,update_proj_gap=2"),
        *("--freeze_embeddings", "--task_name", "mrpc"),
    ],
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the local GLUE metric, no hub round trip


@pytest.mark.parametrize("case", list(CASES))
def test_run_glue_trains_and_evaluates(case, tiny_roberta, csv_files, tmp_path):
    results = run(tiny_roberta, csv_files, tmp_path, *CASES[case])

    assert results["train_examples"] == 48 and results["eval_examples"] == 16 and results["eval_split"] == "validation"
    assert 0.0 <= results["score"] <= 1.0 and results["optimizer_state_mb"] > 0
    assert results["peak_memory_mb"] > 0 and results["train_seconds"] > 0
    assert json.loads((tmp_path / "results.json").read_text())["score"] == results["score"]
    total, trainable = results["total_params"], results["trainable_params"]
    if case == "full-adamw":
        assert results["method"] == "full" and trainable == total
    if case == "lora":
        assert results["method"] == "lora" and trainable < 0.2 * total
    if case.startswith("galore"):
        assert results["method"] == "galore" and results["optim"] == CASES[case][1]
    if case == "galore-frozen-embeddings-mrpc-metric":
        assert set(results["eval_metrics"]) >= {"accuracy", "f1"} and results["metric"] == "f1"
        embeddings = sum(
            p.numel()
            for m in RobertaForSequenceClassification.from_pretrained(tiny_roberta).modules()
            if isinstance(m, torch.nn.Embedding)
            for p in m.parameters()
        )
        assert trainable == total - embeddings
    else:
        assert results["metric"] == "accuracy" and "accuracy" in results["eval_metrics"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--method", "lora", "--optim", "galore_adamw"], "--method lora with --optim galore_adamw"),
        (["--method", "galore"], "--method galore needs a GaLore optimizer"),
    ],
    ids=["lora-with-galore-optim", "galore-without-galore-optim"],
)
def test_run_glue_rejects_contradictory_method_and_optim(flags, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        run_glue.main(["--output_dir", str(tmp_path), *flags])


@pytest.mark.parametrize(
    ("task", "predictions", "references", "expected"),
    [
        ("sst2", [1, 0, 1, 1], [1, 0, 0, 1], {"accuracy": 0.75}),
        ("mrpc", [1, 0, 1, 1], [1, 0, 0, 1], {"accuracy": 0.75, "f1": 0.8}),
        ("cola", [1, 0, 1, 0], [1, 0, 1, 0], {"matthews_correlation": 1.0}),
        ("stsb", [0.1, 0.5, 0.9], [1.0, 2.0, 3.0], {"pearson": 1.0, "spearmanr": 1.0}),
    ],
    ids=["sst2-accuracy", "mrpc-accuracy-f1", "cola-matthews", "stsb-pearson-spearman"],
)
def test_local_glue_metric_gives_the_hub_keys(task, predictions, references, expected):
    metric = run_glue.load_glue_metric(task)
    assert metric.compute(predictions=predictions, references=references) == pytest.approx(expected)


def fake_result(name: str, method: str, score: float, state_mb: float) -> dict:
    return {
        "name": name,
        "method": method,
        "optim": "galore_adamw" if method == "galore" else "adamw_torch",
        "optim_args": "rank=8",
        "optim_target_modules": "attn,mlp",
        "learning_rate": 1e-3,
        "metric": "accuracy",
        "score": score,
        "data": "toy",
        "validation_examples": 1000,
        "trainable_params": 1000,
        "optimizer_state_mb": state_mb,
        "peak_memory_mb": 500.0,
        "train_seconds": 10.0,
        "process_seconds": 20.0,
        "model_args": {
            "freeze_embeddings": method == "galore",
            "lora_r": 8,
            "lora_alpha": 16,
            "lora_target_modules": "all-linear",
        },
    }


def test_compare_table_and_plot(tmp_path):
    results = [
        fake_result("full", "full", 0.8, 170.0),
        fake_result("lora", "lora", 0.79, 2.6),
        fake_result("galore", "galore", 0.795, 2.4),
    ]
    text = compare.table(results)
    assert text.splitlines()[0].startswith("| method | trains | lr | accuracy | trainable params |")
    assert "| galore | GaLore (rank=8) on attn,mlp; other parameters AdamW, embeddings frozen |" in text
    assert "| lora | LoRA r=8 α=16 on all-linear + classifier head |" in text
    assert "standard error of about 1.3 points" in compare.notes(results)[1]  # sqrt(0.79 * 0.21 / 1000)
    compare.plot(results, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_compare_end_to_end(tiny_roberta, csv_files, tmp_path):
    train, validation = csv_files
    compare.main(
        [
            "--results",
            str(tmp_path / "results.md"),
            "--work_dir",
            str(tmp_path / "runs"),
            "--model_name_or_path",
            str(tiny_roberta),
            "--train_file",
            str(train),
            "--validation_file",
            str(validation),
            "--max_seq_length",
            "32",
            "--per_device_train_batch_size",
            "8",
            "--use_cpu",
            "true",
        ]
    )
    markdown = (tmp_path / "results.md").read_text()
    assert all(f"| {name} |" in markdown for name in compare.METHODS)
    assert (tmp_path / "results.png").exists()
