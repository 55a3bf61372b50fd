"""`qlora-studio bench --memory --grid consumer`: the estimate against the engine's measured peak as on consumer cards.

Each configuration runs in its own process (a process that trained one configuration keeps paged optimizer buffers
bitsandbytes never frees, which would bias the next), with torch's allocator capped at the card's memory minus what
the process uses outside it (the CUDA context), so a configuration that would not fit that card runs out of memory
here too. Several processes share the GPU at once, as many as its memory holds while they build their models; each
process's own peak comes from NVML's per-process accounting, so they don't see each other.

The architectures are the catalog's, from 0.5B to 14B (random init, real shapes); lengths 512-16,384, batch 1-8,
rank 8-64, checkpointing on and off, bf16 and fp16, DoRA and the activation memory budget on a few, caps of 8, 12,
16 and 24 GiB.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from qlora_engine.bench.models import MODEL_CONFIGS

GIB = 2**30
OUTSIDE_ENV = "QLORA_BENCH_OUTSIDE_TORCH_BYTES"
# (architecture, max_length, micro_batch_size, lora_r, gradient_checkpointing, compute_dtype, card GiB, other options)
CONSUMER_GRID: list[tuple[str, int, int, int, bool, str, int, dict[str, Any]]] = [
    ("qwen2.5-0.5b", 2048, 4, 16, True, "bf16", 8, {}), ("qwen2.5-0.5b", 8192, 1, 64, True, "fp16", 8, {}),
    ("qwen2.5-0.5b", 1024, 8, 8, False, "bf16", 8, {}), ("qwen2.5-0.5b", 16384, 1, 16, True, "bf16", 12, {}),
    ("qwen3-0.6b", 4096, 2, 16, True, "bf16", 8, {}), ("qwen3-0.6b", 512, 8, 32, False, "fp16", 8, {}),
    ("qwen3-0.6b", 2048, 1, 16, True, "bf16", 8, {"use_dora": True}),
    ("llama-3.2-1b", 2048, 2, 16, True, "fp16", 8, {}), ("llama-3.2-1b", 8192, 1, 16, True, "bf16", 8, {}),
    ("llama-3.2-1b", 16384, 1, 8, True, "bf16", 12, {}), ("llama-3.2-1b", 1024, 4, 64, False, "bf16", 12, {}),
    ("qwen2.5-1.5b", 4096, 1, 16, True, "bf16", 8, {}), ("qwen2.5-1.5b", 2048, 8, 16, True, "bf16", 12, {}),
    ("qwen2.5-1.5b", 512, 4, 16, False, "fp16", 8, {}),
    ("qwen2.5-1.5b", 2048, 2, 32, True, "bf16", 8, {"use_dora": True}),
    ("gemma-2-2b", 2048, 1, 16, True, "bf16", 8, {}), ("gemma-2-2b", 4096, 2, 16, True, "fp16", 12, {}),
    ("gemma-2-2b", 1024, 1, 8, False, "bf16", 12, {}),
    ("llama-3.2-3b", 2048, 1, 16, True, "fp16", 8, {}), ("llama-3.2-3b", 4096, 4, 16, True, "bf16", 16, {}),
    ("llama-3.2-3b", 8192, 1, 32, True, "bf16", 12, {}), ("llama-3.2-3b", 1024, 2, 16, False, "bf16", 16, {}),
    ("llama-3.2-3b", 2048, 1, 16, True, "bf16", 12, {"use_dora": True}),
    ("phi-3.5-mini", 2048, 1, 16, True, "bf16", 8, {}), ("phi-3.5-mini", 4096, 2, 8, True, "fp16", 12, {}),
    ("phi-3.5-mini", 512, 4, 16, False, "bf16", 12, {}),
    ("qwen3-4b", 4096, 1, 16, True, "bf16", 12, {}), ("qwen3-4b", 2048, 4, 64, True, "bf16", 16, {}),
    ("qwen3-4b", 16384, 1, 16, True, "bf16", 24, {}),
    ("mistral-7b-v0.3", 2048, 1, 16, True, "bf16", 8, {}), ("mistral-7b-v0.3", 4096, 2, 16, True, "fp16", 12, {}),
    ("mistral-7b-v0.3", 8192, 1, 16, True, "bf16", 16, {}), ("mistral-7b-v0.3", 1024, 1, 16, False, "bf16", 16, {}),
    ("llama-3.1-8b", 512, 1, 16, True, "bf16", 8, {}), ("llama-3.1-8b", 2048, 1, 16, True, "bf16", 12, {}),
    ("llama-3.1-8b", 4096, 1, 16, True, "fp16", 12, {}), ("llama-3.1-8b", 8192, 2, 16, True, "bf16", 24, {}),
    ("llama-3.1-8b", 16384, 1, 16, True, "bf16", 24, {}), ("llama-3.1-8b", 2048, 4, 64, True, "bf16", 16, {}),
    ("llama-3.1-8b", 2048, 1, 16, True, "bf16", 16, {"use_dora": True}),
    ("llama-3.1-8b", 2048, 1, 16, True, "bf16", 16, {"activation_memory_budget": 0.25}),
    ("qwen3-8b", 2048, 2, 16, True, "bf16", 12, {}), ("qwen3-8b", 8192, 1, 32, True, "fp16", 16, {}),
    ("gemma-2-9b", 2048, 1, 16, True, "bf16", 12, {}), ("gemma-2-9b", 4096, 1, 16, True, "bf16", 16, {}),
    ("mistral-nemo-12b", 2048, 1, 16, True, "bf16", 12, {}), ("mistral-nemo-12b", 4096, 2, 16, True, "bf16", 16, {}),
    ("mistral-nemo-12b", 1024, 1, 16, False, "bf16", 24, {}),
    ("qwen2.5-14b", 2048, 1, 16, True, "bf16", 12, {}), ("qwen2.5-14b", 4096, 1, 32, True, "fp16", 16, {}),
    ("qwen2.5-14b", 8192, 1, 16, True, "bf16", 24, {}),
]


# DoRA's peak, uncapped (card 0): every DoRA row of the grid ran out of memory under its cap, so it is measured
# where nothing stops it; and the 12B / 14B shapes the first consumer run had no time left for
PROBE_GRID: list[tuple[str, int, int, int, bool, str, int, dict[str, Any]]] = [
    ("qwen2.5-1.5b", 2048, 2, 32, True, "bf16", 0, {"use_dora": True}),
    ("llama-3.2-3b", 2048, 1, 16, True, "bf16", 0, {"use_dora": True}),
    ("llama-3.1-8b", 2048, 1, 16, True, "bf16", 0, {"use_dora": True}),
    ("mistral-nemo-12b", 2048, 1, 16, True, "bf16", 12, {}), ("qwen2.5-14b", 2048, 1, 16, True, "bf16", 12, {}),
]
# DoRA's term refitted on the probe's three rows, checked here on shapes, lengths, batches, ranks and dtypes it was
# not fitted on; the 14B shape uncapped; DoRA on the 8B under a 12 GiB cap (the verdict against the run)
DORA_CHECK_GRID: list[tuple[str, int, int, int, bool, str, int, dict[str, Any]]] = [
    ("qwen2.5-0.5b", 4096, 1, 16, True, "bf16", 0, {"use_dora": True}),
    ("llama-3.2-1b", 2048, 4, 16, True, "bf16", 0, {"use_dora": True}),
    ("qwen3-4b", 2048, 1, 64, True, "bf16", 0, {"use_dora": True}),
    ("mistral-7b-v0.3", 4096, 1, 16, True, "bf16", 0, {"use_dora": True}),
    ("llama-3.1-8b", 1024, 2, 32, True, "fp16", 0, {"use_dora": True}),
    ("mistral-nemo-12b", 4096, 1, 16, True, "bf16", 0, {"use_dora": True}),
    ("qwen2.5-14b", 2048, 1, 16, True, "bf16", 0, {}),
    ("llama-3.1-8b", 2048, 1, 16, True, "bf16", 12, {"use_dora": True}),
]
# After the optimizer default became fused AdamW: the precision budget (never measured on a GPU before), DoRA under
# consumer caps on today's path, and the default optimizer on the largest catalog shapes
TODAY_GRID: list[tuple[str, int, int, int, bool, str, int, dict[str, Any]]] = [
    ("qwen2.5-1.5b", 2048, 2, 16, True, "bf16", 8, {"precision_budget_bits": 6.0}),
    ("llama-3.2-3b", 2048, 1, 16, True, "bf16", 8, {"precision_budget_bits": 4.5}),
    ("llama-3.2-3b", 4096, 1, 16, True, "bf16", 8, {"precision_budget_bits": 4.25}),
    ("qwen3-4b", 2048, 2, 16, True, "bf16", 12, {"precision_budget_bits": 4.5}),
    ("llama-3.1-8b", 2048, 1, 16, True, "bf16", 12, {"precision_budget_bits": 4.25}),
    ("llama-3.1-8b", 2048, 1, 16, True, "bf16", 16, {"precision_budget_bits": 5.0}),
    ("mistral-7b-v0.3", 4096, 1, 16, True, "fp16", 16, {"precision_budget_bits": 4.5}),
    ("qwen2.5-1.5b", 2048, 2, 32, True, "bf16", 8, {"use_dora": True}),
    ("llama-3.2-3b", 2048, 1, 16, True, "bf16", 8, {"use_dora": True}),
    ("qwen3-4b", 4096, 1, 16, True, "bf16", 12, {"use_dora": True}),
    ("mistral-7b-v0.3", 2048, 1, 16, True, "bf16", 12, {"use_dora": True}),
    ("llama-3.1-8b", 4096, 1, 16, True, "bf16", 16, {"use_dora": True}),
    ("llama-3.1-8b", 8192, 1, 16, True, "bf16", 24, {"use_dora": True}),
    ("llama-3.1-8b", 2048, 1, 16, True, "bf16", 12, {}), ("qwen3-8b", 4096, 1, 16, True, "bf16", 16, {}),
    ("mistral-nemo-12b", 2048, 1, 16, True, "bf16", 16, {}), ("qwen2.5-14b", 4096, 1, 16, True, "bf16", 24, {}),
    ("qwen3-14b", 2048, 1, 16, True, "bf16", 16, {}),
]
GRIDS = {"consumer": CONSUMER_GRID, "probe": PROBE_GRID, "dora-check": DORA_CHECK_GRID, "today": TODAY_GRID}


def consumer_runs(only: set[str] | None = None, grid: str = "consumer") -> list[dict[str, Any]]:
    """The grid as runs: RunConfig fields plus the model's file stem and the card's memory (0: uncapped)."""
    return [{"model": name, "max_length": length, "micro_batch_size": batch, "lora_r": rank, "lora_alpha": 2 * rank,
             "gradient_checkpointing": checkpointing, "compute_dtype": dtype, "gpu_memory_gib": card, **extra}
            for name, length, batch, rank, checkpointing, dtype, card, extra in GRIDS[grid]
            if not only or name in only]


def build_footprint_gib(model: str) -> float:
    """What a worker holds on the GPU at most while it builds: its 16-bit random model before quantizing (the
    bench builds 16-bit, then quantizes), or its card's cap after, plus a margin."""
    from qlora_engine.planning.model_shape import load_model_config, model_shape

    shape, _ = model_shape(load_model_config(MODEL_CONFIGS / f"{model}.json"))
    params = shape.num_layers * sum(linear.params for linear in shape.decoder_linears()) \
        + 2 * shape.vocab_size * shape.hidden_size
    return 2 * params / GIB + 2


