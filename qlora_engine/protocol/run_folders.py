"""The one rule for run folders: where they live, how a new one is named, which folders are runs, how one is
deleted. Used by the CLI and the GUI alike. No torch here."""
from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

from platformdirs import user_data_dir

from qlora_engine.protocol.errors import EngineError

RUNS_ENV = "QLORA_STUDIO_RUNS"
DEFAULT_MODEL_SLUG = "smollm2-135m-instruct"  # the bundled default model
CONFIG_NAME = "config.yaml"


def runs_root() -> Path:
    """$QLORA_STUDIO_RUNS, else platformdirs' user data dir's runs/ (~/.local/share/qlora-studio/runs on Linux)."""
    return Path(os.environ.get(RUNS_ENV) or Path(user_data_dir("qlora-studio")) / "runs")


def model_slug(model: str) -> str:
    """`default` -> smollm2-135m-instruct, `/models/My_Model/` -> my-model, `x/Llama-3.2-3B.gguf` -> llama-3-2-3b,
    `meta-llama/Llama-3.2-3B-Instruct` -> llama-3-2-3b-instruct."""
    if model == "default":
        return DEFAULT_MODEL_SLUG
    name = re.split(r"[\\/]", model.rstrip("/\\"))[-1]
    name = name[: -len(".gguf")] if name.lower().endswith(".gguf") else name
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "run"


def new_run_dir(runs_folder: Path, model: str, now: float | None = None) -> Path:
    """A fresh folder such as `<runs>/2026-12-01_21-54_smollm2-135m-instruct` (a `-2`, `-3` … when taken);
    not created here."""
    base = f"{time.strftime('%Y-%m-%d_%H-%M', time.localtime(now))}_{model_slug(model)}"
    candidate, number = runs_folder / base, 2
    while candidate.exists():
        candidate, number = runs_folder / f"{base}-{number}", number + 1
    return candidate


def is_run_dir(path: Path) -> bool:
    return (path / CONFIG_NAME).is_file()


# ----------------------------------------------------------------------------- inside a run folder
FINAL_ADAPTER = "final"  # --checkpoint's word for the finished adapter; a checkpoint's adapter is named step-N
CHECKPOINT_HELP = ("which of the run's adapters: final (the finished one), best (the checkpoint with the lowest eval "
                   "loss) or step-N [final]")


def adapter_folder(run_dir: Path, checkpoint: str = FINAL_ADAPTER) -> Path:
    """The finished adapter (<run>/adapter) or checkpoint step-N's (<run>/checkpoints/step-N/adapter)."""
    return run_dir / "adapter" if checkpoint == FINAL_ADAPTER else run_dir / "checkpoints" / checkpoint / "adapter"


def exports_folder(run_dir: Path, checkpoint: str = FINAL_ADAPTER) -> Path:
    """Where that adapter's exports go: <run>/exports, or <run>/exports/step-N for a checkpoint's."""
    return run_dir / "exports" if checkpoint == FINAL_ADAPTER else run_dir / "exports" / checkpoint


def run_dirs(runs_folder: Path) -> list[Path]:
    """Every run folder (one holding a config.yaml) directly inside `runs_folder`."""
    return [p for p in runs_folder.iterdir() if is_run_dir(p)] if runs_folder.is_dir() else []


def delete_run(run_dir: Path, runs_folder: Path) -> None:
    """Delete a run folder; refuses anything that is not a run directly inside the runs folder."""
    run_dir, runs_folder = run_dir.resolve(), runs_folder.resolve()
    if run_dir.parent != runs_folder or not is_run_dir(run_dir):
        raise EngineError("not_a_run", f"{run_dir} is not a run folder inside {runs_folder}",
                          "Only runs listed on the Runs page (folders with a config.yaml) can be deleted.")
    shutil.rmtree(run_dir)
