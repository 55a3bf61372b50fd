"""The fused LoRA-over-4-bit layer computes what peft's layer computes: same loss, same adapter gradients."""
import pytest
import torch
from test_packing import random_rows

from qlora_engine.model import lm_loss, lora_nf4
from qlora_engine.protocol.config import RunConfig
from qlora_engine.training import loop


def loss_and_grads(model_dir, fused: bool, dropout: float):
    cfg = RunConfig(model=str(model_dir), lora_dropout=dropout, fused_lora=fused, compute_dtype="fp32", device="cpu")
    torch.manual_seed(0)
    model = loop.build_model(cfg, model_dir, "cpu", torch.float32)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; give it values so every gradient path is exercised
            torch.nn.init.normal_(param, std=0.02)
    batch = loop.collate(random_rows([20, 33]), 0, "cpu")
    torch.manual_seed(1)
    loss = lm_loss.causal_lm_loss(model, batch, loop.trained_tokens(batch))
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_lora_matches_peft_loss_and_gradients(tiny_model_dir, dropout):
    peft_loss, peft_grads = loss_and_grads(tiny_model_dir, False, dropout)
    fused_loss, fused_grads = loss_and_grads(tiny_model_dir, True, dropout)
    assert fused_loss == pytest.approx(peft_loss, rel=1e-6)
    assert fused_grads.keys() == peft_grads.keys() and len(fused_grads) == 2 * 7 * 2  # A and B, 7 layers, 2 blocks
    for name, grad in peft_grads.items():
        assert torch.allclose(fused_grads[name], grad, rtol=1e-4, atol=1e-7), name


def test_every_4bit_lora_layer_takes_the_fused_path(tiny_model_dir, monkeypatch):
    calls = []
    original = lora_nf4.LoraOver4bit.apply
    monkeypatch.setattr(lora_nf4.LoraOver4bit, "apply", lambda *a: calls.append(1) or original(*a))
    loss_and_grads(tiny_model_dir, True, 0.0)
    assert len(calls) == 7 * 2
    calls.clear()
    loss_and_grads(tiny_model_dir, False, 0.0)
    assert not calls
