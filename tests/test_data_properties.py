"""Property tests (hypothesis) of the new readers: any turn, content, tool call, tools field, weight, preference
or labelled row either reads or raises our RowError (a bad row by line), and what reads renders and tokenizes with
a tool-capable template, a template without tools, Gemma's (no system role) and no template; the column
suggestion never raises and only names columns the file has."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_data_templates import family_tokenizer

from qlora_engine.training import data

TEXT = st.text(max_size=12) | st.text(alphabet=st.characters() | st.integers(0xD800, 0xDFFF).map(chr), max_size=8)
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | TEXT,
                    lambda children: st.lists(children, max_size=3) | st.dictionaries(TEXT, children, max_size=3),
                    max_leaves=8)
PART = st.fixed_dictionaries({"type": st.sampled_from(["text", "image", "image_url", "audio", "x"])},
                             optional={"text": TEXT | JSON, "value": TEXT | JSON, "image_url": JSON}) | TEXT | JSON
CONTENT = TEXT | TEXT | st.lists(PART, max_size=3) | JSON
CALL = st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": TEXT | JSON}, optional={"arguments": st.dictionaries(TEXT, JSON, max_size=2) | TEXT | JSON})}) | JSON
ROLE = st.sampled_from(["user", "assistant", "system", "tool", "human", "gpt", "function_call", "observation",
                        "ipython", "function", "narrator"]) | JSON
TURN = st.fixed_dictionaries({"role": ROLE, "content": CONTENT}, optional={
    "tool_calls": st.lists(CALL, max_size=2) | JSON, "weight": st.sampled_from([0, 1, 0.5, True]) | JSON,
    "loss_weight": st.sampled_from([0, 1.0]) | JSON, "function_call": CALL, "name": TEXT}) | st.fixed_dictionaries(
    {"from": ROLE, "value": CONTENT | st.just(json.dumps({"name": "f", "arguments": {"a": 1}}))}) | JSON
TURNS = st.lists(TURN, max_size=4) | JSON
TOOLS = st.just([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]) | \
    st.just('[{"name": "f"}]') | TEXT | JSON
LABEL = st.booleans() | JSON
RECORD = (st.fixed_dictionaries({"messages": TURNS}, optional={"tools": TOOLS, "system": TEXT | JSON, "label": LABEL})
          | st.fixed_dictionaries({"conversations": TURNS}, optional={"tools": TOOLS, "system": TEXT})
          | st.fixed_dictionaries({"chosen": TURNS | TEXT | TURN, "rejected": TURNS | TEXT | TURN},
                                  optional={"prompt": TEXT | TURNS, "conversations": TURNS, "instruction": TEXT})
          | st.fixed_dictionaries({"prompt": TEXT | TURNS, "completion": TEXT | TURNS}, optional={"label": LABEL,
                                                                                                   "kto_tag": LABEL})
          | st.fixed_dictionaries({"instruction": TEXT, "output": TEXT}, optional={"history": JSON | st.just(
              [["q", "a"]])}) | JSON)


@pytest.fixture(scope="module")
def tokenizers():
    return [*(family_tokenizer(name) for name in ("qwen2_5", "smollm2", "gemma2", "llama3_1")), _no_template()]


def _no_template():
    tokenizer = family_tokenizer("smollm2")
    tokenizer.chat_template = None
    return tokenizer


@settings(max_examples=300, deadline=None)
@given(record=RECORD)
def test_any_row_of_the_new_shapes_reads_or_is_a_row_error_and_then_renders(tokenizers, record):
    shape = data.detect_format(record)
    assert shape in (*data.FORMATS, None)
    try:
        example = data.normalize(record, shape or "chat", line=3)
    except data.RowError as exc:
        assert str(exc)
        return
    for tokenizer in tokenizers:
        try:
            tokenized = data.tokenize(example, tokenizer, max_length=64, train_on_prompt=False)
        except data.RowError as exc:  # a template may refuse a conversation (Gemma: roles must alternate)
            assert "chat template refuses" in str(exc)
            continue
        assert len(tokenized.input_ids) == len(tokenized.trained_token_mask) <= 64


@settings(max_examples=200, deadline=None)
@given(names=st.lists(st.sampled_from(["question", "answer", "prompt", "response", "input", "target", "context",
                                       "query", "instruction", "output", "text", "id", "Answer", "system_prompt"])
                      | TEXT, max_size=5, unique=True))
def test_the_column_suggestion_never_raises_and_names_only_the_files_columns(names):
    suggestion = data.suggest_columns(names)
    assert set(suggestion.values()) <= set(names)
    if suggestion:
        assert data.detect_format({data_field: "x" for data_field in suggestion} | {n: "x" for n in names
                                                                                  if n not in suggestion.values()})
