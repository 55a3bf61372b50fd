"""The JSON-lines event protocol between the engine and its clients (GUI, scripts).

One JSON object per line on stdout, the same lines appended to <run_dir>/events.jsonl. No torch here.
"""
from __future__ import annotations

import errno
import json
import shutil
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
    """An error a user can hit and act on; it becomes an `error` event with code, message and advice.

    `details` are extra fields of that event (e.g. a `cuda_oom` error's measured peak and the estimator's fixes).
    """

    def __init__(self, code: str, message: str, advice: str = "", **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.advice = advice
        self.details = details


DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
NOT_WRITABLE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS}
# Writers that bypass Python's files report a full disk in their own exception types: safetensors raises
# SafetensorError "... No space left on device (os error 28)", torch.save a RuntimeError "unexpected pos ...".
# So a failed write also counts as a full disk when the folder it went to has less than this left.
LOW_SPACE_BYTES = 64 * 2**20
NO_SPACE_TEXTS = ("No space left on device", "os error 28", "Disk quota exceeded")


def write_failure(exc: BaseException, what: str, folder: Path | None, then: str,
                  verb: str = "write") -> EngineError | None:
    """A failed write of `what` into `folder` as an error a person can act on; None when `exc` is not one.

    Any OSError is a write failure; another exception only when it says so or the folder's disk is (nearly) full.
    `then` ends the advice: what to do once the disk has room or the folder is writable.
    """
    where = getattr(exc, "filename", None) or folder
    at = f" ({where})" if where else ""
    if isinstance(exc, OSError) and exc.errno not in DISK_FULL_ERRNOS:
        return EngineError("write_failed", f"could not {verb} {what}{at}: {exc.strerror or exc}",
                           f"Check that the folder exists and is writable (or pick another folder), then {then}.")
    if not isinstance(exc, OSError) and not (any(text in str(exc) for text in NO_SPACE_TEXTS)
                                             or _free_bytes(folder) < LOW_SPACE_BYTES):
        return None
    free = _free_bytes(folder)
    left = f", {free / 2**20:.1f} MiB left there" if free != float("inf") else ""
    return EngineError("disk_full", f"the disk is full: could not {verb} {what}{at}{left}",
                       f"Free some disk space (or move the folder to a drive with room), then {then}.")


def _free_bytes(folder: Path | None) -> float:
    """Free space on the drive holding `folder` (its nearest existing parent); infinite when unknown."""
    if folder is None:
        return float("inf")
    for candidate in (Path(folder), *Path(folder).parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return float("inf")


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
        self.last_of_kind: dict[str, dict[str, Any]] = {}  # e.g. the last `step`, to say where a failure hit
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(log_path, "a", encoding="utf-8")
            if self._log.tell() and not _ends_with_newline(log_path):  # a line cut short by a kill
                self._log.write("\n")

    def emit(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = make_event(kind, **fields)
        line = json.dumps(event, default=_json_default)
        self.last_of_kind[kind] = event
        if self._log is not None:
            try:
                self._log.write(line + "\n")
                self._log.flush()
            except OSError:  # disk full or folder gone: the events still reach stdout, and the error is reported
                self._close_log_quietly()
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
            try:
                self._log.close()
            except OSError:  # its buffer could not be written (disk full); nothing more to do
                pass
            self._log = None

    def _close_log_quietly(self) -> None:
        log, self._log = self._log, None
        try:
            log.close()
        except OSError:
            pass


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(-1, 2)
        return handle.read(1) == b"\n"


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
