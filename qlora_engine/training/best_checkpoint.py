"""The best checkpoint of a run and early stopping; and which adapter `export` and `chat` use (`--checkpoint`).

An evaluation after training began whose eval loss is lower than the best so far (by more than
early_stopping_min_delta; 0: strictly lower) is a new best: the loop makes sure a checkpoint exists at that step, and
the best's step and loss go into the trainer state every checkpoint holds from then on. So the mark survives a
resume exactly as the checkpoint it is in does, and pruning keeps the marked checkpoint. The base model's
evaluation at step 0 is no candidate: it has no trained adapter to export (it is where the curve starts).
Early stopping counts the evaluations since the last new best. No training here, only the bookkeeping.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_engine.protocol import events as ev
from qlora_engine.protocol.config import RunConfig
from qlora_engine.protocol.errors import EngineError
from qlora_engine.protocol.run_folders import FINAL_ADAPTER, adapter_folder, exports_folder
from qlora_engine.training.checkpoints import STATE_FILE, TrainerState, checkpoint_root, complete_checkpoints

FINAL, BEST = FINAL_ADAPTER, "best"  # --checkpoint's words: the run's final adapter, the checkpoint marked best
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class BestTracker:
    """Follows a run's evaluations: marks new bests in the trainer state, says when one needs its checkpoint
    written, and when early stopping ends the run."""

    def __init__(self, cfg: RunConfig, events: ev.EventWriter) -> None:
        self.patience, self.min_delta = cfg.early_stopping_patience, cfg.early_stopping_min_delta
        self.events = events
        self.stopped_early = False

    def observe(self, state: TrainerState, eval_loss: float) -> bool:
        """The evaluation at state.step (after at least one step): True when it is a new best."""
        if state.best_eval_loss is None or eval_loss < state.best_eval_loss - self.min_delta:
            state.best_step, state.best_eval_loss = state.step, round(eval_loss, 5)
            state.evals_without_improvement = 0
            return True
        state.evals_without_improvement += 1
        return False

    @staticmethod
    def needs_checkpoint(state: TrainerState, run_dir: Path) -> bool:
        """This step is the new best and no checkpoint holds it yet (save_steps may have written one just now)."""
        return state.best_step == state.step > 0 and not (checkpoint_path(run_dir, state.step) / STATE_FILE).is_file()

    def stop_now(self, state: TrainerState, ranks: Any, evaluated: bool) -> bool:
        """After an evaluation: whether the eval loss has not improved for `patience` evaluations in a row. Rank 0
        alone evaluates, so its count decides for every rank (`ranks.any`, called by all at the same steps)."""
        if not self.patience or not evaluated:
            return False
        self.stopped_early = ranks.any(ranks.is_main and state.evals_without_improvement >= self.patience)
        if self.stopped_early and ranks.is_main:
            by = f" by more than {self.min_delta:g}" if self.min_delta else ""
            self.events.emit(ev.Warning(
                message=f"early stopping at step {state.step} of {state.total_steps}: the eval loss has not improved"
                        f"{by} for {state.evals_without_improvement} evaluations in a row; the best was "
                        f"{state.best_eval_loss:.4f} at step {state.best_step} (export or chat with it: "
                        f"--checkpoint best)", step=state.step))
        return self.stopped_early


# ----------------------------------------------------------------------------- which adapter a command uses
@dataclass(frozen=True)
class AdapterChoice:
    """The adapter `--checkpoint` names: the final one (`final`) or a checkpoint's (`step-N`)."""

    name: str
    folder: Path  # PEFT format: adapter_config.json + adapter_model.safetensors

    def exports_dir(self, run_dir: Path) -> Path:
        """Where its exports go: <run>/exports for the final adapter, <run>/exports/step-N for a checkpoint's."""
        return exports_folder(run_dir, self.name)


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return checkpoint_root(run_dir) / f"step-{step}"


def best_mark(run_dir: Path) -> tuple[int, float | None] | None:
    """(step, eval loss) of the run's best checkpoint, from its latest checkpoint's trainer state; None when no
    evaluation after training began has marked one."""
    found = complete_checkpoints(run_dir)
    if not found:
        return None
    state = json.loads((found[-1] / STATE_FILE).read_text(encoding="utf-8"))
    return (state["best_step"], state.get("best_eval_loss")) if state.get("best_step") else None


def checkpoint_names(run_dir: Path) -> list[str]:
    """'step-20 (best, eval loss 0.5412)', 'step-40', …: the run's checkpoints that hold an adapter, oldest first."""
    mark = best_mark(run_dir)
    names = []
    for path in complete_checkpoints(run_dir):
        best = mark is not None and path.name == f"step-{mark[0]}"
        loss = f", eval loss {mark[1]:.4f}" if best and mark[1] is not None else ""
        if (path / "adapter" / ADAPTER_WEIGHTS).is_file():
            names.append(path.name + (f" (best{loss})" if best else ""))
    return names


def choose_adapter(run_dir: Path, checkpoint: str = FINAL) -> AdapterChoice:
    """The adapter folder for `--checkpoint`: final, best, step-N (or N); an EngineError naming the run's
    checkpoints when the run has no such adapter."""
    choice = (checkpoint or FINAL).strip().lower()
    if choice == FINAL:
        folder = adapter_folder(run_dir)
        if not (folder / "adapter_config.json").is_file():
            raise _no_such(run_dir, "has no final adapter: the run has not finished", choice)
        return AdapterChoice(FINAL, folder)
    if choice == BEST:
        mark = best_mark(run_dir)
        if mark is None:
            raise _no_such(run_dir, "has no best checkpoint: no evaluation after training began marked one "
                                    "(eval_steps 0 and no validation rows, or the run stopped before its first)",
                           choice)
        step = mark[0]
    else:
        match = re.fullmatch(r"(?:step-?)?(\d+)", choice)
        if match is None:
            raise _no_such(run_dir, f"has no checkpoint {checkpoint!r} (--checkpoint takes final, best or step-N)",
                           choice)
        step = int(match.group(1))
    folder = adapter_folder(run_dir, f"step-{step}")
    if not (folder / ADAPTER_WEIGHTS).is_file() or not (folder.parent / STATE_FILE).is_file():
        what = "its best checkpoint, " if choice == BEST else ""
        raise _no_such(run_dir, f"has no checkpoint step-{step} ({what}pruned or never written)", choice)
    return AdapterChoice(f"step-{step}", folder)


def _no_such(run_dir: Path, what: str, choice: str) -> EngineError:
    """`bad_checkpoint` (or `no_adapter` for the final adapter) naming what the run does have."""
    names = checkpoint_names(run_dir)
    has_final = (run_dir / "adapter" / "adapter_config.json").is_file()
    listing = ", ".join((["final (the finished adapter)"] if has_final else []) + names)
    message = f"{run_dir} {what}; " + (f"it has: {listing}" if listing else "it has no adapter or checkpoint yet")
    steps = [name.split(" ")[0] for name in names]
    words = (["final"] if has_final else []) + (["best"] if best_mark(run_dir) else []) + steps
    if choice == FINAL:
        advice = ("Let the run finish (or resume it) first" + (f", or use one of its checkpoints: --checkpoint "
                                                                f"{' / '.join(words)}" if steps else "") + ".")
        return EngineError("no_adapter", message, advice)
    advice = (f"Pass --checkpoint {' / '.join(words)}." if words else
              "Let the run train until it writes a checkpoint (every save_steps, at a stop, at its end).")
    return EngineError("bad_checkpoint", message, advice)
