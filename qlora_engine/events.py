"""The JSON-lines event protocol between the engine and its clients (GUI, scripts).

One JSON object per line on stdout, the same lines appended to <run_dir>/events.jsonl. No torch here.
"""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

PROTOCOL_VERSION = 1
KINDS = ("started", "model_loaded", "data_ready", "step", "eval", "checkpoint", "warning", "error",
         "stopped", "finished", "comparison",
         # export and chat commands speak the same protocol
         "export_progress", "exported", "chat_ready", "chat_token", "chat_done")


class EngineError(Exception):
    """An error a user can hit and act on; it becomes an `error` event with code, message and advice."""

    def __init__(self, code: str, message: str, advice: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.advice = advice


def make_event(kind: str, **fields: Any) -> dict[str, Any]:
    if kind not in KINDS:
        raise ValueError(f"unknown event kind {kind!r}")
    return {"v": PROTOCOL_VERSION, "t": round(time.time(), 3), "kind": kind, **fields}


class EventWriter:
    """Writes events to a stream (stdout by default) and appends them to the run's events.jsonl."""

    def __init__(self, log_path: Path | None = None, stream: IO[str] | None = sys.stdout,
                 human: bool = False) -> None:
        self.log_path = log_path
        self.stream = stream
        self.human = human
        self._log: IO[str] | None = None
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(log_path, "a", encoding="utf-8")

    def emit(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = make_event(kind, **fields)
        line = json.dumps(event, default=_json_default)
        if self._log is not None:
            self._log.write(line + "\n")
            self._log.flush()
        if self.stream is not None:
            try:
                self.stream.write((describe(event) if self.human else line) + "\n")
                self.stream.flush()
            except (BrokenPipeError, OSError, ValueError):
                # The reader went away (the GUI closed and left the run going): keep training and
                # keep writing events.jsonl, which is how a reopened window follows the run.
                self.stream = None
        return event

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def parse_line(line: str) -> dict[str, Any] | None:
    """The event on this line, or None when the line is plain log text."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    if isinstance(event, dict) and event.get("v") == PROTOCOL_VERSION and event.get("kind") in KINDS:
        return event
    return None


def read_events(path: Path) -> Iterator[dict[str, Any]]:
    """The events of a run's events.jsonl; a line cut short by a kill is skipped."""
    if not path.exists():
        return
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            event = parse_line(line)
            if event is not None:
                yield event


def describe(event: dict[str, Any]) -> str:
    """One human line for an event (the CLI's --events human mode)."""
    kind = event["kind"]
    if kind == "step":
        parts = [f"step {event['step']}/{event.get('total_steps', '?')}", f"loss {event['loss']:.4f}",
                 f"lr {event['lr']:.2e}", f"grad_norm {event.get('grad_norm', 0):.3f}",
                 f"{event.get('tokens_per_s', 0):.0f} tok/s"]
        vram = event.get("vram") or {}
        if vram.get("max_allocated"):
            parts.append(f"peak {vram['max_allocated'] / 2**30:.2f} GiB")
        return "  ".join(parts)
    if kind == "eval":
        return f"eval at step {event['step']}: loss {event['eval_loss']:.4f}  perplexity {event['perplexity']:.2f}"
    if kind == "comparison":
        return _describe_comparison(event)
    if kind == "started":
        return f"started: {event['run_dir']} on {event.get('device')} ({event.get('compute_dtype')})"
    if kind == "error":
        return f"ERROR [{event['code']}] {event['message']}\n  what to do: {event.get('advice', '')}"
    rest = {k: v for k, v in event.items() if k not in ("v", "t", "kind")}
    return f"{kind}: " + ", ".join(f"{k}={v}" for k, v in rest.items())


def _describe_comparison(event: dict[str, Any]) -> str:
    lines = ["", "Before / after on held-out questions:"]
    for row in event["rows"]:
        marks = {True: "right", False: "wrong", None: ""}
        lines += [f"Q: {row['question']}",
                  f"   base  [{marks[row['base_correct']]}]: {row['base'][:160]}",
                  f"   tuned [{marks[row['tuned_correct']]}]: {row['tuned'][:160]}"]
    if event.get("base_accuracy") is not None:
        lines.append(f"Correct: base {event['base_accuracy']:.0%}, tuned {event['tuned_accuracy']:.0%} "
                     f"of {len(event['rows'])} held-out questions")
    return "\n".join(lines)
