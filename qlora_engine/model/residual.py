"""The residual stream in fp32 while the matmuls stay 16-bit: the precision of the plain Hugging Face QLoRA recipe.

peft's `prepare_model_for_kbit_training` casts embeddings and norms to fp32 and the Trainer runs under autocast, so
the hidden state carried from layer to layer is fp32, and each layer's output projection adds base + adapter in fp32
into it. Early in a run an adapter's contribution is about one bf16 rounding step of the base output it is added to:
a model kept wholly in bf16 rounds much of it away at every sum, and learns measurably slower than the recipe (an
8B model, 2048-token rows: its loss 0.1-0.2% above an fp32 reference's before the first loss spike, where the
recipe's stays within 0.05%). Here the same precision, without fp32 copies of the embeddings or lm_head: the
embedding's output is upcast; the layers that write the residual stream (attention and MLP output projections) sum
base and adapter in fp32; every other 4-bit layer's output and the rotary embedding's cos/sin stay in the compute
dtype, so attention and the MLP run in 16-bit as under autocast; lm_head's input is cast to the compute dtype.
"""
from __future__ import annotations

from typing import Any

import torch

# The output projections of attention and MLP blocks (Llama, Mistral, Qwen, Gemma, Phi-3 and the like): what they
# return is added to the residual stream.
RESIDUAL_WRITERS = ("o_proj", "down_proj", "out_proj", "dense", "fc2", "c_proj", "w2", "wo", "dense_4h_to_h")


def keep_residual_fp32(causal_lm: Any) -> bool:
    """Hook `causal_lm` so its hidden states between layers are fp32; False where its weights are fp32 already."""
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    embeddings = causal_lm.get_input_embeddings()
    compute_dtype = embeddings.weight.dtype
    if compute_dtype == torch.float32:
        return False
    embeddings.register_forward_hook(lambda module, args, output: output.float())
    to_compute = lambda module, args, output: _to_dtype(output, compute_dtype)  # noqa: E731
    for name, module in causal_lm.named_modules():
        writer = name.rpartition(".")[2] in RESIDUAL_WRITERS
        if isinstance(module, LoraLayer) and writer:
            module.residual_dtype = torch.float32  # the fused LoRA layer sums base and adapter in fp32
        elif isinstance(module, (bnb.nn.Linear4bit, LoraLayer)) and not writer:
            module.register_forward_hook(to_compute)  # peft and bitsandbytes return their input's dtype
        elif type(module).__name__.endswith("RotaryEmbedding"):
            module.register_forward_hook(to_compute)
    head = causal_lm.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(lambda module, args: _to_dtype(args, compute_dtype))
    return True


def _to_dtype(value: Any, dtype: torch.dtype) -> Any:
    """Floating tensors in `value` (a tensor or a tuple of them) cast to `dtype`; everything else as is."""
    if isinstance(value, tuple):
        return tuple(_to_dtype(item, dtype) for item in value)
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    return value
