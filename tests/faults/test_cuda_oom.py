"""Out of GPU memory: the run stops with a `cuda_oom` error that carries the measured peak and the estimator's fix,
the last checkpoint stays, and the engine process exits, so it holds no GPU memory.

On the CPU the out-of-memory error is injected at step 3 and the GPU's figures are those of a made-up card too
small for the run by the estimate; the gpu-marked test runs, on the real card, a configuration the estimate says
won't fit.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from engine_process import ROOT, engine_command, parse_events
from tiny_models import build_tokenizer, write_jsonl

from qlora_engine import cli
from qlora_engine.planning.advice import advise
from qlora_engine.planning.memory import estimate_peak
from qlora_engine.planning.model_shape import resolve_model_config
from qlora_engine.protocol.config import RunConfig
from qlora_engine.protocol.events import read_events
from qlora_engine.training import checkpoints, loop

GIB, MIB = 2**30, 2**20
TORCH_MESSAGE = "CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 has a total capacity of 4.00 GiB."
# 64 rows of up to 4096 tokens per micro-batch: a large estimate (the data's rows are short, so the CPU run is quick)
OPTIONS = {"micro_batch_size": 64, "max_length": 4096, "max_steps": 6, "save_steps": 2, "eval_steps": 0}


def card_too_small_for(cfg: RunConfig) -> dict[str, int]:
    """A made-up card, read after the error, on which `cfg` won't fit by the estimate but the estimator's first fix
    does: the run held all but 100 MiB of it."""
    model_config = resolve_model_config(cfg.model)
    peak_bytes = estimate_peak(model_config, cfg).peak_bytes
    for run_bytes in (int(peak_bytes * fraction) for fraction in (0.7, 0.5, 0.35, 0.25)):
        plan = advise(model_config, cfg, run_bytes)
        if plan.verdict == "won't fit" and plan.fixes and plan.fixes[0].fits_after:
            return {"peak_bytes": run_bytes - 300 * MIB, "reserved_bytes": run_bytes - 100 * MIB,
                    "free_bytes": 100 * MIB, "gpu_total_bytes": run_bytes + 500 * MIB}
    raise AssertionError(f"no card size where the estimator has a fix for {cfg}")


def test_running_out_of_gpu_memory_reports_the_measured_peak_and_the_estimators_fix(
        engine_in_process, tiny_model_dir, faults_data_file, tmp_path, monkeypatch, capfd):
    real_step, steps_started = loop.training_step, []

    def step_until_the_memory_runs_out(*args, **kwargs):
        steps_started.append(1)
        if len(steps_started) == 3:
            raise torch.cuda.OutOfMemoryError(TORCH_MESSAGE)
        return real_step(*args, **kwargs)

    cfg = RunConfig(model=str(tiny_model_dir), data=str(faults_data_file), **OPTIONS)
    card = card_too_small_for(cfg)
    monkeypatch.setattr(loop, "training_step", step_until_the_memory_runs_out)
    monkeypatch.setattr(cli, "measured_gpu_memory", lambda: dict(card))
    run_dir = tmp_path / "run"
    code = engine_in_process("--model", cfg.model, "--data", cfg.data, "--run-dir", str(run_dir), "--events", "jsonl",
                             *[f"--{name.replace('_', '-')}={value}" for name, value in OPTIONS.items()])

    error = list(read_events(run_dir / "events.jsonl"))[-1]
    assert code == 1 and error.kind == "error" and error.code == "cuda_oom"
    assert error.step == 3 and error.peak_bytes == card["peak_bytes"]
    assert "during step 3 (it tried to allocate 2.50 GiB more)" in error.message
    assert (f"this run used up to {card['peak_bytes'] / GIB:.2f} GiB of the GPU's {card['gpu_total_bytes'] / GIB:.2f} "
            "GiB") in error.message

    model_config = resolve_model_config(cfg.model)
    plan = advise(model_config, RunConfig.load(run_dir / "config.yaml"),
                  card["free_bytes"] + card["reserved_bytes"])
    assert error.estimate_peak_bytes == plan.peak_bytes
    assert f"the estimate for this configuration is {plan.peak_bytes / GIB:.2f} GiB" in error.message
    assert error.advice.startswith(f"The estimator's fix for this GPU: {plan.fixes[0].description}")
    assert [fix["config_changes"] for fix in error.fixes] == [fix.config_changes for fix in plan.fixes]

    assert checkpoints.latest_checkpoint(run_dir).name == "step-2", "the last checkpoint is kept"
    assert not (run_dir / ".lock").exists()
    assert "Traceback" not in capfd.readouterr().err


def test_when_the_estimate_says_it_fits_the_advice_points_at_other_programs_on_the_gpu(tiny_model_dir, monkeypatch):
    big_card = {"peak_bytes": 3 * GIB, "reserved_bytes": 4 * GIB, "free_bytes": 70 * GIB, "gpu_total_bytes": 80 * GIB}
    monkeypatch.setattr(cli, "measured_gpu_memory", lambda: dict(big_card))
    error = cli.cuda_oom_error(torch.cuda.OutOfMemoryError(TORCH_MESSAGE), RunConfig(model=str(tiny_model_dir)), 5)
    assert error.code == "cuda_oom" and error.details["fixes"] == []
    assert "another program is probably using GPU memory" in error.advice


def test_an_out_of_memory_error_never_offers_a_speed_fix_whatever_the_verdict(tiny_model_dir, monkeypatch):
    """Fixes say their kind: a speed fix (it costs memory) is left out of a cuda_oom error even beside memory fixes
    and a verdict other than "fits"; the advice names the memory fix."""
    from qlora_engine.protocol.queries import Advice, Fix

    speed = Fix("fused AdamW", -GIB // 4, {"optimizer": "adamw"}, True, kind="speed")
    memory = Fix("gradient checkpointing on", 2 * GIB, {"gradient_checkpointing": True}, True, kind="memory")
    monkeypatch.setattr(cli, "_estimator_plan", lambda cfg, free: Advice("tight", 5 * GIB, free, None, None,
                                                                         [speed, memory]))
    monkeypatch.setattr(cli, "measured_gpu_memory", lambda: {"peak_bytes": 3 * GIB, "reserved_bytes": 4 * GIB,
                                                             "free_bytes": 1 * GIB, "gpu_total_bytes": 8 * GIB})
    error = cli.cuda_oom_error(torch.cuda.OutOfMemoryError(TORCH_MESSAGE), RunConfig(model=str(tiny_model_dir)), 5)
    assert error.details["fixes"] == [{"description": "gradient checkpointing on",
                                       "config_changes": {"gradient_checkpointing": True}}]
    assert error.advice.startswith("The estimator's fix for this GPU: gradient checkpointing on.")


# ----------------------------------------------------------------------------- on a real GPU
def wide_tiny_model(folder):
    """Two layers, but wide and with an 8k context, so that one micro-batch can fill a big GPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=4096, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=8192,
                         tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def gpu_processes() -> set[int]:
    if shutil.which("nvidia-smi") is None:
        return set()
    listing = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout
    return {int(line) for line in listing.split() if line.strip().isdigit()}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_a_run_the_estimate_says_wont_fit_ends_in_cuda_oom_with_peak_and_fix_and_frees_the_gpu(tmp_path):
    model_dir = wide_tiny_model(tmp_path / "model")
    free_before, total = torch.cuda.mem_get_info()
    flags = {"max_length": 4096, "gradient_checkpointing": False, "grad_accum": 1, "device": "cuda"}
    model_config = resolve_model_config(str(model_dir))
    batch = 8
    while estimate_peak(model_config, RunConfig(model=str(model_dir), micro_batch_size=batch,
                                                **flags)).peak_bytes < 2 * free_before:
        batch *= 2
    cfg = RunConfig(model=str(model_dir), micro_batch_size=batch, **flags)
    plan = advise(model_config, cfg, free_before)
    assert plan.verdict == "won't fit"
    # rows of ~4096 tokens, enough for one full micro-batch
    data_file = write_jsonl(tmp_path / "long.jsonl", [{"text": f"row {i}: " + "The quick brown fox. " * 1400}
                                                      for i in range(batch)])
    args = ["train", "--model", str(model_dir), "--data", str(data_file), "--run-dir", str(tmp_path / "run"),
            "--micro-batch-size", str(batch), "--max-length", "4096", "--no-gradient-checkpointing", "--grad-accum",
            "1", "--max-steps", "2", "--val-fraction", "0", "--device", "cuda", "--events", "jsonl"]
    engine = subprocess.Popen(engine_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=ROOT)
    stdout, stderr = engine.communicate(timeout=540)
    error = parse_events(stdout)[-1]
    print("CUDA_OOM_EVENT " + error.to_json(), file=sys.stderr)

    assert engine.returncode == 1 and error.code == "cuda_oom", stderr[-2000:]
    assert 0.5 * free_before < error.peak_bytes <= total and error.gpu_total_bytes == total
    assert error.estimate_peak_bytes > free_before
    assert error.fixes and error.advice.startswith("The estimator's fix for this GPU:")
    assert "Traceback" not in stderr
    # no zombie holding VRAM: the process is gone and its memory is back
    with pytest.raises(ProcessLookupError):
        os.kill(engine.pid, 0)
    assert engine.pid not in gpu_processes()
    assert torch.cuda.mem_get_info()[0] > free_before - GIB
