"""The training loss of a causal LM without its full logits: lm_head and cross-entropy, chunk by chunk.

For a 128k vocabulary the logits of one 2048-token row take 1 GiB in fp32, and their gradient as much again; here
only one chunk exists at a time, and rows with no loss (prompt tokens, padding) never reach lm_head. Pure torch, so
CPU and CUDA alike. Models that change their logits (soft-capping, scaling) keep transformers' own loss.
"""
from __future__ import annotations

from typing import Any

import torch

from qlora_engine.model.packing import IGNORE_INDEX
from qlora_engine.protocol.config import CHUNK_LOGITS_BYTES, CHUNKED_LOSS_MODEL_TYPES


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum(cross_entropy(hidden @ weight.T, labels)) / items, the gradient to `hidden` computed in the forward.

    `weight` is frozen (lm_head of a LoRA run), so only hidden's gradient exists; computing it chunk by chunk
    while the chunk's logits are at hand is what keeps the full logits from ever existing.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                items: float) -> torch.Tensor:
        chunk = max(1, CHUNK_LOGITS_BYTES // (4 * weight.shape[0]))
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            logits = (hidden[start:start + chunk] @ weight.t()).float()
            targets = labels[start:start + chunk].unsqueeze(1)
            log_normalizer = torch.logsumexp(logits, dim=-1, keepdim=True)
            loss_sum += (log_normalizer - logits.gather(1, targets)).sum()
            if grad_hidden is not None:  # d loss / d logits = softmax - one_hot, scaled by 1 / items
                probs = logits.sub_(log_normalizer).exp_()
                probs.scatter_add_(1, targets, torch.full_like(targets, -1.0, dtype=probs.dtype))
                grad_hidden[start:start + chunk] = (probs.mul_(1.0 / items)).to(weight.dtype) @ weight
        ctx.save_for_backward(grad_hidden)
        return loss_sum / items

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_loss.to(grad_hidden.dtype), None, None, None


def causal_lm_loss(model: Any, batch: dict[str, torch.Tensor], items: int, chunked: bool = True) -> torch.Tensor:
    """The summed next-token loss of the batch divided by `items` (the step's trained tokens).

    Same value as transformers' `model(**batch, num_items_in_batch=items).loss`; with `chunked` (and a model whose
    lm_head is a plain projection) computed without the full logits.
    """
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not (chunked and supports_chunked_loss(causal_lm)):
        return model(**batch, num_items_in_batch=items).loss
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = causal_lm.model(**inputs).last_hidden_state
    # position t predicts the label at t + 1; the last position of each row predicts nothing
    labels = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
    trained = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, trained)
    weight = causal_lm.get_output_embeddings().weight
    return ChunkedLinearCrossEntropy.apply(hidden.to(weight.dtype), weight, labels.index_select(0, trained),
                                           float(items))


def supports_chunked_loss(causal_lm: Any) -> bool:
    """True for decoders whose logits are exactly lm_head(hidden) and whose lm_head is frozen and bias-free."""
    config = causal_lm.config
    head = causal_lm.get_output_embeddings()
    return (getattr(config, "model_type", None) in CHUNKED_LOSS_MODEL_TYPES
            and not getattr(config, "final_logit_softcapping", None)
            and type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad
            and hasattr(causal_lm, "model"))
