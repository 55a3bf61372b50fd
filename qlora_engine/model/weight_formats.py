"""The formats a frozen linear weight can be held in (4-bit with a block size, int8, 16-bit): their exact size in
bits, quantizing into them and back (bitsandbytes' own kernels), and building or re-filling the layer.

Used by the precision budget (which format each matrix gets) and by the adapter inits that re-quantize a base
(LoftQ with several iterations, PiSSA, OLoRA). No choice of formats here, no LoRA.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

FP32_BITS = 32
NESTED_BLOCKSIZE = 256  # bitsandbytes quantizes the block scales in blocks of 256 (compress_statistics)
CODE_TABLE_BITS = 16 * FP32_BITS  # the 16-value NF4/FP4 code book of each quant_state
NESTED_CODE_TABLE_BITS = 256 * FP32_BITS + FP32_BITS  # the 8-bit code book of the nested scales, and their offset
# Every block size bitsandbytes' quantize_4bit accepts on CPU and CUDA (checked by tests/test_precision_budget.py);
# 16 and below are not offered by its CUDA kernels for 4-bit.
BLOCKSIZES_4BIT = (32, 64, 128, 256)


@dataclass(frozen=True)
class WeightFormat:
    name: str  # "4bit-b64", "int8", "16bit": what the plan file and the Fit page say
    kind: str  # "4bit", "int8" or "16bit"
    blocksize: int = 0

    def bits(self, rows: int, cols: int, double_quant: bool) -> int:
        """Exact bits of one (rows, cols) weight in this format, its constants included."""
        count = rows * cols
        if self.kind == "16bit":
            return 16 * count
        if self.kind == "int8":
            return 8 * count + FP32_BITS * rows  # one fp32 scale per output row (SCB)
        blocks = math.ceil(count / self.blocksize)
        packed = 8 * math.ceil(count / 2)
        if not double_quant:
            return packed + FP32_BITS * blocks + CODE_TABLE_BITS
        nested = math.ceil(blocks / NESTED_BLOCKSIZE)
        return packed + 8 * blocks + FP32_BITS * nested + CODE_TABLE_BITS + NESTED_CODE_TABLE_BITS


FORMATS = tuple(WeightFormat(f"4bit-b{b}", "4bit", b) for b in BLOCKSIZES_4BIT) + (
    WeightFormat("int8", "int8"), WeightFormat("16bit", "16bit"))
PLAIN_FORMAT = FORMATS[1]  # blocks of 64: what transformers' BitsAndBytesConfig gives every layer


def format_named(name: str) -> WeightFormat:
    for fmt in FORMATS:
        if fmt.name == name:
            return fmt
    raise KeyError(name)


def quantize(fmt: WeightFormat, weight: torch.Tensor, quant_type: str, double_quant: bool, device: Any,
             dtype: torch.dtype = torch.bfloat16) -> torch.nn.Parameter:
    """The weight as a parameter in `fmt` on `device` (a 4-bit or int8 bitsandbytes parameter, or plain)."""
    import bitsandbytes as bnb

    if fmt.kind == "4bit":
        return bnb.nn.Params4bit(weight.detach().to("cpu").contiguous(), requires_grad=False,
                                 blocksize=fmt.blocksize, compress_statistics=double_quant,
                                 quant_type=quant_type).to(device)
    if fmt.kind == "int8":
        return bnb.nn.Int8Params(weight.detach().to("cpu", torch.float16).contiguous(), requires_grad=False,
                                 has_fp16_weights=False).to(device)
    return torch.nn.Parameter(weight.detach().to(device, dtype), requires_grad=False)


def dequantize(param: torch.Tensor) -> torch.Tensor:
    """An fp32 copy of what a (possibly quantized) parameter holds."""
    import bitsandbytes as bnb

    name = type(param).__name__
    if name == "Params4bit":
        return bnb.functional.dequantize_4bit(param.data, param.quant_state).float()
    if name == "Int8Params":
        return bnb.functional.int8_vectorwise_dequant(param.data, param.SCB).float()
    return param.detach().float()


def squared_error(fmt: WeightFormat, weight: torch.Tensor, quant_type: str, double_quant: bool) -> float:
    """||W - dequant(quant(W))||_F^2, quantized exactly as the layer would be (on W's device)."""
    if fmt.kind == "16bit":
        return float((weight.float() - weight.to(torch.bfloat16).float()).pow(2).sum())
    restored = dequantize(quantize(fmt, weight, quant_type, double_quant, weight.device))
    return float((weight.float() - restored).pow(2).sum())


def layer_format(layer: torch.nn.Module) -> WeightFormat:
    name = type(layer.weight).__name__
    if name == "Params4bit":
        return WeightFormat(f"4bit-b{layer.weight.blocksize}", "4bit", layer.weight.blocksize)
    if name == "Int8Params":
        return format_named("int8")
    return format_named("16bit")


def dequantize_layer(layer: torch.nn.Module) -> torch.Tensor:
    weight = layer.weight
    if type(weight).__name__ == "Int8Params" and getattr(weight, "SCB", None) is None:
        return dequantize_int8_state(layer)
    return dequantize(weight)


def dequantize_int8_state(layer: torch.nn.Module) -> torch.Tensor:
    """After its first forward a Linear8bitLt keeps the row scales on its matmul state, not on the weight."""
    from peft.utils.integrations import dequantize_bnb_weight

    return dequantize_bnb_weight(layer.weight, state=layer.state).float()


def like(layer: torch.nn.Module, weight: torch.Tensor) -> torch.nn.Parameter:
    """`weight` quantized in the layer's own format (same block size, quant type and double quantization)."""
    old = layer.weight
    kind = type(old).__name__
    if kind == "Params4bit":
        import bitsandbytes as bnb

        return bnb.nn.Params4bit(weight.detach().to("cpu").contiguous(), requires_grad=False,
                                 blocksize=old.blocksize, compress_statistics=old.compress_statistics,
                                 quant_type=old.quant_type, quant_storage=old.quant_storage,
                                 module=layer).to(old.device)
    if kind == "Int8Params":
        return quantize(format_named("int8"), weight, "", False, old.device)
    return torch.nn.Parameter(weight.detach().to(old.device, old.dtype), requires_grad=False)


def refill(layer: torch.nn.Module, weight: torch.Tensor) -> None:
    """Replace a layer's frozen weight by `weight` in the layer's own format: how a re-quantized base goes back."""
    layer.weight = like(layer, weight)
    if type(layer.weight).__name__ == "Int8Params":
        layer.state.SCB = None
        layer.state.CB = None


def make_layer(fmt: WeightFormat, linear: torch.nn.Linear, quant_type: str, double_quant: bool,
               compute_dtype: torch.dtype, device: Any) -> torch.nn.Module:
    """A frozen layer in `fmt` holding `linear`'s weight and bias, on `device`."""
    import bitsandbytes as bnb

    has_bias = linear.bias is not None
    if fmt.kind == "4bit":
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias, compute_dtype=compute_dtype,
                                  compress_statistics=double_quant, quant_type=quant_type, device="meta")
    elif fmt.kind == "int8":
        from qlora_engine.model.int8_layer import FrozenInt8Linear

        layer = FrozenInt8Linear(linear.in_features, linear.out_features, has_bias, compute_dtype, device="meta")
    else:
        return linear.to(device, compute_dtype).requires_grad_(False)
    layer.weight = quantize(fmt, linear.weight, quant_type, double_quant, device)
    if fmt.kind == "4bit":
        layer.weight.module = layer
    if has_bias:
        layer.bias = torch.nn.Parameter(linear.bias.detach().to(device, compute_dtype), requires_grad=False)
    return layer
