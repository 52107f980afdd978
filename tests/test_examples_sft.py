"""examples/llama_sft/sft.py: prompt tokens masked, packing, data formats, train → save → resume → reload → generate.

Tiny random-init LLaMA and a BPE tokenizer trained on a few dozen pairs written to a temporary folder; no download
and no data package.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "llama_sft" / "sft.py"
spec = importlib.util.spec_from_file_location("examples_llama_sft", SCRIPT)
sft = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = sft
spec.loader.exec_module(sft)

PAIRS = [(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.") for a in range(1, 7) for b in range(1, 7)]  # 36 pairs
TINY = "hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=4,num_key_value_heads=4"


@pytest.fixture(scope="module")
def tokenizer():
    return sft.train_bpe_tokenizer([t for pair in PAIRS for t in pair], vocab_size=400)


@pytest.fixture(scope="module")
def chatterbot_yaml(tmp_path_factory) -> Path:
    """The chatterbot-corpus layout: consecutive turns of each conversation are pairs."""
    path = tmp_path_factory.mktemp("sft_data") / "sums.yml"
    conversations = [[prompt, response, "Thanks!", "You are welcome."] for prompt, response in PAIRS[:12]]
    conversations += [[prompt, response] for prompt, response in PAIRS[12:]]
    path.write_text(yaml.safe_dump({"categories": ["sums"], "conversations": conversations}))
    return path


def test_prompt_tokens_are_masked_with_the_chat_template(tokenizer):
    example = sft.tokenize_pair(tokenizer, "What is 2 plus 3?", "2 plus 3 is 5.", max_length=64)
    ids, labels = example["input_ids"], example["labels"]
    prompt_ids = tokenizer("<s><|user|>What is 2 plus 3?</s><|assistant|>", add_special_tokens=False)["input_ids"]
    n = len(prompt_ids)

    assert ids[:n] == prompt_ids
    assert labels[:n] == [sft.IGNORE_INDEX] * n
    assert labels[n:] == ids[n:] and len(labels) == len(ids) == len(example["attention_mask"])
    assert tokenizer.decode(labels[n:]) == "2 plus 3 is 5.</s>"


def test_prompt_tokens_are_masked_without_a_chat_template(tokenizer):
    plain = sft.train_bpe_tokenizer([t for pair in PAIRS for t in pair], vocab_size=400)
    plain.chat_template = None
    example = sft.tokenize_pair(plain, "What is 1 plus 1?", "1 plus 1 is 2.", max_length=64)
    learned = [t for t in example["labels"] if t != sft.IGNORE_INDEX]

    assert plain.decode(learned) == "1 plus 1 is 2.</s>"
    assert plain.decode(example["input_ids"]).startswith("<s>### Prompt:\nWhat is 1 plus 1?\n\n### Response:\n")


def test_packing_keeps_the_masks_in_full_blocks(tokenizer):
    data = sft.DataArguments(max_length=16, packing=True)
    blocks = sft.build_examples(tokenizer, PAIRS, data)
    unpacked = sft.build_examples(tokenizer, PAIRS, sft.DataArguments(max_length=16))
    flat_labels = [t for e in unpacked for t in e["labels"]]

    assert blocks and all(len(b["input_ids"]) == len(b["labels"]) == 16 for b in blocks)
    assert [t for b in blocks for t in b["labels"]] == flat_labels[: 16 * len(blocks)]


@pytest.mark.parametrize("form", ["chatterbot-yaml", "records-yaml", "jsonl"])
def test_load_pairs_reads_local_formats(form, chatterbot_yaml, tmp_path):
    if form == "chatterbot-yaml":
        path = chatterbot_yaml
    elif form == "records-yaml":
        path = tmp_path / "pairs.yaml"
        path.write_text(yaml.safe_dump([{"q": p, "a": r} for p, r in PAIRS]))
    else:
        path = tmp_path / "pairs.jsonl"
        path.write_text("\n".join(json.dumps({"q": p, "a": r}) for p, r in PAIRS))
    columns = {} if form == "chatterbot-yaml" else {"prompt_column": "q", "response_column": "a"}
    pairs = sft.load_pairs(sft.DataArguments(train_file=str(path), **columns))

    assert set(PAIRS) <= set(pairs)
    assert len(pairs) == len(set(pairs)) == (36 + 12 + 1 if form == "chatterbot-yaml" else 36)  # dups dropped


def test_train_save_resume_reload_generate(chatterbot_yaml, tmp_path):
    common = [
        *("--train_file", str(chatterbot_yaml), "--config_overrides", TINY, "--tokenizer_vocab_size", "400"),
        *("--max_length", "48", "--per_device_train_batch_size", "8", "--max_steps", "6", "--save_strategy", "steps"),
        *("--save_steps", "3", "--eval_strategy", "no", "--logging_steps", "1", "--learning_rate", "3e-3"),
        *("--optim", "galore_adamw_8bit", "--optim_target_modules", "attn,mlp"),
        *("--optim_args", "rank=4,update_proj_gap=2,scale=1", "--use_cpu", "true", "--disable_tqdm", "true"),
        *("--sample_prompts", "What is 2 plus 2?"),
    ]
    whole = sft.main([*common, "--output_dir", str(tmp_path / "whole")])
    assert whole["global_step"] == 6 and whole["eval_loss"] is not None
    assert isinstance(whole["samples"]["What is 2 plus 2?"], str)
    assert (tmp_path / "whole" / "checkpoint-3").is_dir() and (tmp_path / "whole" / "checkpoint-6").is_dir()

    checkpoint = str(tmp_path / "whole" / "checkpoint-3")
    resumed = sft.main([*common, "--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint", checkpoint])
    assert resumed["global_step"] == 6

    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "whole").state_dict()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "resumed").state_dict()
    assert reference.keys() == reloaded.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(reloaded[name], tensor, msg=lambda m, name=name: f"{name}: {m}")


def test_resume_last_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        sft.main(["--output_dir", str(tmp_path), "--resume_from_checkpoint", "last"])
