"""Padding-free packing and the chunked loss: same numbers as the padded, full-logits path; no example sees another."""
import pytest
import torch

from qlora_engine.model import lm_loss, packing
from qlora_engine.training import loop
from qlora_engine.training.data import Tokenized


def random_rows(lengths, vocab=300, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [Tokenized(torch.randint(0, vocab, (n,), generator=generator).tolist(),
                      [i >= n // 3 for i in range(n)], line, False) for line, n in enumerate(lengths)]


def tiny_causal_lm(model_dir, device="cpu", dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)


def packed_logits_error(model, rows, device):
    """Largest |logit difference| between each example inside a packed row and the same example run alone."""
    packing.use_packed_attention(model, 4096)
    batch = packing.collate_packed(rows, device)
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0].float()
        worst, start = 0.0, 0
        for row in rows:
            alone = model(input_ids=torch.tensor([row.input_ids], device=device)).logits[0].float()
            end = start + len(row.input_ids)
            worst = max(worst, float((packed[start:end] - alone).abs().max()))
            start = end
    return worst


def test_an_example_in_a_packed_row_sees_only_itself(tiny_model_dir):
    model = tiny_causal_lm(tiny_model_dir)
    assert packed_logits_error(model, random_rows([7, 19, 3, 12]), "cpu") < 1e-4
    # and the test can fail: the same row without boundaries lets later examples see earlier ones
    rows = random_rows([7, 19, 3, 12])
    ids = torch.tensor([[t for r in rows for t in r.input_ids]])
    with torch.no_grad():
        joined = model(input_ids=ids).logits[0]
        second_alone = model(input_ids=torch.tensor([rows[1].input_ids])).logits[0]
    assert float((joined[7:26] - second_alone).abs().max()) > 1e-2


def test_a_packed_row_never_trains_on_the_first_token_of_the_next_example():
    batch = packing.collate_packed(random_rows([5, 4]), "cpu")
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 5, 9]
    assert batch["labels"][0, 5] == packing.IGNORE_INDEX


def test_packed_and_padded_micro_batches_give_the_same_loss_and_gradient(tiny_model_dir):
    model = tiny_causal_lm(tiny_model_dir)
    model.requires_grad_(False)
    norm = model.model.norm.weight.requires_grad_(True)
    rows = random_rows([9, 30, 4, 17])
    results = []
    for batch in (loop.collate(rows, 0, "cpu"), packing.collate_packed(rows, "cpu")):
        packing.use_packed_attention(model, 4096)
        loss = lm_loss.causal_lm_loss(model, batch, loop.trained_tokens(batch))
        loss.backward()
        results.append((float(loss), norm.grad.clone()))
        norm.grad = None
    (padded_loss, padded_grad), (packed_loss, packed_grad) = results
    assert packed_loss == pytest.approx(padded_loss, rel=1e-5)
    assert torch.allclose(packed_grad, padded_grad, rtol=1e-4, atol=1e-7)


def test_the_chunked_loss_equals_transformers_loss_without_the_full_logits(tiny_model_dir, monkeypatch):
    model = tiny_causal_lm(tiny_model_dir)
    model.requires_grad_(False)
    norm = model.model.norm.weight.requires_grad_(True)
    batch = loop.collate(random_rows([40, 25, 33]), 0, "cpu")
    items = loop.trained_tokens(batch)
    reference = model(**batch, num_items_in_batch=items).loss
    reference.backward()
    reference_grad, norm.grad = norm.grad.clone(), None
    vocab = model.config.vocab_size
    monkeypatch.setattr(lm_loss, "CHUNK_LOGITS_BYTES", 4 * vocab * 16)  # 16 tokens a chunk: several chunks
    seen_shapes = []
    original = torch.Tensor.float
    monkeypatch.setattr(torch.Tensor, "float", lambda t: seen_shapes.append(tuple(t.shape)) or original(t))
    chunked = lm_loss.causal_lm_loss(model, batch, items)
    monkeypatch.undo()
    chunked.backward()
    assert float(chunked) == pytest.approx(float(reference), rel=1e-5)
    assert torch.allclose(norm.grad, reference_grad, rtol=1e-4, atol=1e-7)
    logits_shapes = [s for s in seen_shapes if s and s[-1] == vocab]
    assert logits_shapes and max(s[0] for s in logits_shapes) <= 16  # never more than a chunk of logits


def test_models_that_transform_their_logits_keep_transformers_loss(tiny_model_dir):
    model = tiny_causal_lm(tiny_model_dir)
    assert not lm_loss.supports_chunked_loss(model)  # a trainable lm_head needs its weight gradient
    model.requires_grad_(False)
    assert lm_loss.supports_chunked_loss(model)
    model.config.model_type = "gemma2"  # soft-capped logits
    assert not lm_loss.supports_chunked_loss(model)


def test_packed_attention_is_used_unless_a_sliding_window_is_shorter_than_an_example(tiny_model_dir):
    model = tiny_causal_lm(tiny_model_dir)
    model.config.sliding_window = 64
    assert packing.use_packed_attention(model, max_length=64)  # rows of several 64-token examples: still exact
    assert not packing.use_packed_attention(model, max_length=128)
    model.config.sliding_window, model.config.attn_logit_softcapping = None, 50.0
    assert not packing.use_packed_attention(model, max_length=64)
