"""`qlora-studio bench --memory`: measured peak GPU memory of the engine's training step next to the estimate.
(`qlora-studio bench --speed`, the engine against the plain HF stack, lives in speedbench.py.)

For each architecture a worker process builds a random-init model of that exact shape straight on the
GPU, quantizes it the way loading does (bitsandbytes Linear4bit), then runs the engine's own LoRA setup,
optimizer and training step for a few steps per run configuration, recording torch's peaks and NVML's
whole-GPU used memory. Random weights: no download, same memory as the real model.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from qlora_engine import speedbench
from qlora_engine.config import RunConfig

ROOT = Path(__file__).resolve().parent.parent
MODEL_CONFIGS = ROOT / "tests" / "data" / "model_configs"
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


# ----------------------------------------------------------------------------- the worker (one architecture)
class NvmlPeak:
    """Samples whole-GPU used memory every 20 ms in a thread; keeps the maximum since the last reset."""

    def __init__(self) -> None:
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def used_bytes(self) -> int:
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_bytes = max(self.peak_bytes, self.used_bytes())

    def reset(self) -> None:
        self.peak_bytes = self.used_bytes()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def random_model(model_config: dict[str, Any], cfg: RunConfig, device: str = "cuda") -> Any:
    """A random-init model of this shape, built straight on the device in the compute dtype."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from qlora_engine.models import resolve_compute_dtype

    dtype = resolve_compute_dtype(cfg.compute_dtype, device)
    values = {k: v for k, v in model_config.items() if k not in ("architectures", "transformers_version")}
    config = AutoConfig.for_model(**values)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def random_quantized_model(model_config: dict[str, Any], cfg: RunConfig, device: str = "cuda") -> Any:
    """A random-init model of this shape on the device, every decoder Linear turned into a bitsandbytes Linear4bit."""
    import bitsandbytes as bnb
    import torch

    model = random_model(model_config, cfg, device)
    dtype = model.dtype
    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Linear) or name.endswith("lm_head"):
            continue
        quantized = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                      compute_dtype=dtype, compress_statistics=cfg.double_quant,
                                      quant_type=cfg.quant_type, device="meta")
        quantized.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False,
                                             compress_statistics=cfg.double_quant,
                                             quant_type=cfg.quant_type).to(device)
        if module.bias is not None:
            quantized.bias = torch.nn.Parameter(module.bias.data, requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, quantized)
        del module
    model.is_loaded_in_4bit = True  # as from_pretrained(quantization_config=...) marks it: peft picks its bnb layers
    gc.collect()  # the replaced 16-bit modules reference each other: free them before anything is measured
    if device == "cuda":
        torch.cuda.empty_cache()
    return model


