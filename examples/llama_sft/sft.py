"""Supervised fine-tuning (SFT) of a causal LM on prompt/response pairs; the prompt tokens are masked out of the loss.

    # SMOKE RUN (offline default): a small RANDOM-INIT LLaMA on the chatterbot-corpus pairs, GaLore 8-bit
    python -m pip install --no-deps chatterbot-corpus==1.3.3
    python examples/llama_sft/sft.py --optim galore_adamw_8bit --optim_target_modules attn,mlp \
        --optim_args "rank=64,update_proj_gap=200,scale=0.25"
    python examples/llama_sft/sft.py ... --resume_from_checkpoint last     # continue from the newest checkpoint

The smoke run checks the pipeline end to end in a few minutes on 2 CPU cores (masking, packing, checkpoints,
resume, reload, generation). A model trained from scratch on 1,257 chit-chat pairs learns the format and some
replies, nothing more: it is not a chat model. Any `AutoModelForCausalLM` works by `--model_name_or_path`
(LLaMA family first), with data from the hub or local json/jsonl/yaml, e.g. with internet:

    python examples/llama_sft/sft.py --model_name_or_path meta-llama/Llama-3.2-1B-Instruct \
        --dataset_name tatsu-lab/alpaca --prompt_column instruction --response_column output \
        --optim galore_adamw_8bit --optim_target_modules attn,mlp \
        --optim_args "rank=128,update_proj_gap=200,scale=0.25" \
        --learning_rate 1e-5 --bf16 --max_length 512 --packing

Without hub access, a real pretrained causal LM (Gemma 3 270M, pip-installable, Gemma Terms of Use, ~13 s per
step on 2 CPU cores) is one command away: see examples/llama_sft/gemma_from_gguf.py.

Data: `--train_file` is a json/jsonl file of records with `--prompt_column`/`--response_column` (default
`prompt`/`response`), a yaml file (a list of such records, or chatterbot's `conversations:` lists, whose
consecutive turns become pairs) or a folder of yaml files. The tokenizer's chat template formats each pair when it
has one (the random-init default gets a small BPE tokenizer trained on the data, with a chat template); otherwise
"### Prompt:/### Response:". `--packing` concatenates examples into full `--max_length` blocks (labels keep their
masks; attention crosses example boundaries, as in classic packing). Every `TrainingArguments` flag works; the
final model and tokenizer are saved to `--output_dir`, reloaded with `from_pretrained` and asked the
`--sample_prompts`.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from datasets import Dataset, load_dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    HfArgumentParser,
    LlamaConfig,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
    set_seed,
)

import hf_galore  # noqa: F401  registers hf_galore's optimizers for --optim galore_*
from hf_galore.checkpoints import newest_complete_checkpoint

# -- config: defaults for TrainingArguments; any flag on the command line overrides them ---------------------------
DEFAULTS: dict[str, Any] = {
    "output_dir": "outputs/llama_sft",
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 32,
    "learning_rate": 1e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 10,
    "num_train_epochs": 8,
    "logging_steps": 20,
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "save_total_limit": 2,
    "report_to": "none",
    "seed": 0,
}
SMOKE_LLAMA = {  # the random-init model of the smoke run (--config_overrides changes any field)
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "tie_word_embeddings": False,
}
OFFLINE_DATA_PACKAGE = "chatterbot_corpus"  # English conversations under <package>/data/english
CHAT_TEMPLATE = (  # for the trained BPE tokenizer: <s><|user|>prompt</s><|assistant|>response</s>
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
IGNORE_INDEX = -100  # label of the tokens that carry no loss (the prompt, padding)
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Local directory or hub id of a causal LM. Default: a small random-init LLaMA (smoke run)."},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Random-init only: LlamaConfig fields, e.g. 'hidden_size=64,num_hidden_layers=2'."},
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={"help": "Tokenizer to use. Default: the model's; for random init, a BPE trained on the data."},
    )
    tokenizer_vocab_size: int = field(default=2048, metadata={"help": "Vocabulary of the BPE trained on the data."})


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset of prompt/response pairs."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its configuration, if any."})
    train_file: str | None = field(
        default=None,
        metadata={"help": "json/jsonl/yaml file or folder of yaml files. Default: chatterbot-corpus (English)."},
    )
    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the prompt."})
    response_column: str = field(default="response", metadata={"help": "Column holding the response."})
    max_length: int = field(default=128, metadata={"help": "Tokens per example (per block with --packing)."})
    packing: bool = field(default=False, metadata={"help": "Concatenate examples into full --max_length blocks."})
    validation_split_percentage: int = field(default=5, metadata={"help": "Pairs held out for evaluation (%)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use the first N training pairs."})
    sample_prompts: str = field(
        default="Hello|What is your name?|Do you like movies?",
        metadata={"help": "'|'-separated prompts answered by the reloaded model at the end ('' for none)."},
    )


def package_dir(name: str) -> Path:
    """Folder of an installed data package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The offline default needs {name.replace('_', '-')!r}: python -m pip install --no-deps "
            "chatterbot-corpus==1.3.3 (or pass --train_file / --dataset_name)."
        )
    return Path(spec.submodule_search_locations[0])


