"""One run in several processes (ranks), inside torchrun: the process group, each rank's share of a micro-batch, the
adapter's gradients summed over ranks, a stop every rank agrees on, per-rank memory, a failed rank's error for rank 0.

Built on torch.distributed (gloo on the CPU, nccl on CUDA, one GPU per rank). Starting torchrun is launch.py's job.
A single process gets `Ranks()` (rank 0 of 1): every method is then a no-op and the loop runs as before.
"""
from __future__ import annotations

import datetime
import json
import os
import resource
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qlora_engine.protocol.errors import EngineError

TIMEOUT_ENV = "QLORA_DIST_TIMEOUT_S"  # how long a rank waits for the others at a collective before failing
DEFAULT_TIMEOUT_S = 900  # above a first step's compile and a 70B's load skew between ranks
STOP_FILE = ".stop-request"  # written by the launcher when the user stops a run of several processes
RANK_ERRORS = ".rank-errors"  # rank-N.json: the error a rank other than 0 failed with, for rank 0 to report
REPORT_WAIT_S = 3.0  # how long rank 0 waits for a failed rank's report before saying it left none


def in_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def collective_timeout_s() -> float:
    return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))


class RankTerminated(Exception):
    """torchrun ended this rank (SIGTERM) because another rank failed."""


@dataclass
class Ranks:
    """This process's place in the run; rank 0 writes events, checkpoints and the adapter."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.world > 1

    def share(self, rows: list[Any]) -> list[Any]:
        """This rank's contiguous slice of a global micro-batch (micro_batch_size x world rows): a run of N ranks at
        micro-batch b trains the same rows per step as one process at micro-batch N x b. May be empty at an epoch's
        last, short micro-batch."""
        per_rank = -(-len(rows) // self.world)
        return rows[self.rank * per_rank:(self.rank + 1) * per_rank]

    def sum_int(self, value: int) -> int:
        return int(self.sum_float(value)) if self.several else value

    def sum_float(self, value: float) -> float:
        if not self.several:
            return value
        total = torch.tensor([value], dtype=torch.float64, device=self._device())
        torch.distributed.all_reduce(total)
        return float(total.item())

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the trainable (LoRA) gradients over ranks in one flat all-reduce: each rank's loss is already divided
        by the step's trained tokens over all ranks, so the sum is the whole step's gradient. A rank whose share was
        empty contributes zeros."""
        if not self.several or not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        torch.distributed.all_reduce(flat)
        offset = 0
        for param, grad in zip(params, grads):
            count = grad.numel()
            param.grad = flat[offset:offset + count].view_as(param).to(param.dtype)
            offset += count

    def broadcast_parameters(self, params: list[torch.nn.Parameter]) -> None:
        """Rank 0's starting adapter on every rank (the seeded init already agrees; this makes it certain)."""
        if not self.several:
            return
        device = self._device()
        for param in params:  # through the backend's device (NCCL: the GPU), a model loaded on the CPU included
            value = param.data.to(device)
            torch.distributed.broadcast(value, src=0)
            param.data.copy_(value)

    def any(self, flag: bool) -> bool:
        if not self.several:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self._device())
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item())

    def gather(self, value: Any) -> list[Any]:
        if not self.several:
            return [value]
        gathered: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(gathered, value)
        return gathered

    def end_together(self) -> None:
        """Every rank waits here until all have finished: a rank done early (under ddp the others leave the loop
        while rank 0 still writes the adapter) must not tear its connections down under rank 0's feet."""
        if self.several:
            torch.distributed.barrier()

    def dropout_seed(self, seed: int, step: int) -> None:
        """Each rank's own dropout stream, a function of (seed, rank, step) alone: a resumed rank draws the same
        masks it would have without the stop (rank 0's saved RNG state is no use to the others)."""
        if self.several:
            torch.manual_seed((seed * 1_000_003 + self.rank * 10_007 + step) % 2**63)

    def _device(self) -> torch.device:
        if torch.distributed.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def setup(device_option: str) -> Ranks:
    """Join torchrun's process group (its RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* environment); one GPU per rank.
    Outside torchrun: Ranks() and nothing else."""
    if not in_torchrun():
        return Ranks()
    from qlora_engine.model.loading import resolve_device

    device = resolve_device(device_option)
    rank, world, local_rank = (int(os.environ[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise EngineError("bad_config", f"rank {rank} needs GPU {local_rank}, this machine has "
                              f"{torch.cuda.device_count()}", "Set nproc to at most the number of GPUs.")
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device == "cuda" else "gloo", rank=rank,
                                             world_size=world,
                                             timeout=datetime.timedelta(seconds=collective_timeout_s()))
    signal.signal(signal.SIGTERM, _on_sigterm)
    return Ranks(rank=rank, world=world, local_rank=local_rank)


def teardown() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _on_sigterm(signum: int, frame: Any) -> None:
    raise RankTerminated("torchrun ended this rank: another rank failed")


def rank_memory(device: str) -> dict[str, int]:
    """What this rank holds: on CUDA its GPU's figures (the loop's vram_figures), on the CPU its peak resident size."""
    if device == "cuda":
        free_bytes, total_bytes = torch.cuda.mem_get_info()
        return {"max_reserved": torch.cuda.max_memory_reserved(), "gpu_used": total_bytes - free_bytes,
                "gpu_total": total_bytes}
    return {"max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


# ----------------------------------------------------------------------------- stopping
class AgreedStop:
    """The user's stop for a run of several ranks: the launcher writes STOP_FILE (or a rank got SIGINT); every rank
    asks after each step and they agree (any rank saw it: all stop), so all checkpoint at the same step."""

    def __init__(self, local: Any, ranks: Ranks, run_dir: Path) -> None:
        self.local, self.ranks, self.file = local, ranks, run_dir / STOP_FILE

    @property
    def requested(self) -> bool:
        return self.ranks.any(self.local.requested or self.file.exists())


# ----------------------------------------------------------------------------- a failed rank
def write_rank_error(run_dir: Path, rank: int, error: dict[str, Any]) -> None:
    """A rank other than 0 leaves its error (an ev.Error's fields) where rank 0 looks for it."""
    folder = run_dir / RANK_ERRORS
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".rank-{rank}.json.tmp"
    tmp.write_text(json.dumps(error), encoding="utf-8")
    os.replace(tmp, folder / f"rank-{rank}.json")


def report_rank_failure(events: Any, exc: BaseException, ranks: Ranks, run_dir: Path | None,
                        report: Callable[[Any, BaseException], int]) -> int:
    """`report` (the CLI's: an error event, an exit code); with several ranks, rank 0 reports a failed collective as
    the failed rank's own error, and another rank leaves its own failure for rank 0 (an echo of another's, not)."""
    if not ranks.several or run_dir is None:
        return report(events, exc)
    collective = is_collective_failure(exc)
    code = report(events, failed_rank_error(run_dir, exc) if ranks.is_main and collective else exc)
    if not ranks.is_main and not collective:
        leave_rank_error(run_dir, ranks.rank, events.last_of_kind.get("error"))
    return code


def leave_rank_error(run_dir: Path, rank: int, error: Any) -> None:
    """A rank other than 0 failed on its own (not as an echo of another's failure): say so in its log, and leave
    the error (an ev.Error) for rank 0 to report."""
    if error is None:
        return
    print(f"rank {rank}: {error.message}", file=sys.stderr, flush=True)
    write_rank_error(run_dir, rank, error.to_dict())


def clear_rank_errors(run_dir: Path) -> None:
    for old in (run_dir / RANK_ERRORS).glob("rank-*.json"):
        old.unlink(missing_ok=True)


def failed_rank_error(run_dir: Path, exc: BaseException, wait_s: float = REPORT_WAIT_S) -> EngineError:
    """What rank 0 reports when a collective failed or torchrun ended it: the failed rank's own error when it left
    one, else that a rank went away without a report (killed, out of host memory), with what rank 0 saw."""
    deadline = time.time() + wait_s
    while True:
        reports = sorted((run_dir / RANK_ERRORS).glob("rank-*.json"))
        if reports or time.time() >= deadline:
            break
        time.sleep(0.2)
    if reports:
        report = json.loads(reports[0].read_text(encoding="utf-8"))
        rank = reports[0].stem.split("-")[1]
        return EngineError(report.get("code", "rank_failed"), f"rank {rank}: {report.get('message', '')}",
                           report.get("advice", ""))
    seen = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return EngineError("rank_failed", f"another rank of this run stopped without a report (killed, or out of "
                       f"memory); rank 0 saw: {seen}",
                       "Look at the log for the failed rank's last lines, fix the cause and resume the run "
                       "(--resume, same nproc) from its last checkpoint.")


def is_collective_failure(exc: BaseException) -> bool:
    """A failure that means another rank went away: torchrun's SIGTERM, a closed gloo/nccl connection, a timeout."""
    if isinstance(exc, RankTerminated):
        return True
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & {"DistBackendError", "DistNetworkError", "DistError"}) or (
        isinstance(exc, RuntimeError) and any(mark in str(exc) for mark in (
            "Connection closed by peer", "Connection reset by peer", "Gloo", "NCCL", "Timed out", "timed out")))
