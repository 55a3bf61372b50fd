"""Peak VRAM of one QLoRA training step of our engine, from a model's config.json and a RunConfig alone.

Holds the memory model (named terms in bytes), the fit verdict, advice, and `qlora-studio estimate`.
No weights are loaded and torch is not imported; the measured constants live in CALIBRATION.

What the estimate predicts: the GPU memory the training process adds, as NVML (nvidia-smi) counts it, i.e. what a
user compares with the free memory of the card. That is torch's peak *allocated* tensors (the terms up to
logits_and_loss), plus what torch's caching allocator reserves beyond them (allocator_slack), plus what never goes
through torch (cuda_context, and the paged part of optimizer_states). calibration_errors() holds the estimate
against a measured table (tests/data/memory_measured_h100.jsonl, from `qlora-studio bench --memory`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import statistics
import textwrap
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlora_engine.config import CHUNK_LOGITS_BYTES, CHUNKED_LOSS_MODEL_TYPES, ConfigError, RunConfig

BYTES_PER_MIB = 2**20
BYTES_PER_GIB = 2**30
FP32_BYTES = 4

# Facts of bitsandbytes, not fitted.
QUANT_BLOCKSIZE = 64  # 4-bit weights per absmax constant
NESTED_QUANT_BLOCKSIZE = 256  # with double quantization: 8-bit absmax constants per fp32 second-level constant
QUANT_CODE_BYTES = 16 * FP32_BYTES  # the NF4/FP4 code table every quantized tensor carries
NESTED_QUANT_EXTRA_BYTES = 256 * FP32_BYTES + FP32_BYTES  # the 8-bit code table and the mean offset
OPTIMIZER_8BIT_BLOCKSIZE = 256  # parameters per fp32 absmax of each 8-bit optimizer state
OPTIMIZER_8BIT_MIN_PARAMS = 4096  # bitsandbytes keeps 32-bit states for smaller tensors
OPTIMIZER_PAGED_MIN_PARAMS = 100_000  # paged optimizers page only the states of tensors this large; smaller ones
#                                       are ordinary GPU tensors (bitsandbytes Optimizer8bit.get_state_buffer)

TIGHT_MARGIN_FRACTION = 0.10  # a peak within this fraction of free memory is "tight"
SEARCH_MAX_BATCH = 1024
SEARCH_DEFAULT_MAX_LENGTH = 32768  # when config.json gives no max_position_embeddings
MIN_MAX_LENGTH = 16  # RunConfig's minimum

CALIBRATION_PATH = Path(__file__).with_name("calibration.json")
# Fallbacks when calibration.json is missing: the H100 fit (see calibration.json's _source), rounded. The file holds
# the fitted values; any constant it leaves out keeps the value here.
DEFAULT_CALIBRATION: dict[str, float] = {
    # What the process adds to the GPU beyond torch's tensors and the paged optimizer states: the CUDA driver
    # context, the kernels of CUDA, cuBLAS, bitsandbytes and the attention kernels, cuBLAS workspaces. Measured as
    # NVML's used memory minus torch's max reserved minus the GPU's used memory before the process started.
    "cuda_context_bytes": 900 * BYTES_PER_MIB,
    # The caching allocator reserves more than the step's short-lived tensors (activations, logits, gradients)
    # need: block rounding, and freed blocks split by later, smaller tensors (fragmentation). A fraction of those
    # tensors' bytes at the peak; the weights and LoRA parameters are allocated once and add no slack.
    "allocator_slack_full_fraction": 0.10,  # without gradient checkpointing
    # With checkpointing each layer's recomputation lands in the blocks the logits freed, so the next step's
    # logits need fresh ones: about three times the slack.
    "allocator_slack_checkpointed_fraction": 0.35,
    # Multiplies the tensors autograd is counted as keeping per token for one decoder layer run in full
    # (see _layer_activation_bytes_per_token): 1.0 = exactly the enumerated tensors.
    "activation_full_scale": 1.0,
    # Multiplies what gradient checkpointing keeps per token per layer: the layer's input hidden state.
    "activation_checkpointed_scale": 1.0,
    # Multiplies the gradients one layer's backward holds at once (see _backward_transient_bytes_per_token).
    "backward_transient_scale": 1.0,
    # fp32 [batch, tokens, vocab] tensors alive at once in the loss's backward: the saved log-softmax, the
    # gradient flowing into it and the gradient it hands back.
    "logits_fp32_backward_copies": 3.0,
    # Dequantized 16-bit copies of the largest base weight alive at once while a Linear4bit runs.
    "dequant_workspace_matrices": 1.0,
}


class EstimateError(ValueError):
    """A model config or option the estimate can't work with; the message names the file or field."""

    code = "bad_model_config"

    def __init__(self, message: str, advice: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.advice = advice or "Pass a Hugging Face model folder (with config.json) or its config.json."


def load_calibration(path: Path = CALIBRATION_PATH) -> dict[str, float]:
    """DEFAULT_CALIBRATION, with the values fitted to measurements from `path` where that file exists.

    The file is {"name": number} with the fitted constants; keys that start with "_" are notes (where and when
    the measurements were taken) and are ignored. `qlora-studio bench --memory` records measured peaks next to
    the estimate; calibration_errors() says how far the estimate is from them.
    """
    calibration = dict(DEFAULT_CALIBRATION)
    if not path.is_file():
        return calibration
    try:
        fitted = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise EstimateError(f"{path}: not valid JSON (line {exc.lineno})", "Fix or delete the file.") from exc
    fitted = {name: value for name, value in fitted.items() if not name.startswith("_")}
    unknown = sorted(set(fitted) - set(calibration))
    if unknown:
        raise EstimateError(f"{path}: unknown calibration constant(s) {', '.join(unknown)}",
                            f"Known: {', '.join(calibration)}.")
    calibration.update({name: float(value) for name, value in fitted.items()})
    return calibration


CALIBRATION = load_calibration()


# ----------------------------------------------------------------------------- the model's shape
@dataclass(frozen=True)
class Family:
    """What config.json doesn't say about a family but its modelling code does."""

    tied_default: bool  # tie_word_embeddings when config.json leaves it out
    norms_per_layer: int = 2
    qk_norm: bool = False  # RMSNorm on each head's query and key (Qwen3)
    attention_bias: bool = False  # q/k/v projections with a bias (Qwen2)
    fused_projections: bool = False  # qkv_proj and gate_up_proj instead of separate layers (Phi-3)
    eager_attention: bool = False  # transformers has no SDPA path for it: attention scores are materialized


KNOWN_FAMILIES = {
    "llama": Family(tied_default=False),
    "mistral": Family(tied_default=False),
    "qwen2": Family(tied_default=False, attention_bias=True),
    "qwen3": Family(tied_default=False, qk_norm=True),
    "gemma": Family(tied_default=True),
    "gemma2": Family(tied_default=True, norms_per_layer=4, eager_attention=True),
    "phi3": Family(tied_default=False, fused_projections=True),
}
LLAMA_LIKE = KNOWN_FAMILIES["llama"]

# config.json key for each size the estimate needs, with the names other families use for it.
REQUIRED_FIELDS = {
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_hidden_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "num_attention_heads": ("num_attention_heads", "n_head"),
    "intermediate_size": ("intermediate_size", "n_inner", "ffn_dim"),
    "vocab_size": ("vocab_size",),
}


@dataclass(frozen=True)
class LinearShape:
    """One nn.Linear of a decoder layer: quantized to 4-bit, and a LoRA target when selected."""

    name: str
    in_features: int
    out_features: int
    copies: int = 1  # mixture-of-experts: one per expert

    @property
    def params(self) -> int:
        return self.in_features * self.out_features * self.copies


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool
    family: Family
    final_logit_softcapping: bool
    attn_logit_softcapping: bool
    num_experts: int
    experts_per_token: int
    max_position_embeddings: int

    @property
    def q_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def is_gqa(self) -> bool:
        return self.num_kv_heads < self.num_heads

    def decoder_linears(self) -> list[LinearShape]:
        """The linear layers of one decoder layer, named as in the model's modules."""
        h, inter, experts = self.hidden_size, self.intermediate_size, self.num_experts
        if self.family.fused_projections:
            attention = [LinearShape("qkv_proj", h, self.q_width + 2 * self.kv_width)]
            mlp = [LinearShape("gate_up_proj", h, 2 * inter, experts)]
        else:
            attention = [LinearShape("q_proj", h, self.q_width), LinearShape("k_proj", h, self.kv_width),
                         LinearShape("v_proj", h, self.kv_width)]
            mlp = [LinearShape("gate_proj", h, inter, experts), LinearShape("up_proj", h, inter, experts)]
        return [*attention, LinearShape("o_proj", self.q_width, h), *mlp, LinearShape("down_proj", inter, h, experts)]


def _required_int(config: dict[str, Any], name: str) -> int:
    for key in REQUIRED_FIELDS[name]:
        value = config.get(key)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise EstimateError(f"config.json field '{key}' is {value!r}: expected a positive whole number",
                                    "Check the file: it may be damaged or hand-edited.")
            return value
    raise EstimateError(
        f"config.json has no '{name}' field: the memory estimate needs it",
        "Use the model's own config.json from Hugging Face. For a gated model, accept its license on the model "
        "page and download again: a failed download can leave an error page or an empty file instead.")


def _text_decoder_config(config: dict[str, Any], reasons: list[str]) -> dict[str, Any]:
    """Multimodal configs keep the language model's sizes under text_config."""
    if "hidden_size" in config or not isinstance(config.get("text_config"), dict):
        return config
    reasons.append("multimodal model: only the text decoder is counted, not its vision or audio tower")
    outer = {key: config[key] for key in ("model_type", "tie_word_embeddings") if key in config}
    return {**outer, **config["text_config"]}


def model_shape(config: dict[str, Any]) -> tuple[ModelShape, list[str]]:
    """The sizes the estimate needs, and the reasons it is only approximate (empty for a known family)."""
    reasons: list[str] = []
    config = _text_decoder_config(config, reasons)
    model_type = str(config.get("model_type") or "")
    family = KNOWN_FAMILIES.get(model_type)
    if family is None:
        family = LLAMA_LIKE
        named = f"architecture '{model_type}'" if model_type else "a config.json without model_type"
        reasons.append(f"{named} is not one the estimate models; it is treated as a Llama-style decoder")
    sizes = {name: _required_int(config, name) for name in REQUIRED_FIELDS}
    hidden, heads = sizes["hidden_size"], sizes["num_attention_heads"]
    tied = config.get("tie_word_embeddings")
    if tied is None and model_type not in KNOWN_FAMILIES:
        tied = False  # the larger assumption: a separate lm_head
        reasons.append("tie_word_embeddings is not set: a separate lm_head is assumed")
    experts = int(config.get("num_local_experts") or config.get("num_experts") or 1)
    if experts > 1:
        reasons.append(f"mixture of {experts} experts: every expert's MLP is counted as a dense one")
    shape = ModelShape(
        model_type=model_type or "unknown", hidden_size=hidden, intermediate_size=sizes["intermediate_size"],
        num_layers=sizes["num_hidden_layers"], num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads), vocab_size=sizes["vocab_size"],
        tied_embeddings=bool(family.tied_default if tied is None else tied),
        family=dataclasses.replace(family, attention_bias=bool(config.get("attention_bias", family.attention_bias))),
        final_logit_softcapping=bool(config.get("final_logit_softcapping")),
        attn_logit_softcapping=bool(config.get("attn_logit_softcapping")), num_experts=experts,
        experts_per_token=int(config.get("num_experts_per_tok") or 1) if experts > 1 else 1,
        max_position_embeddings=int(config.get("max_position_embeddings") or SEARCH_DEFAULT_MAX_LENGTH))
    return shape, reasons


