"""The tables `bench --speed` prints: tokens/s and memory per stack and workload against the plain stack, memory
per sequence length, and each run's numerical stability (bench/speed.py runs the stacks)."""
from __future__ import annotations

import math
from typing import Any

from qlora_engine.bench.ddp import run_label

GIB = 2**30
# the stacks bench/speed.py can run, with the names the tables give them
STACKS = {
    "plain": "plain HF QLoRA",
    "plain_liger": "plain HF QLoRA + Liger kernels",
    "plain_fp32": "plain HF QLoRA computed in fp32 (the reference)",
    "lora16": "16-bit LoRA (no quantization)",
    "engine": "QLoRA Studio engine",
    "engine_eager": "engine, compiled layers off",
    "engine_bf16_residual": "engine, bf16 residual stream",
    "engine_unfused": "engine, fused LoRA and compiled layers off",
    "engine_baseline": "engine, every speed switch off",
    "unsloth": "Unsloth (documented QLoRA recipe)",
}


def format_table(results: list[dict[str, Any]], model: str) -> str:
    """One table per workload; ratios against the plain stack of the same workload."""
    lines = []
    for workload in dict.fromkeys(r["workload"] for r in results):
        rows = [r for r in results if r["workload"] == workload]
        plain = next((r for r in rows if r["stack"] == "plain" and not r.get("error") and not r.get("oom")), None)
        lines += [f"\n{model}, workload '{workload}'",
                  "| stack | tokens/s | vs plain | peak allocated GiB | vs plain | GPU used GiB | first / last loss "
                  "| max loss diff vs plain |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(_table_row(r, plain))
    return "\n".join(lines)


def format_lengths(results: list[dict[str, Any]], default_budget_gib: float = 8.0) -> str:
    """The long workload: memory and time per sequence length, and the longest row measured within the budget."""
    lines = []
    for r in (r for r in results if r["workload"] == "long" and r.get("per_length")):
        card = f", as on a {r['gpu_memory_gib']:g} GiB card" if r.get("gpu_memory_gib") else ""
        budget_gib = r.get("gpu_memory_gib") or default_budget_gib
        lines += [f"\n{STACKS.get(r['stack'], r['stack'])}: one row of each length, batch 1{card}",
                  "| tokens | peak allocated GiB | GPU used GiB | step s | tokens/s |", "|---:|---:|---:|---:|---:|"]
        for point in r["per_length"]:
            lines.append(f"| {point['length']} | {_gib(point, 'max_allocated_bytes')} | "
                         f"{_gib(point, 'nvml_peak_used_bytes')} | {point['step_s']:.2f} | "
                         f"{point['length'] / point['step_s']:.0f} |")
        within = [p["length"] for p in r["per_length"] if p.get("nvml_peak_used_bytes", 0) <= budget_gib * GIB]
        lines.append(f"longest measured row within {budget_gib:g} GiB of GPU memory: "
                     f"{max(within) if within else 'none'} tokens"
                     + (f"; out of memory at {r['oom']['length']} tokens" if r.get("oom") else ""))
    return "\n".join(lines)


def format_stability(results: list[dict[str, Any]]) -> str:
    """Per stack and workload: compute dtype, non-finite losses and gradient norms, steps the loss scaler skipped,
    the mean loss difference from the plain stack and the LoRA init checksum (equal sums: the same init)."""
    lines = ["\n| stack | workload | compute dtype | steps | non-finite losses | non-finite grad norms | "
             "scaler-skipped steps | mean loss diff vs plain | LoRA A[0] sum |",
             "|---|---|---|---:|---:|---:|---|---:|---:|"]
    for r in results:
        if r.get("error") or not r.get("losses"):
            continue
        plain = next((p for p in results if p["stack"] == "plain" and p["workload"] == r["workload"]
                      and p.get("losses") and not p.get("error")), None)
        mean = ""
        if plain and r["stack"] != "plain" and r.get("batch_scale", 1) == 1:  # the plain stack's rows per step
            pairs = [(a, b) for a, b in zip(r["losses"], plain["losses"]) if math.isfinite(a) and math.isfinite(b)]
            mean = f"{sum(abs(a - b) / abs(b) for a, b in pairs) / len(pairs):.2%}" if pairs else ""
        sums = (r.get("lora_init") or {}).get("sums") or [""]
        lines.append(f"| {_run_name(r)} | {r['workload']} | {r.get('compute_dtype')} | "
                     f"{len(r['losses'])} | {r.get('nonfinite_losses')} | {r.get('nonfinite_grad_norms')} | "
                     f"{len(r.get('skipped_steps') or [])} | {mean} | {sums[0]} |")
    return "\n".join(lines)


def _gib(values: dict[str, Any], key: str) -> str:
    return f"{values[key] / GIB:.2f}" if key in values else ""


def _run_name(r: dict[str, Any]) -> str:
    return run_label(r, STACKS.get(r["stack"], r["stack"]))


def _table_row(r: dict[str, Any], plain: dict[str, Any] | None) -> str:
    name = _run_name(r)
    if r.get("error"):
        return f"| {name} | failed: {r['error'][:80]} | | | | | | |"
    if r.get("oom"):
        return f"| {name} | out of memory at {r['oom']['length']} tokens | | | | | | |"

    def ratio(key: str) -> str:
        return f"{r[key] / plain[key]:.2f}x" if plain and r.get(key) and plain.get(key) else ""

    allocated, used = _gib(r, "max_allocated_bytes"), _gib(r, "nvml_peak_used_bytes")
    losses = r.get("losses") or []
    curve = f"{losses[0]:.4f} / {losses[-1]:.4f}" if losses else ""
    diff = ""
    if plain and r["stack"] != "plain" and losses and plain.get("losses") and r.get("batch_scale", 1) == 1:
        count = min(len(losses), len(plain["losses"]))
        diff = f"{max(abs(a - b) / abs(b) for a, b in zip(losses[:count], plain['losses'][:count])):.2%}"
    return (f"| {name} | {r['tokens_per_s']:.0f} | {ratio('tokens_per_s')} | {allocated} | "
            f"{ratio('max_allocated_bytes')} | {used} | {curve} | {diff} |")
