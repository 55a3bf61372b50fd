"""Against free GPU memory: the verdict, the longest max_length and largest batch that fit, fixes, fit to this GPU.

Every number comes from memory.estimate_peak; nothing here counts bytes itself.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from qlora_engine.planning.memory import Estimate, estimate_peak, format_gib
from qlora_engine.planning.model_shape import model_shape
from qlora_engine.protocol.config import RunConfig
from qlora_engine.protocol.errors import EngineError, model_config_error
from qlora_engine.protocol.queries import Advice, Fix

TIGHT_MARGIN_FRACTION = 0.10  # a peak within this fraction of free memory is "tight"
SEARCH_MAX_BATCH = 1024
MIN_MAX_LENGTH = 16  # RunConfig's minimum


def fit_verdict(estimate: Estimate, free_bytes: int) -> str:
    """'fits', 'tight' (within TIGHT_MARGIN_FRACTION of free memory) or "won't fit"."""
    return peak_verdict(estimate.peak_bytes, free_bytes)


def peak_verdict(peak_bytes: int, free_bytes: int) -> str:
    """The verdict for a peak, estimated or measured (the first step's), against the memory the run has."""
    if peak_bytes > free_bytes:
        return "won't fit"
    if peak_bytes > free_bytes * (1 - TIGHT_MARGIN_FRACTION):
        return "tight"
    return "fits"


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
                             _fits(model_config, changed, free_bytes), kind="memory"))
        fixes.sort(key=lambda fix: (not fix.fits_after, -fix.saving_bytes))
        fixes = _combined_fix(model_config, run, free_bytes, fixes) + fixes
    else:
        fixes = _speed_fixes(model_config, run, free_bytes, peak_bytes)
    return Advice(verdict=verdict, peak_bytes=peak_bytes, free_bytes=free_bytes,
                  max_length_that_fits=max_length_that_fits(model_config, run, free_bytes),
                  batch_that_fits=batch_that_fits(model_config, run, free_bytes), fixes=fixes)


# Spare memory spent on speed, each measured on an H200 (Llama-3.1-8B, 1 x 2048 tokens, README "Where the engine's
# step time went"): the fused AdamW 1.16x the paged 8-bit optimizer's tokens/s, the activation memory budget 0.25
# 1.14x alone and 1.22x on top of the fused AdamW.
SPEED_SWITCHES = (("fused AdamW (optimizer adamw): one kernel updates every LoRA tensor; measured 1.16x faster steps",
                   {"optimizer": "adamw"}),
                  ("keep a quarter of each layer's activations for the backward (activation_memory_budget 0.25) "
                   "instead of recomputing them; measured 1.14-1.22x faster steps", {"activation_memory_budget": 0.25}))


def _speed_fixes(model_config: dict[str, Any], run: RunConfig, free_bytes: int, peak_bytes: int) -> list[Fix]:
    """For a run that fits: the changes that make its steps faster and still fit, each with what it costs
    (a negative saving). Only on a GPU: the compiled layers and the fused optimizer are CUDA's."""
    if run.device == "cpu":
        return []
    wanted = [(description, changes) for description, changes in SPEED_SWITCHES
              if any(getattr(run, name) != value for name, value in changes.items())
              and ("activation_memory_budget" not in changes or (run.compile_layers and run.gradient_checkpointing
                                                                 and not run.use_dora))]
    if len(wanted) == 2:  # both together first, where both fit
        both = {**wanted[0][1], **wanted[1][1]}
        wanted.insert(0, (f"both: {describe_changes(both)}", both))
    fixes = []
    for description, changes in wanted:
        changed = _with(run, **changes)
        if _fits(model_config, changed, free_bytes):
            fixes.append(Fix(description, peak_bytes - estimate_peak(model_config, changed).peak_bytes, changes,
                             True, kind="speed"))
    return fixes


def _combined_fix(model_config: dict[str, Any], run: RunConfig, free_bytes: int,
                  single_fixes: list[Fix]) -> list[Fix]:
    """fit_to_gpu's changes as one fix, unless nothing fits or a single fix is the same change."""
    try:
        changes = fit_to_gpu(model_config, run, free_bytes)
    except EngineError:
        return []
    if not changes or any(fix.config_changes == changes for fix in single_fixes):
        return []
    saving = estimate_peak(model_config, run).peak_bytes - estimate_peak(model_config, _with(run, **changes)).peak_bytes
    return [Fix(f"fit to this GPU: {describe_changes(changes)}", saving, changes, True, kind="memory")]


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
        raise model_config_error(f"even batch 1 with max_length {MIN_MAX_LENGTH} won't fit in {format_gib(free_bytes)}",
                                 "Pick a smaller model, or free GPU memory (close other programs using the GPU).")
    if length < run.max_length:
        changes["max_length"] = _round_length(length)
    effective = run.micro_batch_size * run.grad_accum
    sized = _with(run, **changes)
    batch = max(b for b in range(1, effective + 1) if effective % b == 0
                and (b == 1 or _fits(model_config, _with(sized, micro_batch_size=b), free_bytes)))
    changes.update({"micro_batch_size": batch, "grad_accum": effective // batch})
    return {name: value for name, value in changes.items() if getattr(run, name) != value}


def non_finite_loss_advice(compute_dtype: str, bf16_supported: bool) -> str:
    """What to do when the loss became NaN or inf, for the dtype the run used and what this device can do:
    bf16 is only offered where the hardware has it (GPUs of compute capability 8.0+), never on a T4 or V100."""
    kept = " The last checkpoint is kept: resume from it with --resume and the changed option."
    if compute_dtype == "float16":
        if bf16_supported:
            return ("This device supports bf16, which has fp32's range: set compute_dtype bf16 (or auto), or lower "
                    "the learning rate." + kept)
        return ("This GPU has no bf16 (it needs compute capability 8.0), so fp16 with loss scaling is its fast "
                "option: lower the learning rate (e.g. by half) and keep max_grad_norm on (1.0); if it happens "
                "again, compute_dtype fp32 is slower and needs more memory but cannot overflow." + kept)
    return ("Lower the learning rate (e.g. by half) and keep max_grad_norm on (1.0); check the data for rows "
            "that are empty or far longer than the rest." + kept)
