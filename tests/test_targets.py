"""Target selection on tiny random-init Hugging Face models (built from configs, no downloads)."""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import transformers
from hypothesis import given
from hypothesis import strategies as st

from hf_galore.targets import GaLoreTarget, format_target_table, parse_target_modules, select_targets

LAYERS = (0, 1)
TINY = {"vocab_size": 64}
BERT_LIKE = {**TINY, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 48}
DECODER = {**BERT_LIKE, "num_key_value_heads": 1}
T5_TINY = {**TINY, "d_model": 32, "d_kv": 16, "d_ff": 48, "num_layers": 2, "num_heads": 2}


def _names(*templates: str) -> set[str]:
    """Expand ``{i}`` (layer index) in each template over the two tiny layers."""
    return {template.format(i=i) for template in templates for i in LAYERS}


@functools.cache
def _bert() -> torch.nn.Module:
    config = transformers.BertConfig(**BERT_LIKE, max_position_embeddings=32)
    return transformers.AutoModelForSequenceClassification.from_config(config)


@functools.cache
def _roberta() -> torch.nn.Module:
    config = transformers.RobertaConfig(**BERT_LIKE, max_position_embeddings=40)
    return transformers.AutoModelForSequenceClassification.from_config(config)


@functools.cache
def _decoder(config_cls: type) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_config(config_cls(**DECODER))


@functools.cache
def _gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(
        **TINY, n_embd=32, n_layer=2, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return transformers.AutoModelForCausalLM.from_config(config)


@functools.cache
def _t5(feed_forward_proj: str = "relu") -> torch.nn.Module:
    config = transformers.T5Config(**T5_TINY, feed_forward_proj=feed_forward_proj)
    return transformers.T5ForConditionalGeneration(config)


def _llama() -> torch.nn.Module:
    return _decoder(transformers.LlamaConfig)


def _fresh_llama() -> torch.nn.Module:
    """A model the test may modify (freezing), not the cached one."""
    return transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**DECODER))


def _t5_names(*encoder_decoder: str, decoder_only: tuple[str, ...] = ()) -> set[str]:
    names = set()
    for stack, sublayer_offset in (("encoder", 0), ("decoder", 1)):
        for template in encoder_decoder:
            names |= _names(f"{stack}.block.{{i}}." + template.format(ff=1 + sublayer_offset))
    for template in decoder_only:
        names |= _names("decoder.block.{i}." + template)
    return names


_BERT_ATTN = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")
_LLAMA_ATTN = _names(*(f"model.layers.{{i}}.self_attn.{p}_proj" for p in "qkvo"))
_LLAMA_MLP = _names(*(f"model.layers.{{i}}.mlp.{p}_proj" for p in ("gate", "up", "down")))
_T5_ATTN = _t5_names(
    *(f"layer.0.SelfAttention.{p}" for p in "qkvo"), decoder_only=tuple(f"layer.1.EncDecAttention.{p}" for p in "qkvo")
)


@dataclass(frozen=True)
class Case:
    build: Callable[[], torch.nn.Module]
    attn: set[str]
    mlp: set[str]
    heads: set[str]  # linear heads that all-linear and the aliases must leave out
    transposed: bool = False


