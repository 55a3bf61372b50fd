"""Where the app finds its bundled resources and keeps its runs; no Qt widgets here."""
from __future__ import annotations

from pathlib import Path

from qlora_engine.protocol.run_folders import runs_root
from qlora_engine.resources import resources_dir

APP_NAME = "qlora-studio"
RESOURCES = resources_dir()


def resource(*parts: str) -> Path:
    """A file under resources/ (icons, themes, presets)."""
    return RESOURCES.joinpath(*parts)


def default_runs_folder() -> Path:
    """$QLORA_STUDIO_RUNS, else the user data dir's runs/: the same folder the engine's CLI uses."""
    return runs_root()
