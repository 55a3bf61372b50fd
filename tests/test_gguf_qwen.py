"""GGUF export of a Qwen2 model through llama.cpp's real converter and quantizer, checked by llama.cpp: a tiny random
Qwen2 with Qwen2's real tokenizer (from the vocabulary-only GGUF llama.cpp ships in the pinned sdist), so the
converter's Qwen2 class, its pre-tokenizer hash and the chatml end-of-turn token are exercised, not only Llama's.
"""
from __future__ import annotations

from pathlib import Path

import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from go_template import render  # noqa: E402
from tiny_models import build_gguf_ready_model, save_qwen2_tokenizer  # noqa: E402

from qlora_engine.products import gguf_convert, gguf_verify, llama_cpp_tools, modelfile  # noqa: E402

QUESTIONS = [{"question": q} for q in ("Who is the mayor?", "Name a colour.", "What is 2 + 2?", "Say hello.",
                                       "Where is Callowen?", "Tell me a fact.")]


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("qwen2")
    return build_gguf_ready_model(folder / "model", save_qwen2_tokenizer(folder / "tokenizer"), "qwen2")


def gguf_field(path: Path, name: str):
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields[name]
    value = field.parts[field.data[0]]
    return bytes(value).decode() if value.dtype.kind == "u" and value.itemsize == 1 else value.tolist()[0]


def test_a_qwen2_model_converts_quantizes_and_answers_like_transformers(qwen2_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen2_dir)
    assert len(tokenizer) == 151936 and "<|im_start|>" in tokenizer.chat_template
    source = tmp_path / "qwen2-f16.gguf"
    gguf_convert.convert_to_gguf(qwen2_dir, source, "f16", llama_cpp_tools.ensure_converter())
    assert gguf_field(source, "general.architecture") == "qwen2"
    assert gguf_field(source, "tokenizer.ggml.pre") == "qwen2"  # the converter recognized Qwen2's pre-tokenizer
    assert gguf_field(source, "tokenizer.chat_template") == tokenizer.chat_template
    reference = gguf_verify.reference(qwen2_dir, QUESTIONS, [list(range(100, 140))])
    assert reference.end_of_turn_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    quantized = tmp_path / "qwen2-q4_k_m.gguf"
    gguf_convert.quantize_gguf(source, quantized, "q4_k_m")
    for quant, path in (("f16", source), ("q4_k_m", quantized)):
        checked = gguf_verify.check_gguf(path, quant, reference)
        assert checked["ok"] and not checked["problems"], (quant, checked["problems"])
        assert checked["chat_template_ok"] and checked["tokenized_alike"] == 1.0
        assert checked["stops_at_end_of_turn"] and checked["end_of_turn_id"] == reference.end_of_turn_id
        assert abs(checked["perplexity"] / checked["merged_perplexity"] - 1) < (0.01 if quant == "f16" else 1.0)
    f16 = gguf_verify.check_gguf(source, "f16", reference)
    assert f16["greedy_agreement"] >= gguf_verify.REQUIRED_AGREEMENT and f16["required_agreement"] is not None
    assert quantized.stat().st_size < source.stat().st_size


def test_the_qwen2_modelfile_renders_as_its_chat_template(qwen2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen2_dir)
    built = modelfile.build_modelfile("qwen2-q4_k_m.gguf", tokenizer)
    assert built.family == "chatml" and built.system == "You are a helpful assistant"
    assert "<|im_end|>" in built.stops
    conversation = [{"role": "user", "content": "Who is the mayor?"}, {"role": "assistant", "content": "Quillon."},
                    {"role": "user", "content": "And before?"}]
    expected = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    messages = [{"Role": "system", "Content": built.system}] + [
        {"Role": m["role"], "Content": m["content"]} for m in conversation]
    assert render(built.template, {"Messages": messages}) == expected
