"""The one way the app asks the engine something without waiting for it (in the spirit of Anki's QueryOp): a typed
request runs on a worker thread of Qt's thread pool, and its typed result or EngineError comes back on the GUI
thread, with progress lines on the way. The requests themselves are in app/engine_requests.py.

Long-running streams (train, export, chat --serve) are not requests: they are EngineProcess's.
"""
from __future__ import annotations

import queue
import subprocess
import threading
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, ClassVar, Generic, TypeVar

import shiboken6
from PySide6.QtCore import QObject, QThreadPool, Signal

from app.engine_command import child_environment, crash_error, default_engine_command, not_started_error
from qlora_engine.protocol import queries
from qlora_engine.protocol.errors import EngineError

Result = TypeVar("Result")
SHUTDOWN_WAIT_MS = 5000
PIPE_DRAIN_S = 5.0
# Most requests wait on an engine process rather than use the CPU: a minute-long .gguf import must not hold up the
# estimate, whatever the number of cores.
MIN_WORKERS = 8


class Request(Generic[Result]):
    """Something the app asks the engine. `run` is called on a worker thread and returns the typed result or raises
    EngineError; it may report progress through `call.report`. Calls of requests with the same `key` replace each
    other: a newer one cancels the one still running, whose answer is never shown."""

    key: ClassVar[str] = ""

    def run(self, call: Call) -> Result:
        raise NotImplementedError


class EngineQuery(Request[Result]):
    """A short engine command that prints one typed answer (`model-info --json`, `data --json`): an `answer_type` of
    qlora_engine.protocol.queries, or a failure, read back as the EngineError it was."""

    answer_type: ClassVar[type[queries.Answer]]

    def args(self) -> list[str]:
        raise NotImplementedError

    def stdin_text(self) -> str | None:
        """What to write to the command's stdin (a secret never goes on its command line); None: nothing."""
        return None

    def run(self, call: Call) -> Result:
        output = call.run_engine(self.args(), self.stdin_text())
        try:
            return queries.read_answer(output.stdout, self.answer_type)
        except EngineError as exc:
            if exc.code == "bad_answer" and output.exit_code != 0:  # it ended without an answer: a crash
                raise crash_error(output.exit_code, output.crashed, output.log_lines) from None
            raise


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
        # A worker thread may drop the last reference to a call: it holds no QObject that dropping could delete
        # there (the client by weak reference; the owner is a widget, owned by its parent).
        self._client = weakref.ref(client)
        self.engine_command = client.engine_command
        self.request, self.owner = request, owner
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
        _send("progressed", self, text)

    def run_engine(self, args: list[str], stdin_text: str | None = None) -> EngineOutput:
        """`<engine> args` to its end (`stdin_text` written to its stdin), killed if the call is cancelled; each
        stderr line is reported as progress."""
        command = [*self.engine_command, *args]
        with self._lock:
            if self.cancelled:
                return EngineOutput(-1, True, "", [])
            try:
                process = subprocess.Popen(command, stdin=subprocess.DEVNULL if stdin_text is None else subprocess.PIPE,
                                           stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, env=child_environment(), text=True,
                                           encoding="utf-8", errors="replace")
            except OSError as exc:
                raise not_started_error(self.engine_command, exc.strerror or str(exc)) from exc
            self._process = process
        stdout: list[str] = []
        log_lines: list[str] = []
        readers = [threading.Thread(target=lambda: stdout.append(process.stdout.read()), daemon=True),
                   threading.Thread(target=self._read_log, args=(process.stderr, log_lines), daemon=True)]
        for reader in readers:
            reader.start()
        if stdin_text is not None:
            try:
                process.stdin.write(stdin_text)
                process.stdin.close()
            except OSError:  # it ended before reading: its exit code and log say why
                pass
        exit_code = process.wait()
        for reader in readers:  # a child of the engine may hold its pipes open: its exit is the end
            reader.join(PIPE_DRAIN_S)
        if not any(reader.is_alive() for reader in readers):
            process.stdout.close()
            process.stderr.close()
        text = "".join(stdout)
        return EngineOutput(exit_code, exit_code < 0, text, log_lines + [s for s in text.splitlines() if s.strip()])

    def _read_log(self, stream: IO[str], log_lines: list[str]) -> None:
        for line in stream:
            if line.strip():
                log_lines.append(line.rstrip())
                self.report(line.rstrip())

    def work(self) -> None:
        try:
            result = self.request.run(self)
        except EngineError as exc:
            _send("failed", self, exc)
        except Exception as exc:  # a bug in a request: shown as an error, its traceback in the terminal
            traceback.print_exc()
            _send("failed", self, EngineError("internal", f"{type(exc).__name__}: {exc}",
                                              "This is a bug in QLoRA Studio; the terminal has the details."))
        else:
            _send("answered", self, result)

    # ------------------------------------------------------------------ on the GUI thread
    def _owner_gone(self) -> bool:
        return self.owner is not None and not shiboken6.isValid(self.owner)

    def _deliver(self, result: Any, error: EngineError | None) -> None:
        client = self._client()
        if client is not None and not shiboken6.isValid(client):  # its window was closed and Qt deleted it
            client = None
        if client is not None:
            client.forget(self)
        if client is None or self.cancelled or self._owner_gone():
            return
        self.answered, self.result, self.error = True, result, error
        callback = self._failed if error is not None else self._done
        if callback is not None:
            callback(error if error is not None else result)
        if shiboken6.isValid(client):  # the callback may have closed what held the client (emitting then crashes)
            client.answered.emit(self)

    def _show_progress(self, text: str) -> None:
        if self.is_running() and self._progress is not None and not self._owner_gone():
            self._progress(text)


class _Relay(QObject):
    """Carries answers from worker threads to the GUI thread. One for the whole app, never deleted, so a worker never
    emits on an object that is gone. A worker queues (what, call, value) in plain Python and emits `wake`, which has
    no arguments: no Python object rides in a queued Qt event between threads (PySide6 crashed, about one run in
    three of the GUI tests, with answers passed as `object` arguments of a queued signal)."""

    wake = Signal()

    def __init__(self) -> None:
        super().__init__()
        self.pending: queue.SimpleQueue[tuple[str, Call, Any]] = queue.SimpleQueue()
        self.wake.connect(self._deliver_pending)  # queued: the relay lives on the GUI thread

    def _deliver_pending(self) -> None:
        while True:
            try:
                what, call, value = self.pending.get_nowait()
            except queue.Empty:
                return
            if what == "progressed":
                call._show_progress(value)
            else:
                call._deliver(value, None) if what == "answered" else call._deliver(None, value)


_RELAY: list[_Relay] = []


def _send(what: str, call: Call, value: Any) -> None:
    """From a worker thread: `what` ("answered", "failed", "progressed") for the GUI thread; after the app has quit
    (the relay is gone) there is no one to tell."""
    relay = _RELAY[0]
    if shiboken6.isValid(relay):
        relay.pending.put((what, call, value))
        relay.wake.emit()


class EngineClient(QObject):
    """Runs requests off the GUI thread: `run(request, done=..., failed=...)`; the one place that does."""

    answered = Signal(object)  # a Call, after its done or failed callback ran (tests wait for it)

    def __init__(self, engine_command: list[str] | None = None, parent: QObject | None = None) -> None:
        super().__init__(parent)
        if not _RELAY:
            _RELAY.append(_Relay())  # made on the GUI thread, which the answers are delivered to
        self.engine_command = engine_command or default_engine_command()
        self.pool = QThreadPool.globalInstance()
        self.pool.setMaxThreadCount(max(self.pool.maxThreadCount(), MIN_WORKERS))
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