CASES = {
    "bert": Case(
        _bert,
        attn=_names(*(f"bert.encoder.layer.{{i}}.{m}" for m in _BERT_ATTN)),
        mlp=_names("bert.encoder.layer.{i}.intermediate.dense", "bert.encoder.layer.{i}.output.dense"),
        heads={"bert.pooler.dense", "classifier"},
    ),
    "roberta": Case(
        _roberta,
        attn=_names(*(f"roberta.encoder.layer.{{i}}.{m}" for m in _BERT_ATTN)),
        mlp=_names("roberta.encoder.layer.{i}.intermediate.dense", "roberta.encoder.layer.{i}.output.dense"),
        heads={"classifier.dense", "classifier.out_proj"},
    ),
    "llama": Case(_llama, attn=_LLAMA_ATTN, mlp=_LLAMA_MLP, heads={"lm_head"}),
    "mistral": Case(lambda: _decoder(transformers.MistralConfig), attn=_LLAMA_ATTN, mlp=_LLAMA_MLP, heads={"lm_head"}),
    "qwen2": Case(lambda: _decoder(transformers.Qwen2Config), attn=_LLAMA_ATTN, mlp=_LLAMA_MLP, heads={"lm_head"}),
    "gpt2-conv1d": Case(
        _gpt2,
        attn=_names("transformer.h.{i}.attn.c_attn", "transformer.h.{i}.attn.c_proj"),
        mlp=_names("transformer.h.{i}.mlp.c_fc", "transformer.h.{i}.mlp.c_proj"),
        heads={"lm_head"},
        transposed=True,
    ),
    "t5": Case(
        _t5,
        attn=_T5_ATTN,
        mlp=_t5_names("layer.{ff}.DenseReluDense.wi", "layer.{ff}.DenseReluDense.wo"),
        heads={"lm_head"},
    ),
    "t5-gated": Case(
        lambda: _t5("gated-gelu"),
        attn=_T5_ATTN,
        mlp=_t5_names(*(f"layer.{{ff}}.DenseReluDense.{w}" for w in ("wi_0", "wi_1", "wo"))),
        heads={"lm_head"},
    ),
}


def _selected(model: torch.nn.Module, spec: object) -> set[str]:
    return {target.module_name for target in select_targets(model, spec)}


def _linear_names(model: torch.nn.Module) -> set[str]:
    linear = (torch.nn.Linear, transformers.pytorch_utils.Conv1D)
    return {name for name, module in model.named_modules() if isinstance(module, linear)}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_aliases_select_exactly_attention_and_feed_forward(case: Case) -> None:
    model = case.build()
    attn, mlp = select_targets(model, "attn"), select_targets(model, "mlp")
    assert {t.module_name for t in attn} == case.attn
    assert {t.module_name for t in mlp} == case.mlp
    assert not case.attn & case.mlp
    assert {t.pattern for t in attn} == {"attn"} and {t.pattern for t in mlp} == {"mlp"}
    assert all(t.transposed is case.transposed for t in attn + mlp)
    assert all(t.name == f"{t.module_name}.weight" and t.param.ndim == 2 for t in attn + mlp)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_comma_string_is_the_union_and_all_linear_leaves_out_heads(case: Case) -> None:
    model = case.build()
    union = select_targets(model, "attn,mlp")
    assert {t.module_name for t in union} == case.attn | case.mlp
    order = [name for name, _ in model.named_modules()]
    assert [t.module_name for t in union] == sorted((t.module_name for t in union), key=order.index)
    assert case.heads <= _linear_names(model)
    # On these architectures every linear layer outside the heads is attention or feed-forward.
    assert _selected(model, "all-linear") == _linear_names(model) - case.heads == case.attn | case.mlp
    assert _selected(model, "all_linear") == case.attn | case.mlp


def test_gpt2_conv1d_targets_are_transposed_with_stored_shape() -> None:
    targets = {t.module_name: t for t in select_targets(_gpt2(), "all-linear")}
    c_attn = targets["transformer.h.0.attn.c_attn"]
    assert c_attn.transposed and c_attn.shape == (32, 96) == tuple(c_attn.param.shape)


def test_regex_is_full_matched() -> None:
    targets = select_targets(_llama(), r".*\.(q|v)_proj")
    assert {t.module_name for t in targets} == _names(
        "model.layers.{i}.self_attn.q_proj", "model.layers.{i}.self_attn.v_proj"
    )
    assert {t.pattern for t in targets} == {r".*\.(q|v)_proj"}
    # Full match, not search: the regex must cover the whole name.
    with pytest.raises(ValueError, match="No target modules found"):
        select_targets(_llama(), r"(q|v)_proj")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        pytest.param("q_proj", _names("model.layers.{i}.self_attn.q_proj"), id="plain-key"),
        pytest.param(["self_attn"], _LLAMA_ATTN, id="substring-of-container"),
        pytest.param("q_proj,v_proj", _names(*(f"model.layers.{{i}}.self_attn.{p}_proj" for p in "qv")), id="keys"),
        pytest.param(["layers.1.mlp.up_proj"], {"model.layers.1.mlp.up_proj"}, id="dotted-suffix"),
        pytest.param(
            ["attn", r".*\.down_proj"], _LLAMA_ATTN | _names("model.layers.{i}.mlp.down_proj"), id="list-regex"
        ),
    ],
)
def test_list_keys_keep_transformers_substring_meaning(spec: object, expected: set[str]) -> None:
    assert _selected(_llama(), spec) == expected


