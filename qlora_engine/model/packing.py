"""Padding-free micro-batches: the examples of a micro-batch laid end to end in one row, each attending only to itself.

`collate_packed` builds the row (positions restart at 0 for every example; `cu_seq_lens` marks where each starts).
`use_packed_attention` makes the model's attention honour those boundaries: FlashAttention's varlen kernel on CUDA
(torch.nn.attention.varlen), plain SDPA per example elsewhere. Without `cu_seq_lens` it is transformers' SDPA, so
evaluation and generation on padded batches work as before. No mask is ever materialized.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch

IGNORE_INDEX = -100  # the label transformers' losses skip: a token that is not trained on


ATTENTION_NAME = "qlora_packed"


def collate_packed(rows: list[Any], device: str) -> dict[str, torch.Tensor]:
    """One row of all examples (input_ids, trained_token_mask); the first token of each is never a label,
    so no example learns to predict the start of the next one."""
    ids = torch.cat([torch.tensor(r.input_ids, dtype=torch.long) for r in rows])
    positions = torch.cat([torch.arange(len(r.input_ids)) for r in rows])
    trained = torch.cat([torch.tensor(r.trained_token_mask, dtype=torch.bool) for r in rows])
    lengths = torch.tensor([len(r.input_ids) for r in rows])
    starts = torch.cumsum(lengths, 0) - lengths
    trained[starts] = False
    labels = torch.where(trained, ids, IGNORE_INDEX)
    cu_seq_lens = torch.nn.functional.pad(torch.cumsum(lengths, 0), (1, 0)).to(device, torch.int32)
    longest = int(lengths.max())
    return {"input_ids": ids.unsqueeze(0).to(device), "position_ids": positions.unsqueeze(0).to(device),
            "labels": labels.unsqueeze(0).to(device), "cu_seq_lens_q": cu_seq_lens,
            "cu_seq_lens_k": cu_seq_lens, "max_length_q": longest, "max_length_k": longest}


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that are not padding: a packed row has none."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


def use_packed_attention(model: Any, max_length: int) -> bool:
    """Switch the model (and its PEFT wrapper) to the packed-aware attention registered here, where it computes
    what the model's own attention does: not for soft-capped scores, nor a sliding window shorter than an example
    (`max_length`; attention never crosses examples, so a packed row's length does not matter).
    Otherwise transformers' own attention handles the packed row (with a materialized block mask)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = causal_lm.config
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    if getattr(config, "attn_logit_softcapping", None) or (window and window < max_length):
        return False
    AttentionInterface.register(ATTENTION_NAME, packed_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, _mask_for_padded_batches_only)
    causal_lm.set_attn_implementation(ATTENTION_NAME)
    return True


def _mask_for_padded_batches_only(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
    """SDPA's mask for padded batches; none for a packed or unpadded row (is_causal or cu_seq_lens do the job)."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def packed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention within each packed example; query/key/value are (1, heads, tokens, head_dim)."""
    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    if cu_seq_lens is None or query.shape[2] != key.shape[2]:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = query.shape[1] // key.shape[1]
    if query.is_cuda and query.dtype in (torch.bfloat16, torch.float16) and varlen_kernel() is not None:
        output = _varlen_flash(query, key, value, cu_seq_lens, int(kwargs["max_length_q"]), scaling, groups)
    else:
        output = _per_example_sdpa(query, key, value, cu_seq_lens, scaling, groups)
    return output, None


def _per_example_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_lens: torch.Tensor,
                      scaling: float | None, groups: int) -> torch.Tensor:
    """The pure-torch path: causal SDPA on each example's slice. Returns (1, tokens, heads, head_dim)."""
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    bounds = cu_seq_lens.tolist()
    parts = [torch.nn.functional.scaled_dot_product_attention(
        query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], is_causal=True, scale=scaling)
        for start, end in zip(bounds[:-1], bounds[1:])]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous()


def _varlen_flash(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_lens: torch.Tensor,
                  longest: int, scaling: float | None, groups: int) -> torch.Tensor:
    kernel, keywords = varlen_kernel()
    if groups > 1 and "enable_gqa" not in keywords:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    options: dict[str, Any] = {"scale": scaling} if "scale" in keywords else {}
    if "window_size" in keywords:
        options["window_size"] = (-1, 0)  # causal
    else:
        options["is_causal"] = True
    if groups > 1 and "enable_gqa" in keywords:
        options["enable_gqa"] = True
    # varlen wants (tokens, heads, head_dim)
    output = kernel(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                    cu_seq_lens, cu_seq_lens, longest, longest, **options)
    return output.unsqueeze(0)


_VARLEN: list[Any] = []


def varlen_kernel() -> tuple[Any, set[str]] | None:
    """torch's FlashAttention varlen entry point and its keyword names (they changed between releases), or None."""
    if not _VARLEN:
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            _VARLEN.append(None)
        else:
            _VARLEN.append((varlen_attn, set(inspect.signature(varlen_attn).parameters)))
    return _VARLEN[0]