def yaml_pairs(path: Path, prompt_column: str, response_column: str) -> list[tuple[str, str]]:
    """Pairs from a yaml file: a list of records, or chatterbot's `conversations` (consecutive turns)."""
    content = yaml.safe_load(path.read_text(encoding="utf-8"))
    if isinstance(content, dict) and "conversations" in content:
        return [(str(a), str(b)) for turns in content["conversations"] for a, b in zip(turns, turns[1:])]
    if isinstance(content, list):
        return [(str(r[prompt_column]), str(r[response_column])) for r in content]
    raise ValueError(f"{path}: expected a list of records or a 'conversations' mapping, got {type(content).__name__}.")


def load_pairs(data: DataArguments) -> list[tuple[str, str]]:
    """Prompt/response pairs from the hub, a local file/folder, or the chatterbot default; exact duplicates dropped."""
    if data.dataset_name is not None:
        rows = load_dataset(data.dataset_name, data.dataset_config_name, split="train")
        pairs = list(zip(map(str, rows[data.prompt_column]), map(str, rows[data.response_column])))
    else:
        path = Path(data.train_file) if data.train_file else package_dir(OFFLINE_DATA_PACKAGE) / "data" / "english"
        if path.is_dir():
            files = sorted([*path.glob("*.yml"), *path.glob("*.yaml")])
            pairs = [p for f in files for p in yaml_pairs(f, data.prompt_column, data.response_column)]
        elif path.suffix in (".yml", ".yaml"):
            pairs = yaml_pairs(path, data.prompt_column, data.response_column)
        elif path.suffix in (".json", ".jsonl"):
            rows = load_dataset("json", data_files=str(path), split="train")
            pairs = list(zip(map(str, rows[data.prompt_column]), map(str, rows[data.response_column])))
        else:
            raise ValueError(f"Invalid --train_file {str(path)!r}. Must be .json, .jsonl, .yml, .yaml or a folder.")
    pairs = list(dict.fromkeys(pairs))
    if not pairs:
        raise ValueError("No prompt/response pairs found.")
    return pairs


def train_bpe_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `texts`, with <s>/</s>/<pad> and a chat template: no download needed."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def format_pair(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str) -> tuple[str, str]:
    """(prompt text, response text): the chat template's generation prompt and the rest, else a plain format."""
    if tokenizer.chat_template:
        user = [{"role": "user", "content": prompt}]
        head = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": response}], tokenize=False)
        if not full.startswith(head):
            raise ValueError("The chat template's generation prompt is not a prefix of the full conversation.")
        tail = full[len(head) :]
        if tokenizer.eos_token and not tail.rstrip().endswith(tokenizer.eos_token):
            tail += tokenizer.eos_token
        return head, tail
    return f"{tokenizer.bos_token or ''}### Prompt:\n{prompt}\n\n### Response:\n", f"{response}{tokenizer.eos_token}"


def tokenize_pair(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, max_length: int) -> dict[str, list]:
    """input_ids and labels for one pair; the prompt's labels are IGNORE_INDEX, so only the response is learned.

    Prompt and response are tokenized apart and concatenated, so the boundary is exact whatever the tokenizer.
    """
    head, tail = format_pair(tokenizer, prompt, response)
    prompt_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def pack(examples: list[dict[str, list]], block: int) -> list[dict[str, list]]:
    """Concatenate examples and cut full `block`-token pieces (the remainder is dropped); masks travel along."""
    ids = [t for e in examples for t in e["input_ids"]]
    labels = [t for e in examples for t in e["labels"]]
    return [
        {"input_ids": ids[i : i + block], "attention_mask": [1] * block, "labels": labels[i : i + block]}
        for i in range(0, len(ids) - block + 1, block)
    ]


def build_examples(
    tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]], data: DataArguments
) -> list[dict[str, list]]:
    examples = [tokenize_pair(tokenizer, p, r, data.max_length) for p, r in pairs]
    examples = [e for e in examples if any(label != IGNORE_INDEX for label in e["labels"])]  # response cut away
    return pack(examples, data.max_length) if data.packing else examples


