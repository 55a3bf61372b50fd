"""CUDA: the packed attention's FlashAttention varlen path and the chunked loss, against the reference paths."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from test_packing import packed_logits_error, random_rows, tiny_causal_lm  # noqa: E402

from qlora_engine.model import (
    lm_loss,  # noqa: E402
    packing,
)
from qlora_engine.training import loop

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]


def test_varlen_flash_attention_keeps_packed_examples_apart(tiny_model_dir, monkeypatch):
    assert packing.varlen_kernel() is not None, "this torch has no torch.nn.attention.varlen"
    calls = []
    kernel, keywords = packing.varlen_kernel()
    monkeypatch.setattr(packing, "_VARLEN", [(lambda *a, **k: calls.append(1) or kernel(*a, **k), keywords)])
    model = tiny_causal_lm(tiny_model_dir, "cuda", torch.bfloat16)
    error = packed_logits_error(model, random_rows([70, 190, 30, 120]), "cuda")
    assert calls, "the varlen kernel was not used"
    assert error < 0.06  # bf16: the same numbers up to rounding


def test_chunked_loss_matches_transformers_on_cuda(tiny_model_dir):
    model = tiny_causal_lm(tiny_model_dir, "cuda", torch.bfloat16)
    model.requires_grad_(False)
    batch = loop.collate(random_rows([400, 250, 333]), 0, "cuda")
    items = loop.trained_tokens(batch)
    reference = float(model(**batch, num_items_in_batch=items).loss)
    assert float(lm_loss.causal_lm_loss(model, batch, items)) == pytest.approx(reference, rel=2e-3)


def engine_losses_and_grads(model_dir, compiled: bool):
    """Three packed micro-batches of different shapes (the compiled layers go dynamic on the second)."""
    from qlora_engine.protocol.config import RunConfig

    cfg = RunConfig(model=str(model_dir), device="cuda", compute_dtype="bf16", lora_dropout=0.0,
                    compile_layers=compiled)
    torch.manual_seed(0)
    model = loop.build_model(cfg, model_dir, "cuda", torch.bfloat16)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    model.train()  # as the engine trains: gradient checkpointing on around the compiled blocks
    losses = []
    for lengths in ([70, 190, 30, 120], [50, 300], [128, 64, 200, 17]):
        batch = packing.collate_packed(random_rows(lengths), "cuda")
        loss = lm_loss.causal_lm_loss(model, batch, loop.trained_tokens(batch))
        loss.backward()
        losses.append(float(loss))
    grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.requires_grad])
    return losses, grads


def test_compiled_layers_match_eager_on_cuda(tiny_model_dir):
    """Inductor's code for the attention and MLP blocks (the 4-bit dequantization, the fused LoRA function and
    FlashAttention varlen inside) gives the eager engine's losses and adapter gradients, without a graph break."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager_losses, eager_grads = engine_losses_and_grads(tiny_model_dir, compiled=False)
    assert not counters["stats"]["unique_graphs"]
    compiled_losses, compiled_grads = engine_losses_and_grads(tiny_model_dir, compiled=True)
    assert counters["stats"]["unique_graphs"] >= 2, "nothing was compiled"
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-2)  # bf16, fused in another order
    cosine = torch.nn.functional.cosine_similarity(compiled_grads, eager_grads, dim=0)
    assert cosine > 0.99, float(cosine)
