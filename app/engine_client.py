"""The one way the app asks the engine something without waiting for it (in the spirit of Anki's QueryOp): a typed
request runs on a worker thread of Qt's thread pool, and its typed result or EngineError comes back on the GUI
thread, with progress lines on the way. The requests themselves are in app/engine_requests.py.

Long-running streams (train, export, chat --serve) are not requests: they are EngineProcess's.
"""
from __future__ import annotations

import json
import subprocess
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import shiboken6
from PySide6.QtCore import QObject, QThreadPool, Signal

from app.engine_command import child_environment, crash_error, default_engine_command, not_started_error
from qlora_engine.protocol.errors import EngineError

Result = TypeVar("Result")
SHUTDOWN_WAIT_MS = 5000


class Request(Generic[Result]):
    """Something the app asks the engine. `run` is called on a worker thread and returns the typed result or raises
    EngineError; it may report progress through `call.report`. Calls of requests with the same `key` replace each
    other: a newer one cancels the one still running, whose answer is never shown."""

    key: ClassVar[str] = ""

    def run(self, call: Call) -> Result:
        raise NotImplementedError


class EngineQuery(Request[Result]):
    """A short engine command that prints one JSON object (`model-info --json`, `data --json`), or `{"error": {code,
    message, advice}}`. Subclasses say its arguments and how the object becomes the typed result."""

    def args(self) -> list[str]:
        raise NotImplementedError

    def read(self, answer: dict[str, Any]) -> Result:
        raise NotImplementedError

    def run(self, call: Call) -> Result:
        output = call.run_engine(self.args())
        answer = last_json_object(output.stdout)
        if answer is not None and isinstance(answer.get("error"), dict):
            fields = dict(answer["error"])
            raise EngineError(str(fields.pop("code", "engine_error")), str(fields.pop("message", "")),
                              str(fields.pop("advice", "")), **fields)
        if answer is None or output.exit_code != 0:
            raise crash_error(output.exit_code, output.crashed, output.log_lines)
        return self.read(answer)


@dataclass
class EngineOutput:
    exit_code: int
    crashed: bool  # ended by a signal (killed, segfault)
    stdout: str
    log_lines: list[str]  # stderr's, then stdout's non-empty lines


class Call:
    """One request on its way: cancel it, ask whether its answer is still to come, and (after it came) read its
    `result` or `error`. On the worker thread its request reports progress and starts engine commands through it."""

    def __init__(self, client: EngineClient, request: Request[Any], owner: QObject | None,
                 done: Callable[[Any], None] | None, failed: Callable[[EngineError], None] | None,
                 progress: Callable[[str], None] | None) -> None:
        self.client, self.request, self.owner = client, request, owner
        self._done, self._failed, self._progress = done, failed, progress
        self.result: Any = None
        self.error: EngineError | None = None
        self.cancelled = self.answered = False
        self._process: subprocess.Popen[str] | None = None
        self._lock = threading.Lock()

    def is_running(self) -> bool:
        return not (self.answered or self.cancelled)

    def cancel(self) -> None:
        """Drop the answer; an engine command still running is killed."""
        with self._lock:
            self.cancelled = True
            process = self._process
        if process is not None and process.poll() is None:
            process.kill()

    # ------------------------------------------------------------------ on the worker thread
    def report(self, text: str) -> None:
        _relay().progressed.emit(self, text)

    def run_engine(self, args: list[str]) -> EngineOutput:
        """`<engine> args` to its end, killed if the call is cancelled; each stderr line is reported as progress."""
        command = [*self.client.engine_command, *args]
        with self._lock:
            if self.cancelled:
                return EngineOutput(-1, True, "", [])
            try:
                process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, env=child_environment(), text=True,
                                           encoding="utf-8", errors="replace")
            except OSError as exc:
                raise not_started_error(self.client.engine_command, exc.strerror or str(exc)) from exc
            self._process = process
        stdout: list[str] = []
        reader = threading.Thread(target=lambda: stdout.append(process.stdout.read()), daemon=True)
        reader.start()
        log_lines = []
        for line in process.stderr:
            if line.strip():
                log_lines.append(line.rstrip())
                self.report(line.rstrip())
        reader.join()
        exit_code = process.wait()
        text = "".join(stdout)
        return EngineOutput(exit_code, exit_code < 0, text, log_lines + [s for s in text.splitlines() if s.strip()])

    def work(self) -> None:
        try:
            result = self.request.run(self)
        except EngineError as exc:
            _relay().failed.emit(self, exc)
        except Exception as exc:  # a bug in a request: shown as an error, its traceback in the terminal
            traceback.print_exc()
            _relay().failed.emit(self, EngineError("internal", f"{type(exc).__name__}: {exc}",
                                                   "This is a bug in QLoRA Studio; the terminal has the details."))
        else:
            _relay().answered.emit(self, result)

    # ------------------------------------------------------------------ on the GUI thread
    def _deliver(self, result: Any, error: EngineError | None) -> None:
        self.client.forget(self)
        if self.cancelled or (self.owner is not None and not shiboken6.isValid(self.owner)):
            return
        self.answered, self.result, self.error = True, result, error
        callback = self._failed if error is not None else self._done
        if callback is not None:
            callback(error if error is not None else result)
        self.client.answered.emit(self)

    def _show_progress(self, text: str) -> None:
        if self.is_running() and self._progress is not None:
            self._progress(text)


