"""`bench --speed --nproc N`: the engine's data-parallel run in N processes (one per GPU, torchrun) next to the same
engine in one process, in one command: which runs a stack gets, and their comparison (tokens/s, loss curves).

Three runs of each engine stack: one process at the workload's batch (the speed reference: the same work per GPU),
one process at N x that batch (the loss reference: the same rows per optimizer step) and N processes at N x the
batch, each rank its 1/N share (`--fsdp`: sharded, parallel: fsdp). Other stacks run once, in one process.
"""
from __future__ import annotations

from typing import Any

SPEEDUP_GOAL = 1.8  # issue 21: N = 2 processes against one, tokens/s
LOSS_TOLERANCE = 0.01  # largest relative loss difference, step by step, against one process at N x the batch


def runs_of(nproc: int, workload: str, is_engine: bool) -> list[tuple[int, int]]:
    """(processes, batch scale) of every run of one stack on one workload."""
    if nproc <= 1 or not is_engine or workload == "long":
        return [(1, 1)]
    return [(1, 1), (1, nproc), (nproc, nproc)]


def run_label(result: dict[str, Any], name: str) -> str:
    processes, scale = result.get("nproc", 1), result.get("batch_scale", 1)
    if processes > 1:
        return f"{name}, {processes} processes ({scale}x rows per step)"
    return f"{name}, {scale}x rows per step" if scale > 1 else name


def loss_difference(losses: list[float], reference: list[float]) -> dict[str, Any]:
    """Step by step, relative to the reference: the largest (and its step) and the mean difference."""
    pairs = list(zip(losses, reference))
    if not pairs or len(losses) != len(reference):
        return {"max": None, "max_step": None, "mean": None}
    diffs = [abs(a - b) / abs(b) for a, b in pairs]
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    return {"max": round(diffs[worst], 6), "max_step": worst + 1, "mean": round(sum(diffs) / len(diffs), 6)}


def comparisons(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per several-process run, against the same stack's one-process runs of the same workload."""
    def find(run: dict[str, Any], scale: int) -> dict[str, Any] | None:
        return next((r for r in results if (r["stack"], r["workload"], r.get("nproc", 1), r.get("batch_scale", 1))
                     == (run["stack"], run["workload"], 1, scale)), None)

    return [compare(run, find(run, 1), find(run, run["batch_scale"])) for run in results if run.get("nproc", 1) > 1]


def compare(run: dict[str, Any], one: dict[str, Any] | None, same_rows: dict[str, Any] | None) -> dict[str, Any]:
    """Its tokens/s against one process at the usual batch (speed-up, per-process efficiency) and against one
    process at the same rows per step; its loss curve against the latter's."""
    entry = {"stack": run["stack"], "workload": run["workload"], "nproc": run["nproc"], "tokens_per_s": _speed(run),
             "one_process_tokens_per_s": _speed(one), "one_process_same_rows_tokens_per_s": _speed(same_rows),
             "speedup": None, "speedup_goal": SPEEDUP_GOAL, "loss_tolerance": LOSS_TOLERANCE,
             "error": _failure(run, one, same_rows), "ranks_started_alike": run.get("ranks_started_alike")}
    if entry["tokens_per_s"] and entry["one_process_tokens_per_s"]:
        entry["speedup"] = round(entry["tokens_per_s"] / entry["one_process_tokens_per_s"], 3)
        entry["efficiency"] = round(entry["speedup"] / run["nproc"], 3)
    if entry["tokens_per_s"] and entry["one_process_same_rows_tokens_per_s"]:
        entry["speedup_vs_same_rows"] = round(entry["tokens_per_s"] / entry["one_process_same_rows_tokens_per_s"], 3)
    entry["loss_difference"] = loss_difference(run.get("losses") or [], (same_rows or {}).get("losses") or [])
    worst = entry["loss_difference"]["max"]
    if entry["error"] is None and worst is None:
        entry["error"] = "the loss curves differ in length"
    entry["losses_within_tolerance"] = entry["error"] is None and worst <= LOSS_TOLERANCE
    return entry


def format_comparisons(entries: list[dict[str, Any]], names: dict[str, str]) -> str:
    if not entries:
        return ""
    lines = ["\n| stack | workload | processes | tokens/s | one process | speed-up (goal) | vs one process at the same "
             "rows per step | max / mean loss diff vs it | within |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for e in entries:
        name = names.get(e["stack"], e["stack"])
        if e["error"]:
            lines.append(f"| {name} | {e['workload']} | {e['nproc']} | failed: {e['error'][:80]} | | | | | |")
            continue
        diff = e["loss_difference"]
        lines.append(f"| {name} | {e['workload']} | {e['nproc']} | {e['tokens_per_s']:.0f} | "
                     f"{e['one_process_tokens_per_s']:.0f} | {e['speedup']:.2f}x ({e['speedup_goal']}x) | "
                     f"{e.get('speedup_vs_same_rows', 0):.2f}x | {diff['max']:.2%} (step {diff['max_step']}) / "
                     f"{diff['mean']:.2%} | {'yes' if e['losses_within_tolerance'] else 'no'} "
                     f"({e['loss_tolerance']:.0%}) |")
    return "\n".join(lines)


def _speed(result: dict[str, Any] | None) -> float | None:
    if result is None or result.get("error") or result.get("oom"):
        return None
    return result.get("tokens_per_s")


def _failure(*runs: dict[str, Any] | None) -> str | None:
    """Why a comparison has no numbers: a run that failed, ran out of memory or is missing."""
    for run in runs:
        if run is None:
            return "a reference run is missing"
        if run.get("error"):
            return f"{run_label(run, run['stack'])}: {run['error']}"
        if run.get("oom"):
            return f"{run_label(run, run['stack'])}: out of memory at step {run['oom']['step']}"
    return None
