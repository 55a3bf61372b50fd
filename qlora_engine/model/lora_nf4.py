"""LoRA over a 4-bit layer as one autograd function: fewer kernels, no fp32 copies of activations.

peft's bitsandbytes LoRA layer runs the 4-bit matmul, then dropout, a cast of the input to the adapter's fp32,
two small matmuls, a scaling, a cast back and an add, each a kernel and an autograd node, for every linear layer in
all three passes of a checkpointed step; on a GPU the step ends up waiting on Python. Here the forward is: dequantize
the weight, one matmul, dropout, the two LoRA matmuls with the scaling folded into an addmm; the backward likewise.
The adapters stay fp32 (the optimizer's precision), their matmuls run in the compute dtype, as under autocast.

The function takes the 4-bit weight as plain tensors (packed codes, block scales, the scales' own scales when they are
double-quantized) and a hashable `Layout`, so torch.compile traces it whole (see layer_compile): there the weight is
dequantized by the few torch operations below, which Inductor fuses into one kernel; run eagerly, bitsandbytes' own
kernels do it.
"""
from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

import torch

BUFFER_PREFIX = "fused_lora_"
QUANT_TENSORS = ("absmax", "nested_absmax", "nested_code", "offset", "code")


@dataclass(frozen=True)
class Layout:
    """What a 4-bit weight's tensors do not say themselves."""
    shape: tuple[int, int]
    blocksize: int
    nested_blocksize: int  # 0: the block scales are stored as fp32, not quantized again
    quant_type: str


def dequantize(packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: torch.Tensor | None,
               nested_code: torch.Tensor | None, offset: torch.Tensor | None, code: torch.Tensor, layout: Layout,
               dtype: torch.dtype) -> torch.Tensor:
    """The (out, in) weight in `dtype`, exactly as bitsandbytes' dequantize_4bit computes it."""
    if not torch.compiler.is_compiling():
        if layout.nested_blocksize:
            absmax = torch.ops.bitsandbytes.dequantize_blockwise(absmax, nested_absmax, nested_code,
                                                                 layout.nested_blocksize, torch.float32) + offset
        return torch.ops.bitsandbytes.dequantize_4bit(packed, absmax, layout.blocksize, layout.quant_type,
                                                      list(layout.shape), dtype)
    return dequantize_in_torch(packed, absmax, nested_absmax, nested_code, offset, code, layout, dtype)


def dequantize_in_torch(packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: torch.Tensor | None,
                        nested_code: torch.Tensor | None, offset: torch.Tensor | None, code: torch.Tensor,
                        layout: Layout, dtype: torch.dtype) -> torch.Tensor:
    """dequantize in plain torch operations: a code-book lookup per 4-bit value times its block's scale (itself a
    lookup times a scale when double-quantized); high nibble first, as bitsandbytes packs them."""
    if layout.nested_blocksize:
        absmax = _scale_blocks(nested_code[absmax.long()], nested_absmax, layout.nested_blocksize) + offset
    rows, cols = layout.shape
    flat = packed.reshape(-1)
    nibbles = torch.stack((flat >> 4, flat & 15), dim=-1).reshape(-1)[:rows * cols]
    return _scale_blocks(code[nibbles.long()], absmax, layout.blocksize).to(dtype).view(rows, cols)