def targeted_linears(shape: ModelShape, target_modules: str) -> list[LinearShape]:
    """The linear layers that get LoRA adapters: every one for 'all-linear', else those named."""
    linears = shape.decoder_linears()
    if target_modules.strip() == "all-linear":
        return linears
    wanted = {name.strip() for name in target_modules.split(",") if name.strip()}
    chosen = [linear for linear in linears if linear.name in wanted]
    if not chosen:
        names = ", ".join(linear.name for linear in linears)
        raise EstimateError(f"target_modules '{target_modules}' names no linear layer of this model",
                            f"Use 'all-linear' or some of: {names}.")
    return chosen


# ----------------------------------------------------------------------------- the estimate
@dataclass
class Term:
    name: str
    bytes: int
    note: str


@dataclass
class Estimate:
    terms: list[Term]
    approximate: bool
    reasons: list[str]  # why approximate
    warnings: list[str] = field(default_factory=list)  # what the user should know even when exact
    total_params: int = 0
    trainable_params: int = 0

    @property
    def peak_bytes(self) -> int:
        return sum(term.bytes for term in self.terms)

    def bytes_of(self, name: str) -> int:
        return next(term.bytes for term in self.terms if term.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {"peak_bytes": self.peak_bytes, "terms": [dataclasses.asdict(term) for term in self.terms],
                "approximate": self.approximate, "reasons": self.reasons, "warnings": self.warnings,
                "total_params": self.total_params, "trainable_params": self.trainable_params}


def compute_dtype_bytes(run: RunConfig) -> int:
    """bf16 or fp16 (what 'auto' picks on a GPU) is 2 bytes; fp32 is 4."""
    return FP32_BYTES if run.compute_dtype == "fp32" else 2


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / BYTES_PER_GIB:.2f} GiB"


def _millions(count: int) -> str:
    return f"{count / 1e6:,.1f} M" if count < 1e9 else f"{count / 1e9:.2f} B"


def _quant_constant_bytes(params: int, double_quant: bool) -> int:
    """The absmax constants of one 4-bit tensor (plus its small code tables)."""
    blocks = math.ceil(params / QUANT_BLOCKSIZE)
    if not double_quant:
        return blocks * FP32_BYTES + QUANT_CODE_BYTES
    nested_blocks = math.ceil(blocks / NESTED_QUANT_BLOCKSIZE)
    return blocks + nested_blocks * FP32_BYTES + QUANT_CODE_BYTES + NESTED_QUANT_EXTRA_BYTES


