"""One engine per run folder: a lock file holding the owner's pid, taken over when that process is gone."""
from __future__ import annotations

import os
from pathlib import Path

from qlora_engine.protocol.errors import EngineError

LOCK_NAME = ".lock"


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists (a lock's or a temp folder's owner)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_NAME
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if self._owner_alive():
                    raise EngineError("run_locked", f"{self.path.parent} is in use by another engine "
                                      f"(pid {self._owner()})",
                                      "Wait for that run to finish or stop it, or pick another run folder.") from None
                self.path.unlink(missing_ok=True)  # stale: its owner was killed
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(str(os.getpid()))
            self.held = True
            return
        raise EngineError("run_locked", f"could not take the lock {self.path}", "Try again.")

    def _owner(self) -> int | None:
        try:
            return int(self.path.read_text().strip() or 0) or None
        except (OSError, ValueError):
            return None

    def _owner_alive(self) -> bool:
        owner = self._owner()
        return owner is not None and process_alive(owner)

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def engine_alive(run_dir: Path) -> bool:
    """Whether an engine holds this run folder now (its lock names a living process)."""
    return RunLock(run_dir)._owner_alive()
