"""The memory model: peak VRAM of one QLoRA training step as named terms in bytes, from a config.json and a RunConfig.

Holds the terms, the calibration constants (calibration.json) and estimate_peak; not the verdict or fixes (advice.py).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_engine.planning import precision_memory
from qlora_engine.planning.model_shape import LinearShape, ModelShape, model_shape, targeted_linears
from qlora_engine.protocol.config import CHUNK_LOGITS_BYTES, CHUNKED_LOSS_MODEL_TYPES, RunConfig
from qlora_engine.protocol.errors import model_config_error
from qlora_engine.protocol.queries import Estimate, Term

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
    # The same four for the compiled layers on a GPU (compile_layers with checkpointing, the default there): the
    # compiler's recomputation keeps and frees its own set of tensors, fitted to the consumer-card table.
    "compiled_activation_checkpointed_scale": 1.0,
    "compiled_activation_full_scale": 1.0,
    "compiled_backward_transient_scale": 1.0,
    "compiled_allocator_slack_fraction": 0.35,
    "compiled_activation_unchecked_scale": 1.0,  # compiled without checkpointing: activation_full_scale's twin
    # DoRA (use_dora) runs peft's layers (no fused LoRA, uncompiled). While a layer computes its weight norm, peft's
    # get_lora_weight multiplies an identity of in_features x in_features (in the adapter's fp32) through A and B,
    # and B @ A, the dequantized base weight and their sum exist at once. The matrix with the largest sum of both
    # decides. Bytes per input squared from peft's code (torch.eye in fp32); bytes per weight fitted to the uncapped
    # H200 probe (tests/data/memory_measured_probe_h200.jsonl: Llama-3.2-3B and Llama-3.1-8B 26.2 and 25.8).
    "dora_eye_bytes_per_input_squared": 4.0,
    "dora_bytes_per_weight": 26.0,
}
COMPILED_PATH_KEYS = {"activation_checkpointed_scale": "compiled_activation_checkpointed_scale",
                      "activation_full_scale": "compiled_activation_full_scale",
                      "backward_transient_scale": "compiled_backward_transient_scale",
                      "allocator_slack_checkpointed_fraction": "compiled_allocator_slack_fraction"}


def dora_bytes(linear: LinearShape, calibration: dict[str, float]) -> float:
    """What peft's DoRA weight norm holds at once for one adapted matrix (see CALIBRATION)."""
    return (calibration["dora_eye_bytes_per_input_squared"] * linear.in_features ** 2
            + calibration["dora_bytes_per_weight"] * linear.in_features * linear.out_features)


def compiled_path(run: RunConfig) -> bool:
    """Whether the run's layers are compiled: compile_layers on a GPU, except with DoRA or a precision budget (whose
    plan may hold int8 layers: nearly every plan does) and checkpointing, where the training loop leaves them
    uncompiled (training.loop.attach_lora says why)."""
    uncompiled = (run.use_dora or run.precision_budget_bits > 0) and run.gradient_checkpointing
    return run.device != "cpu" and run.compile_layers and not uncompiled


def path_calibration(run: RunConfig, calibration: dict[str, float]) -> dict[str, float]:
    """The constants of the path the run takes: the compiled layers' own on a GPU (compiled_path), the eager
    path's elsewhere."""
    if not compiled_path(run):
        return calibration
    compiled = {**calibration, **{eager: calibration[key] for eager, key in COMPILED_PATH_KEYS.items()}}
    if not run.gradient_checkpointing:  # every layer keeps what the compiler's default partition saves
        compiled["activation_full_scale"] = calibration["compiled_activation_unchecked_scale"]
    return compiled


