"""A run's numbers as the Monitor shows them: growing numpy series plus the latest values.

Fed one event at a time (live from the engine, or replayed from events.jsonl); knows no widgets.
The Monitor reads it on a timer, so plots cost the same however fast events arrive.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


class Series:
    """x/y points appended one at a time into arrays that grow by doubling."""

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


SERIES_NAMES = ("loss", "eval_loss", "lr", "grad_norm", "tokens_per_s", "vram_process", "vram_gpu")


@dataclass
class RunMetrics:
    series: dict[str, Series] = field(default_factory=lambda: {name: Series() for name in SERIES_NAMES})
    status: str = "idle"  # idle, loading, training, stopping, stopped, finished, failed
    step: int = 0
    total_steps: int = 0
    epoch: float = 0.0
    loss: float | None = None
    eval_loss: float | None = None
    perplexity: float | None = None
    lr: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    estimate_peak_bytes: int = 0
    gpu_total_bytes: int = 0
    peak_process_bytes: int = 0
    model_summary: str = ""
    data_summary: str = ""
    last_checkpoint: str = ""
    adapter_dir: str = ""
    comparison: dict[str, Any] | None = None  # base vs tuned answers to held-out questions, after training
    error: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    dirty: bool = True  # set by every event, cleared by whoever redraws

    def add_event(self, event: dict[str, Any]) -> None:
        handler = getattr(self, f"_on_{event.get('kind')}", None)
        if handler is not None:
            handler(event)
            self.dirty = True

    def _on_started(self, event: dict[str, Any]) -> None:
        self.status, self.error = "loading", None
        self.total_steps = event.get("total_steps") or self.total_steps
        self.estimate_peak_bytes = event.get("estimate_peak_bytes") or self.estimate_peak_bytes

    def _on_model_loaded(self, event: dict[str, Any]) -> None:
        params, trainable = event.get("params") or 0, event.get("trainable_params") or 0
        share = f" ({100 * trainable / params:.2f}%)" if params else ""
        self.model_summary = f"{event.get('model', '')}: {params / 1e6:,.1f}M parameters, " \
                             f"{trainable / 1e6:,.2f}M trained{share}"

    def _on_data_ready(self, event: dict[str, Any]) -> None:
        parts = [f"{event.get('train_rows', 0):,} training rows", f"{event.get('val_rows', 0):,} validation rows"]
        for key, label in (("skipped_rows", "skipped"), ("truncated_rows", "truncated")):
            if event.get(key):
                parts.append(f"{event[key]:,} {label}")
        self.data_summary = ", ".join(parts)

    def _on_step(self, event: dict[str, Any]) -> None:
        step = event["step"]
        if step <= self.step and self.series["loss"].count:
            for series in self.series.values():
                series.drop_from(step)
        self.status = "stopping" if self.status == "stopping" else "training"
        self.step, self.epoch = step, event.get("epoch", self.epoch)
        self.total_steps = event.get("total_steps") or self.total_steps
        self.loss, self.lr = event.get("loss"), event.get("lr")
        self.tokens_per_s, self.eta_s = event.get("tokens_per_s"), event.get("eta_s")
        for name in ("loss", "lr", "grad_norm", "tokens_per_s"):
            if event.get(name) is not None:
                self.series[name].append(step, event[name])
        vram = event.get("vram") or {}
        if vram.get("reserved"):
            self.series["vram_process"].append(step, vram["reserved"])
        if vram.get("gpu_used"):
            self.series["vram_gpu"].append(step, vram["gpu_used"])
        self.gpu_total_bytes = vram.get("gpu_total") or self.gpu_total_bytes
        self.peak_process_bytes = max(self.peak_process_bytes, vram.get("max_allocated") or 0)

    def _on_eval(self, event: dict[str, Any]) -> None:
        self.eval_loss, self.perplexity = event.get("eval_loss"), event.get("perplexity")
        if self.eval_loss is not None:
            self.series["eval_loss"].append(event.get("step", self.step), self.eval_loss)

    def _on_checkpoint(self, event: dict[str, Any]) -> None:
        self.last_checkpoint = event.get("path", "")

    def _on_warning(self, event: dict[str, Any]) -> None:
        self.warnings.append(event.get("message", ""))

    def _on_error(self, event: dict[str, Any]) -> None:
        self.status = "failed"
        self.error = {key: event.get(key, "") for key in ("code", "message", "advice")}
        # an out-of-memory error carries the peak measured when it struck: higher than any step's report
        self.peak_process_bytes = max(self.peak_process_bytes, event.get("peak_bytes") or 0)
        self.gpu_total_bytes = event.get("gpu_total_bytes") or self.gpu_total_bytes
        self.estimate_peak_bytes = event.get("estimate_peak_bytes") or self.estimate_peak_bytes

    def _on_comparison(self, event: dict[str, Any]) -> None:
        self.comparison = {key: event.get(key) for key in ("rows", "base_accuracy", "tuned_accuracy")}

    def _on_stopped(self, event: dict[str, Any]) -> None:
        self.status = "stopped"
        self.last_checkpoint = event.get("checkpoint") or self.last_checkpoint

    def _on_finished(self, event: dict[str, Any]) -> None:
        self.status = "finished"
        self.step = event.get("step", self.step)
        self.eta_s = 0
        self.adapter_dir = event.get("adapter_dir", "")
        if event.get("eval_loss") is not None:
            self.eval_loss = event["eval_loss"]

    @property
    def progress(self) -> float:
        return min(1.0, self.step / self.total_steps) if self.total_steps else 0.0