def cap_process_memory(gpu_memory_gib: float, outside_torch_bytes: int) -> None:
    """Let torch's allocator hold the card's memory minus what this process uses outside it (context, kernels):
    past it, an allocation frees torch's cached blocks and retries, then raises out-of-memory, as on that card."""
    import torch

    total_bytes = torch.cuda.get_device_properties(0).total_memory
    allowed_bytes = gpu_memory_gib * GIB - outside_torch_bytes
    torch.cuda.set_per_process_memory_fraction(max(0.0, allowed_bytes) / total_bytes)


def run_grid(runs: list[dict[str, Any]], out: Path, parallel: int, gpu_budget_gib: float = 120.0,
             timeout_s: float = 420.0) -> int:
    """Every run in its own worker process, up to `parallel` at once within `gpu_budget_gib` of build footprint;
    each worker appends its row to its own file, merged into `out` in grid order at the end."""
    parts = out.parent / f".{out.name}.parts"
    parts.mkdir(parents=True, exist_ok=True)
    waiting = list(enumerate(runs))
    running: list[tuple[subprocess.Popen, int, float, float]] = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    failures = 0
    if parallel > 1 and waiting:  # the first alone: does NVML count each process's memory on this machine?
        index, run = waiting.pop(0)
        failures += _start(index, run, parts, env).wait(timeout=timeout_s) != 0
        first = [json.loads(line) for line in (parts / f"{index:03d}.jsonl").read_text().splitlines() if line]
        if first and not first[0].get("process_peak_used_bytes"):
            # it doesn't (a container's process ids): the later rows count torch's peak reserved plus what this
            # first process, alone on the GPU, used outside torch's allocator
            row = first[0]
            env[OUTSIDE_ENV] = str(row["nvml_peak_used_bytes"] - row["idle_gpu_used_bytes"] - row["max_reserved_bytes"])
            print(f"NVML does not count memory per process here: later rows add {int(env[OUTSIDE_ENV]) / GIB:.2f} GiB "
                  "outside torch's allocator to its peak reserved", flush=True)
    while waiting or running:
        for proc, index, footprint, started in list(running):
            if proc.poll() is None and time.monotonic() - started < timeout_s:
                continue
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            failures += proc.returncode != 0
            running.remove((proc, index, footprint, started))
        while waiting and len(running) < parallel:
            index, run = waiting[0]
            footprint = max(build_footprint_gib(run["model"]), (run["gpu_memory_gib"] or 40) + 2)
            if running and sum(r[2] for r in running) + footprint > gpu_budget_gib:
                break
            waiting.pop(0)
            running.append((_start(index, run, parts, env), index, footprint, time.monotonic()))
        time.sleep(0.5)
    with open(out, "a", encoding="utf-8") as merged:
        for part in sorted(parts.glob("*.jsonl")):
            merged.write(part.read_text(encoding="utf-8"))
    return 1 if failures else 0


def _start(index: int, run: dict[str, Any], parts: Path, env: dict[str, str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "qlora_engine", "bench", "--out", str(parts / f"{index:03d}.jsonl"),
               "--worker", str(MODEL_CONFIGS / f"{run['model']}.json"), json.dumps([run])]
    return subprocess.Popen(command, env=env)


def outside_torch_assumed() -> int:
    """Set by run_grid where NVML can't count per process: the outside-torch bytes a worker's row assumes."""
    return int(os.environ.get(OUTSIDE_ENV, "0"))