def test_heads_only_when_the_pattern_names_them() -> None:
    assert _selected(_llama(), ["lm_head"]) == {"lm_head"}
    assert _selected(_llama(), r"lm_head|.*\.q_proj") == {"lm_head"} | _names("model.layers.{i}.self_attn.q_proj")
    assert "lm_head" not in _selected(_llama(), ".*")
    assert _selected(_roberta(), "classifier") == {"classifier.dense", "classifier.out_proj"}
    # "dense" is a substring of the pooler's name, but the pooler is a head and is not named.
    dense = _selected(_bert(), "dense")
    assert "bert.pooler.dense" not in dense and "bert.encoder.layer.1.output.dense" in dense
    assert _selected(_bert(), "pooler") == {"bert.pooler.dense"}
    with pytest.raises(ValueError, match=r"matched only output/classifier heads.*\n  classifier\.out_proj"):
        select_targets(_roberta(), "out_proj")


def test_embedding_only_match_is_an_error_that_says_so() -> None:
    with pytest.raises(ValueError, match="matched only non-linear modules") as error:
        select_targets(_llama(), "embed_tokens")
    assert "model.embed_tokens (Embedding)" in str(error.value)
    with pytest.raises(ValueError, match=r"matched only non-linear modules[^\n]*\n  model\.layers\.\{0\.\.1\}\.input"):
        select_targets(_llama(), "layernorm")


def test_frozen_weights_are_skipped() -> None:
    model = _fresh_llama()
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    assert _selected(model, "q_proj") == {"model.layers.1.self_attn.q_proj"}
    model.model.layers[1].self_attn.q_proj.weight.requires_grad_(False)
    with pytest.raises(
        ValueError, match=r"matched only frozen weights.*\n  model\.layers\.\{0\.\.1\}\.self_attn\.q_proj"
    ):
        select_targets(model, "q_proj")


def test_alias_rules_beyond_the_tested_architectures() -> None:
    """OPT/BART keep fc1/fc2 directly in the layer; MoE routers (``gate``) are not feed-forward projections."""

    def linear() -> torch.nn.Linear:
        return torch.nn.Linear(4, 4)

    moe = torch.nn.ModuleDict(
        {"gate": linear(), "experts": torch.nn.ModuleList([torch.nn.ModuleDict({"w1": linear()})])}
    )
    layer = torch.nn.ModuleDict(
        {"self_attn": torch.nn.ModuleDict({"out_proj": linear()}), "fc1": linear(), "block_sparse_moe": moe}
    )
    model = torch.nn.ModuleDict({"layers": torch.nn.ModuleList([layer])})
    assert _selected(model, "attn") == {"layers.0.self_attn.out_proj"}
    assert _selected(model, "mlp") == {"layers.0.fc1", "layers.0.block_sparse_moe.experts.0.w1"}
    assert "layers.0.block_sparse_moe.gate" in _selected(model, "all-linear")


def test_shared_weight_is_selected_once_and_bias_never() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    model[1].weight = model[0].weight
    targets = select_targets(model, "all-linear")
    assert [(t.name, t.module_name) for t in targets] == [("0.weight", "0")]
    assert all(t.param is not model[0].bias for t in targets)


