"""One engine command in a child process (QProcess), its JSON-lines events turned into Qt signals.

Holds no engine logic: it starts `python -m qlora_engine ...`, reads events with `events.parse_line`,
passes other lines on as log text, and reports a crash (exit without an `error` event) as an error.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shlex
import sys
from collections import deque
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, QProcess, QProcessEnvironment, Signal, SignalInstance

from qlora_engine.events import parse_line

ENGINE_COMMAND_ENV = "QLORA_STUDIO_ENGINE"


def default_engine_command() -> list[str]:
    """How to start the engine: $QLORA_STUDIO_ENGINE when set (tests point it at a fake engine)."""
    override = os.environ.get(ENGINE_COMMAND_ENV)
    if override:
        return shlex.split(override, posix=os.name != "nt")
    if getattr(sys, "frozen", False):  # a PyInstaller bundle: its executable runs the engine after --engine
        return [sys.executable, "--engine"]
    return [sys.executable, "-m", "qlora_engine"]


def _child_environment() -> QProcessEnvironment:
    env = QProcessEnvironment.systemEnvironment()
    env.insert("PYTHONUNBUFFERED", "1")  # log lines arrive as they are printed, not in 8 KiB chunks
    env.insert("PYTHONIOENCODING", "utf-8")
    # Running from a source checkout: let the child import the same qlora_engine as this process.
    spec = importlib.util.find_spec("qlora_engine")
    if spec is not None and spec.origin:
        source_root = str(Path(spec.origin).resolve().parent.parent)
        pythonpath = env.value("PYTHONPATH", "")
        env.insert("PYTHONPATH", os.pathsep.join(p for p in (source_root, pythonpath) if p))
    return env


def _start(process: QProcess, command: list[str], args: list[str]) -> None:
    process.setProcessEnvironment(_child_environment())  # read now: the environment may have changed since
    process.start(command[0], [*command[1:], *args])


def crash_error(exit_code: int, crashed: bool, last_log_lines: list[str]) -> dict[str, Any]:
    """The error to show when the engine ended without saying why (killed, segfault, uncaught bug)."""
    tail = last_log_lines[-1] if last_log_lines else ""
    if crashed:
        return {"code": "engine_killed",
                "message": "The engine process was killed before it finished."
                           + (f" Last line: {tail}" if tail else ""),
                "advice": "If the computer ran out of memory the system stops the largest process: try a smaller "
                          "model, sequence length or batch. A run with a checkpoint can be resumed from Runs."}
    return {"code": "engine_crashed",
            "message": f"The engine stopped with exit code {exit_code}." + (f" Last line: {tail}" if tail else ""),
            "advice": "The log has the details. A run with a checkpoint can be resumed from Runs; "
                      "if it happens again, report the log."}


class EngineProcess(QObject):
    """A long-running engine command (train, export, chat --serve) speaking the event protocol."""

    # one signal per event kind, each with the event's dict
    started = Signal(dict)
    model_loaded = Signal(dict)
    data_ready = Signal(dict)
    step = Signal(dict)
    eval = Signal(dict)
    checkpoint = Signal(dict)
    warning = Signal(dict)
    error = Signal(dict)
    stopped = Signal(dict)
    finished = Signal(dict)
    comparison = Signal(dict)
    export_progress = Signal(dict)
    exported = Signal(dict)
    chat_ready = Signal(dict)
    chat_token = Signal(dict)
    chat_done = Signal(dict)

    event = Signal(dict)  # every event, in order, before its own signal
    log_line = Signal(str)  # stdout lines that are not events, and all of stderr
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
        event = parse_line(line) if channel == "stdout" else None
        if event is None:
            if line.strip():
                self._recent_log.append(line)
                self.log_line.emit(line)
            return
        if event["kind"] == "error":
            self._error_seen = True
        self.event.emit(event)
        kind_signal = getattr(self, event["kind"], None)
        if isinstance(kind_signal, SignalInstance):  # a kind newer than this app has only `event`
            kind_signal.emit(event)

    def _emit_error(self, error: dict[str, Any]) -> None:
        self._error_seen = True
        event = {"kind": "error", **error}
        self.event.emit(event)
        self.error.emit(event)

    def _on_finished(self, exit_code: int, exit_status: QProcess.ExitStatus) -> None:
        self._read("stdout")
        self._read("stderr")
        self._flush_partial_lines()
        crashed = exit_status == QProcess.ExitStatus.CrashExit
        if (crashed or exit_code != 0) and not self._error_seen:
            self._emit_error(crash_error(exit_code, crashed, list(self._recent_log)))
        self.exited.emit(exit_code if not crashed else -1)

    def _on_process_error(self, process_error: QProcess.ProcessError) -> None:
        if process_error != QProcess.ProcessError.FailedToStart:
            return  # crashes also end in `finished`, handled there
        self._emit_error({"code": "engine_not_started",
                          "message": f"Could not start the engine ({' '.join(self.command)}): "
                                     f"{self._process.errorString()}",
                          "advice": "Reinstall QLoRA Studio (or run it from its launcher), then try again."})
        self.exited.emit(-1)


class EngineQuery(QObject):
    """A short engine command that prints one JSON object (`model-info --json`, `data --json`)."""

    result = Signal(dict)
    failed = Signal(dict)  # {code, message, advice}
    running_changed = Signal(bool)

    def __init__(self, command: list[str] | None = None, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.command = command or default_engine_command()
        self._process: QProcess | None = None
        self._spent: list[QProcess] = []  # ended processes, deleted at the next run, never inside their own signal

    def run(self, args: list[str]) -> None:
        """Start the command; a query still running is abandoned (its answer would be stale)."""
        self.cancel()
        for process in self._spent:
            process.deleteLater()
        self._spent.clear()
        process = QProcess(self)
        process.finished.connect(lambda code, status: self._on_finished(process, code, status))
        process.errorOccurred.connect(lambda err: self._on_process_error(process, err))
        self._process = process
        _start(process, self.command, args)
        self.running_changed.emit(True)

    def is_running(self) -> bool:
        return self._process is not None

    def cancel(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        self._spent.append(process)
        process.kill()  # its finished signal now finds it is no longer the current query
        process.waitForFinished(2000)
        self.running_changed.emit(False)

    def _on_finished(self, process: QProcess, exit_code: int, exit_status: QProcess.ExitStatus) -> None:
        if process is not self._process:
            return
        self._process = None
        self._spent.append(process)
        stdout = bytes(process.readAllStandardOutput()).decode("utf-8", errors="replace")
        stderr = bytes(process.readAllStandardError()).decode("utf-8", errors="replace")
        answer = _last_json_object(stdout)
        self.running_changed.emit(False)
        if answer is not None and isinstance(answer.get("error"), dict):
            self.failed.emit(answer["error"])
        elif answer is not None and exit_code == 0:
            self.result.emit(answer)
        else:
            log_lines = [line for line in (stderr + stdout).splitlines() if line.strip()]
            self.failed.emit(crash_error(exit_code, exit_status == QProcess.ExitStatus.CrashExit, log_lines))

    def _on_process_error(self, process: QProcess, process_error: QProcess.ProcessError) -> None:
        if process is not self._process or process_error != QProcess.ProcessError.FailedToStart:
            return
        self._process = None
        self._spent.append(process)
        self.running_changed.emit(False)
        self.failed.emit({"code": "engine_not_started",
                          "message": f"Could not start the engine: {process.errorString()}",
                          "advice": "Reinstall QLoRA Studio (or run it from its launcher), then try again."})


def _last_json_object(stdout: str) -> dict[str, Any] | None:
    """The command's answer: all of stdout as JSON, or else its last line that is a JSON object."""
    candidates = [stdout] + [line for line in reversed(stdout.splitlines()) if line.lstrip().startswith("{")]
    for text in candidates:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None
