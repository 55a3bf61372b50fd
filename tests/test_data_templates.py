"""Every family's chat template, as the models ship it (tests/data/templates): exactly the assistant's tokens and
its end-of-turn token are trained on, in multi-turn rows, with tool calls (trained) and tool results (never), with
weight-0 turns (never), and with the families' quirks: Gemma 2 refuses a system role (folded into the first user
turn), Qwen3 rewrites earlier turns and their <think> blocks, Mistral moves the system text to the last user turn.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from test_modelfile import SMOLLM2_TEMPLATE
from tiny_models import build_tokenizer

from qlora_engine.training import data

TEMPLATES = Path(__file__).parent / "data" / "templates"
# Each family's special tokens, BOS and EOS, on a tiny byte-level BPE tokenizer (any text encodes).
FAMILIES = {
    "llama3": (["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|begin_of_text|>",
               "<|eot_id|>"),
    "llama3_1": (["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
                  "<|python_tag|>"], "<|begin_of_text|>", "<|eot_id|>"),
    "qwen2_5": ([], None, "<|im_end|>"),
    "qwen3": ([], None, "<|im_end|>"),
    "gemma2": (["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>"),
    "gemma3": (["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>"),
    "phi3": (["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], None, "<|endoftext|>"),
    "mistral": (["<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>"),
}
END = {"llama3": "<|eot_id|>", "llama3_1": "<|eot_id|>", "qwen2_5": "<|im_end|>", "qwen3": "<|im_end|>",
       "gemma2": "<end_of_turn>", "gemma3": "<end_of_turn>", "phi3": "<|end|>", "mistral": "</s>"}
SPACE_BEFORE_ANSWER = {"mistral": " "}  # `[/INST]` + ' ' + answer: the space is the answer's first token's
THINK = "<think>\n\n</think>\n\n"  # Qwen3 writes an empty reasoning block into the turn after the last question

MULTI_TURN = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is mayor?"},
              {"role": "assistant", "content": "Varet."}, {"role": "user", "content": "And the harbour?"},
              {"role": "assistant", "content": "Brindle."}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                            "parameters": {"type": "object", "required": ["city"],
                                                           "properties": {"city": {"type": "string"}}}}}
TOOL_TURNS = [{"role": "user", "content": "Weather in Paris?"},
              {"role": "assistant", "content": "", "tool_calls": [
                  {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
              {"role": "tool", "content": '{"temp_c": 21}'},
              {"role": "assistant", "content": "It is 21 degrees."}]


def family_tokenizer(family: str):
    template = SMOLLM2_TEMPLATE if family == "smollm2" else (TEMPLATES / f"{family}.jinja").read_text()
    tokenizer = build_tokenizer(template)
    specials, bos, eos = FAMILIES.get(family, ([], None, "<|im_end|>"))
    tokenizer.add_tokens(specials, special_tokens=True)
    tokenizer.bos_token, tokenizer.eos_token = bos, eos
    return tokenizer


def trained_runs(messages, tokenizer, tools=None, train_on_prompt=False) -> list[str]:
    """The trained text of a row, as the runs of consecutive trained tokens."""
    example = data.tokenize(data.Example(line=1, messages=messages, tools=tools), tokenizer, 1024, train_on_prompt)
    return [s["text"] for s in data.preview_segments(example, tokenizer) if s["trained"]]


def rendered(messages, tokenizer, tools=None) -> str:
    return data.render(data.Example(line=1, messages=messages, tools=tools), tokenizer)[0]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_multi_turn_row_trains_exactly_each_answer_and_its_end_of_turn_token(family):
    tokenizer = family_tokenizer(family)
    space, end = SPACE_BEFORE_ANSWER.get(family, ""), END[family]
    last = (THINK if family == "qwen3" else "") + "Brindle."
    assert trained_runs(MULTI_TURN, tokenizer) == [f"{space}Varet.{end}", f"{space}{last}{end}"]


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_gets_the_system_text_in_the_first_user_turn_never_a_crash(family):
    text = rendered(MULTI_TURN, family_tokenizer(family))
    assert text.startswith("<bos><start_of_turn>user\nBe brief.\n\nWho is mayor?<end_of_turn>\n")
    assert "system" not in text


def test_qwen3_drops_an_earlier_turns_reasoning_and_trains_the_answer_as_rendered():
    tokenizer = family_tokenizer("qwen3")
    thinking = [*MULTI_TURN[:2], {"role": "assistant", "content": "<think>\nThe mayor is Varet.\n</think>\n\nVaret."},
                *MULTI_TURN[3:4], {"role": "assistant", "content": "<think>\nBrindle it is.\n</think>\n\nBrindle."}]
    text = rendered(thinking, tokenizer)
    assert "The mayor is Varet." not in text  # the template rewrote the earlier turn without its reasoning
    assert trained_runs(thinking, tokenizer) == ["Varet.<|im_end|>", "<think>\nBrindle it is.\n</think>\n\nBrindle."
                                                                     "<|im_end|>"]


def test_mistral_moves_the_system_text_to_the_last_question_and_the_mask_follows():
    tokenizer = family_tokenizer("mistral")
    text = rendered(MULTI_TURN, tokenizer)
    assert text == "<s>[INST] Who is mayor?[/INST] Varet.</s>[INST] Be brief.\n\nAnd the harbour?[/INST] Brindle.</s>"


@pytest.mark.parametrize("family, call", [
    ("qwen2_5", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'),
    ("qwen3", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'),
    ("llama3_1", '{"name": "get_weather", "parameters": {"city": "Paris"}}'),
])
def test_templates_with_tool_support_render_the_tools_and_train_the_call_never_the_result(family, call):
    tokenizer = family_tokenizer(family)
    text = rendered(TOOL_TURNS, tokenizer, tools=[WEATHER])
    assert "get_weather" in text.split("Weather in Paris?")[0] + text  # the schema is in the prompt
    assert '"description": "The weather in a city."' in text
    end, final = END[family], (THINK if family == "qwen3" else "") + "It is 21 degrees."
    runs = trained_runs(TOOL_TURNS, tokenizer, tools=[WEATHER])
    assert runs == [f"{call}{end}", f"{final}{end}"]
    assert not any("temp_c" in run for run in runs)


@pytest.mark.parametrize("family", ["smollm2", "llama3", "gemma2", "phi3", "mistral"])
def test_templates_without_tool_support_get_the_plain_tool_text_call_trained_result_not(family):
    tokenizer = family_tokenizer(family)
    text = rendered(TOOL_TURNS, tokenizer, tools=[WEATHER])
    assert "<tools>\n" + '{"type": "function"' in text  # the schemas in the system text (folded for Gemma)
    assert '<tool_response>\n{"temp_c": 21}\n</tool_response>' in text
    runs = trained_runs(TOOL_TURNS, tokenizer, tools=[WEATHER])
    space, end = SPACE_BEFORE_ANSWER.get(family, ""), END.get(family, "<|im_end|>")
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert runs == [f"{space}{call}{end}", f"{space}It is 21 degrees.{end}"]


@pytest.mark.parametrize("family", ["smollm2", "llama3", "qwen2_5", "gemma2", "mistral"])
def test_a_weight_0_turn_is_context_never_a_target_even_with_train_on_prompt(family):
    tokenizer = family_tokenizer(family)
    turns = [{"role": "user", "content": "Who is mayor?"}, {"role": "assistant", "content": "Nobody.", "train": False},
             {"role": "user", "content": "Really?"}, {"role": "assistant", "content": "Varet."}]
    space, end = SPACE_BEFORE_ANSWER.get(family, ""), END.get(family, "<|im_end|>")
    assert trained_runs(turns, tokenizer) == [f"{space}Varet.{end}"]
    assert "Nobody." in rendered(turns, tokenizer)
    assert not any("Nobody" in run for run in trained_runs(turns, tokenizer, train_on_prompt=True))


def test_tool_results_are_never_trained_even_with_train_on_prompt():
    tokenizer = family_tokenizer("qwen2_5")
    runs = trained_runs(TOOL_TURNS, tokenizer, tools=[WEATHER], train_on_prompt=True)
    assert "Weather in Paris?" in "".join(runs) and not any("temp_c" in run for run in runs)


def test_a_conversation_the_template_refuses_is_a_row_error_not_a_crash():
    with pytest.raises(data.RowError, match="chat template refuses this conversation.*alternate"):
        rendered([{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                  {"role": "assistant", "content": "c"}], family_tokenizer("gemma2"))


def test_llama3_1_writes_a_tool_result_as_json_text_and_it_is_still_never_trained():
    tokenizer = family_tokenizer("llama3_1")
    assert '"{\\"temp_c\\": 21}"' in rendered(TOOL_TURNS, tokenizer, tools=[WEATHER])
    runs = trained_runs(TOOL_TURNS, tokenizer, tools=[WEATHER], train_on_prompt=True)
    assert "Weather in Paris?" in "".join(runs) and not any("temp_c" in run for run in runs)


@pytest.mark.parametrize("family", ["smollm2", "gemma2"])
def test_a_tool_result_merged_with_the_next_user_turn_is_still_never_trained(family):
    """The plain fallback joins a tool result and a user message that follows it into one user turn (for templates
    that insist on alternating roles); with train_on_prompt that turn must still not be a target."""
    turns = [*TOOL_TURNS[:3], {"role": "user", "content": "And in Rome?"},
             {"role": "assistant", "content": "It is 25 degrees."}]
    tokenizer = family_tokenizer(family)
    assert '{"temp_c": 21}\n</tool_response>\nAnd in Rome?' in rendered(turns, tokenizer, tools=[WEATHER])
    runs = trained_runs(turns, tokenizer, tools=[WEATHER], train_on_prompt=True)
    assert "Weather in Paris?" in "".join(runs) and not any("temp_c" in run for run in runs)
