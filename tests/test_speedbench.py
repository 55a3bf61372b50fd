"""`qlora-studio bench --speed` end to end on the CPU: every stack in its own process, the same loss curve."""
import json
import subprocess
import sys

TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 49152,  # the bench text's tokenizer
              "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


def test_speed_bench_runs_the_plain_stack_and_the_engine_side_by_side_with_the_same_losses(tmp_path):
    config, out = tmp_path / "config.json", tmp_path / "speed.json"
    config.write_text(json.dumps(TINY_LLAMA))
    done = subprocess.run([sys.executable, "-m", "qlora_engine", "bench", "--speed", "--device", "cpu", "--model",
                           str(config), "--stacks", "plain,engine,plain_fp32", "--workloads", "fixed", "--steps", "3",
                           "--warmup", "1", "--max-length", "64", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| plain HF QLoRA |" in done.stdout and "| QLoRA Studio engine |" in done.stdout
    results = {r["stack"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"plain", "engine", "plain_fp32"}
    assert not any(r.get("error") or r.get("oom") for r in results.values())
    assert all(r["tokens_per_s"] > 0 and len(r["losses"]) == 3 for r in results.values())
    # fp32 on the CPU, dropout 0: packing, the chunked loss and the fused LoRA layer compute what peft does
    for plain, engine, reference in zip(*(results[s]["losses"] for s in ("plain", "engine", "plain_fp32"))):
        assert abs(plain - engine) <= 1e-3 * abs(plain) and abs(plain - reference) <= 1e-3 * abs(plain)
    assert results["plain"]["losses"][0] != results["plain"]["losses"][-1]  # it trained


def test_engine_variants_are_named_by_the_run_options_they_change():
    """`--stacks engine@OPTION=VALUE+...`: any run option changed, typed as the config types it; a name that is not
    a run option is refused before any worker starts."""
    import pytest

    from qlora_engine.bench.speed import engine_switches

    assert engine_switches("engine@activation_memory_budget=0.25+fp32_residual=false") == {
        "activation_memory_budget": 0.25, "fp32_residual": False}
    assert engine_switches("engine_eager") == {"compile_layers": False}
    assert engine_switches("plain") is None and engine_switches("unsloth") is None
    with pytest.raises(SystemExit, match="not OPTION=VALUE"):
        engine_switches("engine@lora_rank=8")
