"""`hf-galore estimate`: its optimizer-state figure equals what the real optimizer allocates; bad input is an error."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertLMHeadModel,
    CodeGenConfig,
    GPT2Config,
    LlamaConfig,
    T5Config,
    Trainer,
    TrainingArguments,
)

import hf_galore
from hf_galore.cli import main
from hf_galore.estimate import activation_bytes, estimate, parse_memory_size
from hf_galore.presets import PRESETS, preset_config
from hf_galore.trainer_factory import GALORE_OPTIMIZERS

TINY = ["--preset", "llama-tiny"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny shapes: one thread. Two OpenMP threads on a busy 2-core machine can make a 64x172 SVD take a second."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_cli(capsys, *flags):
    main(["estimate", *flags, "--json"])
    return json.loads(capsys.readouterr().out)


def gpt2_config_dir(tmp_path):
    """GPT-2: Conv1D weights stored (in, out) and an LM head tied to the embeddings."""
    config = GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    config.save_pretrained(tmp_path / "gpt2")
    return tmp_path / "gpt2"


def real_state_bytes(config, optim, optim_args, dtype, tmp_path, *, classify=False):
    """Build the real model (a causal LM, or with `classify` a sequence classifier) and the optimizer the Trainer
    would build for these flags, step once, measure."""
    torch.manual_seed(0)
    auto_class = AutoModelForSequenceClassification if classify else AutoModelForCausalLM
    model = auto_class.from_config(config, dtype=dtype)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        optim=optim,
        optim_target_modules="attn,mlp",
        optim_args=optim_args,
        use_cpu=True,
        report_to="none",
        max_grad_norm=0.0,  # layer-wise forms warn otherwise
    )
    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    optimizer = optimizer_cls(model.parameters(), **kwargs)
    tokens = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, config.num_labels - 1]) if classify else tokens
    model(tokens, labels=labels).loss.backward()
    optimizer.step()
    return hf_galore.optimizer_state_bytes(optimizer)


# id -> (optim, optim_args, dtype); min_8bit_size=256 puts the projected targets on the 8-bit path too
CASES = {
    "galore_adamw-fp32": ("galore_adamw", "rank=8", "float32"),
    "galore_adamw-bf16": ("galore_adamw", "rank=8,proj_type=reverse_std", "bfloat16"),
    "galore_adamw_8bit-fp32-min256": ("galore_adamw_8bit", "rank=8,min_8bit_size=256", "float32"),
    "galore_adamw_8bit-bf16": ("galore_adamw_8bit", "rank=8", "bfloat16"),
    "galore_adamw_8bit_layerwise-bf16-min256": ("galore_adamw_8bit_layerwise", "rank=8,min_8bit_size=256", "bfloat16"),
    "galore_adafactor-fp32": ("galore_adafactor", "rank=8", "float32"),
    "galore_adafactor-fp32-full": ("galore_adafactor", "rank=8,proj_type=full", "float32"),
    "galore_adamw-fp32-others-adafactor": ("galore_adamw", "rank=8,others=adafactor", "float32"),
    "galore_adafactor-bf16-others-adamw8bit": ("galore_adafactor", "rank=8,others=adamw8bit", "bfloat16"),
    "galore_adamw_8bit-fp32-others-frozen": ("galore_adamw_8bit", "rank=8,others=frozen", "float32"),
    "galore_adamw-fp32-fira": ("galore_adamw", "rank=8,residual=fira", "float32"),
    "apollo_adamw-fp32": ("apollo_adamw", "rank=8", "float32"),
    "apollo_adamw-bf16-mini": ("apollo_adamw", "rank=1,scale_type=tensor", "bfloat16"),
    "apollo_adamw_layerwise-fp32-svd": ("apollo_adamw_layerwise", "rank=8,proj=svd", "float32"),
    "apollo_adamw-fp32-others-adafactor": ("apollo_adamw", "rank=8,others=adafactor", "float32"),
    "adamw_torch-bf16": ("adamw_torch", None, "bfloat16"),
    "adamw_torch_fused-fp32": ("adamw_torch_fused", None, "float32"),
    "adamw_bnb_8bit-bf16": ("adamw_bnb_8bit", None, "bfloat16"),
    "adafactor-fp32": ("adafactor", None, "float32"),
}
CASE_PARAMS = [pytest.param(*case, id=name) for name, case in CASES.items()]
CASE_PARAMS.append(pytest.param("galore_adafactor", "rank=8", "bfloat16", id="galore_adafactor-bf16"))


@pytest.mark.parametrize(("optim", "optim_args", "dtype"), CASE_PARAMS)
def test_state_bytes_equal_the_real_optimizer(capsys, tmp_path, optim, optim_args, dtype):
    flags = [*TINY, "--optim", optim, "--optim_target_modules", "attn,mlp", "--dtype", dtype]
    plan = run_cli(capsys, *flags, *(["--optim_args", optim_args] if optim_args else []))
    real = real_state_bytes(preset_config("llama-tiny"), optim, optim_args, getattr(torch, dtype), tmp_path)
    assert plan["optimizer_state"] == plan["state_by_optimizer"][optim] == real


def test_config_file_gpt2_conv1d_and_tied_head(capsys, tmp_path):
    folder = gpt2_config_dir(tmp_path)
    plan = run_cli(
        capsys,
        "--config",
        str(folder / "config.json"),
        "--optim",
        "galore_adamw_8bit",
        "--optim_target_modules",
        "attn,mlp",
        "--optim_args",
        "rank=4,min_8bit_size=64",
        "--seq-len",
        "64",  # the config's n_positions
    )
    real = real_state_bytes(
        GPT2Config.from_pretrained(folder), "galore_adamw_8bit", "rank=4,min_8bit_size=64", torch.float32, tmp_path
    )
    assert plan["optimizer_state"] == real
    assert plan["optimizer"]["targets"] == 8  # c_attn, c_proj (attention), c_fc, c_proj (mlp) per layer
    assert (
        plan["model"]["parameters"]
        == AutoModelForCausalLM.from_config(GPT2Config.from_pretrained(folder)).num_parameters()
    )
    from_folder = run_cli(capsys, "--config", str(folder), "--seq-len", "64")  # a folder holding config.json works too
    assert from_folder["optimizer_state"] > 0


def test_galore_repo_style_config_json(capsys, tmp_path):
    """The GaLore repository's configs (LLaMAForCausalLM architecture name, max_sequence_length) load as they are."""
    path = tmp_path / "llama_60m.json"
    galore_style = {
        "architectures": ["LLaMAForCausalLM"],
        "max_sequence_length": 1024,
        "model_type": "llama",
        "pad_token_id": -1,
        **{k: v for k, v in PRESETS["llama-60m"].items() if k != "max_position_embeddings"},
    }
    path.write_text(json.dumps(galore_style))
    from_file = run_cli(capsys, "--config", str(path), "--optim", "galore_adamw", "--optim_target_modules", "attn,mlp")
    from_preset = run_cli(
        capsys, "--preset", "llama-60m", "--optim", "galore_adamw", "--optim_target_modules", "attn,mlp"
    )
    assert from_file["optimizer_state"] == from_preset["optimizer_state"]
    assert from_file["model"]["parameters"] == from_preset["model"]["parameters"] == 58_073_600  # the paper's 60M


