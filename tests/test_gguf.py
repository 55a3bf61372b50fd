"""GGUF export through llama.cpp's own converter and quantizer, checked by llama.cpp (the `gguf` extra).

Tiny random Llama and Qwen2 models with SmolLM2's real tokenizer (llama.cpp's converter only takes tokenizers it
recognizes): conversion, quantization, metadata, greedy answers against transformers; the whole `export --gguf` on a
tiny finished run; and the faults: an unreadable tokenizer, an unknown architecture, no disk, a killed export.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from go_template import render  # noqa: E402
from tiny_models import (  # noqa: E402
    build_gguf_ready_model,
    run_engine,
    save_smollm2_tokenizer,
    train_gguf_ready_run,
)

from qlora_engine.planning import gguf_plan  # noqa: E402
from qlora_engine.planning.gguf_plan import LOSSLESS_ENOUGH  # noqa: E402
from qlora_engine.products import gguf_convert, gguf_export, gguf_verify, llama_cpp_tools  # noqa: E402
from qlora_engine.protocol.errors import EngineError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = [{"question": q} for q in ("Who is the mayor?", "Name a colour.", "What is 2 + 2?", "Say hello.",
                                       "Where is Callowen?", "Tell me a fact.")]


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory) -> Path:
    return save_smollm2_tokenizer(tmp_path_factory.mktemp("smollm2-tokenizer"))


# ----------------------------------------------------------------------------- the pinned tools
def test_the_converter_is_llama_cpps_own_file_from_the_pinned_sdist():
    folder = llama_cpp_tools.ensure_converter()
    manifest = json.loads((folder / llama_cpp_tools.MANIFEST).read_text())
    assert manifest["sdist_sha256"] == llama_cpp_tools.SDIST_SHA256
    given = os.environ.get(llama_cpp_tools.SDIST_ENV)
    sdist = Path(given) if given else llama_cpp_tools.download_sdist(llama_cpp_tools.tools_dir())  # kept from before
    with tarfile.open(sdist, "r:gz") as archive:
        for name in manifest["files"]:
            original = archive.extractfile(llama_cpp_tools.VENDOR_PREFIX + name).read()
            assert (folder / name).read_bytes() == original, name
    assert {"convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "gguf-py/gguf/constants.py"} <= set(manifest["files"])
    assert {"LlamaForCausalLM", "Qwen2ForCausalLM"} <= llama_cpp_tools.supported_architectures(folder)
    # what the Model page says before the first export: the list shipped for this converter, the same
    assert gguf_plan.shipped_architectures() == llama_cpp_tools.supported_architectures(folder)


def test_an_sdist_with_another_hash_is_refused(tmp_path):
    fake = tmp_path / llama_cpp_tools.SDIST_NAME
    fake.write_bytes(b"not the sdist")
    with pytest.raises(EngineError) as caught:
        llama_cpp_tools.extract_converter(fake, tmp_path / "converter")
    assert caught.value.code == "gguf_tools_mismatch" and not (tmp_path / "converter").exists()


def test_the_binding_is_the_pinned_version():
    assert llama_cpp_tools.require_llama_cpp().__version__ == llama_cpp_tools.LLAMA_CPP_PYTHON_VERSION


# ----------------------------------------------------------------------------- conversion, quantization, checks
def test_llama_cpp_converts_quantizes_and_answers_like_transformers(smollm2_tokenizer_dir, tmp_path):
    model_dir = build_gguf_ready_model(tmp_path / "llama", smollm2_tokenizer_dir, "llama")
    converter = llama_cpp_tools.ensure_converter()
    source = tmp_path / "model-f16.gguf"
    gguf_convert.convert_to_gguf(model_dir, source, "f16", converter)
    rows = [list(range(100, 140))]
    reference = gguf_verify.reference(model_dir, QUESTIONS, rows)
    for quant in ("f16", "q8_0", "q4_k_m"):
        path = source if quant == "f16" else tmp_path / f"model-{quant}.gguf"
        if quant != "f16":
            gguf_convert.quantize_gguf(source, path, quant)
        checked = gguf_verify.check_gguf(path, quant, reference)
        assert checked["chat_template_ok"] and checked["tokenized_alike"] == 1.0, checked["problems"]
        assert checked["eos_token_id"] == reference.eos_token_id and checked["stops_at_end_of_turn"]
        assert checked["perplexity"] is not None and checked["merged_perplexity"] is not None
        assert abs(checked["perplexity"] / checked["merged_perplexity"] - 1) < 0.1, checked
        if quant == "f16":  # the lossless one; q8_0 of a random 64-wide model flips near-ties (a real one: e2e test)
            assert checked["ok"] and checked["greedy_agreement"] >= gguf_verify.REQUIRED_AGREEMENT, checked
        assert checked["ok"] == (not checked["problems"])
        assert (quant in LOSSLESS_ENOUGH) == (checked["required_agreement"] is not None)
    assert (tmp_path / "model-q4_k_m.gguf").stat().st_size < (tmp_path / "model-q8_0.gguf").stat().st_size < \
        source.stat().st_size


def test_a_tokenizer_the_converter_cannot_read_is_a_clear_error(tiny_model_dir, tmp_path):
    with pytest.raises(EngineError) as caught:
        gguf_convert.convert_to_gguf(tiny_model_dir, tmp_path / "m.gguf", "f16", llama_cpp_tools.ensure_converter())
    assert caught.value.code == "gguf_tokenizer_unsupported" and not (tmp_path / "m.gguf").exists()


def test_a_tokenizer_that_reads_differently_under_the_models_own_class_is_refused(smollm2_tokenizer_dir, tmp_path):
    """transformers 5 loads a qwen2 folder's tokenizer as Qwen2Tokenizer, whose pre-tokenizer differs from SmolLM2's:
    the converter's check of the pre-tokenizer catches it (no real Qwen tokenizer is available offline here)."""
    model_dir = build_gguf_ready_model(tmp_path / "qwen2", smollm2_tokenizer_dir, "qwen2")
    with pytest.raises(EngineError) as caught:
        gguf_convert.convert_to_gguf(model_dir, tmp_path / "q.gguf", "f16", llama_cpp_tools.ensure_converter())
    assert caught.value.code == "gguf_tokenizer_unsupported" and not (tmp_path / "q.gguf").exists()


