"""Regional torch.compile: the attention and MLP block of each decoder layer compiled, on CUDA.

A checkpointed QLoRA step of an 8B model launches about fifteen thousand kernels, each from Python; on a fast GPU
the step waits on the CPU (measured: 0.31 s of GPU work in a 0.65 s step). Compiled, each block is one call into
Inductor's generated code: elementwise work (rotary embedding, SwiGLU, the 4-bit dequantization inside the fused
LoRA layer) fused into a few Triton kernels, the matmuls still cuBLAS. Every layer has the same code, so a block is
compiled once (the first step takes a minute longer) and reused by all layers. The blocks, not the whole layers:
gradient checkpointing then stays outside the compiled code whichever way transformers wraps it (around the layer's
call up to 5.1x, inside its forward since), and a whole layer with the checkpoint traced inside did not compile on
the GPU machine's torch 2.11 (measured: no faster than eager). On the CPU, and on GPUs Triton does not support,
nothing changes.
"""
from __future__ import annotations

from typing import Any

import torch

RECOMPILE_LIMIT = 64  # train/eval x grad/no-grad x a static and a dynamic shape, with room to spare
MIN_COMPUTE_CAPABILITY = (7, 0)  # Triton's


def compile_supported(device: torch.device | str) -> str | None:
    """None where compiling is supported on `device`, otherwise why not (said in the log)."""
    if torch.device(device).type != "cuda":
        return "torch.compile of the layers is used on CUDA GPUs only"
    if torch.cuda.get_device_capability(device) < MIN_COMPUTE_CAPABILITY:
        return "this GPU is older than Triton supports (compute capability 7.0)"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed"
    return None


def compile_layers(model: Any, backend: Any = "inductor", fullgraph: bool = False) -> int:
    """Compile the attention and MLP block of every decoder layer of `model` in place; returns how many blocks.
    `backend` and `fullgraph` are for tests (aot_eager traces and differentiates exactly like Inductor, without
    generating code; fullgraph raises on any graph break)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    blocks = [child for layer in model.modules() if isinstance(layer, GradientCheckpointingLayer)
              for child in layer.children() if any(isinstance(m, torch.nn.Linear) for m in child.modules())]
    for block in blocks:
        block.compile(backend=backend, fullgraph=fullgraph, dynamic=None)
    return len(blocks)