def test_no_match_error_lists_patterns_linear_modules_and_aliases() -> None:
    with pytest.raises(ValueError) as error:
        select_targets(_llama(), ["foo", "bar"], optimizer_name="GaLoreAdamW8bit")
    message = str(error.value)
    assert "No target modules found for GaLoreAdamW8bit" in message and "['foo', 'bar']" in message
    assert "  model.layers.{0..1}.self_attn.q_proj\n" in message and "  lm_head\n" in message
    assert all(alias in message for alias in ("'attn'", "'mlp'", "'all-linear'"))


def test_long_module_listing_is_abridged() -> None:
    model = torch.nn.ModuleDict({f"proj_{chr(97 + i)}": torch.nn.Linear(2, 2) for i in range(25)})
    with pytest.raises(ValueError, match=r"  proj_t\n  \.\.\. \(5 more\)\n"):
        select_targets(model, "nothing")


def test_selection_is_logged_once_with_the_table(galore_log) -> None:
    select_targets(_bert(), "dense")
    records = [r for r in galore_log if r.levelno == logging.INFO]
    assert len(records) == 1
    assert "bert.encoder.layer.{0..1}.intermediate.dense" in records[0].getMessage()
    assert (
        "skipped 1 output/classifier heads, which need their name in the pattern: bert.pooler.dense"
        in records[0].getMessage()
    )


def _row(table: str, pattern: str, shape: str) -> list[str]:
    return next(line.split() for line in table.splitlines() if line.split()[:3:2] == [pattern, shape])


def _state_bytes(rows: int, cols: int, rank: int) -> int:
    r = min(rank, rows, cols)
    return 4 * (2 * r * max(rows, cols) + r * min(rows, cols))


def test_table_state_bytes_on_llama_rank_8() -> None:
    targets = select_targets(_llama(), "attn,mlp")
    table = format_target_table(targets, rank=8)
    # q/o are 32x32: 4 modules * 4 B * (2*8*32 + 8*32) = 12,288.
    assert _row(table, "attn", "32x32")[1:5] == ["4", "32x32", "8", "12,288"]
    assert _row(table, "attn", "16x32")[1:5] == ["4", "16x32", "8", f"{4 * _state_bytes(16, 32, 8):,}"]
    assert _row(table, "mlp", "48x32")[1:5] == ["4", "48x32", "8", f"{4 * _state_bytes(48, 32, 8):,}"]
    assert _row(table, "mlp", "32x48")[1:5] == ["2", "32x48", "8", f"{2 * _state_bytes(32, 48, 8):,}"]
    total = sum(_state_bytes(*t.shape, 8) for t in targets)
    assert total == 47_104
    assert table.splitlines()[-1].startswith(f"total: 14 matrices, 15,360 weights, GaLore state {total:,} bytes")
    assert "model.layers.{0..1}.self_attn.q_proj" in table


