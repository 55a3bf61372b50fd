"""The precision plan's int8 layers on CUDA (qlora_engine/model/int8_layer.py): the dequantized matmul's answer and
gradient, and the memory a checkpointed stack of them keeps against bitsandbytes' own Linear8bitLt."""
from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from qlora_engine.model import weight_formats as wf

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]
WIDTH, TOKENS, LAYERS = 2048, 4096, 8


def int8_stack(plain_bnb: bool) -> list[torch.nn.Module]:
    import bitsandbytes as bnb

    torch.manual_seed(0)
    layers = []
    for _ in range(LAYERS):
        linear = torch.nn.Linear(WIDTH, WIDTH, bias=False)
        if plain_bnb:
            layer = bnb.nn.Linear8bitLt(WIDTH, WIDTH, bias=False, has_fp16_weights=False)
            layer.weight = wf.quantize(wf.format_named("int8"), linear.weight, "", False, "cuda")
        else:
            layer = wf.make_layer(wf.format_named("int8"), linear, "nf4", True, torch.bfloat16, "cuda")
        layers.append(layer)
    return layers


def kept_bytes(layers: list[torch.nn.Module]) -> int:
    """What a checkpointed forward through the stack still holds once the loss is computed (before backward)."""
    x = torch.randn(TOKENS, WIDTH, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    h = x
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for layer in layers:
        h = checkpoint(lambda t, layer=layer: layer(torch.nn.functional.silu(t)), h, use_reentrant=False)
    loss = h.float().pow(2).mean()
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - before
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    return kept


def test_the_int8_layer_matches_its_dequantized_weight_on_cuda():
    layer = int8_stack(plain_bnb=False)[0]
    x = torch.randn(64, WIDTH, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = layer(x)
    weight = wf.dequantize_layer(layer).to(torch.bfloat16)
    torch.testing.assert_close(out, x.detach() @ weight.T)
    grad = torch.randn_like(out)
    out.backward(grad)
    torch.testing.assert_close(x.grad, grad @ weight)


def test_a_checkpointed_stack_keeps_only_the_layer_boundaries():
    boundary = TOKENS * WIDTH * 2  # one bf16 hidden state per checkpointed layer
    ours, theirs = kept_bytes(int8_stack(plain_bnb=False)), kept_bytes(int8_stack(plain_bnb=True))
    print(f"kept over {LAYERS} checkpointed int8 layers: ours {ours / 2**20:.0f} MiB, bitsandbytes' "
          f"{theirs / 2**20:.0f} MiB (a boundary: {boundary / 2**20:.0f} MiB)")
    assert ours <= (LAYERS + 2) * boundary + 2**20  # the boundaries, the loss's fp32 copy of the last (two), the loss
    assert theirs - ours >= LAYERS * boundary  # its fp16 copy of each layer's input, out of checkpointing's reach
