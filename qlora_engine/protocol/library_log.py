"""Library noise kept in the run's log file (`<run>/engine.log`), out of the terminal and the GUI's log view.

transformers, peft, bitsandbytes and torch warn at every start about things a user can't act on (a CPU kernel
package not installed, an API peft still calls being deprecated). Their logging records and Python warnings are
held in memory from `capture()` until `write_to(file)` names the file, then appended to it; errors still reach
stderr as well, since those are real problems. The engine's own messages are events, never logging. No torch here.
"""
from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import IO, Any

LOG_FILE = "engine.log"
LIBRARIES = ("transformers", "peft", "bitsandbytes", "torch", "accelerate", "huggingface_hub", "datasets",
             "safetensors", "tokenizers", "triton")


class LibraryLog(logging.Handler):
    """Lines held until the file is known, then appended to it; ERROR and above also go to stderr."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.held: list[str] = []
        self.file: IO[str] | None = None
        self.path: Path | None = None

    def write_line(self, line: str) -> None:
        if self.file is None:
            self.held.append(line)
            return
        try:
            self.file.write(line + "\n")
            self.file.flush()
        except OSError:  # disk full: the log is the least of it, and the run reports the disk itself
            pass

    def emit(self, record: logging.LogRecord) -> None:
        line = self.format(record)
        self.write_line(line)
        if record.levelno >= logging.ERROR:
            print(line, file=sys.stderr, flush=True)

    def open(self, path: Path) -> None:
        """Write to `path` from now on; a later run in the same process (tests, the GUI's in-process
        helpers) gets its own file, never the first run's."""
        if self.file is not None:
            self.file.close()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", encoding="utf-8")
        self.path = path
        for line in self.held:
            self.write_line(line)
        self.held.clear()


_active: dict[str, Any] = {}


def is_library_file(filename: str) -> bool:
    parts = Path(filename).parts
    return any(part in LIBRARIES for part in parts[-6:-1]) and ("site-packages" in parts or "dist-packages" in parts)


def capture() -> None:
    """From now on library warnings and log records are held for the log file (idempotent)."""
    if _active:
        return
    handler = LibraryLog()
    original_showwarning = warnings.showwarning

    def showwarning(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None,
                    line: str | None = None) -> None:
        if is_library_file(filename):
            handler.write_line(f"{category.__name__} at {filename}:{lineno}: {message}")
        else:
            original_showwarning(message, category, filename, lineno, file, line)

    root = logging.getLogger()
    _active.update(handler=handler, showwarning=original_showwarning, root_level=root.level)
    root.addHandler(handler)
    root.setLevel(min(root.level, logging.WARNING) if root.level else logging.WARNING)
    warnings.showwarning = showwarning
    _route_transformers_logging(True)


def write_to(path: Path) -> None:
    """Append what was held, and everything after, to `path` (the run's engine.log)."""
    if _active and _active["handler"].path != path:
        _active["handler"].open(path)


def release() -> None:
    """Back to the libraries' own printing (tests)."""
    if not _active:
        return
    handler = _active.pop("handler")
    logging.getLogger().removeHandler(handler)
    logging.getLogger().setLevel(_active.pop("root_level"))
    warnings.showwarning = _active.pop("showwarning")
    _route_transformers_logging(False)
    if handler.file is not None:
        handler.file.close()
    _active.clear()


def _route_transformers_logging(to_root: bool) -> None:
    """transformers prints through its own stderr handler; send its records to the root logger's handler instead."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    if to_root:
        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
    else:
        hf_logging.disable_propagation()
        hf_logging.enable_default_handler()
