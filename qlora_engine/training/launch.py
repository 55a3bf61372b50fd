"""`qlora-studio train --nproc N`: start the run's N engine processes through torchrun and watch them.

This process owns the run folder (its lock) while torchrun runs; rank 0's events reach stdout and events.jsonl
straight from rank 0. A stop (SIGINT, a `stop` line on stdin) becomes the stop file every rank checks; a run that
ended without a final event (a rank killed, torchrun failed) gets its `error` event here. No model is loaded here.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path

from qlora_engine.protocol import events as ev
from qlora_engine.protocol.config import RunConfig
from qlora_engine.protocol.errors import EngineError
from qlora_engine.protocol.events import EventWriter, read_events
from qlora_engine.protocol.run_lock import RunLock
from qlora_engine.training import distributed

FINAL_KINDS = ("finished", "stopped", "error")
TORCHRUN_ENV = "QLORA_TORCHRUN_ARGS"  # torchrun's own options (multi-node rendezvous) when --torchrun isn't given


def torchrun_command(cfg: RunConfig, run_dir: Path, events_mode: str, resume: bool,
                     torchrun_args: str = "") -> list[str]:
    """python -m torch.distributed.run ... -m qlora_engine train <run>/config.yaml: one node of `nproc` processes
    (--standalone: a local rendezvous on a free port) unless torchrun options say otherwise (--nnodes,
    --rdzv-endpoint, ... for several machines). No restarts: a failed rank ends the run."""
    command = [*torchrun_prefix(cfg.nproc, torchrun_args), "-m", "qlora_engine", "train",
               str(run_dir / "config.yaml"), "--run-dir", str(run_dir), "--events", events_mode]
    return command + (["--resume"] if resume else [])


def torchrun_prefix(nproc: int, torchrun_args: str = "") -> list[str]:
    """torchrun up to the module it starts: `nproc` processes on this node, standalone unless torchrun options say
    otherwise, no restarts. The engine's runs and the speed bench's several-process runs start the same way."""
    own = shlex.split(torchrun_args or os.environ.get(TORCHRUN_ENV, "")) or ["--standalone"]
    return [sys.executable, "-m", "torch.distributed.run", *own, "--nproc-per-node", str(nproc),
            "--max-restarts", "0", "--monitor-interval", "1"]


def launch_train(cfg: RunConfig, run_dir: Path, events_mode: str, resume: bool, torchrun_args: str = "") -> int:
    """This process writes the run's config and holds its lock while torchrun runs the ranks."""
    from qlora_engine.training.loop import StopRequest

    check_layout(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.yaml")
    stop = StopRequest()
    stop.install()
    with RunLock(run_dir):
        return run_under_torchrun(cfg, run_dir, events_mode, resume, stop, torchrun_args)


def run_under_torchrun(cfg: RunConfig, run_dir: Path, events_mode: str, resume: bool, stop: object,
                       torchrun_args: str = "") -> int:
    """Start torchrun, turn the user's stop into the stop file, wait; torchrun's exit code."""
    stop_file = run_dir / distributed.STOP_FILE
    stop_file.unlink(missing_ok=True)
    distributed.clear_rank_errors(run_dir)
    events_file = run_dir / "events.jsonl"
    seen_before = len(list(read_events(events_file))) if events_file.is_file() else 0
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    # its own session: a Ctrl+C in the terminal reaches this process only, which asks the ranks to checkpoint first
    process = subprocess.Popen(torchrun_command(cfg, run_dir, events_mode, resume, torchrun_args),
                               stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    threading.Thread(target=_write_stop_file, args=(stop, stop_file, process), daemon=True).start()
    try:
        code = process.wait()
    except KeyboardInterrupt:  # a second Ctrl+C: end the ranks now, without a checkpoint
        os.killpg(process.pid, signal.SIGTERM)
        process.wait()
        raise
    finally:
        stop_file.unlink(missing_ok=True)
    _report_silent_end(run_dir, seen_before, code, events_mode)
    return code


def check_layout(cfg: RunConfig) -> None:
    """What a run of several processes cannot do, refused before any starts."""
    if cfg.parallel == "fsdp" and cfg.optimizer != "adamw":
        # bitsandbytes' paged optimizers run their own kernels on whole tensors, not on FSDP's sharded DTensors
        raise EngineError("bad_config", f"parallel: fsdp needs optimizer: adamw, not {cfg.optimizer}: bitsandbytes' "
                          "paged optimizers cannot update FSDP's sharded weights",
                          "Set optimizer: adamw (sharded, its states are split over the cards too), or use "
                          "parallel: ddp.")
    if cfg.parallel == "fsdp" and cfg.precision_budget_bits > 0:
        # measured on the CPU: FSDP's sharded parameter loses bitsandbytes' int8 state (Int8Params.CB)
        raise EngineError("bad_config", "parallel: fsdp cannot shard a precision budget's int8 layers (bitsandbytes "
                          "keeps their state on the parameter, which sharding replaces)",
                          "Set precision_budget_bits: 0 (plain 4-bit), or use parallel: ddp.")


def _write_stop_file(stop: object, stop_file: Path, process: subprocess.Popen) -> None:
    while process.poll() is None:
        if stop.event.wait(0.5):  # type: ignore[attr-defined]
            stop_file.write_text("stop\n", encoding="utf-8")
            return


def _report_silent_end(run_dir: Path, seen_before: int, code: int, events_mode: str) -> None:
    """Rank 0 reports its own end; if it could not (killed with the others), say so here."""
    events_file = run_dir / "events.jsonl"
    new = list(read_events(events_file))[seen_before:] if events_file.is_file() else []
    if any(event.kind in FINAL_KINDS for event in new):
        return
    writer = EventWriter(events_file, human=events_mode == "human")
    error = distributed.failed_rank_error(run_dir, RuntimeError(f"torchrun exited with code {code}"), wait_s=0)
    writer.emit(ev.Error.from_exception(error))
    writer.close()
