"""`qlora-studio bench --drift-grid`: what a recipe teaches against how far it moves the model from the base.

Each configuration is a whole training run of the bundled SmolLM2-135M-Instruct on the sample facts, in its own
engine process (`python -m qlora_engine train`), over one grid of learning rate, rank, steps and LoRA dropout; the
rest pinned. Recorded per run: held-out accuracy (the sample set's 36 questions, keyword-scored), the final eval loss
and the drift from the base (training.drift: KL per token on the base's own text), and the run's wall time. The
defaults and presets are chosen from this table: the least drift that still teaches the facts (>= 90% held-out).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from qlora_engine.protocol.config import write_text_atomic
from qlora_engine.protocol.events import read_events

ATTENTION = "q_proj,k_proj,v_proj,o_proj"
# Pinned, not the defaults: the defaults are what this grid chooses.
BASE_OPTIONS = {"max_length": 256, "micro_batch_size": 4, "grad_accum": 2, "warmup_steps": 3, "eval_steps": 0,
                "compare_questions": 36, "seed": 42, "device": "cpu", "gradient_checkpointing": False,
                "drift_samples": 64, "lora_dropout": 0.05, "target_modules": "all-linear"}
GRID: list[dict[str, Any]] = [
    *({"learning_rate": lr, "lora_r": 16, "max_steps": steps} for steps in (40, 80) for lr in (2e-4, 5e-4, 1e-3)),
    *({"learning_rate": 1e-3, "lora_r": r, "max_steps": 40} for r in (8, 32)),  # at the rate that teaches in 40
    *({"learning_rate": 1e-3, "lora_r": 16, "max_steps": 40, "lora_dropout": d} for d in (0.0, 0.1)),
    *({"learning_rate": lr, "lora_r": 16, "max_steps": 40, "target_modules": ATTENTION} for lr in (1e-3, 2e-3)),
]


def flags(options: dict[str, Any]) -> list[str]:
    """The engine's command-line flags for these options (`--no-…` for a false boolean)."""
    out = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else flag.replace("--", "--no-", 1))
        else:
            out += [flag, str(value)]
    return out


def run_one(options: dict[str, Any], scratch: Path) -> dict[str, Any]:
    """One training run in its own process; its numbers from the events it wrote."""
    run_dir = scratch / f"run-{len(list(scratch.iterdir()))}"
    merged = {**BASE_OPTIONS, "lora_alpha": 2 * options.get("lora_r", 16), **options}
    started_s = time.time()
    done = subprocess.run([sys.executable, "-m", "qlora_engine", "train", *flags(merged), "--run-dir", str(run_dir),
                           "--events", "jsonl"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    row: dict[str, Any] = {"options": options, "wall_s": round(time.time() - started_s, 1)}
    if done.returncode != 0:
        return {**row, "failed": done.stderr[-2000:] or done.stdout[-2000:]}
    events = list(read_events(run_dir / "events.jsonl"))
    evals = [e for e in events if e.kind == "eval"]
    comparison = next(e for e in events if e.kind == "comparison")
    return {**row, "heldout_accuracy": comparison.tuned_accuracy, "base_accuracy": comparison.base_accuracy,
            "eval_loss_start": evals[0].eval_loss, "eval_loss_final": evals[-1].eval_loss,
            "drift": evals[-1].drift}


def run_grid(out: Path, only: list[int] | None = None) -> int:
    """The grid's runs in turn (or the `only` indices), every row kept in `out` (JSON lines) as it comes."""
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] if out.is_file() else []
    with tempfile.TemporaryDirectory() as scratch:
        for index, options in enumerate(GRID):
            if only is not None and index not in only:
                continue
            row = {"index": index, **run_one(options, Path(scratch))}
            rows = [r for r in rows if r.get("options") != options] + [row]
            write_text_atomic(out, "".join(json.dumps(r) + "\n" for r in rows))
            print(json.dumps(row), flush=True)
    return 1 if any("failed" in r for r in rows) else 0


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The README table, in the grid's order."""
    lines = ["| learning rate | rank | steps | LoRA dropout | adapters on | held-out right | eval loss | drift "
             "(nats/token) | wall |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r.get("index", 0)):
        o = {**BASE_OPTIONS, **r["options"]}
        head = (f"| {o['learning_rate']:g} | {o['lora_r']} | {o['max_steps']} | {o['lora_dropout']:g} "
                f"| {'attention' if o['target_modules'] == ATTENTION else o['target_modules']} ")
        if "failed" in r:
            lines.append(f"{head}| failed | | | |")
            continue
        lines.append(f"{head}| {r['heldout_accuracy']:.0%} | {r['eval_loss_start']:.2f} → {r['eval_loss_final']:.3f} "
                     f"| {r['drift']:.4f} | {r['wall_s'] / 60:.1f} min |")
    return "\n".join(lines) + "\n"
