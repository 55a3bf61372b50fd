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

# softmax x 256 keeps probabilities down to 2.4e-7 in fp16's normal range; the gradient of the summed loss, at most
# 2 x 256 x the largest lm_head weight, stays far below fp16's largest number
GRAD_PRESCALE = 256.0
BACKWARD_CHUNK_BYTES = 32 * 2**20  # the fp32 part of the gradient multiplied at a time


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum(cross_entropy(hidden @ weight.T, labels)) / items, the gradient to `hidden` computed in the forward.

    `weight` is frozen (lm_head of a LoRA run), so only hidden's gradient exists; computing it chunk by chunk
    while the chunk's logits are at hand is what keeps the full logits from ever existing.

    The forward cannot know the factor the backward brings (1 / items, and in fp16 the loss scale), so it keeps
    GRAD_PRESCALE x the gradient of the summed loss, which the backward multiplies by grad_loss / (items x
    GRAD_PRESCALE) in fp32. In fp16 a token's share of the mean, softmax / items, falls below fp16's smallest number
    (1e-5 / 2048), and the starting loss scale 2^16 is not an fp16 number: cast to the compute dtype either one
    loses the gradient (measured: every fp16 run's first step overflowed, and its curve strayed from bf16's).
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
            if grad_hidden is not None:  # d loss_sum / d logits = softmax - one_hot
                probs = logits.sub_(log_normalizer).exp_()
                probs.scatter_add_(1, targets, torch.full_like(targets, -1.0, dtype=probs.dtype))
                grad_hidden[start:start + chunk] = probs.mul_(GRAD_PRESCALE).to(weight.dtype) @ weight
        ctx.save_for_backward(grad_hidden)
        ctx.items = items
        return loss_sum / items

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        (grad_hidden,) = ctx.saved_tensors
        factor = grad_loss.float() / (ctx.items * GRAD_PRESCALE)
        chunk = max(1, BACKWARD_CHUNK_BYTES // (4 * grad_hidden.shape[-1]))
        for start in range(0, grad_hidden.shape[0], chunk):  # in place, in fp32, never a whole fp32 copy
            part = grad_hidden[start:start + chunk]
            part.copy_(part.float().mul_(factor))
        return grad_hidden, None, None, None


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
