"""One run's state, folded from its events: the one reducer behind the Monitor page, the Runs page and
`qlora-studio runs`. Events in (live from the engine or replayed from events.jsonl), state out; no Qt, no torch.

Status words: new (no event yet), loading, training, stopping (the client asked it to stop), stopped, finished,
failed, and interrupted (events end mid-run and no engine holds the folder: killed, crashed or power lost).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from qlora_engine.protocol import events as ev
from qlora_engine.protocol.run_folders import CONFIG_NAME, run_dirs
from qlora_engine.protocol.run_lock import engine_alive

LIVE_STATUSES = ("loading", "training", "stopping")
ENDED_STATUSES = ("stopped", "finished", "failed", "interrupted")


class Series:
    """x/y points appended one at a time into arrays that grow by doubling (plots read them on a timer)."""

    def __init__(self) -> None:
        self._points = np.empty((2, 256))
        self.count = 0

    def append(self, x: float, y: float) -> None:
        if self.count == self._points.shape[1]:
            self._points = np.concatenate([self._points, np.empty_like(self._points)], axis=1)
        self._points[:, self.count] = (x, y)
        self.count += 1

    def drop_from(self, x: float) -> None:
        """Forget points at x and after: a resume from an earlier checkpoint replays those steps."""
        self.count = int(np.searchsorted(self.x, x, side="left"))

    @property
    def x(self) -> np.ndarray:
        return self._points[0, :self.count]

    @property
    def y(self) -> np.ndarray:
        return self._points[1, :self.count]


SERIES_NAMES = ("loss", "eval_loss", "drift", "lr", "grad_norm", "tokens_per_s", "vram_process", "vram_gpu")


@dataclass
class RunState:
    run_dir: Path | None = None
    model: str = ""  # as configured (config.yaml), else as the engine reported it
    status: str = "new"
    step: int = 0
    total_steps: int = 0
    epoch: float = 0.0
    loss: float | None = None
    final_loss: float | None = None
    eval_loss: float | None = None
    perplexity: float | None = None
    drift: float | None = None  # KL from the base on the base's own text at the last evaluation (training.drift)
    lr: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    estimate_peak_bytes: int = 0
    gpu_total_bytes: int = 0
    peak_process_bytes: int = 0
    model_summary: str = ""
    data_summary: str = ""
    last_checkpoint: str = ""
    best_step: int | None = None  # the checkpoint with the lowest eval loss after training began (best_checkpoint)
    best_eval_loss: float | None = None
    adapter_dir: str = ""
    comparison: ev.Comparison | None = None  # base vs tuned answers to held-out questions, after training
    fit_check: ev.FitCheck | None = None  # the first (largest) step's measured peak against the estimate
    skipped_steps: int = 0  # fp16 steps the loss scaler skipped (gradients overflowed)
    error: ev.Error | None = None
    warnings: list[str] = field(default_factory=list)
    started_at: float | None = None
    last_event_at: float | None = None
    duration_s: float | None = None
    series: dict[str, Series] = field(default_factory=lambda: {name: Series() for name in SERIES_NAMES})
    dirty: bool = True  # set by every event, cleared by whoever redraws

    # ------------------------------------------------------------------ the reducer
    def apply(self, event: ev.Event) -> None:
        handler = getattr(self, f"_on_{event.kind}", None)
        if handler is None:  # chat, export and unknown events don't change a run's state
            return
        self.started_at = self.started_at if self.started_at is not None else event.t
        self.last_event_at = event.t
        handler(event)
        self.dirty = True

    def _on_started(self, event: ev.Started) -> None:
        self.status, self.error = "loading", None
        self.run_dir = self.run_dir or Path(event.run_dir)
        self.model = self.model or str(event.config.get("model", ""))
        self.estimate_peak_bytes = event.estimate_peak_bytes or self.estimate_peak_bytes

    def _on_model_loaded(self, event: ev.ModelLoaded) -> None:
        share = f" ({100 * event.trainable_params / event.params:.2f}%)" if event.params else ""
        self.model_summary = (f"{event.model}: {event.params / 1e6:,.1f}M parameters, "
                              f"{event.trainable_params / 1e6:,.2f}M trained{share}")

    def _on_data_ready(self, event: ev.DataReady) -> None:
        self.total_steps = event.total_steps or self.total_steps
        parts = [f"{event.train_rows:,} training rows", f"{event.val_rows:,} validation rows"]
        for count, label in ((event.skipped_rows, "skipped"), (event.truncated_rows, "truncated")):
            if count:
                parts.append(f"{count:,} {label}")
        self.data_summary = ", ".join(parts)

    def _on_step(self, event: ev.Step) -> None:
        if event.step <= self.step and self.series["loss"].count:
            for series in self.series.values():
                series.drop_from(event.step)
        self.status = "stopping" if self.status == "stopping" else "training"
        self.step, self.epoch = event.step, event.epoch
        self.total_steps = event.total_steps or self.total_steps
        self.loss, self.final_loss, self.lr = event.loss, event.loss, event.lr
        self.tokens_per_s, self.eta_s = event.tokens_per_s, event.eta_s
        self.skipped_steps = event.skipped_steps
        for name in ("loss", "lr", "grad_norm", "tokens_per_s"):
            value = getattr(event, name)
            if value is not None and math.isfinite(value):
                self.series[name].append(event.step, value)
        vram = event.vram
        if vram.get("reserved"):
            self.series["vram_process"].append(event.step, vram["reserved"])
        if vram.get("gpu_used"):
            self.series["vram_gpu"].append(event.step, vram["gpu_used"])
        self.gpu_total_bytes = vram.get("gpu_total") or self.gpu_total_bytes
        self.peak_process_bytes = max(self.peak_process_bytes, vram.get("max_allocated") or 0)

    def _on_fit_check(self, event: ev.FitCheck) -> None:
        self.fit_check = event
        self.estimate_peak_bytes = event.estimate_peak_bytes or self.estimate_peak_bytes

    def _on_eval(self, event: ev.Eval) -> None:
        self.eval_loss, self.perplexity = event.eval_loss, event.perplexity
        self.series["eval_loss"].append(event.step, event.eval_loss)
        if event.drift is not None:
            self.drift = event.drift
            self.series["drift"].append(event.step, event.drift)

    def _on_checkpoint(self, event: ev.Checkpoint) -> None:
        self.last_checkpoint = event.path
        self.best_step, self.best_eval_loss = event.best_step, event.best_eval_loss

    def _on_warning(self, event: ev.Warning) -> None:
        self.warnings.append(event.message)

    def _on_error(self, event: ev.Error) -> None:
        self.status, self.error = "failed", event
        # an out-of-memory error carries the peak measured when it struck: higher than any step's report
        self.peak_process_bytes = max(self.peak_process_bytes, event.peak_bytes or 0)
        self.gpu_total_bytes = event.gpu_total_bytes or self.gpu_total_bytes
        self.estimate_peak_bytes = event.estimate_peak_bytes or self.estimate_peak_bytes

    def _on_comparison(self, event: ev.Comparison) -> None:
        self.comparison = event

    def _on_stopped(self, event: ev.Stopped) -> None:
        self.status, self.step = "stopped", event.step
        self.last_checkpoint = event.checkpoint or self.last_checkpoint

    def _on_finished(self, event: ev.Finished) -> None:
        self.status, self.step, self.eta_s = "finished", event.step, 0
        self.adapter_dir = event.adapter_dir
        self.final_loss = event.final_loss if event.final_loss is not None else self.final_loss
        self.eval_loss = event.eval_loss if event.eval_loss is not None else self.eval_loss
        self.drift = event.drift if event.drift is not None else self.drift
        self.duration_s = event.duration_s

    # ------------------------------------------------------------------ what pages ask
    def request_stop(self) -> None:
        """The client asked the engine to stop: shown as stopping until the engine says stopped."""
        if self.status in ("loading", "training"):
            self.status, self.dirty = "stopping", True

    def check_engine(self, run_dir: Path) -> None:
        """Events that end mid-run with no engine holding the folder any more mean an interrupted run (killed,
        crashed, or the folder was copied mid-run): the one place this rule lives."""
        if self.status in LIVE_STATUSES and not engine_alive(run_dir):
            self.status, self.dirty = "interrupted", True

    @property
    def progress(self) -> float:
        return min(1.0, self.step / self.total_steps) if self.total_steps else 0.0

    @property
    def step_text(self) -> str:
        """`12 / 40`, or `12` before the total is known."""
        return f"{self.step} / {self.total_steps}" if self.total_steps else str(self.step)

    @property
    def name(self) -> str:
        return self.run_dir.name if self.run_dir else ""

    @property
    def checkpoints(self) -> list[Path]:
        folder = self.run_dir / "checkpoints" if self.run_dir else None
        found = [p for p in folder.glob("step-*") if p.is_dir()] if folder and folder.is_dir() else []
        return sorted(found, key=_step_number)

    def adapter_choices(self) -> list[tuple[str, str]]:
        """(`--checkpoint` value, label) for each adapter export and chat can use: the final adapter first, then
        the checkpoints newest first, e.g. ("step-20", "step 20 (best eval loss 0.5412)")."""
        evals = {int(step): loss for step, loss in zip(self.series["eval_loss"].x, self.series["eval_loss"].y)}

        def note(step: int) -> str:
            if step == self.best_step and self.best_eval_loss is not None:
                return f"best eval loss {self.best_eval_loss:.4g}"
            return f"eval loss {evals[step]:.4g}" if step in evals else ""

        choices = []
        if self.has_adapter:
            final = ", ".join(filter(None, [f"step {self.step}" if self.status == "finished" else "",
                                            note(self.step) if self.status == "finished" else ""]))
            choices.append(("final", "final adapter" + (f" ({final})" if final else "")))
        for path in reversed(self.checkpoints):
            if (path / "adapter").is_dir():
                step = _step_number(path)
                choices.append((path.name, f"step {step}" + (f" ({note(step)})" if note(step) else "")))
        return choices

    @property
    def can_resume(self) -> bool:
        return self.status in ("stopped", "failed", "interrupted") and bool(self.checkpoints)

    @property
    def has_adapter(self) -> bool:
        return bool(self.adapter_dir) or bool(self.run_dir and (self.run_dir / "adapter").is_dir())

    def to_summary(self) -> dict[str, Any]:
        """What `qlora-studio runs --json` prints for a run."""
        return {"run_dir": str(self.run_dir or ""), "model": self.model, "status": self.status, "step": self.step,
                "total_steps": self.total_steps, "final_loss": self.final_loss, "eval_loss": self.eval_loss,
                "drift": self.drift, "started_at": self.started_at, "duration_s": self.duration_s,
                "adapter_dir": self.adapter_dir,
                "error": self.error.message if self.error else "", "checkpoints": len(self.checkpoints)}


def _step_number(checkpoint: Path) -> int:
    match = re.search(r"(\d+)$", checkpoint.name)
    return int(match.group(1)) if match else -1


def fold(events: Any, run_dir: Path | None = None) -> RunState:
    """The state after these events, in order."""
    state = RunState(run_dir=run_dir)
    for event in events:
        state.apply(event)
    return state


def summarize_run(run_dir: Path) -> RunState:
    """A run folder's state from its config.yaml and events.jsonl; a run whose events end mid-run and that no engine
    holds is interrupted."""
    state = RunState(run_dir=run_dir, model=_configured_model(run_dir / CONFIG_NAME))
    for event in ev.read_events(run_dir / "events.jsonl"):
        state.apply(event)
    if state.duration_s is None and state.started_at is not None and state.last_event_at is not None:
        state.duration_s = state.last_event_at - state.started_at
    state.check_engine(run_dir)
    state.dirty = True
    return state


def _configured_model(config_path: Path) -> str:
    try:
        values = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return ""
    return str(values.get("model", "")) if isinstance(values, dict) else ""


def list_runs(runs_folder: Path) -> list[RunState]:
    """Every run folder's state, newest first."""
    runs = [summarize_run(path) for path in run_dirs(runs_folder)]
    return sorted(runs, key=lambda run: run.started_at or run.run_dir.stat().st_mtime, reverse=True)