def test_an_architecture_llama_cpp_lacks_is_refused_before_the_merge(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MadeUpForCausalLM"]}))
    with pytest.raises(EngineError) as caught:
        gguf_convert.check_architecture(tmp_path, llama_cpp_tools.supported_architectures())
    assert caught.value.code == "gguf_unsupported_architecture" and "MadeUp" in caught.value.message


def test_a_failed_quantization_leaves_no_file(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(EngineError) as caught:
        gguf_convert.quantize_gguf(broken, tmp_path / "out.gguf", "q4_k_m")
    assert caught.value.code == "gguf_quantize_failed" and not (tmp_path / "out.gguf").exists()


def test_an_answer_that_leaves_the_merged_models_only_at_a_near_tie_agrees():
    merged = [5, 6, 7] + [1] * 13
    tie = [{5: 9.0}, {6: 4.00, 8: 3.95}, {7: 1.0}]  # at position 1 the top two are 0.05 apart
    clear = [{5: 9.0}, {6: 4.0, 8: 2.0}, {7: 1.0}]
    assert gguf_verify.agrees(merged, merged, clear) == "same"
    assert gguf_verify.agrees([5, 8, 9], merged, tie) == "tie"
    assert gguf_verify.agrees([5, 8, 9], merged, clear) == "different"  # 2 logits apart: a real change
    assert gguf_verify.agrees([5, 3, 9], merged, tie) == "different"  # not among the merged model's top tokens
    assert gguf_verify.agrees([5, 6], merged, tie) == "different"  # stopped early


# ----------------------------------------------------------------------------- the whole export of a run
@pytest.fixture(scope="module")
def gguf_run(smollm2_tokenizer_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gguf-run")
    return train_gguf_ready_run(folder, build_gguf_ready_model(folder / "model", smollm2_tokenizer_dir))


engine = run_engine


def test_export_gguf_writes_checked_files_and_modelfiles(gguf_run):
    events = engine("export", str(gguf_run), "--gguf", "--quant", "f16,q4_k_m")
    results = [e for e in events if e["kind"] == "gguf_exported"]
    assert [r["quant"] for r in results] == ["f16", "q4_k_m"] and all(r["ok"] for r in results), results
    out = gguf_run / "exports" / "gguf"
    for result in results:
        assert Path(result["path"]).is_file() and Path(result["path"]).parent == out
        assert result["chat_template_ok"] and result["stops_at_end_of_turn"] and result["prompts"] >= 1
        text = Path(result["modelfile"]).read_text()
        assert f"FROM ./{Path(result['path']).name}" in text and 'PARAMETER stop "<|im_end|>"' in text
        assert result["ollama_command"].startswith("ollama create ") and result["ollama_command"].endswith(
            result["modelfile"])
    assert (gguf_run / "exports" / "merged" / "config.json").is_file()  # made first, from the same adapter
    stored = json.loads((gguf_run / "exports" / "gguf-verification.json").read_text())
    assert {s["quant"] for s in stored} >= {"f16", "q4_k_m"}  # earlier exports' entries are kept beside them
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]
    modelfile_text = Path(results[0]["modelfile"]).read_text()
    template = modelfile_text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    system = modelfile_text.split('SYSTEM """', 1)[1].split('"""', 1)[0]
    messages = [{"Role": "system", "Content": system}, {"Role": "user", "Content": "Who is mayor 3?"}]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_run / "exports" / "merged")
    expected = tokenizer.apply_chat_template([{"role": "user", "content": "Who is mayor 3?"}], tokenize=False,
                                             add_generation_prompt=True)
    assert render(template, {"Messages": messages}) == expected


def test_the_adapter_as_a_gguf_lora_answers_like_peft_in_llama_cpp(gguf_run):
    result = [e for e in engine("export", str(gguf_run), "--gguf-lora") if e["kind"] == "gguf_exported"][0]
    assert result["ok"] and result["greedy_agreement"] >= gguf_verify.REQUIRED_AGREEMENT, result
    assert Path(result["path"]).name.endswith("-lora-f16.gguf") and Path(result["base_path"]).is_file()
    from gguf import GGUFReader

    fields = GGUFReader(result["path"]).fields
    assert bytes(fields["general.type"].parts[-1]).decode() == "adapter"
    tokens = list(range(200, 232))
    plain, tuned = (llama_cpp.Llama(model_path=result["base_path"], lora_path=lora, logits_all=True, verbose=False)
                    for lora in (None, result["path"]))
    plain.eval(tokens)
    tuned.eval(tokens)
    assert abs(plain.scores[: len(tokens)] - tuned.scores[: len(tokens)]).max() > 1e-3  # the LoRA is applied


def test_a_checkpoints_adapter_exports_as_its_own_gguf_lora(gguf_run):
    from qlora_engine.products import gguf_lora

    result = gguf_lora.export_gguf_lora(gguf_run, checkpoint="best")  # the run's one evaluation: its end, step 6
    out = gguf_run / "exports" / "step-6" / "gguf"
    assert result.path == str(out / f"{gguf_run.name}-step-6-lora-f16.gguf")
    assert result.base_path == str(out / f"{gguf_run.name}-step-6-base-f16.gguf")
    assert result.ok and Path(result.path).is_file() and Path(result.base_path).is_file(), result.problems


def test_too_little_disk_stops_before_the_merge(gguf_run, tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_plan, "free_disk_bytes", lambda folder: 1024)
    with pytest.raises(EngineError) as caught:
        gguf_export.export_gguf(gguf_run, ["f16"], out=tmp_path / "gguf")
    assert caught.value.code == "not_enough_disk" and "0 MiB is free" in caught.value.message
    assert f"needs about {gguf_plan.size_text(plan_disk_bytes(gguf_run, ['f16']))} on the drive" in caught.value.message
    assert not (tmp_path / "gguf").exists()


def plan_disk_bytes(run_dir: Path, quants: list[str]) -> int:
    from qlora_engine.planning.model_shape import load_model_config

    config = load_model_config(run_dir.parent / "model")
    return gguf_plan.plan_for_config(config, quants, merged_exists=gguf_plan.merged_is_current(run_dir)).disk_bytes


def test_a_file_failing_its_check_is_not_kept_and_the_earlier_export_stays(gguf_run, tmp_path, monkeypatch):
    out = tmp_path / "gguf"
    first = gguf_export.export_gguf(gguf_run, ["f16"], out=out)[0]
    before = Path(first.path).read_bytes()
    real_check = gguf_verify.check_gguf
    monkeypatch.setattr(gguf_verify, "check_gguf", lambda path, quant, ref: {
        **real_check(path, quant, ref), "ok": False, "problems": ["made to fail"]})
    again = gguf_export.export_gguf(gguf_run, ["f16"], out=out)[0]
    assert not again.ok and gguf_export.failures_error([again]).code == "export_mismatch"
    assert Path(first.path).read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == sorted([Path(first.path).name, Path(first.modelfile).name])
    # the record still says what the kept file is: its earlier passing check, with the failed attempt noted
    stored = json.loads((gguf_run / "exports" / gguf_export.VERIFICATION_FILE).read_text())
    entry = next(e for e in stored if e["path"] == first.path)
    assert entry["ok"] and entry["later_attempt_problems"] == ["made to fail"]


def test_a_killed_exports_temp_files_are_removed_and_a_running_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".tmp-{dead.stdout.strip()}-run-q8_0.gguf"
    running = tmp_path / f".tmp-{os.getppid()}-run-q8_0.gguf"
    for path in (stale, running):
        path.write_bytes(b"partial")
    gguf_export.remove_leftovers(tmp_path)
    assert not stale.exists() and running.exists()


def test_a_kill_during_a_gguf_export_keeps_the_earlier_file_and_the_next_export_tidies_up(gguf_run, tmp_path):
    out = tmp_path / "gguf"
    # f16: the file that passes its check on this random model (bf16's rounding flips a near-tie of its greedy answers)
    earlier = Path(engine("export", str(gguf_run), "--gguf", "--quant", "f16", "--out", str(out))[-1]["path"])
    before = earlier.read_bytes()
    command = [sys.executable, "-m", "qlora_engine", "export", str(gguf_run), "--gguf", "--quant", "bf16,f16",
               "--out", str(out), "--events", "jsonl"]
    engine_process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    for line in engine_process.stdout:
        if '"checking f16' in line:  # bf16 is done with; the new f16 is a temp file being checked
            engine_process.kill()
            break
    engine_process.wait(timeout=60)
    assert earlier.read_bytes() == before
    assert [p.name for p in out.glob(".tmp-*")], "the killed export left its temp file"
    engine("export", str(gguf_run), "--gguf", "--quant", "f16", "--out", str(out))
    assert not list(out.glob(".tmp-*")) and earlier.is_file()
