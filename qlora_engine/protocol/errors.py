"""The one error type a user can hit and act on (code, message naming the file / line / field, advice), and how a
failed write becomes one. Every layer raises it; the CLI turns it into an `error` event. No torch here."""
from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Any

CONFIG_ADVICE = "Fix the value in the run's config.yaml or the matching command-line flag."


class EngineError(Exception):
    """An error a user can hit and act on; it becomes an `error` event with code, message and advice.

    `details` are extra fields of that event (e.g. a `cuda_oom` error's measured peak and the estimator's fixes).
    Codes in use include bad_config (an option's value), bad_model_config (a config.json the estimate can't read),
    bad_data, model_not_found, disk_full, write_failed, cuda_oom, nan_loss, no_checkpoint, run_locked.
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


def config_error(message: str, advice: str = "") -> EngineError:
    """A run option a person must fix; the message names the field (or file and line) and what is allowed."""
    return EngineError("bad_config", message, advice or CONFIG_ADVICE)


def model_config_error(message: str, advice: str = "") -> EngineError:
    """A model config.json (or option) the memory estimate can't work with; the message names the file or field."""
    return EngineError("bad_model_config", message,
                       advice or "Pass a Hugging Face model folder (with config.json) or its config.json.")