class _Relay(QObject):
    """Carries answers from worker threads to the GUI thread (queued signals). One for the whole app, never
    deleted, so a worker never emits on an object that is gone."""

    answered = Signal(object, object)  # call, result
    failed = Signal(object, object)  # call, EngineError
    progressed = Signal(object, str)  # call, text

    def __init__(self) -> None:
        super().__init__()
        self.answered.connect(lambda call, result: call._deliver(result, None))
        self.failed.connect(lambda call, error: call._deliver(None, error))
        self.progressed.connect(lambda call, text: call._show_progress(text))


_RELAY: list[_Relay] = []


def _relay() -> _Relay:
    return _RELAY[0]


class EngineClient(QObject):
    """Runs requests off the GUI thread: `run(request, done=..., failed=...)`; the one place that does."""

    answered = Signal(object)  # a Call, after its done or failed callback ran (tests wait for it)

    def __init__(self, engine_command: list[str] | None = None, parent: QObject | None = None) -> None:
        super().__init__(parent)
        if not _RELAY:
            _RELAY.append(_Relay())  # made on the GUI thread, which the answers are delivered to
        self.engine_command = engine_command or default_engine_command()
        self.pool = QThreadPool.globalInstance()
        self._running: dict[int, Call] = {}
        self._latest: dict[str, Call] = {}

    def run(self, request: Request[Result], owner: QObject | None = None,
            done: Callable[[Result], None] | None = None, failed: Callable[[EngineError], None] | None = None,
            progress: Callable[[str], None] | None = None) -> Call:
        """Start `request` on a worker thread. `done(result)` or `failed(error)` is called on the GUI thread, unless
        the call was cancelled, replaced by a newer one of the same key, or `owner` was deleted first."""
        call = Call(self, request, owner, done, failed, progress)
        if request.key:
            replaced = self._latest.get(request.key)
            if replaced is not None:
                replaced.cancel()
            self._latest[request.key] = call
        self._running[id(call)] = call
        self.pool.start(call.work)
        return call

    def forget(self, call: Call) -> None:
        self._running.pop(id(call), None)
        if self._latest.get(call.request.key) is call:
            del self._latest[call.request.key]

    def shutdown(self) -> None:
        """Cancel every call (engine commands are killed) and wait for the workers to end."""
        for call in list(self._running.values()):
            call.cancel()
        self._running.clear()
        self._latest.clear()
        self.pool.waitForDone(SHUTDOWN_WAIT_MS)


def last_json_object(stdout: str) -> dict[str, Any] | None:
    """An engine query's answer: all of stdout as JSON, or else its last line that is a JSON object."""
    candidates = [stdout] + [line for line in reversed(stdout.splitlines()) if line.lstrip().startswith("{")]
    for text in candidates:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None
