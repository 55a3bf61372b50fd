"""How the app starts the engine as a child process: its command line, the child's environment, and the error for
an engine that ended without saying why. Shared by the long-running streams (engine_process) and the short
queries (engine_client); no Qt here.
"""
from __future__ import annotations

import importlib.util
import os
import shlex
import sys
from pathlib import Path

from qlora_engine.protocol.errors import EngineError

ENGINE_COMMAND_ENV = "QLORA_STUDIO_ENGINE"
REINSTALL_ADVICE = "Reinstall QLoRA Studio (or run it from its launcher), then try again."


def default_engine_command() -> list[str]:
    """How to start the engine: $QLORA_STUDIO_ENGINE when set (tests point it at a fake engine)."""
    override = os.environ.get(ENGINE_COMMAND_ENV)
    if override:
        return shlex.split(override, posix=os.name != "nt")
    if getattr(sys, "frozen", False):  # a PyInstaller bundle: its executable runs the engine after --engine
        return [sys.executable, "--engine"]
    return [sys.executable, "-m", "qlora_engine"]


def child_environment() -> dict[str, str]:
    """This process's environment, read now, with unbuffered UTF-8 output and this checkout's qlora_engine."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"  # log lines arrive as they are printed, not in 8 KiB chunks
    env["PYTHONIOENCODING"] = "utf-8"
    # Running from a source checkout: let the child import the same qlora_engine as this process.
    spec = importlib.util.find_spec("qlora_engine")
    if spec is not None and spec.origin:
        source_root = str(Path(spec.origin).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (source_root, env.get("PYTHONPATH", "")) if p)
    return env


def crash_error(exit_code: int, crashed: bool, last_log_lines: list[str]) -> EngineError:
    """The error to show when the engine ended without saying why (killed, segfault, uncaught bug)."""
    tail = last_log_lines[-1] if last_log_lines else ""
    last_line = f" Last line: {tail}" if tail else ""
    if crashed:
        return EngineError("engine_killed", "The engine process was killed before it finished." + last_line,
                           "If the computer ran out of memory the system stops the largest process: try a smaller "
                           "model, sequence length or batch. A run with a checkpoint can be resumed from Runs.")
    return EngineError("engine_crashed", f"The engine stopped with exit code {exit_code}." + last_line,
                       "The log has the details. A run with a checkpoint can be resumed from Runs; "
                       "if it happens again, report the log.")


def not_started_error(command: list[str], reason: str) -> EngineError:
    return EngineError("engine_not_started", f"Could not start the engine ({' '.join(command)}): {reason}",
                       REINSTALL_ADVICE)