def load_calibration(path: Path = CALIBRATION_PATH) -> dict[str, float]:
    """DEFAULT_CALIBRATION, with the values fitted to measurements from `path` where that file exists.

    The file is {"name": number} with the fitted constants; keys that start with "_" are notes (where and when
    the measurements were taken) and are ignored. `qlora-studio bench --memory` records measured peaks next to
    the estimate; calibration_check.calibration_errors() says how far the estimate is from them.
    """
    calibration = dict(DEFAULT_CALIBRATION)
    if not path.is_file():
        return calibration
    try:
        fitted = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise model_config_error(f"{path}: not valid JSON (line {exc.lineno})", "Fix or delete the file.") from exc
    fitted = {name: value for name, value in fitted.items() if not name.startswith("_")}
    unknown = sorted(set(fitted) - set(calibration))
    if unknown:
        raise model_config_error(f"{path}: unknown calibration constant(s) {', '.join(unknown)}",
                                 f"Known: {', '.join(calibration)}.")
    calibration.update({name: float(value) for name, value in fitted.items()})
    return calibration


CALIBRATION = load_calibration()


def compute_dtype_bytes(run: RunConfig) -> int:
    """bf16 or fp16 (what 'auto' picks on a GPU) is 2 bytes; fp32 is 4."""
    return FP32_BYTES if run.compute_dtype == "fp32" else 2