def test_json_breakdown_and_table(capsys):
    flags = [
        *TINY,
        "--optim",
        "galore_adamw_layerwise",
        "--optim_target_modules",
        "attn,mlp",
        "--optim_args",
        "rank=8",
    ]
    plan = run_cli(
        capsys, *flags, "--dtype", "bf16", "--batch-size", "2", "--seq-len", "32", "--device-memory", "1GiB"
    )
    parts = ("weights", "gradients", "optimizer_state", "refresh_workspace", "activations", "overhead")
    assert plan["total"] == sum(plan[key] for key in parts)
    assert plan["gradients"] == plan["gradients_layerwise"] == 512 * 64 * 2  # the embedding's (or head's) gradient
    assert plan["gradients_full"] == plan["model"]["trainable_parameters"] * 2
    assert plan["fits"] is True and plan["largest_rank"] == 64 and plan["largest_batch_size"] > 2
    assert set(plan["state_by_optimizer"]) == {
        *("galore_adamw", "galore_adamw_8bit", "galore_adafactor"),
        *("adamw_torch", "adamw_bnb_8bit", "galore_adamw_layerwise"),
    }
    main(["estimate", *flags, "--device-memory", "1GiB"])
    table = capsys.readouterr().out
    for text in (
        "optimizer state",
        "activations (estimate)",
        "fits",
        "largest rank",
        "<- --optim galore_adamw_layerwise",
    ):
        assert text in table


