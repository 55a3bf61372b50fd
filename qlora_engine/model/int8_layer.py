"""The precision plan's int8 layers: bitsandbytes' Linear8bitLt, computed from its dequantized weight.

bitsandbytes' own int8 matmul keeps each layer's input on its autograd context as a plain attribute, where gradient
checkpointing cannot drop it: on an H200, Qwen2.5-1.5B with 120 int8 matrices of 196 kept 2.1 GiB more than the
estimate over one checkpointed step (3584 tokens), about 120 x tokens x in_features x 2 bytes. It also quantizes the
activations to int8, an error the plan's per-matrix errors (weights only) never counted. Here the int8 weight is
dequantized for each matmul (fp32 scales, then the compute dtype, as the 4-bit layers do) and the backward pass keeps
only the layer's own codes and scales. The weight, its state and what peft, export and the re-quantizing adapter
starts read stay those of a Linear8bitLt.
"""
from __future__ import annotations

from typing import Any

import bitsandbytes as bnb
import torch


def dequantized(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return bnb.functional.int8_vectorwise_dequant(codes, scales).to(dtype)


class FrozenInt8Matmul(torch.autograd.Function):
    """x @ dequant(codes, scales)^T + bias, with the gradient for x only (the base is frozen)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(codes, scales)  # the layer's own tensors: nothing of this step is kept
        return torch.nn.functional.linear(x, dequantized(codes, scales, x.dtype), bias)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        codes, scales = ctx.saved_tensors
        grad_x = grad_output @ dequantized(codes, scales, grad_output.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None


class FrozenInt8Linear(bnb.nn.Linear8bitLt):
    """A frozen int8 linear layer that computes in `compute_dtype` and returns the input's dtype, as Linear4bit."""

    def __init__(self, in_features: int, out_features: int, bias: bool, compute_dtype: torch.dtype,
                 device: Any = None) -> None:
        super().__init__(in_features, out_features, bias=bias, has_fp16_weights=False, device=device)
        self.compute_dtype = compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.CB is not None:  # a weight just set: its codes and scales move to the state, as bnb does
            self.init_8bit_state()
        input_dtype = x.dtype
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        out = FrozenInt8Matmul.apply(x.to(self.compute_dtype), self.state.CB, self.state.SCB, bias)
        return out.to(input_dtype)
