"""`qlora-studio bench --speed` end to end on the CPU: every stack in its own process, the same loss curve."""
import json
import subprocess
import sys
from pathlib import Path

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
    from qlora_engine.protocol.errors import EngineError

    with pytest.raises(EngineError, match="not OPTION=VALUE"):
        engine_switches("engine@lora_rank=8")
    refused = subprocess.run([sys.executable, "-m", "qlora_engine", "bench", "--speed", "--stacks", "nonsense"],
                             capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert refused.returncode == 2 and "unknown stack 'nonsense'" in refused.stderr
    assert "Traceback" not in refused.stderr and "Choose from" in refused.stderr


def test_speed_bench_with_nproc_2_sets_two_gloo_ranks_beside_one_process_in_one_command(tmp_path):
    """`--nproc 2` on the CPU: the engine in one process, in one process at 2x the rows per step, and in two
    processes (torchrun, gloo) at 2x the rows; the report holds tokens/s of each, the speed-up and the two-process
    curve against the one-process curve at the same rows per step (fp32: equal up to summation order)."""
    config, out = tmp_path / "config.json", tmp_path / "speed.json"
    config.write_text(json.dumps(TINY_LLAMA))
    done = subprocess.run([sys.executable, "-m", "qlora_engine", "bench", "--speed", "--device", "cpu", "--model",
                           str(config), "--stacks", "engine", "--workloads", "fixed", "--steps", "4", "--warmup", "1",
                           "--max-length", "64", "--nproc", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    runs = {(r["nproc"], r["batch_scale"]): r for r in report["results"]}
    assert set(runs) == {(1, 1), (1, 2), (2, 2)} and not any(r.get("error") for r in runs.values())
    assert all(r["tokens_per_s"] > 0 and len(r["losses"]) == 4 for r in runs.values())
    several = runs[(2, 2)]
    assert several["rows_per_step"] == 2 and len(several["rank_memory"]) == 2 and several["ranks_started_alike"]
    [comparison] = report["ddp"]
    assert comparison["nproc"] == 2 and comparison["error"] is None
    assert comparison["speedup"] == round(several["tokens_per_s"] / runs[(1, 1)]["tokens_per_s"], 3)
    assert comparison["loss_difference"]["max"] <= 1e-4 and comparison["losses_within_tolerance"]
    assert runs[(1, 2)]["losses"] != runs[(1, 1)]["losses"]  # the reference trained other rows than the usual run
    assert "| QLoRA Studio engine | fixed | 2 |" in done.stdout and "speed-up (goal)" in done.stdout


def test_speed_bench_with_nproc_2_fsdp_shards_the_engine_and_keeps_its_curve(tmp_path):
    """`--nproc 2 --fsdp` on the CPU: the two-process run shards each decoder layer over the gloo ranks
    and its loss curve is the one-process curve at the same rows per step (fp32: equal up to summation order)."""
    config, out = tmp_path / "config.json", tmp_path / "speed.json"
    config.write_text(json.dumps(TINY_LLAMA))
    done = subprocess.run([sys.executable, "-m", "qlora_engine", "bench", "--speed", "--device", "cpu", "--model",
                           str(config), "--stacks", "engine", "--workloads", "fixed", "--steps", "4", "--warmup", "1",
                           "--max-length", "64", "--nproc", "2", "--fsdp", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    [comparison] = report["ddp"]
    assert comparison["error"] is None and comparison["loss_difference"]["max"] <= 1e-4
    assert "decoder layers sharded" not in done.stdout  # the bench's own output stays its tables
    several = next(r for r in report["results"] if r["nproc"] == 2)
    assert several["ranks_started_alike"] and len(several["losses"]) == 4


def test_a_failed_several_process_run_is_reported_not_compared():
    from qlora_engine.bench import ddp

    one = {"stack": "engine", "workload": "fixed", "nproc": 1, "batch_scale": 1, "tokens_per_s": 100.0,
           "losses": [2.0, 1.0]}
    same_rows = {**one, "batch_scale": 2, "tokens_per_s": 180.0, "losses": [2.0, 1.0]}
    failed = {**one, "nproc": 2, "batch_scale": 2, "error": "RuntimeError: NCCL error"}
    [entry] = ddp.comparisons([one, same_rows, failed])
    assert entry["speedup"] is None and not entry["losses_within_tolerance"]
    assert entry["error"] == "engine, 2 processes (2x rows per step): RuntimeError: NCCL error"
    assert "failed: engine, 2 processes" in ddp.format_comparisons([entry], {})
    close = {**failed, "error": None, "tokens_per_s": 190.0, "losses": [2.01, 1.0]}
    [entry] = ddp.comparisons([one, same_rows, close])
    assert (entry["speedup"], entry["efficiency"], entry["loss_difference"]["max_step"]) == (1.9, 0.95, 1)
    assert entry["losses_within_tolerance"]  # 0.5% at step 1: within 1%
