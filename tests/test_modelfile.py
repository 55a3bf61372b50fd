"""The Ollama Modelfile: its TEMPLATE, rendered the way Ollama renders it (Go text/template over .Messages, the
Modelfile's SYSTEM first when a conversation has none), gives the text the model's own chat template gives."""
from __future__ import annotations

import pytest
from go_template import render
from tiny_models import CHATML_TEMPLATE, build_tokenizer

from qlora_engine.products import modelfile
from qlora_engine.training.data import Example

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Meta-Llama-3-8B-Instruct's template, as its tokenizer_config.json has it.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CONVERSATIONS = [
    [{"role": "user", "content": "Who is the mayor of Callowen?"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of France?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a fact.\nJust one."}],
]


def ollama_render(built: modelfile.Modelfile, conversation: list[dict[str, str]]) -> str:
    """What Ollama sends the model: the Modelfile's SYSTEM as the first message unless the conversation has one."""
    messages = [{"Role": m["role"], "Content": m["content"]} for m in conversation]
    if built.system and messages[0]["Role"] != "system":
        messages.insert(0, {"Role": "system", "Content": built.system})
    return render(built.template, {"Messages": messages})


@pytest.mark.parametrize("template", [CHATML_TEMPLATE, SMOLLM2_TEMPLATE, LLAMA3_TEMPLATE],
                         ids=["chatml", "smollm2", "llama3"])
def test_the_modelfile_template_renders_as_the_chat_template(template):
    tokenizer = build_tokenizer(template)
    tokenizer.bos_token = "<|endoftext|>"  # Llama 3's template starts with it; llama.cpp adds BOS itself
    built = modelfile.build_modelfile("model-q4_k_m.gguf", tokenizer)
    assert built.template, "a known family gets a TEMPLATE"
    for conversation in CONVERSATIONS:
        expected = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        expected = expected.removeprefix(tokenizer.bos_token) if template is LLAMA3_TEMPLATE else expected
        assert ollama_render(built, conversation) == expected


def test_the_modelfile_names_the_file_the_stop_tokens_and_the_default_system_prompt():
    built = modelfile.build_modelfile("run-q8_0.gguf", build_tokenizer(SMOLLM2_TEMPLATE))
    lines = built.text.splitlines()
    assert "FROM ./run-q8_0.gguf" in lines
    assert 'PARAMETER stop "<|im_end|>"' in lines
    assert built.system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert f'SYSTEM """{built.system}"""' in lines
    assert built.text.count('"""') == 4  # TEMPLATE and SYSTEM, each quoted once


def test_a_bos_token_that_is_the_turn_marker_itself_keeps_the_template():
    """SmolLM2's tokenizer names <|im_start|> as its bos_token: the rendering starts with it but that is no BOS."""
    tokenizer = build_tokenizer(SMOLLM2_TEMPLATE)
    tokenizer.bos_token = "<|im_start|>"
    built = modelfile.build_modelfile("m.gguf", tokenizer)
    assert built.family == "chatml" and 'TEMPLATE """' in built.text
    expected = tokenizer.apply_chat_template(CONVERSATIONS[0], tokenize=False, add_generation_prompt=True)
    assert ollama_render(built, CONVERSATIONS[0]) == expected


def test_llama3_stops_at_eot_id():
    tokenizer = build_tokenizer(LLAMA3_TEMPLATE)
    tokenizer.bos_token = "<|endoftext|>"
    built = modelfile.build_modelfile("m.gguf", tokenizer)
    assert built.family == "llama3" and "<|eot_id|>" in built.stops


def test_the_training_data_system_prompt_goes_into_the_modelfile():
    rows = [Example(line=i, messages=[{"role": "system", "content": "You are Callowen's guide."},
                                      {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
            for i in range(3)] + [Example(line=9, messages=[{"role": "user", "content": "q"}])]
    system = modelfile.training_system_prompt(rows)
    assert system == "You are Callowen's guide."
    built = modelfile.build_modelfile("m.gguf", build_tokenizer(SMOLLM2_TEMPLATE), system)
    assert built.system == system
    assert ollama_render(built, CONVERSATIONS[0]).startswith("<|im_start|>system\nYou are Callowen's guide.<|im_end|>")


def test_an_unknown_template_family_leaves_the_template_to_the_gguf():
    plain = build_tokenizer("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    built = modelfile.build_modelfile("m.gguf", plain)
    assert built.family == "" and "TEMPLATE" not in built.text and "FROM ./m.gguf" in built.text


def test_ollama_names_are_what_ollama_accepts():
    assert modelfile.ollama_name("2026-12-01_21-54_SmolLM2 135M") == "2026-12-01_21-54_smollm2-135m"


# microsoft/phi-4's template, as its tokenizer_config.json has it: chatml's markers, <|im_sep|> after the role.
PHI4_TEMPLATE = (
    "{% for message in messages %}{% if (message['role'] == 'system') %}{{'<|im_start|>system<|im_sep|>' + "
    "message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'user') %}{{'<|im_start|>user<|im_sep|>' + "
    "message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'assistant') %}{{'<|im_start|>assistant"
    "<|im_sep|>' + message['content'] + '<|im_end|>'}}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}")


def test_a_template_with_a_familys_markers_but_not_its_layout_gets_no_template_of_ours():
    """Phi-4: chatml's TEMPLATE would send `<|im_start|>user\\nHi` where the model learned `user<|im_sep|>Hi`."""
    built = modelfile.build_modelfile("m.gguf", build_tokenizer(PHI4_TEMPLATE))
    assert built.family == "" and "TEMPLATE" not in built.text and "not its layout" in built.text
    assert "<|im_end|>" in built.stops  # its turns still end where chatml's do


@pytest.mark.parametrize("family", sorted(modelfile.GO_TEMPLATES))
def test_the_familys_layout_the_check_uses_is_what_its_template_renders(family):
    for conversation in [*CONVERSATIONS, modelfile.CHECK_CONVERSATION]:
        messages = [{"Role": m["role"], "Content": m["content"]} for m in conversation]
        assert render(modelfile.GO_TEMPLATES[family], {"Messages": messages}) == \
            modelfile.family_rendering(family, conversation)