def _weight_terms(shape: ModelShape, run: RunConfig, dtype_bytes: int) -> list[Term]:
    """The frozen base model: 4-bit linear layers, their constants, and what stays in the compute dtype."""
    layers = shape.num_layers
    linears = shape.decoder_linears()
    quantized_params = layers * sum(linear.params for linear in linears)
    nf4_bytes = layers * sum((linear.params + 1) // 2 for linear in linears)
    constants_bytes = layers * sum(_quant_constant_bytes(linear.params, run.double_quant) * linear.copies
                                   for linear in linears)
    embedding_params = shape.vocab_size * shape.hidden_size * (1 if shape.tied_embeddings else 2)
    norm_params = layers * shape.family.norms_per_layer * shape.hidden_size + shape.hidden_size
    norm_params += layers * 2 * shape.head_dim if shape.family.qk_norm else 0
    bias_params = layers * (shape.q_width + 2 * shape.kv_width) if shape.family.attention_bias else 0
    dtype_name = "fp32" if dtype_bytes == FP32_BYTES else "16-bit"
    constants_how = ("double quantization: 8-bit absmax per 64 weights plus an fp32 constant per 256 of those"
                     if run.double_quant else "an fp32 absmax per 64 weights (double quantization off)")
    head = "embeddings shared with the lm_head (tied)" if shape.tied_embeddings else "embeddings and a separate lm_head"
    return [
        Term("nf4_weights", nf4_bytes, f"{_millions(quantized_params)} parameters of the decoder layers' linear "
             f"layers at 4 bits ({run.quant_type.upper()}, blocks of {QUANT_BLOCKSIZE})"),
        Term("quant_constants", constants_bytes, f"quantization constants: {constants_how}"),
        Term("layers_16bit", (embedding_params + norm_params + bias_params) * dtype_bytes,
             f"kept in {dtype_name}: {head} ({_millions(embedding_params)} parameters), norms"
             + (", q/k/v biases" if bias_params else "")),
    ]


def _optimizer_state_bytes(params: int, optimizer: str) -> tuple[int, int]:
    """Adam's two moments for one tensor, as (bytes in ordinary GPU tensors, bytes in paged memory).

    fp32 is 8 bytes/param; bitsandbytes 8-bit is 2 plus an fp32 absmax per block of 256 (tensors under 4096
    parameters keep fp32 states). Paged optimizers page the two states of tensors of 100,000 parameters or more.
    """
    if optimizer == "paged_adamw_8bit" and params >= OPTIMIZER_8BIT_MIN_PARAMS:
        state_bytes = 2 * params
        absmax_bytes = 2 * math.ceil(params / OPTIMIZER_8BIT_BLOCKSIZE) * FP32_BYTES
    else:
        state_bytes, absmax_bytes = 2 * FP32_BYTES * params, 0
    paged = optimizer.startswith("paged") and params >= OPTIMIZER_PAGED_MIN_PARAMS
    return (absmax_bytes, state_bytes) if paged else (state_bytes + absmax_bytes, 0)


OPTIMIZER_NOTES = {
    "paged_adamw_8bit": "Adam's two moments in 8 bits (blockwise, ~2 bytes/param), in paged memory",
    "paged_adamw_32bit": "Adam's two moments in fp32 (8 bytes/param), in paged memory",
    "adamw": "Adam's two moments in fp32 (8 bytes/param), ordinary GPU memory",
}
PAGING_NOTE = ("; paged = CUDA unified memory: it sits on the GPU while there is room, and under memory "
               "pressure the driver moves these pages to CPU RAM and back at each optimizer step (slower, but "
               "not an out-of-memory error). torch's memory counters don't include it; NVML does")


@dataclass(frozen=True)
class LoraSizes:
    params: int
    weight_bytes: int  # fp32 A and B of every targeted layer
    gradient_bytes: int  # one fp32 gradient per parameter, alive from its layer's backward until zero_grad
    state_bytes: int  # optimizer states in ordinary GPU tensors
    paged_state_bytes: int  # optimizer states in paged (unified) memory


def _lora_sizes(shape: ModelShape, run: RunConfig) -> LoraSizes:
    """LoRA A (r x in) and B (out x r) on every targeted layer, in fp32; their gradients; the optimizer states."""
    tensors = [run.lora_r * size for linear in targeted_linears(shape, run.target_modules)
               for size in (linear.in_features * linear.copies, linear.out_features * linear.copies)]
    tensors = tensors * shape.num_layers
    params = sum(tensors)
    states = [_optimizer_state_bytes(count, run.optimizer) for count in tensors]
    return LoraSizes(params=params, weight_bytes=params * FP32_BYTES, gradient_bytes=params * FP32_BYTES,
                     state_bytes=sum(torch_bytes for torch_bytes, _ in states),
                     paged_state_bytes=sum(paged_bytes for _, paged_bytes in states))


def _is_padded(shape: ModelShape, run: RunConfig) -> bool:
    """Whether attention gets a padding mask.

    The engine pads each micro-batch to its longest row (train.collate), so a batch of one row is never padded:
    transformers then passes SDPA no mask at all and SDPA runs causal, with GQA's k and v unexpanded. Batches of
    several rows are counted as padded (rows of one length are the exception). Eager attention always gets masks.
    """
    if run.packing:  # one row of examples end to end: no padding, so no mask
        return shape.family.eager_attention
    return run.micro_batch_size > 1 or shape.family.eager_attention


def _lora_input_bytes_per_token(linear: LinearShape, run: RunConfig, tokens_through: int, dtype_bytes: int) -> int:
    """peft casts each LoRA layer's input to fp32 for its own dropout and lora_A, which keep it (and the mask).
    The fused layer (fused_lora) keeps the input in the compute dtype, with dropout its dropped copy and the mask."""
    if run.fused_lora:
        copies = 2 if run.lora_dropout > 0 else 1
        return tokens_through * (linear.in_features * copies + run.lora_r) * dtype_bytes
    mask_bytes = 1 if run.lora_dropout > 0 else 0
    return tokens_through * (linear.in_features * (FP32_BYTES + mask_bytes) + run.lora_r * FP32_BYTES)


def _attention_bytes_per_token(shape: ModelShape, run: RunConfig, dtype_bytes: int) -> int:
    """What attention keeps per token for one layer.

    A padding mask makes transformers expand GQA's k and v to every head before attention. SDPA then keeps q, k,
    v, its output, the logsumexp and the mask as a 16-bit bias row of max_length. Without padding (batch 1) SDPA
    runs causal with no mask and keeps k and v at their own width. Eager attention (families without an SDPA
    path) keeps q, k, v and the max_length-long rows of scores: the fp32 softmax, its 16-bit copy, and tanh's
    output when the scores are soft-capped.
    """
    d, t = dtype_bytes, run.max_length
    padded = _is_padded(shape, run)
    q_k_v = 3 * shape.q_width * d
    if shape.family.eager_attention:
        per_score = FP32_BYTES + d + (d if shape.attn_logit_softcapping else 0)
        return q_k_v + shape.num_heads * t * per_score
    if not padded and not run.packing:
        q_k_v = (shape.q_width + 2 * shape.kv_width) * d  # packed rows: the varlen kernel gets k and v expanded
    # Fused qkv_proj: v stays a view of the fused output, which keeps its q and k parts alive too, unless GQA's
    # expansion for the padding mask copies it.
    fused_rest = shape.q_width + shape.kv_width if shape.family.fused_projections and not (
        shape.is_gqa and padded) else 0
    mask_row = t * d if padded else 0
    return q_k_v + shape.q_width * d + shape.num_heads * FP32_BYTES + mask_row + fused_rest * d


def _layer_activation_bytes_per_token(shape: ModelShape, run: RunConfig, dtype_bytes: int) -> int:
    """What autograd keeps per token for one decoder layer run in full (no checkpointing).

    Each RMSNorm keeps its fp32 input; attention its inputs and buffers; the gated MLP the gate output, its
    activation and the up output; each LoRA layer its own fp32 copy of its input (and the dropout mask).
    """
    norms = shape.family.norms_per_layer * shape.hidden_size * FP32_BYTES
    qk_norms = (shape.q_width + shape.kv_width) * FP32_BYTES if shape.family.qk_norm else 0
    mlp = 3 * shape.intermediate_size * dtype_bytes * shape.experts_per_token
    lora = sum(_lora_input_bytes_per_token(linear, run, shape.experts_per_token if linear.copies > 1 else 1,
                                           dtype_bytes) for linear in targeted_linears(shape, run.target_modules))
    return norms + qk_norms + _attention_bytes_per_token(shape, run, dtype_bytes) + mlp + lora


def _backward_transient_bytes_per_token(shape: ModelShape, run: RunConfig, dtype_bytes: int) -> int:
    """The gradients one layer's backward holds at once, on top of that layer's saved tensors.

    The backward starts at down_proj, the widest input: its LoRA path hands back an fp32 gradient of the
    intermediate activation, its dropout another, and the 4-bit base layer a 16-bit one.
    """
    down_proj = shape.decoder_linears()[-1]
    lora_targeted = down_proj in targeted_linears(shape, run.target_modules)
    if run.fused_lora:  # the LoRA part of the input gradient, then the sum the 4-bit part is added into
        return shape.intermediate_size * shape.experts_per_token * dtype_bytes * (2 if lora_targeted else 1)
    fp32_copies = (1 + (run.lora_dropout > 0)) if lora_targeted else 0
    return shape.intermediate_size * shape.experts_per_token * (fp32_copies * FP32_BYTES + dtype_bytes)


def _logits_bytes(shape: ModelShape, run: RunConfig, dtype_bytes: int, calibration: dict[str, float]) -> int:
    """The [batch, tokens, vocab] tensors at the loss: the larger of its forward and its backward.

    Forward: the logits in the compute dtype, their fp32 upcast and the fp32 log-softmax it keeps.
    Backward: the log-softmax, its incoming and its outgoing fp32 gradient (the 16-bit logits are freed by then).
    """
    tokens = run.micro_batch_size * run.max_length
    if chunked_loss(shape, run):
        # one chunk of logits: 16-bit, fp32 (turned into the gradient in place), the gradient back in 16-bit;
        # for the whole row, the trained positions' hidden states and their gradient
        chunk = min(tokens, max(1, CHUNK_LOGITS_BYTES // (FP32_BYTES * shape.vocab_size)))
        return chunk * shape.vocab_size * (2 * dtype_bytes + FP32_BYTES) + 2 * tokens * shape.hidden_size * dtype_bytes
    elements = tokens * shape.vocab_size
    forward_bytes = dtype_bytes + (FP32_BYTES if dtype_bytes != FP32_BYTES else 0) + FP32_BYTES
    backward_bytes = FP32_BYTES * calibration["logits_fp32_backward_copies"]
    softcap_bytes = dtype_bytes if shape.final_logit_softcapping else 0  # tanh keeps its output
    return int(elements * (max(forward_bytes, backward_bytes) + softcap_bytes))


def chunked_loss(shape: ModelShape, run: RunConfig) -> bool:
    """Whether the engine computes this model's loss a chunk at a time (lm_loss.py), never holding all logits."""
    return run.chunked_loss and shape.model_type in CHUNKED_LOSS_MODEL_TYPES and not shape.final_logit_softcapping


def _mask_bytes_per_element(shape: ModelShape, run: RunConfig, dtype_bytes: int) -> int:
    """The padding-aware T x T attention mask: boolean for SDPA, none without padding; for eager attention two
    additive masks in the compute dtype (Gemma2 alternates full and sliding-window layers)."""
    if shape.family.eager_attention:
        return 2 * dtype_bytes
    return 1 if _is_padded(shape, run) else 0


@dataclass(frozen=True)
class StepPeak:
    """The short-lived tensors of one training step at its three candidate peaks, in bytes.

    The loss: every layer's saved tensors (or checkpoints) and the logits buffers. The start of the backward
    through the layers: the logits are freed, the last layer runs its backward (recomputed first, with
    checkpointing). The end of the backward: every LoRA gradient exists, only the first layer's tensors are left.
    Gradients are set to None after each optimizer step (train.training_step), so with one micro-batch per step
    they don't exist at the loss; with gradient accumulation they are kept from the previous micro-batch.
    """

    stored: int  # what the forward keeps for the backward: every layer's activations, or its checkpoint
    mask: int  # the attention mask(s), shared by the layers
    final_norm: int  # the final RMSNorm's fp32 input, kept for the backward
    logits: int  # the loss's [batch, tokens, vocab] buffers
    layer_backward: int  # one layer's saved tensors (recomputed with checkpointing) while its backward runs
    backward_transient: int  # the gradients that layer's backward holds at once
    workspace: int  # the dequantized 16-bit weight of the Linear4bit running
    first_checkpoint: int  # with checkpointing, the first layer's input (still kept at the end)
    gradients: int  # every LoRA gradient
    checkpointing: bool
    accumulating: bool  # gradients kept across micro-batches (grad_accum > 1)

    @property
    def kept_gradients(self) -> int:
        return self.gradients if self.accumulating else 0

    @property
    def at_loss(self) -> int:
        return self.stored + self.mask + self.final_norm + self.logits + self.kept_gradients

    @property
    def at_backward_start(self) -> int:
        recomputed = self.layer_backward if self.checkpointing else 0  # without checkpointing it is in stored
        return (self.stored + self.mask + recomputed + self.backward_transient + self.workspace
                + self.kept_gradients)

    @property
    def at_backward_end(self) -> int:
        return (self.gradients + self.mask + self.layer_backward + self.backward_transient + self.workspace
                + self.first_checkpoint)

    @property
    def peak(self) -> int:
        return max(self.at_loss, self.at_backward_start, self.at_backward_end)

    @property
    def moment(self) -> str:
        return next(name for name, value in (("loss", self.at_loss), ("backward_start", self.at_backward_start),
                                             ("backward_end", self.at_backward_end)) if value == self.peak)

    @property
    def gradients_at_peak(self) -> int:
        """The gradients' share of the peak: kept ones, plus what the end of the backward adds beyond the rest."""
        before_end = max(self.at_loss, self.at_backward_start)
        return self.kept_gradients + max(0, self.at_backward_end - before_end - self.kept_gradients)

    @property
    def activations_at_peak(self) -> int:
        """The rest of the peak besides the logits and the gradients."""
        return self.peak - self.logits - self.gradients_at_peak


def _step_peak(shape: ModelShape, run: RunConfig, dtype_bytes: int, lora: LoraSizes,
               calibration: dict[str, float]) -> StepPeak:
    tokens = run.micro_batch_size * run.max_length
    full_layer_bytes = int(tokens * _layer_activation_bytes_per_token(shape, run, dtype_bytes)
                           * calibration["activation_full_scale"])
    residual_bytes = FP32_BYTES if run.fp32_residual else dtype_bytes
    checkpoint_bytes = int(tokens * shape.hidden_size * residual_bytes * calibration["activation_checkpointed_scale"])
    largest_weight = max(linear.in_features * linear.out_features for linear in shape.decoder_linears())
    return StepPeak(
        stored=shape.num_layers * (checkpoint_bytes if run.gradient_checkpointing else full_layer_bytes),
        mask=run.micro_batch_size * run.max_length ** 2 * _mask_bytes_per_element(shape, run, dtype_bytes),
        final_norm=tokens * shape.hidden_size * FP32_BYTES,
        logits=_logits_bytes(shape, run, dtype_bytes, calibration),
        layer_backward=full_layer_bytes,
        backward_transient=int(tokens * _backward_transient_bytes_per_token(shape, run, dtype_bytes)
                               * calibration["backward_transient_scale"]),
        workspace=int(largest_weight * dtype_bytes * calibration["dequant_workspace_matrices"]),
        first_checkpoint=checkpoint_bytes if run.gradient_checkpointing else 0,
        gradients=lora.gradient_bytes, checkpointing=run.gradient_checkpointing, accumulating=run.grad_accum > 1)


PEAK_MOMENTS = {"loss": "the peak is at the loss, before the backward",
                "backward_start": "the peak is at the start of the backward through the layers: the logits are "
                                  "freed by then, and this term is what that moment holds beyond them",
                "backward_end": "the peak is at the end of the backward, when every LoRA gradient exists: the "
                                "logits are freed by then, and this term is what that moment holds beyond them "
                                "and the gradients"}


def _step_terms(shape: ModelShape, run: RunConfig, step: StepPeak) -> list[Term]:
    """Gradients, activations and the loss buffers, combined as the step's real peak rather than summed blindly."""
    where = f"batch {run.micro_batch_size} x {run.max_length} tokens"
    if run.gradient_checkpointing:
        how = (f"gradient checkpointing: each of {shape.num_layers} layers keeps only its input "
               f"({_gib(step.stored)}); one layer at a time is recomputed ({_gib(step.layer_backward)})")
    else:
        how = f"no gradient checkpointing: all {shape.num_layers} layers keep their activations"
    padding = "padded batch: attention gets a mask" if _is_padded(shape, run) else (
        "examples packed end to end: no padding mask" if run.packing else "one row: no padding mask")
    lora_inputs = ("the fused LoRA layers keep their inputs in the compute dtype" if run.fused_lora
                   else "peft's LoRA layers keep fp32 copies of their inputs")
    if chunked_loss(shape, run):
        logits_note = (f"{where} x {shape.vocab_size:,} vocab, computed a chunk of tokens at a time: one chunk of "
                       "logits (16-bit, fp32, gradient) and the trained positions' hidden states and gradient")
    else:
        logits_note = (f"{where} x {shape.vocab_size:,} vocab: logits in the compute dtype, their fp32 upcast, the "
                       "fp32 log-softmax and its gradients"
                       + ("; plus the final logit soft-capping's tanh" if shape.final_logit_softcapping else ""))
    if step.accumulating:
        gradients_note = (f"one fp32 gradient per LoRA parameter ({_gib(step.gradients)}), kept across the "
                          f"{run.grad_accum} micro-batches of a step")
    else:
        gradients_note = (f"one fp32 gradient per LoRA parameter ({_gib(step.gradients)}), built during the "
                          "backward and freed after each optimizer step: only what the end of the backward adds "
                          "beyond the earlier peak counts")
    return [
        Term("lora_gradients", step.gradients_at_peak, gradients_note),
        Term("activations", step.activations_at_peak,
             f"{where}; {how}; {padding}; {lora_inputs}; {PEAK_MOMENTS[step.moment]}"),
        Term("logits_and_loss", step.logits, logits_note),
    ]


def estimate_peak(model_config: dict[str, Any], run: RunConfig,
                  calibration: dict[str, float] | None = None) -> Estimate:
    """Peak GPU memory of one training step, as named terms that add up to `peak_bytes`.

    The terms are what the process adds to the GPU's used memory (NVML): torch's tensors at the step's peak,
    the allocator's slack over them, the paged optimizer states and the CUDA context.
    """
    calibration = CALIBRATION if calibration is None else calibration
    shape, reasons = model_shape(model_config)
    dtype_bytes = compute_dtype_bytes(run)
    lora = _lora_sizes(shape, run)
    step = _step_peak(shape, run, dtype_bytes, lora, calibration)
    step_terms = _step_terms(shape, run, step)
    paging = (f"; {_gib(lora.paged_state_bytes)} of it paged{PAGING_NOTE}" if lora.paged_state_bytes else "")
    slack_fraction = calibration["allocator_slack_checkpointed_fraction" if run.gradient_checkpointing
                                 else "allocator_slack_full_fraction"]
    short_lived_bytes = sum(term.bytes for term in step_terms)
    terms = _weight_terms(shape, run, dtype_bytes) + [
        Term("lora_weights", lora.weight_bytes,
             f"{_millions(lora.params)} trainable parameters in fp32 (rank {run.lora_r} on {run.target_modules})"),
        step_terms[0],
        Term("optimizer_states", lora.state_bytes + lora.paged_state_bytes, OPTIMIZER_NOTES[run.optimizer] + paging),
        *step_terms[1:],
        Term("cuda_context", int(calibration["cuda_context_bytes"]),
             "CUDA driver context, the kernels of CUDA, cuBLAS, bitsandbytes and attention, cuBLAS workspaces: "
             "memory the process takes that torch's tensors don't account for (measured)"),
        Term("allocator_slack", int(short_lived_bytes * slack_fraction),
             f"PyTorch's caching allocator reserves ~{slack_fraction:.0%} more than the step's short-lived "
             "tensors (gradients, activations, logits) need: block rounding and fragmentation"
             + (", worse with checkpointing's recomputation" if run.gradient_checkpointing else "")),
    ]
    linear_params = shape.num_layers * sum(linear.params for linear in shape.decoder_linears())
    embedding_params = shape.vocab_size * shape.hidden_size * (1 if shape.tied_embeddings else 2)
    return Estimate(terms=terms, approximate=bool(reasons), reasons=reasons,
                    warnings=_warnings(shape, run), total_params=linear_params + embedding_params,
                    trainable_params=lora.params)


def _warnings(shape: ModelShape, run: RunConfig) -> list[str]:
    warnings = []
    if run.max_length > shape.max_position_embeddings:
        warnings.append(f"max_length {run.max_length} is longer than the model's context "
                        f"({shape.max_position_embeddings} tokens)")
    if run.target_modules.strip() != "all-linear":
        known = {linear.name for linear in shape.decoder_linears()}
        missing = sorted({n.strip() for n in run.target_modules.split(",") if n.strip()} - known)
        if missing:
            warnings.append(f"target_modules {', '.join(missing)}: no such layer in this model (ignored)")
    return warnings


# ----------------------------------------------------------------------------- verdict and advice
def fit_verdict(estimate: Estimate, free_bytes: int) -> str:
    """'fits', 'tight' (within TIGHT_MARGIN_FRACTION of free memory) or "won't fit"."""
    if estimate.peak_bytes > free_bytes:
        return "won't fit"
    if estimate.peak_bytes > free_bytes * (1 - TIGHT_MARGIN_FRACTION):
        return "tight"
    return "fits"


@dataclass
class Fix:
    description: str
    saving_bytes: int
    config_changes: dict[str, Any]
    fits_after: bool  # the run with these changes gets the verdict "fits"


@dataclass
class Advice:
    verdict: str
    peak_bytes: int
    free_bytes: int
    max_length_that_fits: int | None  # at the chosen batch; None when not even MIN_MAX_LENGTH fits
    batch_that_fits: int | None  # at the chosen max_length; None when not even batch 1 fits
    fixes: list[Fix]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _with(run: RunConfig, **changes: Any) -> RunConfig:
    return dataclasses.replace(run, **changes)


def _fits(model_config: dict[str, Any], run: RunConfig, free_bytes: int) -> bool:
    return fit_verdict(estimate_peak(model_config, run), free_bytes) == "fits"


def _largest(low: int, high: int, fits: Callable[[int], bool]) -> int | None:
    """The largest value in [low, high] for which `fits` holds, given it holds up to some point and not beyond."""
    if high < low or not fits(low):
        return None
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low


def _round_length(length: int) -> int:
    """Lengths people pick: a multiple of 64 where that is possible."""
    return length - length % 64 if length >= 64 else length


def max_length_that_fits(model_config: dict[str, Any], run: RunConfig, free_bytes: int) -> int | None:
    """The longest max_length (up to the model's context) that fits with the chosen batch."""
    limit = model_shape(model_config)[0].max_position_embeddings
    length = _largest(MIN_MAX_LENGTH, max(limit, MIN_MAX_LENGTH),
                      lambda n: _fits(model_config, _with(run, max_length=n), free_bytes))
    return None if length is None else _round_length(length)


def batch_that_fits(model_config: dict[str, Any], run: RunConfig, free_bytes: int,
                    max_batch: int = SEARCH_MAX_BATCH) -> int | None:
    """The largest micro-batch that fits with the chosen max_length."""
    return _largest(1, max_batch, lambda b: _fits(model_config, _with(run, micro_batch_size=b), free_bytes))


def _smaller_batch_fix(model_config: dict[str, Any], run: RunConfig, free_bytes: int) -> dict[str, Any] | None:
    """A smaller micro-batch with more accumulation: the same effective batch, fewer activations."""
    effective = run.micro_batch_size * run.grad_accum
    divisors = [b for b in range(run.micro_batch_size - 1, 0, -1) if effective % b == 0]
    if not divisors:
        return None
    batch = next((b for b in divisors if _fits(model_config, _with(run, micro_batch_size=b,
                                                                   grad_accum=effective // b), free_bytes)), 1)
    return {"micro_batch_size": batch, "grad_accum": effective // batch}


def _candidate_fixes(model_config: dict[str, Any], run: RunConfig, free_bytes: int) -> list[tuple[str, dict]]:
    """Each change that lowers memory without touching the others, described in the user's words."""
    candidates: list[tuple[str, dict]] = []
    if not run.gradient_checkpointing:
        candidates.append(("enable gradient checkpointing (about 30% slower)", {"gradient_checkpointing": True}))
    smaller = _smaller_batch_fix(model_config, run, free_bytes)
    if smaller:
        candidates.append((f"micro-batch {smaller['micro_batch_size']} with gradient accumulation "
                           f"{smaller['grad_accum']}: the same effective batch of "
                           f"{run.micro_batch_size * run.grad_accum}", smaller))
    length = max_length_that_fits(model_config, run, free_bytes)
    if length is not None and length < run.max_length:
        candidates.append((f"max_length {length} (longer rows are truncated)", {"max_length": length}))
    if run.optimizer != "paged_adamw_8bit":
        candidates.append(("8-bit optimizer states (paged_adamw_8bit)", {"optimizer": "paged_adamw_8bit"}))
    if run.lora_r > 1:
        rank, alpha = run.lora_r // 2, max(1, run.lora_alpha // 2)
        candidates.append((f"LoRA rank {rank} (alpha {alpha} keeps the same scaling)",
                           {"lora_r": rank, "lora_alpha": alpha}))
    if not run.double_quant:
        candidates.append(("double quantization on", {"double_quant": True}))
    if run.compute_dtype == "fp32":
        candidates.append(("16-bit compute (auto: bf16 where supported)", {"compute_dtype": "auto"}))
    elif run.fp32_residual and run.gradient_checkpointing:
        candidates.append(("bf16 residual stream (fp32_residual off: early training a little slower)",
                           {"fp32_residual": False}))
    return candidates


def advise(model_config: dict[str, Any], run: RunConfig, free_bytes: int) -> Advice:
    """The verdict against free memory, the largest length and batch that fit, and fixes when it doesn't fit.

    Fixes that make the run fit come first: fit_to_gpu's combination (which keeps the user's choices where it
    can), then single changes by saving; changes that help but are not enough alone come last.
    """
    estimate = estimate_peak(model_config, run)
    peak_bytes, verdict = estimate.peak_bytes, fit_verdict(estimate, free_bytes)
    fixes = []
    if verdict != "fits":
        for description, changes in _candidate_fixes(model_config, run, free_bytes):
            changed = _with(run, **changes)
            fixes.append(Fix(description, peak_bytes - estimate_peak(model_config, changed).peak_bytes, changes,
                             _fits(model_config, changed, free_bytes)))
        fixes.sort(key=lambda fix: (not fix.fits_after, -fix.saving_bytes))
        fixes = _combined_fix(model_config, run, free_bytes, fixes) + fixes
    return Advice(verdict=verdict, peak_bytes=peak_bytes, free_bytes=free_bytes,
                  max_length_that_fits=max_length_that_fits(model_config, run, free_bytes),
                  batch_that_fits=batch_that_fits(model_config, run, free_bytes), fixes=fixes)


def _combined_fix(model_config: dict[str, Any], run: RunConfig, free_bytes: int,
                  single_fixes: list[Fix]) -> list[Fix]:
    """fit_to_gpu's changes as one fix, unless nothing fits or a single fix is the same change."""
    try:
        changes = fit_to_gpu(model_config, run, free_bytes)
    except EstimateError:
        return []
    if not changes or any(fix.config_changes == changes for fix in single_fixes):
        return []
    saving = estimate_peak(model_config, run).peak_bytes - estimate_peak(model_config, _with(run, **changes)).peak_bytes
    return [Fix(f"fit to this GPU: {describe_changes(changes)}", saving, changes, True)]


def describe_changes(changes: dict[str, Any]) -> str:
    """Config changes in a person's words: 'gradient_checkpointing on, micro_batch_size 2, grad_accum 4'."""
    def value_text(value: Any) -> str:
        return ("on" if value else "off") if isinstance(value, bool) else str(value)

    return ", ".join(f"{name} {value_text(value)}" for name, value in changes.items())


MEMORY_SWITCHES = ({"gradient_checkpointing": True}, {"optimizer": "paged_adamw_8bit"}, {"double_quant": True})


def fit_to_gpu(model_config: dict[str, Any], run: RunConfig, free_bytes: int) -> dict[str, Any]:
    """The config changes that make the run fit with the most tokens per micro-batch.

    max_length and the effective batch (micro-batch x accumulation) are upper bounds the user chose for the data
    and the recipe: max_length is lowered only if it must be, and as much of the effective batch as fits moves
    into the micro-batch (fewer accumulation steps run faster). The memory switches (checkpointing, 8-bit
    optimizer, double quantization) are turned on one by one only while batch 1 doesn't fit.
    """
    changes: dict[str, Any] = {}
    for switch in MEMORY_SWITCHES:
        if _fits(model_config, _with(run, **changes, micro_batch_size=1), free_bytes):
            break
        changes.update({name: value for name, value in switch.items() if getattr(run, name) != value})
    base = _with(run, **changes, micro_batch_size=1)
    length = _largest(MIN_MAX_LENGTH, run.max_length,
                      lambda n: _fits(model_config, _with(base, max_length=n), free_bytes))
    if length is None:
        raise EstimateError(f"even batch 1 with max_length {MIN_MAX_LENGTH} won't fit in {_gib(free_bytes)}",
                            "Pick a smaller model, or free GPU memory (close other programs using the GPU).")
    if length < run.max_length:
        changes["max_length"] = _round_length(length)
    effective = run.micro_batch_size * run.grad_accum
    sized = _with(run, **changes)
    batch = max(b for b in range(1, effective + 1) if effective % b == 0
                and (b == 1 or _fits(model_config, _with(sized, micro_batch_size=b), free_bytes)))
    changes.update({"micro_batch_size": batch, "grad_accum": effective // batch})
    return {name: value for name, value in changes.items() if getattr(run, name) != value}


# ----------------------------------------------------------------------------- model configs
SMOLLM2_135M_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1,
    "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 576, "initializer_range": 0.041666666666666664,
    "intermediate_size": 1536, "is_llama_config": True, "max_position_embeddings": 8192, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3,
    "pad_token_id": 2, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_interleaved": False,
    "rope_scaling": None, "rope_theta": 100000, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "use_cache": True, "vocab_size": 49152,
}


def load_model_config(path_or_dir: str | Path) -> dict[str, Any]:
    """A model's config.json as a dict: pass the model folder or the file itself."""
    path = Path(path_or_dir).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".gguf":
        raise EstimateError(f"{path}: the estimate reads config.json, not .gguf files",
                            "Import the .gguf once (qlora-studio model-info FILE) and pass the imported folder.")
    if not path.is_file():
        raise EstimateError(f"{path}: no such file",
                            "Pass a Hugging Face model folder (with config.json), its config.json, or 'default'.")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EstimateError(f"{path}: not valid JSON ({exc})",
                            "Download config.json again; for a gated model, accept its license first (a failed "
                            "download can save an error page instead).") from exc
    if not isinstance(config, dict):
        raise EstimateError(f"{path}: expected a JSON object of model settings, got a {type(config).__name__}")
    return config


def resolve_model_config(model: str) -> dict[str, Any]:
    """'default' is the bundled SmolLM2-135M-Instruct; anything else is a folder or a config.json."""
    if model in ("", "default"):
        return dict(SMOLLM2_135M_CONFIG)
    return load_model_config(model)


# ----------------------------------------------------------------------------- against measurements
MEASURED_MODEL_CONFIGS = Path(__file__).resolve().parent.parent / "tests" / "data" / "model_configs"
# NVML's peak beyond torch's max reserved is the CUDA context, kernels and paged states: about 1.3-1.9 GiB on an
# H100. Far more means memory from outside the measured step (e.g. freed weights not yet garbage-collected).
ARTIFACT_OVERHEAD_BYTES = 3 * BYTES_PER_GIB


def measured_bytes(row: dict[str, Any]) -> int:
    """What a `bench --memory` row measured, the number the estimate predicts: the GPU's used memory (NVML) at
    the peak minus its used memory before the process touched CUDA."""
    return int(row["nvml_peak_used_bytes"]) - int(row["idle_gpu_used_bytes"])


def row_run_config(row: dict[str, Any]) -> RunConfig:
    """The RunConfig a bench row ran: its RunConfig fields (except model, the architecture's file stem), the
    rest the defaults, and compute in bf16: what compute_dtype 'auto' is on a CUDA GPU, whatever runs this."""
    names = {spec.name for spec in dataclasses.fields(RunConfig)} - {"model"}
    # Rows measured before the speed switches existed ran peft's path with padded batches and full logits.
    earlier_engine = {"packing": False, "chunked_loss": False, "fused_lora": False, "compile_layers": False,
                      "fp32_residual": False}
    values = {"compute_dtype": "bf16", **earlier_engine, **{name: row[name] for name in names if name in row}}
    return RunConfig(**values).validate()


def row_artifact(row: dict[str, Any]) -> str:
    """Why a measured row can't be held against the estimate ('' when it can)."""
    if row.get("oom"):
        return "the run ran out of memory: its peak is not the step's"
    outside = int(row["nvml_peak_used_bytes"]) - int(row["max_reserved_bytes"])
    if outside > ARTIFACT_OVERHEAD_BYTES:
        return (f"NVML saw {_gib(outside)} more than torch reserved (expected ~1.3-1.9 GiB): memory from outside "
                "the measured step, such as the bench's freed random-init weights. An artifact: re-measure this row")
    return ""


@dataclass
class CalibrationError:
    model: str
    max_length: int
    micro_batch_size: int
    lora_r: int
    gradient_checkpointing: bool
    measured_bytes: int
    estimate_bytes: int
    artifact: str  # '' or why the row can't be held against the estimate

    @property
    def error(self) -> float:
        """(estimate - measured) / measured: positive when the estimate is too high."""
        return (self.estimate_bytes - self.measured_bytes) / self.measured_bytes

    @property
    def label(self) -> str:
        return (f"{self.model} len {self.max_length} batch {self.micro_batch_size} r {self.lora_r} "
                f"gc {'on' if self.gradient_checkpointing else 'off'}")


def calibration_errors(rows: Iterable[dict[str, Any]], model_configs: Path = MEASURED_MODEL_CONFIGS,
                       calibration: dict[str, float] | None = None) -> list[CalibrationError]:
    """The current estimate next to each measured row (bench --memory JSON lines, read as dicts)."""
    errors = []
    for row in rows:
        run = row_run_config(row)
        estimate = estimate_peak(load_model_config(model_configs / f"{row['model']}.json"), run, calibration)
        errors.append(CalibrationError(row["model"], run.max_length, run.micro_batch_size, run.lora_r,
                                       run.gradient_checkpointing, measured_bytes(row), estimate.peak_bytes,
                                       row_artifact(row)))
    return errors


def calibration_summary(errors: list[CalibrationError]) -> dict[str, Any]:
    """Median and worst |relative error| over the rows that are not artifacts, and the worst row."""
    usable = [error for error in errors if not error.artifact]
    if not usable:
        return {"rows": 0, "artifacts": len(errors), "median": None, "worst": None, "worst_row": None}
    worst = max(usable, key=lambda error: abs(error.error))
    return {"rows": len(usable), "artifacts": len(errors) - len(usable),
            "median": statistics.median(abs(error.error) for error in usable), "worst": abs(worst.error),
            "worst_row": worst.label}


def calibration_table(errors: list[CalibrationError]) -> str:
    """The measured table as Markdown (for the README): one line per row, artifacts marked."""
    lines = ["| model | max_length | batch | rank | checkpointing | measured GiB | estimate GiB | error |",
             "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    for e in errors:
        error = "re-measure" if e.artifact else f"{e.error:+.1%}"
        lines.append(f"| {e.model} | {e.max_length} | {e.micro_batch_size} | {e.lora_r} | "
                     f"{'on' if e.gradient_checkpointing else 'off'} | {e.measured_bytes / BYTES_PER_GIB:.2f} | "
                     f"{e.estimate_bytes / BYTES_PER_GIB:.2f} | {error} |")
    summary = calibration_summary(errors)
    if summary["rows"]:
        lines.append("")
        lines.append(f"{summary['rows']} configurations: median error {summary['median']:.1%}, "
                     f"worst {summary['worst']:.1%} ({summary['worst_row']})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- qlora-studio estimate
SIZE_UNITS_BYTES = {"": BYTES_PER_GIB, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": BYTES_PER_MIB,
                    "mb": BYTES_PER_MIB, "mib": BYTES_PER_MIB, "g": BYTES_PER_GIB, "gb": BYTES_PER_GIB,
                    "gib": BYTES_PER_GIB, "t": 2**40, "tb": 2**40, "tib": 2**40}


def parse_size_bytes(text: str) -> int:
    """'12GiB', '12GB', '12g', '11500MiB' or a bare '12' (GiB). GB means GiB, as on a graphics card's box."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in SIZE_UNITS_BYTES:
        raise argparse.ArgumentTypeError(f"{text!r} is not a memory size; write it like 12GiB or 11500MiB")
    return int(float(match.group(1)) * SIZE_UNITS_BYTES[unit])


def _build_parser() -> argparse.ArgumentParser:
    from qlora_engine.cli import add_config_flags  # one flag per RunConfig field, generated from its metadata

    parser = argparse.ArgumentParser(prog="qlora-studio estimate",
                                     description="Estimate a run's peak GPU memory before loading anything.")
    parser.add_argument("model_spec", nargs="?", metavar="model",
                        help="model folder, its config.json, or 'default' (the bundled SmolLM2-135M-Instruct); "
                             "overrides --model")
    parser.add_argument("--gpu-memory", type=parse_size_bytes, metavar="SIZE",
                        help="free GPU memory to check against, e.g. 12GiB [free memory of the training GPU]")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    add_config_flags(parser)
    return parser


def _run_config_from_args(args: argparse.Namespace) -> RunConfig:
    values = {spec.name: getattr(args, spec.name) for spec in dataclasses.fields(RunConfig)
              if hasattr(args, spec.name)}
    if args.model_spec:
        values["model"] = args.model_spec
    return RunConfig.from_dict(values, source="command line")


def _free_memory(args: argparse.Namespace) -> tuple[int | None, str]:
    """Free bytes to check against, and where that number came from."""
    if args.gpu_memory is not None:
        return args.gpu_memory, "--gpu-memory"
    from qlora_engine import hardware

    report = hardware.detect_gpus()
    gpu = hardware.training_gpu(report)
    if gpu is None:
        return None, report.problem or hardware.NO_GPU_MESSAGE
    return gpu.free_bytes, f"GPU {gpu.index}: {gpu.name}"


def _fit_changes(model_config: dict[str, Any], run: RunConfig, free_bytes: int) -> dict[str, Any] | None:
    """fit_to_gpu's changes, or None when nothing fits."""
    try:
        return fit_to_gpu(model_config, run, free_bytes)
    except EstimateError:
        return None


NOTE_WIDTH = 88


def format_report(run: RunConfig, estimate: Estimate, advice: Advice | None, memory_source: str) -> str:
    """The breakdown as a table in GiB, then the verdict and the fixes."""
    lines = [f"Peak GPU memory of one training step: {run.model}", "", f"  {'term':<18}{'GiB':>8}  what it holds"]
    for term in estimate.terms:
        note_lines = textwrap.wrap(term.note, width=NOTE_WIDTH) or [""]
        lines.append(f"  {term.name:<18}{term.bytes / BYTES_PER_GIB:>8.2f}  {note_lines[0]}")
        lines += [" " * 30 + line for line in note_lines[1:]]
    lines += [f"  {'peak':<18}{estimate.peak_bytes / BYTES_PER_GIB:>8.2f}", ""]
    lines += [f"approximate: {reason}" for reason in estimate.reasons]
    lines += [f"warning: {warning}" for warning in estimate.warnings]
    if advice is None:
        lines.append(f"{memory_source}. Pass --gpu-memory 12GiB to check a card.")
        return "\n".join(lines)
    lines.append(f"{memory_source}, {_gib(advice.free_bytes)} free: {advice.verdict.upper()}")
    lines.append(f"  longest max_length that fits with micro-batch {run.micro_batch_size}: "
                 f"{advice.max_length_that_fits or 'none'}")
    lines.append(f"  largest micro-batch that fits with max_length {run.max_length}: "
                 f"{advice.batch_that_fits or 'none'}")
    if advice.fixes:
        lines.append("What would help (estimated saving):")
        lines += [f"  {'fits' if fix.fits_after else '    '}  {fix.description}: saves {_gib(fix.saving_bytes)}"
                  for fix in advice.fixes]
    return "\n".join(lines)


def estimate_main(argv: list[str]) -> int:
    """`qlora-studio estimate <model> [run options] [--gpu-memory 12GiB] [--json]`: argv follows `estimate`."""
    args = _build_parser().parse_args(argv)
    try:
        run = _run_config_from_args(args)
        model_config = resolve_model_config(run.model)
        estimate = estimate_peak(model_config, run)
    except (EstimateError, ConfigError) as exc:
        code = getattr(exc, "code", "bad_config")
        if args.json:
            print(json.dumps({"error": {"code": code, "message": exc.message, "advice": exc.advice}}))
        else:
            print(f"error: {exc.message}\n  what to do: {exc.advice}")
        return 2
    free_bytes, memory_source = _free_memory(args)
    advice = None if free_bytes is None else advise(model_config, run, free_bytes)
    if args.json:
        print(json.dumps({"model": run.model, "estimate": estimate.to_dict(), "memory_source": memory_source,
                          "advice": None if advice is None else advice.to_dict(),
                          "fit_to_gpu": None if free_bytes is None else _fit_changes(model_config, run, free_bytes)},
                         indent=2))
    else:
        print(format_report(run, estimate, advice, memory_source))
    return 0
