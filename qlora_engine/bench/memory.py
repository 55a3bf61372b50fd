"""`qlora-studio bench --memory`: measured peak GPU memory of the engine's training step next to the estimate.

For each architecture a worker process builds a random-init model of that exact shape straight on the
GPU, quantizes it the way loading does (bitsandbytes Linear4bit), then runs the engine's own LoRA setup,
optimizer and training step for a few steps per run configuration, recording torch's peaks and NVML's
whole-GPU used memory. Random weights: no download, same memory as the real model.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import time
from pathlib import Path
from typing import Any

from qlora_engine.bench.models import NvmlPeak, random_planned_model, random_quantized_model
from qlora_engine.protocol.config import RunConfig

MEASURED_STEPS = 3

# (architecture file, max_length, micro_batch_size, lora_r, gradient_checkpointing): 36 configurations.
MEMORY_GRID = [
    ("llama-3.2-1b", 512, 1, 16, True), ("llama-3.2-1b", 2048, 1, 16, True), ("llama-3.2-1b", 2048, 4, 16, True),
    ("llama-3.2-1b", 4096, 2, 16, True), ("llama-3.2-1b", 8192, 1, 16, True), ("llama-3.2-1b", 1024, 8, 16, True),
    ("llama-3.2-1b", 512, 1, 16, False), ("llama-3.2-1b", 2048, 1, 64, False), ("llama-3.2-1b", 2048, 2, 8, True),
    ("llama-3.2-3b", 512, 1, 16, True), ("llama-3.2-3b", 2048, 1, 16, True), ("llama-3.2-3b", 2048, 4, 32, True),
    ("llama-3.2-3b", 8192, 1, 16, True), ("llama-3.2-3b", 1024, 2, 16, False), ("llama-3.2-3b", 4096, 1, 64, True),
    ("llama-3.1-8b", 512, 1, 16, True), ("llama-3.1-8b", 2048, 1, 16, True), ("llama-3.1-8b", 2048, 2, 16, True),
    ("llama-3.1-8b", 4096, 1, 64, True), ("llama-3.1-8b", 8192, 1, 16, True), ("llama-3.1-8b", 1024, 1, 16, False),
    ("llama-3.1-8b", 512, 8, 8, True),
    ("mistral-7b-v0.3", 2048, 1, 16, True), ("mistral-7b-v0.3", 4096, 2, 16, True),
    ("mistral-7b-v0.3", 8192, 1, 32, True), ("mistral-7b-v0.3", 512, 8, 16, True),
    ("mistral-7b-v0.3", 1024, 1, 16, False),
    ("qwen2.5-7b", 2048, 1, 16, True), ("qwen2.5-7b", 4096, 1, 16, True), ("qwen2.5-7b", 1024, 4, 8, True),
    ("qwen2.5-7b", 512, 1, 64, False),
    ("llama-2-13b", 2048, 1, 16, True), ("llama-2-13b", 4096, 1, 16, True), ("llama-2-13b", 512, 4, 8, True),
    ("llama-2-13b", 8192, 1, 16, True), ("llama-2-13b", 1024, 1, 32, False),
]


def grid_runs(only: set[str] | None = None, per_model: int = 0) -> dict[str, list[dict[str, Any]]]:
    by_model: dict[str, list[dict[str, Any]]] = {}
    for name, length, batch, rank, checkpointing in MEMORY_GRID:
        if (only and name not in only) or (per_model and len(by_model.get(name, [])) >= per_model):
            continue
        by_model.setdefault(name, []).append({"max_length": length, "micro_batch_size": batch, "lora_r": rank,
                                              "lora_alpha": 2 * rank, "gradient_checkpointing": checkpointing})
    return by_model


def micro_batch_lengths(cfg: RunConfig) -> list[int]:
    """The bench's rows: the first at full length, the others a quarter shorter (calibration_check restates this
    rule for rows measured before they carried step_tokens; planning can't import the bench)."""
    return [cfg.max_length] + [(3 * cfg.max_length) // 4] * (cfg.micro_batch_size - 1)


def random_micro_batch(cfg: RunConfig, vocab_size: int, generator: Any) -> dict[str, Any]:
    """Row 0 at full length, the others a quarter shorter: what real data looks like to the engine, which pads
    them to the longest (or packs them end to end, with packing on)."""
    import torch

    from qlora_engine.training import loop
    from qlora_engine.training.data import Tokenized

    lengths = micro_batch_lengths(cfg)
    rows = [Tokenized(torch.randint(0, vocab_size, (n,), generator=generator).tolist(), [True] * n, 0, False)
            for n in lengths]
    return loop.micro_batch(rows, cfg, 0, "cuda")


def measure_one(base: Any, model_config: dict[str, Any], cfg: RunConfig, nvml: NvmlPeak,
                gpu_memory_gib: float = 0.0) -> dict[str, Any]:
    """Three engine steps of `cfg` on `base`; with `gpu_memory_gib`, torch's allocator capped as on that card."""
    import torch

    from qlora_engine.bench.memory_grid import cap_process_memory, outside_torch_assumed
    from qlora_engine.planning.advice import fit_verdict
    from qlora_engine.planning.memory import estimate_peak, load_calibration
    from qlora_engine.training import loop

    gc.collect()
    torch.cuda.empty_cache()
    if gpu_memory_gib:
        nvml.reset()
        # what this process uses outside torch's allocator; where NVML can't tell per process, the calibrated context
        outside = (nvml.process_peak_bytes - torch.cuda.memory_reserved() if nvml.process_peak_bytes
                   else outside_torch_assumed() or int(load_calibration()["cuda_context_bytes"]))
        cap_process_memory(gpu_memory_gib, outside)
    torch.cuda.reset_peak_memory_stats()
    nvml.reset()
    step_s, oom = [], False
    model = trainable = optimizer = None
    try:
        model = loop.attach_lora(base, cfg)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = loop.build_optimizer(cfg, trainable)
        scaler = loop.loss_scaler(torch.float16 if cfg.compute_dtype == "fp16" else None, "cuda")
        generator = torch.Generator().manual_seed(0)
        vocab = model_config.get("vocab_size") or model_config["text_config"]["vocab_size"]
        for _ in range(MEASURED_STEPS):
            batch = random_micro_batch(cfg, vocab, generator)
            started = time.perf_counter()
            loop.training_step(model, [batch], trainable, optimizer, cfg.max_grad_norm, cfg.chunked_loss,
                               scaler=scaler)
            torch.cuda.synchronize()
            step_s.append(time.perf_counter() - started)
    except torch.cuda.OutOfMemoryError:
        oom = True
    time.sleep(0.1)  # let the sampler see the last step
    predicted = estimate_peak(model_config, cfg)
    row = {"max_allocated_bytes": torch.cuda.max_memory_allocated(),
           "max_reserved_bytes": torch.cuda.max_memory_reserved(), "nvml_peak_used_bytes": nvml.peak_bytes,
           "process_peak_used_bytes": nvml.process_peak_bytes, "outside_torch_assumed_bytes": outside_torch_assumed(),
           "estimate_verdict": fit_verdict(predicted, int(gpu_memory_gib * 2**30)) if gpu_memory_gib else None,
           "oom": oom, "step_s": [round(s, 3) for s in step_s],
           "step_tokens": sum(micro_batch_lengths(cfg)),
           "tokens_per_s": round(cfg.micro_batch_size * cfg.max_length / min(step_s), 1) if step_s else None,
           "estimate_peak_bytes": predicted.peak_bytes,
           "estimate_terms": {t.name: t.bytes for t in predicted.terms}}
    del optimizer, trainable
    if model is not None:
        model.unload()  # take the LoRA layers out again: the base is reused for the next configuration
    base.gradient_checkpointing_disable()
    return row


def memory_worker(config_path: Path, runs: list[dict[str, Any]], out_path: Path) -> int:
    import torch

    nvml = NvmlPeak(process_id=os.getpid())
    idle_used = nvml.used_bytes()
    model_config = json.loads(config_path.read_text())
    # one compute dtype and precision budget per process (the consumer grid runs one configuration per process)
    base_cfg = RunConfig(device="cuda", compute_dtype=runs[0].get("compute_dtype", "auto"),
                         precision_budget_bits=runs[0].get("precision_budget_bits", 0.0))
    base = (random_planned_model(model_config, base_cfg) if base_cfg.precision_budget_bits > 0
            else random_quantized_model(model_config, base_cfg))
    with open(out_path, "a", encoding="utf-8") as out:
        for run in runs:
            options = {k: v for k, v in run.items() if k not in ("model", "gpu_memory_gib")}
            cfg = dataclasses.replace(base_cfg, **options).validate()
            row = measure_one(base, model_config, cfg, nvml, run.get("gpu_memory_gib", 0.0))
            row.update({"model": config_path.stem, **run, "idle_gpu_used_bytes": idle_used,
                        "optimizer": cfg.optimizer, "packing": cfg.packing, "chunked_loss": cfg.chunked_loss,
                        "fused_lora": cfg.fused_lora, "compile_layers": cfg.compile_layers,
                        "fp32_residual": cfg.fp32_residual, "gpu": torch.cuda.get_device_name(0)})
            out.write(json.dumps(row) + "\n")
            out.flush()
            measured = row["process_peak_used_bytes"] or (
                row["max_reserved_bytes"] + row["outside_torch_assumed_bytes"] if row["outside_torch_assumed_bytes"]
                else row["nvml_peak_used_bytes"] - idle_used)
            card = f"  card {run['gpu_memory_gib']} GiB: {row['estimate_verdict']}" if run.get("gpu_memory_gib") else ""
            print(f"{config_path.stem:16s} len {cfg.max_length:5d} batch {cfg.micro_batch_size} r {cfg.lora_r:2d} "
                  f"gc {int(cfg.gradient_checkpointing)} {cfg.compute_dtype}  measured {measured / 2**30:6.2f} GiB  "
                  f"estimate {row['estimate_peak_bytes'] / 2**30:6.2f} GiB{card}{'  OOM' if row['oom'] else ''}",
                  flush=True)
    nvml.close()
    return 0