def test_table_clips_rank_to_the_smaller_dimension() -> None:
    table = format_target_table(select_targets(_llama(), "attn"), rank=24)
    assert _row(table, "attn", "16x32")[3:5] == ["16", f"{4 * 4 * (2 * 16 * 32 + 16 * 16):,}"]
    assert _row(table, "attn", "32x32")[3:5] == ["24", f"{4 * _state_bytes(32, 32, 24):,}"]
    no_rank = format_target_table(select_targets(_gpt2(), "attn"))
    assert _row(no_rank, "attn", "32x96*")[3:5] == ["-", "-"] and "Conv1D weight stored as (in, out)" in no_rank
    with pytest.raises(ValueError, match="Invalid rank=0"):
        format_target_table([], rank=0)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        pytest.param("attn,mlp", ["attn", "mlp"], id="comma-string"),
        pytest.param(" attn , mlp ", ["attn", "mlp"], id="whitespace"),
        pytest.param("all_linear", "all-linear", id="all_linear"),
        pytest.param("ALL-LINEAR", "all-linear", id="all-linear-upper"),
        pytest.param(["all-linear"], "all-linear", id="all-linear-list"),
        pytest.param(r".*attn.*", r".*attn.*", id="regex"),
        pytest.param("(q|v)_proj", "(q|v)_proj", id="regex-no-dot"),
        pytest.param(r".*\.(q|v){1,2}_proj", r".*\.(q|v){1,2}_proj", id="regex-with-comma"),
        pytest.param("self_attn.q_proj", ["self_attn.q_proj"], id="dotted-key"),
        pytest.param(("attn", " mlp"), ["attn", "mlp"], id="tuple"),
        pytest.param({"v_proj", "q_proj"}, ["q_proj", "v_proj"], id="set-sorted"),
    ],
)
def test_parse_target_modules(spec: object, expected: object) -> None:
    assert parse_target_modules(spec) == expected


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        pytest.param("", ValueError, "Invalid optim_target_modules='': it is empty", id="empty-string"),
        pytest.param(",,", ValueError, "Invalid optim_target_modules=',,': it is empty", id="only-commas"),
        pytest.param("attn,,mlp", ValueError, "empty entry", id="empty-entry"),
        pytest.param([], ValueError, r"Invalid optim_target_modules=\[\]: it is empty", id="empty-list"),
        pytest.param(None, ValueError, "Invalid optim_target_modules=None", id="none"),
        pytest.param(
            "(", ValueError, r"regex '\(' does not compile: missing \), unterminated subpattern", id="bad-regex"
        ),
        pytest.param(["attn", "[q"], ValueError, "regex '\\[q' does not compile", id="bad-regex-in-list"),
        pytest.param(["attn", "all-linear"], ValueError, "cannot be combined", id="all-linear-mixed"),
        pytest.param(["attn", 3], TypeError, "entry 3 is not a string", id="non-string"),
        pytest.param(7, TypeError, "of type int", id="int"),
    ],
)
def test_parse_target_modules_errors(spec: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message) as raised:
        parse_target_modules(spec)
    if error is ValueError and "compile" not in message and "combined" not in message:
        assert "'all-linear'" in str(raised.value) and "'attn'" in str(raised.value)


@given(st.lists(st.from_regex(r"[A-Za-z_][A-Za-z0-9_.]{0,12}", fullmatch=True), min_size=1, max_size=5))
def test_comma_joined_keys_parse_back_to_the_list(keys: list[str]) -> None:
    if any(key.lower().replace("_", "-") == "all-linear" for key in keys):
        return
    assert parse_target_modules(",".join(keys)) == keys
    assert parse_target_modules(keys) == keys


def test_target_is_hashable_and_compares_without_the_parameter() -> None:
    weight = torch.nn.Parameter(torch.zeros(2, 3))
    first = GaLoreTarget("w", "m", "all-linear", weight, (2, 3), False)
    second = GaLoreTarget("w", "m", "all-linear", torch.nn.Parameter(torch.ones(2, 3)), (2, 3), False)
    assert first == second and hash(first) == hash(second) and "Parameter" not in repr(first)
    assert re.fullmatch(r"GaLoreTarget\(.*transposed=False\)", repr(first))


def test_table_shows_the_projected_side_and_fsdp2_projects_every_weight_from_the_right() -> None:
    """mlp's 32x48 weight (wide) is projected from the left by std; row-sharded by FSDP2 it is projected from the
    right, with the state that side holds (its moments are then 32xr, its basis rx48)."""
    targets = select_targets(_llama(), "attn,mlp")
    single = format_target_table(targets, rank=8)
    sharded = format_target_table(targets, rank=8, row_sharded=True)
    assert _row(single, "mlp", "32x48")[5] == "left" and _row(single, "mlp", "48x32")[5] == "right"
    assert _row(sharded, "mlp", "32x48")[5] == "right"
    assert _row(sharded, "mlp", "32x48")[4] == f"{2 * 4 * (2 * 8 * 32 + 8 * 48):,}"  # 2 modules, fp32
    with pytest.raises(
        ValueError,
        match=r"model.layers.0.self_attn.q_proj: Invalid proj_type='left' for a weight row-sharded by FSDP2",
    ):
        format_target_table(targets, rank=8, row_sharded=True, proj_type="left")