def test_largest_rank_and_batch_are_the_boundaries():
    common = {"preset": "llama-60m", "optim": "galore_adamw", "optim_target_modules": "attn,mlp", "seq_len": 64}
    reference = estimate(**common, optim_args="rank=128")
    device = reference.total  # exactly full at rank 128, batch 1
    plan = estimate(**common, optim_args="rank=128", device_memory=device)
    assert plan.fits and plan.largest_rank == 128 and plan.largest_batch_size == 1
    assert not estimate(**common, optim_args="rank=129", device_memory=device).fits
    assert estimate(**common, optim_args="rank=128", batch_size=2).total > device
    assert estimate(**common, optim_args="rank=128", device_memory=device - 1).fits is False


def test_activation_estimate_is_the_documented_formula():
    config = preset_config("llama-7b")
    s, b, h, a, layers, vocab = 256, 1, 4096, 32, 32, 32000
    expected = layers * s * b * h * (34 + 5 * a * s // h) + 2 * s * b * h * 2 + s * b * vocab * (2 + 8)
    assert activation_bytes(config, batch_size=b, seq_len=s, dtype=torch.bfloat16) == expected
    checkpointed = activation_bytes(config, batch_size=b, seq_len=s, dtype=torch.bfloat16, gradient_checkpointing=True)
    assert checkpointed < expected / 4
    assert activation_bytes(config, batch_size=b, seq_len=s, dtype=torch.float32) > expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24GB", 24 * 10**9),
        ("24GiB", 24 * 2**30),
        ("80G", 80 * 10**9),
        ("512MiB", 512 * 2**20),
        ("1024", 1024),
        ("1.5 GiB", 3 * 2**29),
    ],
)
def test_memory_sizes(text, expected):
    assert parse_memory_size(text) == expected


BAD_INPUT = {
    "unknown-preset": (["--preset", "llama-9b"], "Unknown preset 'llama-9b'. Presets: llama-tiny, llama-60m"),
    "missing-config": (["--config", "/nowhere/config.json"], "no such file '/nowhere/config.json'"),
    "rank-0": (
        [*TINY, "--optim", "galore_adamw", "--optim_target_modules", "attn", "--optim_args", "rank=0"],
        "Invalid rank=0. Must be an int >= 1.",
    ),
    "rank-negative": (
        [*TINY, "--optim", "galore_adamw_8bit", "--optim_target_modules", "attn", "--optim_args", "rank=-4"],
        "Invalid rank=-4",
    ),
    "bad-dtype": ([*TINY, "--dtype", "int8"], "Invalid dtype='int8'. Must be one of float32, bfloat16, float16"),
    "unknown-optim": ([*TINY, "--optim", "sgd"], "Invalid optim='sgd'. The planner knows: galore_adamw, "),
    "no-targets": ([*TINY, "--optim", "galore_adamw"], "GaLore needs target modules"),
    "no-match": ([*TINY, "--optim", "galore_adamw", "--optim_target_modules", "conv"], "No target modules found"),
    "unknown-key": (
        [*TINY, "--optim", "galore_adamw", "--optim_target_modules", "attn", "--optim_args", "rnak=4"],
        "Unknown optim_args key(s) 'rnak'",
    ),
    "malformed-args": (
        [*TINY, "--optim", "galore_adamw", "--optim_target_modules", "attn", "--optim_args", "rank=4,"],
        "Invalid optim_args entry '' in 'rank=4,' (a trailing or doubled comma?): each entry must be key=value",
    ),
    "args-without-galore": ([*TINY, "--optim", "adamw_torch", "--optim_args", "rank=4"], "galore_* optimizers only"),
    "bad-device-memory": ([*TINY, "--device-memory", "24 bananas"], "Invalid memory size '24 bananas'"),
    "batch-0": ([*TINY, "--batch-size", "0"], "Invalid batch_size=0. Must be an int >= 1."),
}


