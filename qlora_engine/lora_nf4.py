"""LoRA over a 4-bit layer as one autograd function: fewer kernels, no fp32 copies of activations.

peft's bitsandbytes LoRA layer runs the 4-bit matmul, then dropout, a cast of the input to the adapter's fp32,
two small matmuls, a scaling, a cast back and an add, each a kernel and an autograd node, for every linear layer in
all three passes of a checkpointed step; on a GPU the step ends up waiting on Python. Here the forward is: dequantize
the weight, one matmul, dropout, the two LoRA matmuls with the scaling folded into an addmm; the backward likewise.
The adapters stay fp32 (the optimizer's precision), their matmuls run in the compute dtype, as under autocast.
"""
from __future__ import annotations

import types
from typing import Any

import torch


class LoraOver4bit(torch.autograd.Function):
    """y = x W^T (+ bias) + scaling * dropout(x) A^T B^T, W a frozen 4-bit weight dequantized when needed."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight_4bit: torch.Tensor, quant_state: Any, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float, dropout_p: float, bias: torch.Tensor | None) -> torch.Tensor:
        import bitsandbytes.functional as bnb_functional

        rows = x.reshape(-1, x.shape[-1])
        weight = bnb_functional.dequantize_4bit(weight_4bit, quant_state).to(x.dtype)
        out = rows @ weight.t() if bias is None else torch.addmm(bias.to(x.dtype), rows, weight.t())
        del weight
        keep = None
        if dropout_p > 0:
            keep = torch.empty_like(rows).bernoulli_(1 - dropout_p).div_(1 - dropout_p)
            rows = rows * keep
        down = rows @ lora_a.to(x.dtype).t()
        out.addmm_(down, lora_b.to(x.dtype).t(), alpha=scaling)
        ctx.save_for_backward(rows, keep, down, lora_a, lora_b)
        ctx.weight_4bit, ctx.quant_state, ctx.scaling = weight_4bit, quant_state, scaling
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        import bitsandbytes.functional as bnb_functional

        dropped_rows, keep, down, lora_a, lora_b = ctx.saved_tensors
        grad = grad_out.reshape(-1, grad_out.shape[-1])
        grad_down = (grad @ lora_b.to(grad.dtype)).mul_(ctx.scaling)
        grad_b = (grad.t() @ down).mul_(ctx.scaling)
        grad_a = grad_down.t() @ dropped_rows
        grad_x = None
        if ctx.needs_input_grad[0]:
            lora_part = grad_down @ lora_a.to(grad.dtype)
            if keep is not None:
                lora_part.mul_(keep)
            weight = bnb_functional.dequantize_4bit(ctx.weight_4bit, ctx.quant_state).to(grad.dtype)
            grad_x = torch.addmm(lora_part, grad, weight).view(*grad_out.shape[:-1], weight.shape[1])
        return grad_x, None, None, grad_a.to(lora_a.dtype), grad_b.to(lora_b.dtype), None, None, None


def use_fused_lora(model: Any) -> int:
    """Route every peft LoRA layer over a bitsandbytes 4-bit layer through LoraOver4bit; returns how many."""
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules()
              if isinstance(m, LoraLayer) and isinstance(getattr(m, "base_layer", None), bnb.nn.Linear4bit)]
    for layer in layers:
        layer.forward = types.MethodType(_fused_forward, layer)
    return len(layers)


def _fused_forward(layer: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The fused path for the plain case (one adapter, not merged, no DoRA, no LoRA bias); peft's own otherwise."""
    adapters = layer.active_adapters
    name = adapters[0] if len(adapters) == 1 else None
    base = layer.base_layer
    plain = (name in layer.lora_A and not layer.disable_adapters and not layer.merged and not args and not kwargs
             and not layer.use_dora.get(name) and layer.lora_A[name].bias is None and layer.lora_B[name].bias is None
             and getattr(base.weight, "quant_state", None) is not None)
    if not plain:
        return type(layer).forward(layer, x, *args, **kwargs)
    dropout = layer.lora_dropout[name]
    dropout_p = dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
    compute_dtype = base.compute_dtype or x.dtype
    out = LoraOver4bit.apply(x.to(compute_dtype), base.weight, base.weight.quant_state, layer.lora_A[name].weight,
                             layer.lora_B[name].weight, layer.scaling[name], dropout_p, base.bias)
    return out.to(x.dtype)
