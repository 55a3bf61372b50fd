"""What the Export page shows before a GGUF export starts (no torch, no llama.cpp): quantizations, file sizes, the RAM
and disk needed, and whether the converter knows the architecture."""
from __future__ import annotations

from pathlib import Path

import pytest

from qlora_engine.planning import gguf_plan
from qlora_engine.protocol.errors import EngineError

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2_135M = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
                "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True,
                "max_position_embeddings": 8192}


def test_the_gguf_extra_pins_the_binding_the_converter_comes_from():
    extra = next(line for line in (ROOT / "pyproject.toml").read_text().splitlines() if line.startswith("gguf = "))
    assert f'"llama-cpp-python=={gguf_plan.LLAMA_CPP_PYTHON_VERSION}"' in extra


def test_quantizations_are_parsed_and_unknown_ones_named():
    assert gguf_plan.parse_quants("q8_0, Q4_K_M,q8_0") == ["q8_0", "q4_k_m"]
    with pytest.raises(EngineError) as caught:
        gguf_plan.parse_quants("q8_0,q3_k")
    assert caught.value.code == "bad_config" and "q3_k" in caught.value.message


def test_the_plan_sizes_each_file_and_counts_the_merge_and_the_16_bit_source():
    plan = gguf_plan.plan_for_config(SMOLLM2_135M, ["q8_0", "q4_k_m"])
    assert 134e6 < plan.params < 136e6  # SmolLM2-135M
    assert plan.file_bytes["q4_k_m"] < plan.file_bytes["q8_0"] < gguf_plan.gguf_file_bytes(plan.params, "f16")
    assert plan.disk_bytes == 2 * plan.params + gguf_plan.gguf_file_bytes(plan.params, "bf16") + sum(
        plan.file_bytes.values())
    again = gguf_plan.plan_for_config(SMOLLM2_135M, ["q8_0", "q4_k_m"], merged_exists=True)
    assert again.disk_bytes == plan.disk_bytes - 2 * plan.params
    assert plan.ram_bytes >= 6 * plan.params  # fp32 dequantized base and its 16-bit copy, during the merge


def test_architecture_support_is_known_before_the_converter_is_there_and_read_from_it_after(tmp_path, monkeypatch):
    monkeypatch.setenv(gguf_plan.TOOLS_ENV, str(tmp_path))
    assert not gguf_plan.supported_architectures()  # nothing fetched yet: the list shipped for the pinned converter
    assert gguf_plan.gguf_export_supported(SMOLLM2_135M) is True
    assert gguf_plan.gguf_export_supported({"architectures": ["MadeUpForCausalLM"]}) is False
    monkeypatch.setattr(gguf_plan, "shipped_architectures", set)
    assert gguf_plan.gguf_export_supported(SMOLLM2_135M) is None
    conversion = gguf_plan.converter_dir() / "conversion"
    conversion.mkdir(parents=True)
    (conversion / "llama.py").write_text('@ModelBase.register("LlamaForCausalLM", "MistralForCausalLM")\nclass X: ...')
    assert gguf_plan.gguf_export_supported(SMOLLM2_135M) is True
    assert gguf_plan.gguf_export_supported({"architectures": ["MadeUpForCausalLM"]}) is False


def test_the_converters_failures_become_errors_a_person_can_act_on(tmp_path):
    from qlora_engine.products.gguf_convert import conversion_error

    full = conversion_error("OSError: [Errno 28] No space left on device: 'm.gguf'", tmp_path)
    assert full.code == "disk_full" and "Free some disk space" in full.advice
    tokenizer = conversion_error("NotImplementedError: BPE pre-tokenizer was not recognized", tmp_path)
    assert tokenizer.code == "gguf_tokenizer_unsupported" and "recognized" in tokenizer.advice
    other = conversion_error("KeyError: 'rope_theta'", tmp_path)
    assert other.code == "gguf_convert_failed" and "rope_theta" in other.advice
