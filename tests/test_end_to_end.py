"""The real SmolLM2-135M-Instruct, QLoRA (NF4 + double quant + paged AdamW 8-bit) on the bundled sample facts.

One run per device: eval loss must drop by at least half, the tuned model must answer the held-out
questions far more often than the base, and both exports must reload and match the trained model; on the CPU
the same run's GGUF files answer alike in llama.cpp.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_engine.protocol.events import Event, parse_line

ROOT = Path(__file__).resolve().parent.parent
STEPS = 40
EVAL_LOSS_KEPT_AT_MOST = 0.5  # final eval loss <= half the base model's
MIN_TUNED_ACCURACY = 0.6
MAX_BASE_ACCURACY = 0.1


def engine(*args: str, timeout: int = 900) -> list[Event]:
    result = subprocess.run([sys.executable, "-m", "qlora_engine", *args, "--events", "jsonl"],
                            capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    events = [event for event in map(parse_line, result.stdout.splitlines()) if event is not None]
    assert result.returncode == 0, (events[-1:], result.stderr[-3000:])
    return events


def check_end_to_end(run_dir: Path, device: str) -> dict:
    # Gradient checkpointing trades time for GPU memory; on the CPU it only doubles the step time.
    checkpointing = "--gradient-checkpointing" if device == "cuda" else "--no-gradient-checkpointing"
    events = engine("train", "--max-steps", str(STEPS), "--eval-steps", "20", "--compare-questions", "100",
                    "--device", device, "--run-dir", str(run_dir), checkpointing)
    started = next(e for e in events if e.kind == "started")
    assert started.device == device and started.config["optimizer"] == "adamw"
    assert started.config["quant_type"] == "nf4" and started.config["double_quant"] is True
    evals = [e.eval_loss for e in events if e.kind == "eval"]
    assert evals[-1] <= evals[0] * EVAL_LOSS_KEPT_AT_MOST, evals
    comparison = next(e for e in events if e.kind == "comparison")
    assert comparison.base_accuracy <= MAX_BASE_ACCURACY
    assert comparison.tuned_accuracy >= MIN_TUNED_ACCURACY

    adapter = engine("export", str(run_dir), "--adapter")[-1]
    merged = engine("export", str(run_dir), "--merged")[-1]
    assert adapter.kind == "exported" and adapter.ok, adapter
    assert merged.kind == "exported" and merged.ok, merged
    answer = merged_model_answer(run_dir / "exports" / "merged", comparison.rows[0]["question"], device)
    assert any(k.lower() in answer.lower() for k in comparison.rows[0]["keywords"]), answer
    return {"evals": evals, "base_accuracy": comparison.base_accuracy,
            "tuned_accuracy": comparison.tuned_accuracy, "adapter": adapter.to_dict(), "merged": merged.to_dict(),
            "steps": [e for e in events if e.kind == "step"]}


def merged_model_answer(folder: Path, question: str, device: str) -> str:
    """The merged export, loaded with nothing but transformers, answers a held-out question."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(device)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True).to(device)
    output = model.generate(**prompt, max_new_tokens=40, do_sample=False)
    return tokenizer.decode(output[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory) -> tuple[Path, dict]:
    """One CPU run for every end-to-end test of this module (training SmolLM2 takes minutes)."""
    run_dir = tmp_path_factory.mktemp("e2e") / "run"
    return run_dir, check_end_to_end(run_dir, "cpu")


@pytest.mark.slow
def test_smollm2_learns_the_sample_facts_on_cpu(cpu_run):
    _, result = cpu_run
    print(json.dumps({k: v for k, v in result.items() if k != "steps"}, indent=1))


MIN_ENDED = 0.95  # answers that end with the end-of-turn token within gguf_verify.MAX_NEW_TOKENS


@pytest.mark.slow
def test_smollm2_gguf_answers_like_the_merged_model_in_llama_cpp(cpu_run):
    """The same run exported as q8_0 and q4_k_m GGUF: llama.cpp answers the held-out questions, scored next to the
    merged model, and both end their answers with the end-of-turn token (`<|im_end|>`) within 96 new tokens."""
    pytest.importorskip("llama_cpp")
    run_dir, _ = cpu_run
    results = [e.to_dict() for e in engine("export", str(run_dir), "--gguf", "--quant", "q8_0,q4_k_m", timeout=1800)
               if e.kind == "gguf_exported"]
    q8, q4 = results
    summary = {r["quant"]: {k: r[k] for k in ("accuracy", "merged_accuracy", "greedy_agreement", "perplexity",
                                              "merged_perplexity", "ended_with_end_of_turn",
                                              "merged_ended_with_end_of_turn", "size_bytes")} for r in results}
    print(json.dumps(summary, indent=1))
    assert q8["ok"] and q4["ok"], [r["problems"] for r in results]
    assert q8["prompts"] == 36 and q8["greedy_agreement"] >= 0.9
    assert q8["merged_ended_with_end_of_turn"] >= MIN_ENDED and q8["ended_with_end_of_turn"] >= MIN_ENDED
    assert q8["accuracy"] >= q8["merged_accuracy"] - 0.1 and q8["merged_accuracy"] >= 0.6
    assert q4["accuracy"] is not None and q4["perplexity"] < q8["perplexity"] * 1.5
