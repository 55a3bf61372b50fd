"""Checkpoints: adapter, optimizer, scheduler, RNG and data position, written whole or not at all.

A checkpoint is written into `checkpoints/.tmp-step-N/` and renamed to `step-N/` only when complete,
so a kill at any moment leaves either the previous checkpoints or the new one, never half of one.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from qlora_engine.protocol.errors import EngineError, write_failure
from qlora_engine.training import sharding

STEP_DIR = re.compile(r"^step-(\d+)$")
KEEP_LAST = 2
STATE_FILE = "trainer_state.json"
TMP_PREFIX = ".tmp-step-"
CONFIG_FILE = "config.json"  # the options the run had when this checkpoint was written
SCALER_FILE = "scaler.pt"  # fp16 runs: the loss scaler's scale and growth tracker
LORA_KEY_MARK = sharding.LORA_KEY_MARK  # lora_A, lora_B, lora_magnitude_vector (DoRA), lora_embedding_A/B


@dataclass
class TrainerState:
    step: int  # optimizer steps done
    micro_index: int  # micro-batches consumed: the data position
    total_steps: int
    seed: int
    skipped_steps: int = 0  # fp16 steps whose gradients overflowed: skipped by the loss scaler, not applied
    # the best checkpoint so far (training.best_checkpoint): its step (0 = none yet), its eval loss, and the
    # evaluations since it that did not improve on it (early stopping counts them)
    best_step: int = 0
    best_eval_loss: float | None = None
    evals_without_improvement: int = 0


@dataclass
class Whole:
    """A sharded (FSDP) run's adapter and optimizer state, gathered whole from every rank, for rank 0 to write: the
    same files as a single process writes."""
    adapter: dict[str, Any]  # the model's LoRA weights by state-dict name (peft's save_pretrained(state_dict=...))
    optimizer: dict[str, Any]  # optimizer.state_dict() with every state whole


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp folders and ones missing their state are ignored)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir: Path, model: Any, optimizer: Any, scheduler: Any, state: TrainerState,
                    config: dict[str, Any] | None = None, scaler: Any = None, whole: Whole | None = None) -> Path:
    root = checkpoint_root(run_dir)
    final = root / f"step-{state.step}"
    tmp = root / f"{TMP_PREFIX}{state.step}-{os.getpid()}"
    # a full disk or an unwritable folder: the earlier checkpoints stay as they were
    with writing_folder(tmp, f"checkpoint step-{state.step}", root,
                        "resume the run (--resume): it continues from its last complete checkpoint, which is intact"):
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp / "adapter", state_dict=whole.adapter if whole else None)
        torch.save(whole.optimizer if whole else optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(_rng_state(), tmp / "rng.pt")
        if scaler is not None:
            torch.save(scaler.state_dict(), tmp / SCALER_FILE)
        if config is not None:
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1), encoding="utf-8")
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=1), encoding="utf-8")
        _fsync_tree(tmp)
        replace_folder(tmp, final, root / f".tmp-{final.name}-old-{os.getpid()}")
    _prune(run_dir, keep_step=state.best_step)
    return final


@contextmanager
def writing_folder(tmp: Path, what: str, folder: Path, then: str) -> Iterator[None]:
    """Around writing `what` into the temp folder `tmp`: on any failure `tmp` is removed, and a failed write (full
    disk, unwritable folder; see events.write_failure, judged before `tmp` frees its space) becomes an EngineError
    whose advice ends with `then`. Other exceptions pass through unchanged."""
    try:
        yield
    except Exception as exc:
        error = write_failure(exc, what, folder, then)
        shutil.rmtree(tmp, ignore_errors=True)
        if error is None:
            raise
        raise error from exc


def replace_folder(tmp: Path, final: Path, old: Path) -> None:
    """Move the complete folder `tmp` to `final`. An existing `final` is first moved to `old` and removed after,
    so that no moment has a half-deleted `final` on disk (a re-save of a step, a new export over an earlier one)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_folder(final.parent)


def load_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any, scaler: Any = None,
                    sharded: bool = False) -> TrainerState:
    """Put the checkpoint's adapter, optimizer, scheduler, loss scale and RNG into the run; its TrainerState.
    Every LoRA weight of the model must come from the checkpoint and every checkpoint weight must land in the
    model, else EngineError `checkpoint_mismatch` (nothing is ignored). `sharded` (FSDP): the whole weights and
    optimizer states are cut as this rank's shards are."""
    load_adapter_weights(path / "adapter" / "adapter_model.safetensors", model, sharded)
    optimizer_state = torch.load(path / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(sharding.cut_optimizer_state(optimizer_state, optimizer) if sharded else optimizer_state)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    if scaler is not None and (path / SCALER_FILE).is_file():
        scaler.load_state_dict(torch.load(path / SCALER_FILE, weights_only=True))
    _restore_rng(torch.load(path / "rng.pt", weights_only=True))
    return TrainerState(**json.loads((path / STATE_FILE).read_text(encoding="utf-8")))


def stored_config(path: Path) -> dict[str, Any] | None:
    """The options the run had when this checkpoint was written; None for a checkpoint from before they were kept."""
    config_file = path / CONFIG_FILE
    return json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else None


def load_adapter_weights(file: Path, model: Any, sharded: bool = False) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(file))
    try:
        result = set_peft_model_state_dict(model, sharding.cut_adapter_weights(model, weights) if sharded else weights)
    except RuntimeError as exc:  # a weight of another shape (size mismatch)
        raise mismatch_error(file, str(exc).splitlines()[-1].strip()) from exc
    missing = [key for key in result.missing_keys if LORA_KEY_MARK in key]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        parts = [f"{len(keys)} {what} LoRA weight(s), e.g. {keys[0]}"
                 for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise mismatch_error(file, "; ".join(parts))


def mismatch_error(file: Path, detail: str) -> EngineError:
    return EngineError("checkpoint_mismatch", f"{file} does not fit this run's adapter: {detail}",
                       "The checkpoint was written by a run with another adapter (rank, target modules or model). "
                       "Resume with that run's options, or start a new run without --resume.")


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` survive a power cut, not only a kill (POSIX only: Windows can't open a folder)."""
    if os.name != "posix":
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _prune(run_dir: Path, keep_step: int = 0) -> None:
    """The last KEEP_LAST checkpoints stay, and the best one (`keep_step`) wherever it is."""
    for old in complete_checkpoints(run_dir)[:-KEEP_LAST]:
        if old.name != f"step-{keep_step}":
            shutil.rmtree(old, ignore_errors=True)
    # temp folders left by a killed engine (the run lock means no other engine is writing one now)
    for leftover in checkpoint_root(run_dir).glob(TMP_PREFIX + "*"):
        shutil.rmtree(leftover, ignore_errors=True)