def resolve_checkpoint(training_args: TrainingArguments) -> str | None:
    """`--resume_from_checkpoint last` means the newest complete checkpoint in --output_dir (a half-written newer one,
    from a run killed mid-save, is skipped with a warning)."""
    checkpoint = training_args.resume_from_checkpoint
    if checkpoint == "last":
        checkpoint = newest_complete_checkpoint(training_args.output_dir)
        if checkpoint is None:
            raise FileNotFoundError(f"--resume_from_checkpoint last: no checkpoint in {training_args.output_dir}.")
    return checkpoint


def parse_overrides(text: str | None) -> dict[str, Any]:
    """'hidden_size=64,tie_word_embeddings=true' -> {'hidden_size': 64, 'tie_word_embeddings': True}."""
    overrides: dict[str, Any] = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"Invalid --config_overrides item {item!r}. Must be key=value, e.g. hidden_size=64.")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value
    return overrides


def build_model_and_tokenizer(
    model_args: ModelArguments, texts: list[str], max_length: int, checkpoint: str | None
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """A pretrained causal LM, or (smoke run) a random-init LLaMA with a BPE tokenizer trained on the data.

    When resuming a random-init run, the tokenizer and config come from the checkpoint, so the vocabulary matches.
    """
    if model_args.model_name_or_path is not None:
        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path), tokenizer
    if checkpoint is not None:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(checkpoint)), tokenizer
    if model_args.tokenizer_name:
        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name)
    else:
        tokenizer = train_bpe_tokenizer(texts, model_args.tokenizer_vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=max(512, max_length),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{**SMOKE_LLAMA, **parse_overrides(model_args.config_overrides)},
    )
    model = AutoModelForCausalLM.from_config(config)
    print(f"SMOKE RUN: random-init LLaMA, {sum(p.numel() for p in model.parameters()):,} parameters")
    return model, tokenizer


@torch.no_grad()
def generate(model_dir: str, prompts: list[str], max_new_tokens: int = 32) -> dict[str, str]:
    """Reload the saved model and tokenizer with `from_pretrained` and answer each prompt greedily."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    answers = {}
    for prompt in prompts:
        head, _ = format_pair(tokenizer, prompt, "")
        inputs = tokenizer(head, add_special_tokens=False, return_tensors="pt")
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        answers[prompt] = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return answers


def parse(argv: list[str] | None) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    defaults = [item for key, value in DEFAULTS.items() for item in (f"--{key}", str(value))]
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    return parser.parse_args_into_dataclasses(args=defaults + list(sys.argv[1:] if argv is None else argv))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train, save, reload and generate; returns losses, steps, the output folder and the sample answers."""
    model_args, data_args, training_args = parse(argv)
    set_seed(training_args.seed)
    checkpoint = resolve_checkpoint(training_args)

    pairs = load_pairs(data_args)
    generator = torch.Generator().manual_seed(0)  # the same split whatever --seed
    order = torch.randperm(len(pairs), generator=generator).tolist()
    n_eval = math.ceil(len(pairs) * data_args.validation_split_percentage / 100)
    eval_pairs, train_pairs = [pairs[i] for i in order[:n_eval]], [pairs[i] for i in order[n_eval:]]
    train_pairs = train_pairs[: data_args.max_train_samples]
    print(f"{len(train_pairs)} training pairs, {len(eval_pairs)} held out")

    texts = [text for pair in train_pairs for text in pair]
    model, tokenizer = build_model_and_tokenizer(model_args, texts, data_args.max_length, checkpoint)
    train_set = Dataset.from_list(build_examples(tokenizer, train_pairs, data_args))
    eval_set = Dataset.from_list(build_examples(tokenizer, eval_pairs, data_args)) if eval_pairs else None
    if training_args.eval_strategy != "no" and eval_set is None:
        training_args.eval_strategy = "no"

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX),
    )
    train_output = trainer.train(resume_from_checkpoint=checkpoint)
    eval_loss = trainer.evaluate()["eval_loss"] if eval_set is not None else None
    trainer.save_model(training_args.output_dir)  # model + tokenizer, loadable with from_pretrained

    prompts = [p for p in data_args.sample_prompts.split("|") if p]
    answers = generate(training_args.output_dir, prompts) if prompts else {}
    for prompt, answer in answers.items():
        print(f"> {prompt}\n  {answer}")
    results = {
        "output_dir": training_args.output_dir,
        "global_step": trainer.state.global_step,
        "train_loss": train_output.training_loss,
        "eval_loss": eval_loss,
        "train_examples": len(train_set),
        "samples": answers,
    }
    Path(training_args.output_dir, "sft_results.json").write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