def _scale_blocks(values: torch.Tensor, scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    full = values.numel() // blocksize * blocksize
    head = (values[:full].view(-1, blocksize) * scales[:full // blocksize, None]).view(-1)
    return head if full == values.numel() else torch.cat((head, values[full:] * scales[-1]))


class LoraOver4bit(torch.autograd.Function):
    """y = x W^T (+ bias) + scaling * dropout(x) A^T B^T, W a frozen 4-bit weight dequantized when needed."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, bias: torch.Tensor | None,
                scaling: float, dropout_p: float, out_dtype: torch.dtype, layout: Layout, packed: torch.Tensor,
                *quant: torch.Tensor | None) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        weight = dequantize(packed, *quant, layout, x.dtype)
        out = rows @ weight.t() if bias is None else torch.addmm(bias.to(x.dtype), rows, weight.t())
        del weight
        keep = None
        if dropout_p > 0:
            keep = torch.empty_like(rows).bernoulli_(1 - dropout_p).div_(1 - dropout_p)
            rows = rows * keep
        down = rows @ lora_a.to(x.dtype).t()
        if out_dtype == x.dtype:
            out.addmm_(down, lora_b.to(x.dtype).t(), alpha=scaling)
        else:  # summed in out_dtype (fp32): the adapter's small contribution is not rounded away (see residual.py)
            out = torch.add(out.to(out_dtype), down @ lora_b.to(x.dtype).t(), alpha=scaling)
        ctx.save_for_backward(rows, keep, down, lora_a, lora_b, packed, *quant)
        ctx.scaling, ctx.layout = scaling, layout
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        dropped_rows, keep, down, lora_a, lora_b, packed, *quant = ctx.saved_tensors
        grad = grad_out.reshape(-1, grad_out.shape[-1]).to(dropped_rows.dtype)
        grad_down = (grad @ lora_b.to(grad.dtype)).mul_(ctx.scaling)
        grad_b = (grad.t() @ down).mul_(ctx.scaling)
        grad_a = grad_down.t() @ dropped_rows
        grad_x = None
        if ctx.needs_input_grad[0]:
            lora_part = grad_down @ lora_a.to(grad.dtype)
            if keep is not None:
                lora_part.mul_(keep)
            weight = dequantize(packed, *quant, ctx.layout, grad.dtype)
            grad_x = torch.addmm(lora_part, grad, weight).view(*grad_out.shape[:-1], weight.shape[1])
        return (grad_x, grad_a.to(lora_a.dtype), grad_b.to(lora_b.dtype), None, None, None, None, None, None,
                *([None] * len(quant)))


def use_fused_lora(model: Any) -> int:
    """Route every peft LoRA layer over a bitsandbytes 4-bit layer through LoraOver4bit; returns how many.
    The 4-bit weight's tensors are registered on the layer as non-persistent buffers (the same storage: nothing is
    copied, nothing is saved twice)."""
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules()
              if isinstance(m, LoraLayer) and isinstance(getattr(m, "base_layer", None), bnb.nn.Linear4bit)
              and getattr(m.base_layer.weight, "quant_state", None) is not None]
    for layer in layers:
        layer.fused_layout = _register_quant_tensors(layer)
        layer.forward = types.MethodType(_fused_forward, layer)
    return len(layers)


def _register_quant_tensors(layer: Any) -> Layout:
    weight = layer.base_layer.weight
    state = weight.quant_state
    nested = state.state2 if state.nested else None
    tensors = {"packed": weight.data.view(torch.uint8), "absmax": state.absmax,
               "nested_absmax": nested.absmax if nested else None, "nested_code": nested.code if nested else None,
               "offset": state.offset if nested else None, "code": state.code}
    for name, tensor in tensors.items():
        layer.register_buffer(BUFFER_PREFIX + name, tensor, persistent=False)
    return Layout(tuple(state.shape), state.blocksize, nested.blocksize if nested else 0, state.quant_type)


def _fused_forward(layer: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The fused path for the plain case (one adapter, not merged, no DoRA, no LoRA bias); peft's own otherwise."""
    adapters = layer.active_adapters
    name = adapters[0] if len(adapters) == 1 else None
    base = layer.base_layer
    plain = (name in layer.lora_A and not layer.disable_adapters and not layer.merged and not args and not kwargs
             and not layer.use_dora.get(name) and layer.lora_A[name].bias is None and layer.lora_B[name].bias is None)
    if not plain:
        return type(layer).forward(layer, x, *args, **kwargs)
    dropout = layer.lora_dropout[name]
    dropout_p = dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
    compute_dtype = base.compute_dtype or x.dtype
    packed, *quant = [getattr(layer, BUFFER_PREFIX + key) for key in ("packed", *QUANT_TENSORS)]
    # in the compute dtype, as a matmul under autocast; a layer that writes an fp32 residual stream in fp32
    out_dtype = getattr(layer, "residual_dtype", None) or compute_dtype
    return LoraOver4bit.apply(x.to(compute_dtype), layer.lora_A[name].weight, layer.lora_B[name].weight, base.bias,
                              layer.scaling[name], dropout_p, out_dtype, layer.fused_layout, packed, *quant)


def peft_path_note(model: Any) -> str:
    """A log line naming the LoRA layers that run through peft's own path (DoRA, int8 or 16-bit bases), or ''."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    fused = sum(1 for m in layers if hasattr(m, "fused_layout") and not any(m.use_dora.values()))
    if fused == len(layers):
        return ""
    why = "DoRA" if any(any(m.use_dora.values()) for m in layers) else "their base is not 4-bit"
    return (f"fused LoRA: {len(layers) - fused} of {len(layers)} layers run through peft's path instead ({why}): "
            "same result, slower")
