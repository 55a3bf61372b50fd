"""A long-running engine command (train, export, chat --serve) in a child process (QProcess), its JSON-lines
events turned into Qt signals carrying the protocol's typed events.

Holds no engine logic: it starts `python -m qlora_engine ...`, reads events with `events.parse_line`, passes other
lines on as log text, and reports a crash (exit without an `error` event) as an `ev.Error`. Short queries and
in-process calls go through engine_client instead.
"""
from __future__ import annotations

import json
import os
from collections import deque
from typing import Any

from PySide6.QtCore import QObject, QProcess, QProcessEnvironment, Signal, SignalInstance

from app.engine_command import child_environment, crash_error, default_engine_command, not_started_error
from qlora_engine.protocol import events as ev


def _start(process: QProcess, command: list[str], args: list[str]) -> None:
    environment = QProcessEnvironment()
    for name, value in child_environment().items():  # read now: the environment may have changed since
        environment.insert(name, value)
    process.setProcessEnvironment(environment)
    process.start(command[0], [*command[1:], *args])


class EngineProcess(QObject):
    """A long-running engine command speaking the event protocol; every signal carries an `ev.Event` object."""

    # one signal per event kind, each with the typed event (ev.Started, ev.Step, ...)
    started = Signal(object)
    model_loaded = Signal(object)
    data_ready = Signal(object)
    step = Signal(object)
    eval = Signal(object)
    checkpoint = Signal(object)
    warning = Signal(object)
    error = Signal(object)
    stopped = Signal(object)
    finished = Signal(object)
    comparison = Signal(object)
    export_progress = Signal(object)
    exported = Signal(object)
    gguf_exported = Signal(object)
    chat_ready = Signal(object)
    chat_token = Signal(object)
    chat_done = Signal(object)

    event = Signal(object)  # every event, in order, before its own signal (an ev.UnknownEvent has only this one)
    log_line = Signal(str)  # stdout lines that are not events, events this version can't read, and all of stderr
    exited = Signal(int)  # exit code, after the last event (and after a crash's error)

    def __init__(self, command: list[str] | None = None, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.command = command or default_engine_command()
        self.stop_requested = False
        self._error_seen = False
        self._partial = {"stdout": b"", "stderr": b""}
        self._recent_log: deque[str] = deque(maxlen=20)
        self._process = QProcess(self)
        if os.name == "posix":  # its own session: a terminal's Ctrl+C or hang-up doesn't end a detached run
            self._process.setUnixProcessParameters(QProcess.UnixProcessFlag.CreateNewSession)
        self._process.readyReadStandardOutput.connect(lambda: self._read("stdout"))
        self._process.readyReadStandardError.connect(lambda: self._read("stderr"))
        self._process.finished.connect(self._on_finished)
        self._process.errorOccurred.connect(self._on_process_error)

    def start(self, args: list[str]) -> None:
        if self.is_running():
            raise RuntimeError("the engine is already running this command")
        self.stop_requested = False
        self._error_seen = False
        self._partial = {"stdout": b"", "stderr": b""}
        self._recent_log.clear()
        self.log_line.emit("$ " + " ".join(["qlora_engine", *args]))
        _start(self._process, self.command, args)

    def is_running(self) -> bool:
        return self._process.state() != QProcess.ProcessState.NotRunning

    def send_line(self, text: str) -> None:
        if self.is_running():
            self._process.write((text + "\n").encode("utf-8"))

    def send_json(self, message: dict[str, Any]) -> None:
        self.send_line(json.dumps(message))

    def stop(self) -> None:
        """Ask the engine to finish its step, write a checkpoint and exit."""
        self.stop_requested = True
        self.send_line("stop")

    def kill(self) -> None:
        """End the engine now; no checkpoint is written."""
        if self.is_running():
            self._process.kill()

    def wait_for_exit(self, timeout_ms: int) -> bool:
        return self._process.waitForFinished(timeout_ms)

    def detach(self) -> QProcess:
        """Hand over the child so that closing the window does not kill it (see app.main)."""
        self._process.setParent(None)
        return self._process

    # ------------------------------------------------------------------ reading output
    def _read(self, channel: str) -> None:
        raw = bytes(self._process.readAllStandardOutput() if channel == "stdout"
                    else self._process.readAllStandardError())
        lines = (self._partial[channel] + raw).split(b"\n")
        self._partial[channel] = lines.pop()
        for line in lines:
            self._handle_line(line.decode("utf-8", errors="replace").rstrip("\r"), channel)

    def _flush_partial_lines(self) -> None:
        for channel, rest in self._partial.items():
            if rest:
                self._handle_line(rest.decode("utf-8", errors="replace"), channel)
        self._partial = {"stdout": b"", "stderr": b""}

    def _handle_line(self, line: str, channel: str) -> None:
        event = ev.parse_line(line) if channel == "stdout" else None
        if event is None or isinstance(event, ev.UnknownEvent):
            if line.strip():
                self._recent_log.append(line)
                self.log_line.emit(line if event is None else f"(an event this version can't read, "
                                                              f"{event.reason}: {line.strip()})")
            if event is None:
                return
        self._error_seen = self._error_seen or isinstance(event, ev.Error)
        self.event.emit(event)
        kind_signal = getattr(self, event.kind, None)
        if isinstance(kind_signal, SignalInstance) and event.kind in ev.EVENT_TYPES:
            kind_signal.emit(event)

    def _emit_error(self, error: ev.Error) -> None:
        self._error_seen = True
        self.event.emit(error)
        self.error.emit(error)

    def _on_finished(self, exit_code: int, exit_status: QProcess.ExitStatus) -> None:
        self._read("stdout")
        self._read("stderr")
        self._flush_partial_lines()
        crashed = exit_status == QProcess.ExitStatus.CrashExit
        if (crashed or exit_code != 0) and not self._error_seen:
            self._emit_error(ev.Error.from_exception(crash_error(exit_code, crashed, list(self._recent_log))))
        self.exited.emit(exit_code if not crashed else -1)

    def _on_process_error(self, process_error: QProcess.ProcessError) -> None:
        if process_error != QProcess.ProcessError.FailedToStart:
            return  # crashes also end in `finished`, handled there
        self._emit_error(ev.Error.from_exception(not_started_error(self.command, self._process.errorString())))
        self.exited.emit(-1)