@pytest.mark.parametrize(("flags", "message"), BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_is_a_clear_error(flags, message):
    with pytest.raises(SystemExit) as error:
        main(["estimate", *flags])
    assert str(error.value).startswith("hf-galore estimate: error: ")
    assert message in str(error.value)


def test_seven_b_plan_benchmark_quick(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "seven_b_plan", Path(__file__).parent.parent / "benchmarks" / "seven_b_plan.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    output = tmp_path / "plan.json"
    report = module.main(["--quick", "--output", str(output)])
    assert json.loads(output.read_text()) == report
    runs = list(report["runs"].values())
    assert len(runs) == 5 and all(run["plan"]["total"] > 0 for run in runs)
    layerwise, checkpointed, full_grads, adam8, adamw = (run["plan"] for run in runs)
    assert layerwise["gradients"] < full_grads["gradients"] and layerwise["optimizer_state"] < adam8["optimizer_state"]
    assert adam8["optimizer_state"] < adamw["optimizer_state"]
    assert "paper's claim" in capsys.readouterr().out


BERT_TINY = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}


def _config_json(tmp_path, config) -> str:
    config.save_pretrained(tmp_path / "model")
    return str(tmp_path / "model" / "config.json")


def test_encoder_config_is_refused_naming_its_model_type(tmp_path):
    path = _config_json(tmp_path, BertConfig(**BERT_TINY))
    with pytest.raises(SystemExit) as error:
        main(["estimate", "--config", path])
    assert str(error.value) == (
        "hf-galore estimate: error: Cannot plan model_type='bert' (BertConfig) for task='causal-lm': it is an encoder "
        "(masked LM) and its config has is_decoder=false. task='causal-lm' plans causal language models as "
        "AutoModelForCausalLM builds them (llama, mistral, qwen2, gpt2, ...; an encoder such as BERT only with "
        "is_decoder=true in its config); task='sequence-classification' (--task sequence-classification) plans an "
        "encoder or decoder with a classification head as AutoModelForSequenceClassification builds it."
    )


# id -> (optim, optim_args, dtype, num_labels)
CLASSIFIER_CASES = {
    "galore_adamw_8bit-fp32-2labels": ("galore_adamw_8bit", "rank=4,min_8bit_size=256", "float32", None),
    "galore_adamw-bf16-3labels": ("galore_adamw", "rank=4", "bfloat16", 3),
    "galore_adafactor-fp32-5labels": ("galore_adafactor", "rank=4", "float32", 5),
}


@pytest.mark.parametrize(
    ("optim", "optim_args", "dtype", "num_labels"), CLASSIFIER_CASES.values(), ids=CLASSIFIER_CASES.keys()
)
def test_encoder_sequence_classification_state_equals_the_real_optimizer(
    capsys, tmp_path, optim, optim_args, dtype, num_labels
):
    config = BertConfig(**BERT_TINY, num_labels=num_labels or 2)
    flags = ["--config", _config_json(tmp_path, BertConfig(**BERT_TINY)), "--task", "sequence-classification"]
    flags += ["--optim", optim, "--optim_target_modules", "attn,mlp", "--optim_args", optim_args, "--dtype", dtype]
    plan = run_cli(capsys, *flags, *(["--num-labels", str(num_labels)] if num_labels else []))
    real = real_state_bytes(config, optim, optim_args, getattr(torch, dtype), tmp_path, classify=True)
    assert plan["optimizer_state"] == real
    assert plan["model"]["architecture"] == "BertForSequenceClassification"
    assert plan["model"]["task"] == "sequence-classification" and plan["model"]["num_labels"] == config.num_labels
    assert plan["model"]["parameters"] == BertForSequenceClassification(config).num_parameters()


def test_classification_activations_replace_the_logits_by_pooled_output_and_labels(tmp_path):
    config = BertConfig(**BERT_TINY)
    s, b, h, a, layers, labels = 64, 4, 32, 2, 2, 3
    per_layer = s * b * h * (34 + 5 * a * s // h)  # 16-bit bytes; float32 doubles them
    expected = 2 * layers * per_layer + b * h * 4 + b * labels * (4 + 8)
    common = {"batch_size": b, "seq_len": s, "dtype": torch.float32}
    assert activation_bytes(config, **common, task="sequence-classification", num_labels=labels) == expected
    path = _config_json(tmp_path, config)
    plan = estimate(config=path, task="sequence-classification", num_labels=labels, seq_len=s, batch_size=b)
    assert plan.activations == expected


TASK_REFUSALS = {
    "no-classifier": (
        "codegen",
        ["--task", "sequence-classification"],
        "Cannot plan model_type='codegen' (CodeGenConfig) for task='sequence-classification': it is not a model "
        "type AutoModelForSequenceClassification can build.",
    ),
    "encoder-decoder-classifier": (
        "t5",
        ["--task", "sequence-classification"],
        "Cannot plan model_type='t5' (T5Config) for task='sequence-classification': it is an encoder-decoder model.",
    ),
    "labels-without-classifier": ("bert", ["--num-labels", "3"], "Invalid num_labels=3 with task='causal-lm'"),
    "zero-labels": (
        "bert",
        ["--task", "sequence-classification", "--num-labels", "0"],
        "Invalid num_labels=0. Must be an int >= 1.",
    ),
}
TASK_CONFIGS = {
    "codegen": lambda: CodeGenConfig(vocab_size=64, n_embd=32, n_layer=2, n_head=2, rotary_dim=8, n_positions=64),
    "t5": lambda: T5Config(vocab_size=64, d_model=32, d_kv=16, d_ff=48, num_layers=2, num_heads=2),
    "bert": lambda: BertConfig(**BERT_TINY),
}


@pytest.mark.parametrize(("model_type", "flags", "message"), TASK_REFUSALS.values(), ids=TASK_REFUSALS.keys())
def test_task_a_config_cannot_be_built_for_is_refused(tmp_path, model_type, flags, message):
    with pytest.raises(SystemExit) as error:
        main(["estimate", "--config", _config_json(tmp_path, TASK_CONFIGS[model_type]()), "--seq-len", "64", *flags])
    assert message in str(error.value)


def test_unknown_task_is_refused():
    with pytest.raises(ValueError, match=r"Invalid task='token-classification'. Must be one of causal-lm, seq"):
        estimate(preset="llama-tiny", task="token-classification")


def test_encoder_marked_as_decoder_is_planned_as_its_causal_lm(capsys, tmp_path):
    config = BertConfig(**BERT_TINY, is_decoder=True)
    plan = run_cli(capsys, "--config", _config_json(tmp_path, config), "--seq-len", "64")
    assert plan["model"]["architecture"] == "BertLMHeadModel"  # what is planned, said in the plan
    assert plan["model"]["parameters"] == BertLMHeadModel(config).num_parameters()


def test_encoder_decoder_config_is_refused(tmp_path):
    path = _config_json(tmp_path, T5Config(vocab_size=64, d_model=32, d_kv=16, d_ff=48, num_layers=2, num_heads=2))
    with pytest.raises(
        SystemExit, match=r"Cannot plan model_type='t5' \(T5Config\) for task='causal-lm': it is an encoder-decoder"
    ):
        main(["estimate", "--config", path])


def test_sequence_longer_than_the_model_positions_is_refused():
    with pytest.raises(SystemExit) as error:
        main(["estimate", *TINY, "--seq-len", "257"])
    assert str(error.value) == (
        "hf-galore estimate: error: Invalid seq_len=257: longer than the model's max_position_embeddings=256. "
        "Pass --seq-len 256 or less."
    )
    assert estimate(preset="llama-tiny", seq_len=256).seq_len == 256  # the limit itself is fine


def test_galore_optimizers_unpack_as_class_form_layerwise():
    optimizer_cls, form, layerwise = GALORE_OPTIMIZERS["galore_adamw_8bit_layerwise"]
    assert (optimizer_cls, form, layerwise) == (hf_galore.GaLoreAdamW8bit, "adamw8bit", True)
    assert GALORE_OPTIMIZERS["galore_adafactor"].form == "adafactor"
    assert not GALORE_OPTIMIZERS["galore_adafactor"].layerwise


# Odd sizes, so that FSDP2's torch.chunk cut leaves rank 0 one row more: vocabulary 127, MLP 63, 2 KV heads.
ODD_LLAMA = {
    "vocab_size": 127,
    "hidden_size": 32,
    "intermediate_size": 63,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


def _rows(m, world=2):
    return -(-m // world)


def _odd_llama():
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(LlamaConfig(**ODD_LLAMA))


def _odd_llama_shapes():
    """(name, shape, GaLore target) of the odd LLaMA's trainable tensors, as attn,mlp selects them."""
    model = _odd_llama()
    return [
        (name, tuple(p.shape), p.dim() == 2 and (".self_attn." in name or ".mlp." in name))
        for name, p in model.named_parameters()
    ]


@pytest.mark.parametrize("method", ["randomized", "exact"])
def test_fsdp_per_rank_state_weights_and_traffic_by_hand(tmp_path, method):
    """N=2, largest rank: ⌈m/2⌉ rows of every weight, gradient and moment; the r×n right bases replicated."""
    path = _config_json(tmp_path, LlamaConfig(**ODD_LLAMA))
    rank, common = 4, {"optim_target_modules": "attn,mlp", "seq_len": 64}
    args = f"rank={rank},refresh_method={method}"
    plan = estimate(config=path, optim="galore_adamw", optim_args=args, fsdp=2, **common)
    state = traffic = params = 0
    buffers = sum(b.numel() * 4 for b in _odd_llama().buffers())  # replicated (the rotary frequencies)
    for _, (m, *rest), target in _odd_llama_shapes():
        n = rest[0] if rest else 1
        params += _rows(m) * n * 4
        if target:
            r, k = min(rank, m, n), min(rank + 8, m, n)
            state += 2 * _rows(m) * r * 4 + r * n * 4  # two moments on the rank's rows of G Qᵀ, basis Q (r×n)
            traffic += 4 * m * n if method == "exact" else 3 * n * k * 4 + n * r * 4 + 2 * k * k * 4
        else:
            state += 2 * _rows(m) * n * 4
    assert plan.fsdp == 2 and plan.optimizer_state == plan.state_by_optimizer["galore_adamw"] == state
    assert plan.weights == params + buffers and plan.gradients == params
    assert plan.refresh_communication == traffic and plan.step_communication == 0
    parts = ("weights", "gradients", "optimizer_state", "refresh_workspace", "activations", "fsdp_buffers", "overhead")
    assert plan.total == sum(getattr(plan, key) for key in parts)
    one = estimate(config=path, optim="galore_adamw", optim_args=args, **common)
    assert (one.fsdp, one.fsdp_buffers, one.refresh_communication, one.step_communication) == (None, 0, None, None)
    assert plan.activations == one.activations and plan.optimizer_state < one.optimizer_state


def test_fsdp_adafactor_layerwise_and_buffers_by_hand(tmp_path):
    path = _config_json(tmp_path, LlamaConfig(**ODD_LLAMA))
    common = {"optim_target_modules": "attn,mlp", "seq_len": 64, "fsdp": 2}
    plan = estimate(config=path, optim="galore_adafactor_layerwise", optim_args="rank=4", **common)
    shapes = _odd_llama_shapes()
    state = sum(
        _rows(m) * 4 + 4 * 4 + 4 * rest[0] * 4  # row statistic (m_i), column statistic (r), basis (r×n)
        if target
        else (_rows(m) + rest[0]) * 4
        if rest
        else _rows(m) * 4  # factored, or the full second moment of a vector
        for _, (m, *rest), target in shapes
    )
    assert plan.optimizer_state == state
    assert plan.step_communication == 14 * 4 * (4 + 2)  # 14 targets, each min(4, m, n) = 4 columns + 2 scalars
    assert plan.gradients == max(_rows(m) * (rest[0] if rest else 1) * 4 for _, (m, *rest), _ in shapes)
    # Unsharded: the root (embeddings, final norm, head) and one decoder layer, each with its gradient.
    layer = sum(math.prod(shape) for name, shape, _ in shapes if name.startswith("model.layers.0."))
    root = sum(math.prod(shape) for name, shape, _ in shapes if not name.startswith("model.layers."))
    assert plan.fsdp_buffers == 2 * (layer + root) * 4


def test_fsdp_refusals():
    with pytest.raises(SystemExit, match=r"Invalid fsdp=0. Must be an int >= 1 \(the processes FSDP2 shards over\)"):
        main(["estimate", *TINY, "--fsdp", "0"])
    flags = [*TINY, "--optim", "galore_adamw", "--optim_target_modules", "attn", "--optim_args", "proj_type=left"]
    message = r"the 64x64 targets: Invalid proj_type='left' for a weight row-sharded by FSDP2"
    with pytest.raises(SystemExit, match=message):
        main(["estimate", *flags, "--fsdp", "2"])


def test_others_frozen_plans_gradients_for_the_targets_only(capsys):
    flags = [*TINY, "--optim", "galore_adamw", "--optim_target_modules", "attn,mlp"]
    same = run_cli(capsys, *flags, "--optim_args", "rank=8")
    frozen = run_cli(capsys, *flags, "--optim_args", "rank=8,others=frozen")
    model = AutoModelForCausalLM.from_config(preset_config("llama-tiny"))
    targets = {id(t.param) for t in hf_galore.select_targets(model, "attn,mlp")}
    target_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) in targets)
    assert frozen["gradients_full"] == target_bytes < same["gradients_full"]
