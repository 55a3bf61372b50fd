"""CUDA: the packed attention's FlashAttention varlen path and the chunked loss, against the reference paths."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from test_packing import packed_logits_error, random_rows, tiny_causal_lm  # noqa: E402

from qlora_engine import lm_loss, packing, train  # noqa: E402

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
    batch = train.collate(random_rows([400, 250, 333]), 0, "cuda")
    items = train.trained_tokens(batch)
    reference = float(model(**batch, num_items_in_batch=items).loss)
    assert float(lm_loss.causal_lm_loss(model, batch, items)) == pytest.approx(reference, rel=2e-3)