def format_gib(n_bytes: float) -> str:
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
    quantized = [
        Term("nf4_weights", nf4_bytes, f"{_millions(quantized_params)} parameters of the decoder layers' linear "
             f"layers at 4 bits ({run.quant_type.upper()}, blocks of {QUANT_BLOCKSIZE})"),
        Term("quant_constants", constants_bytes, f"quantization constants: {constants_how}")]
    if run.precision_budget_bits > 0:
        quantized = [precision_memory.budget_weight_term(shape, run)]
    return [
        *quantized,
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

    The engine pads each micro-batch to its longest row (training.loop.collate), so a batch of one row is never
    padded: transformers then passes SDPA no mask at all and SDPA runs causal, with GQA's k and v unexpanded.
    Batches of several rows are counted as padded (rows of one length are the exception). Eager attention always
    gets masks.
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
    """Whether the engine computes this model's loss a chunk at a time (model/lm_loss.py), never holding all logits."""
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
    Gradients are set to None after each optimizer step (training.loop.training_step), so with one micro-batch per
    step they don't exist at the loss; with gradient accumulation they are kept from the previous micro-batch.
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
    # activation_memory_budget: the compiled backward may keep up to that fraction of a layer's activations
    # besides its input (torch's own cap on what the partitioner saves, so this is an upper bound)
    kept_bytes = checkpoint_bytes + int(run.activation_memory_budget * full_layer_bytes)
    return StepPeak(
        stored=shape.num_layers * (kept_bytes if run.gradient_checkpointing else full_layer_bytes),
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
               f"({format_gib(step.stored)}); one layer at a time is recomputed ({format_gib(step.layer_backward)})"
               if not run.activation_memory_budget else
               f"gradient checkpointing with an activation memory budget of {run.activation_memory_budget:g}: each "
               f"of {shape.num_layers} layers keeps its input and at most that fraction of its activations "
               f"({format_gib(step.stored)} in all); the rest is recomputed, one layer at a time "
               f"({format_gib(step.layer_backward)})")
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
        gradients_note = (f"one fp32 gradient per LoRA parameter ({format_gib(step.gradients)}), kept across the "
                          f"{run.grad_accum} micro-batches of a step")
    else:
        gradients_note = (f"one fp32 gradient per LoRA parameter ({format_gib(step.gradients)}), built during the "
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
    """Peak GPU memory of one training step, as named terms that add up to `peak_bytes`; no weights are loaded.

    The terms are what the process adds to the GPU's used memory as NVML (nvidia-smi) counts it, the number a
    user compares with the card's free memory: torch's peak allocated tensors (the terms up to logits_and_loss),
    what its caching allocator reserves beyond them (allocator_slack), and what never goes through torch
    (cuda_context, and the paged part of optimizer_states). calibration_check.py holds it against measured peaks.
    """
    calibration = path_calibration(run, CALIBRATION if calibration is None else calibration)
    # DoRA layers take peft's path (lora_nf4.peft_path_note), and so do a precision plan's int8 and 16-bit layers
    # (which of them is only known from the weights: counted as all, the upper bound)
    if (run.use_dora or run.precision_budget_bits > 0) and run.fused_lora:
        run = dataclasses.replace(run, fused_lora=False)
    shape, reasons = model_shape(model_config)
    dtype_bytes = compute_dtype_bytes(run)
    lora = _lora_sizes(shape, run)
    step = _step_peak(shape, run, dtype_bytes, lora, calibration)
    step_terms = _step_terms(shape, run, step)
    paging = (f"; {format_gib(lora.paged_state_bytes)} of it paged{PAGING_NOTE}" if lora.paged_state_bytes else "")
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
    if run.use_dora:
        largest = max(targeted_linears(shape, run.target_modules), key=lambda linear: dora_bytes(linear, calibration))
        terms.append(Term("dora", int(dora_bytes(largest, calibration)),
                          f"DoRA's weight norm of the largest adapted matrix ({largest.name}, "
                          f"{largest.in_features} x {largest.out_features}): peft's identity of its inputs through "
                          "the adapter, B @ A, the dequantized weight and their sum, one matrix at a time "
                          "(measured on the H200)"))
    warnings = _warnings(shape, run)
    if run.nproc > 1 and run.parallel == "fsdp":
        whole = sum(t.bytes for t in terms if t.name in ("nf4_weights", "quant_constants", "layers_16bit"))
        warnings.append(f"parallel fsdp loads the 4-bit model in the computer's memory first: each of the "
                        f"{run.nproc} processes holds {whole / BYTES_PER_GIB:.1f} GiB of RAM while its layers are "
                        "moved onto its card and cut")
    terms = _per_gpu_terms(terms, shape, run) if run.nproc > 1 else terms
    linear_params = shape.num_layers * sum(linear.params for linear in shape.decoder_linears())
    embedding_params = shape.vocab_size * shape.hidden_size * (1 if shape.tied_embeddings else 2)
    return Estimate(terms=terms, approximate=bool(reasons), reasons=reasons,
                    warnings=warnings, total_params=linear_params + embedding_params,
                    trainable_params=lora.params)


FSDP_SHARDED_TERMS = ("nf4_weights", "quant_constants", "lora_weights", "lora_gradients", "optimizer_states")


def _per_gpu_terms(terms: list[Term], shape: ModelShape, run: RunConfig) -> list[Term]:
    """What one of nproc cards holds (the peak is per GPU). ddp: the whole run, at micro_batch_size per card, plus
    the flat fp32 copy of the adapter's gradients the all-reduce sums. fsdp: the decoder layers' 4-bit weights and
    constants, the adapter, its gradients and optimizer states split nproc ways, plus two layers' weights gathered
    whole (the one running and the next, prefetched). The base is loaded on the CPU and cut layer by layer onto the
    cards (training/sharding.py), so no card ever holds it whole. Counted from the layout; NCCL's own buffers not
    measured."""
    if run.parallel == "ddp":
        lora_bytes = next(term.bytes for term in terms if term.name == "lora_weights")
        return [*terms, Term("ddp_gradient_buffer", lora_bytes, f"the adapter's gradients in one fp32 buffer, "
                             f"summed over the {run.nproc} processes (all-reduce); each card holds the whole model")]
    sharded = [Term(t.name, -(-t.bytes // run.nproc), f"{t.note}; split over {run.nproc} cards (FSDP)")
               if t.name in FSDP_SHARDED_TERMS else t for t in terms]
    layer_bytes = sum(t.bytes for t in terms if t.name in ("nf4_weights", "quant_constants")) // shape.num_layers
    sharded.append(Term("fsdp_gathered_layers", 2 * layer_bytes, "two decoder layers' 4-bit weights gathered whole "
                        "at a time (the running one and the prefetched next)"))
    return sharded


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
