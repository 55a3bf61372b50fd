"""The precision plan's int8 layers (qlora_engine/model/int8_layer.py) against bitsandbytes' Linear8bitLt, on the CPU:
the same weight, its dequantized matmul forward and backward, and nothing of the step kept for the backward pass
under gradient checkpointing (bitsandbytes' own int8 matmul keeps each layer's input where checkpointing can't
drop it; measured on an H200 as 2.1 GiB over the estimate)."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch.utils.checkpoint import checkpoint

bnb = pytest.importorskip("bitsandbytes")

from qlora_engine.model import weight_formats as wf  # noqa: E402
from qlora_engine.model.int8_layer import FrozenInt8Linear  # noqa: E402


def int8_layer(linear: torch.nn.Linear, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    return wf.make_layer(wf.format_named("int8"), linear, "nf4", True, dtype, "cpu")


def reference(layer: FrozenInt8Linear, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    weight = wf.dequantize_layer(layer).to(dtype)
    return torch.nn.functional.linear(x.to(dtype), weight, layer.bias.to(dtype)).to(x.dtype)


def test_the_plans_int8_layer_is_a_linear8bitlt_that_computes_with_its_dequantized_weight():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    layer = int8_layer(linear)
    assert isinstance(layer, FrozenInt8Linear) and isinstance(layer, bnb.nn.Linear8bitLt)  # peft and export see int8
    assert layer.weight.dtype == torch.int8
    x = torch.randn(3, 5, 64, requires_grad=True)
    out = layer(x)
    assert out.dtype == torch.float32  # returned in the input's dtype, computed in bf16
    torch.testing.assert_close(out, reference(layer, x.detach(), torch.bfloat16))
    # within int8's weight error of the original layer: no activation quantization on top
    assert (out - linear(x)).abs().max() < 0.05
    grad = torch.randn_like(out)
    out.backward(grad)
    expected = grad.to(torch.bfloat16) @ wf.dequantize_layer(layer).to(torch.bfloat16)
    torch.testing.assert_close(x.grad, expected.float())
    assert layer.weight.grad is None and layer.bias.grad is None  # the base stays frozen


def kept_input(layer: torch.nn.Module) -> bool:
    """Whether a checkpointed forward through `layer` still holds the layer's input once the loss is computed."""
    seen = []
    hook = layer.register_forward_pre_hook(lambda module, args: seen.append(weakref.ref(args[0])))
    x = torch.randn(4, 16, 64, dtype=torch.float16, requires_grad=True)

    def block(h: torch.Tensor) -> torch.Tensor:
        return layer(torch.nn.functional.silu(h) * 2)  # the layer's input: a tensor made inside the block

    loss = checkpoint(block, x, use_reentrant=False).float().pow(2).mean()
    hook.remove()
    gc.collect()
    kept = seen[0]() is not None
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    return kept


def test_under_checkpointing_the_int8_layer_keeps_no_input_for_its_backward():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    assert not kept_input(int8_layer(linear, torch.float16))
    # bitsandbytes' own layer does keep it (ctx.tensors): what the 2026-12-04 grid measured
    plain = bnb.nn.Linear8bitLt(64, 48, has_fp16_weights=False)
    plain.weight = wf.quantize(wf.format_named("int8"), linear.weight, "", False, "cpu")
    plain.bias = torch.nn.Parameter(linear.bias.detach().half(), requires_grad=False)
    assert kept_input(plain)


def test_lora_over_the_int8_layer_trains_through_peft():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    layer = model[0] = int8_layer(model[0])
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False))
    assert peft_model.base_model.model[0].get_base_layer() is layer  # wrapped as the engine's model is (4-bit marked)
    out = peft_model(torch.randn(6, 32)).pow(2).mean()
    out.backward()
    lora_a = peft_model.base_model.model[0].lora_A["default"].weight
    assert lora_a.grad is not None and lora_a.grad.abs().sum() > 0
