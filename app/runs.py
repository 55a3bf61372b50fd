"""The runs folder as the Runs page sees it: one summary per run folder, read from its files.

A run's status comes from its events.jsonl (finished / stopped / failed, or interrupted when it just
ends); nothing here starts or changes a run.
"""
from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from qlora_engine.events import read_events


@dataclass
class RunSummary:
    path: Path
    model: str = ""
    status: str = "new"  # new, running, finished, stopped, failed, interrupted
    step: int = 0
    total_steps: int = 0
    final_loss: float | None = None
    eval_loss: float | None = None
    duration_s: float | None = None
    started_at: float | None = None
    error_message: str = ""
    adapter_dir: str = ""

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def checkpoints(self) -> list[Path]:
        folder = self.path / "checkpoints"
        found = [p for p in folder.glob("step-*") if p.is_dir()] if folder.is_dir() else []
        return sorted(found, key=_step_number)

    @property
    def can_resume(self) -> bool:
        return self.status in ("stopped", "failed", "interrupted") and bool(self.checkpoints)

    @property
    def has_adapter(self) -> bool:
        return bool(self.adapter_dir) or (self.path / "adapter").is_dir()


def _step_number(checkpoint: Path) -> int:
    match = re.search(r"(\d+)$", checkpoint.name)
    return int(match.group(1)) if match else -1


def summarize_run(run_dir: Path) -> RunSummary:
    summary = RunSummary(path=run_dir)
    summary.model = _configured_model(run_dir / "config.yaml")
    first_time = last_time = None
    for event in read_events(run_dir / "events.jsonl"):
        first_time = first_time if first_time is not None else event.get("t")
        last_time = event.get("t", last_time)
        _apply_event(summary, event)
    summary.started_at = first_time
    if summary.duration_s is None and first_time is not None and last_time is not None:
        summary.duration_s = last_time - first_time
    return summary


def _apply_event(summary: RunSummary, event: dict) -> None:
    kind = event["kind"]
    if kind == "started":
        summary.status = "interrupted"  # until a later event says otherwise
        summary.total_steps = event.get("total_steps") or summary.total_steps
    elif kind == "step":
        summary.step = event.get("step", summary.step)
        summary.final_loss = event.get("loss", summary.final_loss)
        summary.status = "interrupted"
    elif kind == "eval":
        summary.eval_loss = event.get("eval_loss")
    elif kind == "stopped":
        summary.status, summary.step = "stopped", event.get("step", summary.step)
    elif kind == "error":
        summary.status, summary.error_message = "failed", event.get("message", "")
    elif kind == "finished":
        summary.status = "finished"
        summary.step = event.get("step", summary.step)
        summary.final_loss = event.get("final_loss", summary.final_loss)
        summary.eval_loss = event.get("eval_loss", summary.eval_loss)
        summary.duration_s = event.get("duration_s")
        summary.adapter_dir = event.get("adapter_dir", "")


def _configured_model(config_path: Path) -> str:
    try:
        values = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return ""
    return str(values.get("model", "")) if isinstance(values, dict) else ""


def list_runs(runs_folder: Path) -> list[RunSummary]:
    """Every run folder (one holding a config.yaml), newest first."""
    if not runs_folder.is_dir():
        return []
    runs = [summarize_run(p) for p in runs_folder.iterdir() if (p / "config.yaml").is_file()]
    return sorted(runs, key=lambda run: run.started_at or run.path.stat().st_mtime, reverse=True)


def new_run_dir(runs_folder: Path, model: str) -> Path:
    """A fresh folder name such as `2025-01-31_14-05_smollm2-135m-instruct` (not created here)."""
    model_name = Path(model.rstrip("/\\")).stem if model != "default" else "smollm2-135m-instruct"
    slug = re.sub(r"[^a-z0-9]+", "-", model_name.lower()).strip("-")[:40] or "run"
    base = f"{time.strftime('%Y-%m-%d_%H-%M')}_{slug}"
    candidate, number = runs_folder / base, 2
    while candidate.exists():
        candidate, number = runs_folder / f"{base}-{number}", number + 1
    return candidate


def delete_run(run_dir: Path, runs_folder: Path) -> None:
    """Delete a run folder; refuses anything that is not a run directly inside the runs folder."""
    run_dir, runs_folder = run_dir.resolve(), runs_folder.resolve()
    if run_dir.parent != runs_folder or not (run_dir / "config.yaml").is_file():
        raise ValueError(f"{run_dir} is not a run folder inside {runs_folder}")
    shutil.rmtree(run_dir)
