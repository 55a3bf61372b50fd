"""CUDA: bitsandbytes' 4-bit block sizes the precision budget offers, LoftQ against peft's own (CUDA-only) functions
run unchanged, and a mixed-precision run. Run with `pytest -m gpu tests/gpu/test_adapter_init_cuda.py`."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from test_train import run, tiny_config  # noqa: E402

from qlora_engine.model import adapter_init, lora_nf4  # noqa: E402
from qlora_engine.model import weight_formats as wf  # noqa: E402
from qlora_engine.protocol.config import RunConfig  # noqa: E402
from qlora_engine.training import loop  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]
NAME = "model.layers.1.mlp.down_proj"


@pytest.mark.parametrize("blocksize", wf.BLOCKSIZES_4BIT)
@pytest.mark.parametrize("double_quant", [False, True])
def test_cuda_bitsandbytes_takes_each_offered_block_size(blocksize, double_quant):
    torch.manual_seed(0)
    weight = torch.randn(384, 256, device="cuda")
    fmt = wf.WeightFormat(f"4bit-b{blocksize}", "4bit", blocksize)
    param = wf.quantize(fmt, weight, "nf4", double_quant, "cuda")
    state = param.quant_state
    assert param.device.type == "cuda" and state.blocksize == blocksize
    tensors = [param.data, state.absmax, state.code] + ([state.state2.absmax, state.state2.code, state.offset]
                                                        if double_quant else [])
    assert fmt.bits(384, 256, double_quant) == sum(t.numel() * t.element_size() * 8 for t in tensors)
    layout = lora_nf4.Layout((384, 256), blocksize, state.state2.blocksize if double_quant else 0, "nf4")
    nested = (state.state2.absmax, state.state2.code, state.offset) if double_quant else (None, None, None)
    in_torch = lora_nf4.dequantize_in_torch(param.data, state.absmax, *nested, state.code, layout, torch.float32)
    assert torch.allclose(in_torch, wf.dequantize(param), atol=1e-6)  # the compiled fused path reads it alike


def built(model_dir, **options):
    cfg = RunConfig(model=str(model_dir), compute_dtype="fp32", device="cuda", lora_dropout=0.0, lora_r=8,
                    compile_layers=False, **options)
    torch.manual_seed(0)
    return loop.build_model(cfg, model_dir, "cuda", torch.float32)


def test_loftq_is_peft_replace_lora_weights_loftq_on_cuda(tiny_model_dir):
    from peft.utils.loftq_utils import replace_lora_weights_loftq

    ours = adapter_init.lora_layers(built(tiny_model_dir, init_lora="loftq", lora_alpha=8))[NAME]
    reference = built(tiny_model_dir, lora_alpha=8)
    replace_lora_weights_loftq(reference, model_path=str(tiny_model_dir / "model.safetensors"))
    theirs = adapter_init.lora_layers(reference)[NAME]
    for got, expected in zip(adapter_init.adapter_weights(ours), adapter_init.adapter_weights(theirs)):
        assert torch.allclose(got, expected.to(got.device), atol=1e-5)


def test_loftq_iterations_are_peft_loftq_init_on_cuda(tiny_model_dir):
    from peft.utils.loftq_utils import loftq_init

    original = adapter_init.original_weight(tiny_model_dir, NAME).float().cuda()
    peft_base, peft_a, peft_b = loftq_init(original, num_bits=4, reduced_rank=8, num_iter=3)
    ours = adapter_init.lora_layers(built(tiny_model_dir, init_lora="loftq", loftq_iters=3, double_quant=False,
                                          lora_alpha=32))[NAME]
    got_a, got_b = adapter_init.adapter_weights(ours)
    assert torch.allclose(4 * got_b @ got_a, peft_b @ peft_a, atol=1e-4)
    assert torch.allclose(wf.dequantize_layer(ours.get_base_layer()), peft_base.float(), atol=1e-5)


def test_a_mixed_precision_pissa_run_trains_on_cuda(tiny_model_dir, alpaca_file, tmp_path):
    config = tiny_config(tiny_model_dir, alpaca_file, tmp_path / "run", device="cuda", precision_budget_bits=7.0,
                         init_lora="pissa", compile_layers=False)
    result, events = run(config)
    assert result["status"] == "finished"
    losses = [e.loss for e in events if e.kind == "step"]
    assert losses[-1] < losses[0]