def random_micro_batch(cfg: RunConfig, vocab_size: int, generator: Any) -> dict[str, Any]:
    """Row 0 at full length, the others a quarter shorter: what real data looks like to the engine, which pads
    them to the longest (or packs them end to end, with packing on)."""
    import torch

    from qlora_engine import train
    from qlora_engine.data import Tokenized

    lengths = [cfg.max_length] + [(3 * cfg.max_length) // 4] * (cfg.micro_batch_size - 1)
    rows = [Tokenized(torch.randint(0, vocab_size, (n,), generator=generator).tolist(), [True] * n, 0, False)
            for n in lengths]
    return train.micro_batch(rows, cfg, 0, "cuda")


def measure_one(base: Any, model_config: dict[str, Any], cfg: RunConfig, nvml: NvmlPeak) -> dict[str, Any]:
    import torch

    from qlora_engine import estimate, train

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    nvml.reset()
    model = train.attach_lora(base, cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = train.build_optimizer(cfg, trainable)
    generator = torch.Generator().manual_seed(0)
    vocab = model_config.get("vocab_size") or model_config["text_config"]["vocab_size"]
    step_s, oom = [], False
    try:
        for _ in range(MEASURED_STEPS):
            batch = random_micro_batch(cfg, vocab, generator)
            started = time.perf_counter()
            train.training_step(model, [batch], trainable, optimizer, cfg.max_grad_norm, cfg.chunked_loss)
            torch.cuda.synchronize()
            step_s.append(time.perf_counter() - started)
    except torch.cuda.OutOfMemoryError:
        oom = True
    time.sleep(0.1)  # let the sampler see the last step
    predicted = estimate.estimate_peak(model_config, cfg)
    row = {"max_allocated_bytes": torch.cuda.max_memory_allocated(),
           "max_reserved_bytes": torch.cuda.max_memory_reserved(), "nvml_peak_used_bytes": nvml.peak_bytes,
           "oom": oom, "step_s": [round(s, 3) for s in step_s],
           "tokens_per_s": round(cfg.micro_batch_size * cfg.max_length / min(step_s), 1) if step_s else None,
           "estimate_peak_bytes": predicted.peak_bytes,
           "estimate_terms": {t.name: t.bytes for t in predicted.terms}}
    del optimizer, trainable
    model.unload()  # take the LoRA layers out again: the base is reused for the next configuration
    base.gradient_checkpointing_disable()
    return row


def memory_worker(config_path: Path, runs: list[dict[str, Any]], out_path: Path) -> int:
    import torch

    nvml = NvmlPeak()
    idle_used = nvml.used_bytes()
    model_config = json.loads(config_path.read_text())
    base_cfg = RunConfig(device="cuda")
    base = random_quantized_model(model_config, base_cfg)
    with open(out_path, "a", encoding="utf-8") as out:
        for run in runs:
            cfg = dataclasses.replace(base_cfg, **run).validate()
            row = measure_one(base, model_config, cfg, nvml)
            row.update({"model": config_path.stem, **run, "idle_gpu_used_bytes": idle_used, "packing": cfg.packing,
                        "chunked_loss": cfg.chunked_loss, "fused_lora": cfg.fused_lora,
                        "compile_layers": cfg.compile_layers, "fp32_residual": cfg.fp32_residual,
                        "gpu": torch.cuda.get_device_name(0)})
            out.write(json.dumps(row) + "\n")
            out.flush()
            print(f"{config_path.stem:16s} len {cfg.max_length:5d} batch {cfg.micro_batch_size} r {cfg.lora_r:2d} "
                  f"gc {int(cfg.gradient_checkpointing)}  "
                  f"measured {(row['nvml_peak_used_bytes'] - idle_used) / 2**30:6.2f} GiB  "
                  f"estimate {row['estimate_peak_bytes'] / 2**30:6.2f} GiB"
                  f"{'  OOM' if row['oom'] else ''}", flush=True)
    nvml.close()
    return 0


# ----------------------------------------------------------------------------- the command
def bench_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="qlora-studio bench", description=__doc__)
    parser.add_argument("--memory", action="store_true", help="measure peak memory vs the estimate (CUDA only)")
    parser.add_argument("--models", help="comma list of architectures from the grid (default: all)")
    parser.add_argument("--per-model", type=int, default=0, help="only the first N configurations of each model")
    parser.add_argument("--out", help="--memory: JSON lines, one configuration each (default bench-memory.jsonl); "
                        "--speed: one JSON file of every result")
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG_JSON", "RUNS_JSON"), help=argparse.SUPPRESS)
    speedbench.add_speed_arguments(parser)
    args = parser.parse_args(argv)
    if args.speed_worker:
        return speedbench.speed_worker(args.speed_worker)
    if args.speed:
        return speedbench.speed_main(args)
    args.out = args.out or "bench-memory.jsonl"
    if args.worker:
        return memory_worker(Path(args.worker[0]), json.loads(args.worker[1]), Path(args.out))
    if not args.memory:
        parser.error("choose what to measure: --memory or --speed")
    only = set(args.models.split(",")) if args.models else None
    failures = 0
    for name, runs in grid_runs(only, args.per_model).items():
        command = [sys.executable, "-m", "qlora_engine", "bench", "--out", args.out, "--worker",
                   str(MODEL_CONFIGS / f"{name}.json"), json.dumps(runs)]
        failures += subprocess.run(command, env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode != 0
    return 1 if failures else 0
