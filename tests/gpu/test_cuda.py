"""CUDA path: bitsandbytes' CUDA kernels, the engine on a GPU, and the real end-to-end run.

Run on a CUDA machine with `pytest -m gpu -s tests/gpu`; results are recorded in tests/gpu/RESULTS.md.
"""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from test_end_to_end import check_end_to_end  # noqa: E402
from test_train import run, step_losses, tiny_config  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]


def test_nf4_cuda_matmul_matches_the_dequantized_weight():
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    torch.manual_seed(0)
    weight = torch.randn(1024, 768, device="cuda", dtype=torch.bfloat16)
    packed, state = F.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
    assert packed.device.type == "cuda" and packed.numel() == weight.numel() // 2
    dequantized = F.dequantize_4bit(packed, state)
    assert (dequantized.float() - weight.float()).norm() / weight.float().norm() < 0.12  # NF4 rounding
    x = torch.randn(8, 768, device="cuda", dtype=torch.bfloat16)
    out = bnb.matmul_4bit(x, packed.t(), quant_state=state)
    reference = x.float() @ dequantized.float().t()
    assert (out.float() - reference).norm() / reference.norm() < 1e-2


def test_tiny_run_on_cuda_learns_in_bf16_with_paged_8bit_adamw(tiny_model_dir, alpaca_file, tmp_path):
    result, events = run(tiny_config(tiny_model_dir, alpaca_file, tmp_path / "run", max_steps=12, eval_steps=4,
                                     device="cuda"))
    started = next(e for e in events if e.kind == "started")
    assert started.compute_dtype == "bfloat16"
    losses = step_losses(events)
    assert losses[-1] < losses[0] * 0.9
    vram = [e for e in events if e.kind == "step"][-1].vram
    assert 0 < vram["max_allocated"] <= vram["gpu_used"] <= vram["gpu_total"]


def test_resume_on_cuda_continues_the_same_curve(tiny_model_dir, alpaca_file, tmp_path):
    from qlora_engine.protocol.events import EventWriter
    from qlora_engine.training import checkpoints, loop

    _, whole = run(tiny_config(tiny_model_dir, alpaca_file, tmp_path / "whole", max_steps=8, device="cuda"))
    config = tiny_config(tiny_model_dir, alpaca_file, tmp_path / "split", max_steps=8, save_steps=4, device="cuda")
    stop = loop.StopRequest()
    original = checkpoints.save_checkpoint

    def save_then_stop(*args, **kwargs):
        stop.event.set()
        return original(*args, **kwargs)

    checkpoints.save_checkpoint = save_then_stop
    try:
        events = EventWriter(tmp_path / "split" / "events.jsonl", stream=None)
        loop.run_training(config, tmp_path / "split", events, stop=stop)
        events.close()
    finally:
        checkpoints.save_checkpoint = original
    _, split = run(config, resume=True)
    assert step_losses(split) == pytest.approx(step_losses(whole), rel=1e-3)


def test_smollm2_learns_the_sample_facts_on_cuda(tmp_path):
    result = check_end_to_end(tmp_path / "run", "cuda")
    steps = result.pop("steps")
    result["tokens_per_s_median"] = sorted(s.tokens_per_s for s in steps)[len(steps) // 2]
    result["peak_allocated_gib"] = round(max(s.vram["max_allocated"] for s in steps) / 2**30, 3)
    print("END_TO_END_CUDA " + json.dumps(result))
