"""Where the app finds its bundled resources and keeps its runs; no Qt widgets here."""
from __future__ import annotations

import os
from pathlib import Path

import platformdirs

from qlora_engine.resources import resources_dir

APP_NAME = "qlora-studio"
RESOURCES = resources_dir()


def resource(*parts: str) -> Path:
    """A file under resources/ (icons, themes, presets)."""
    return RESOURCES.joinpath(*parts)


def default_runs_folder() -> Path:
    """$QLORA_STUDIO_RUNS (as the engine's CLI reads it), else the user data dir's runs/."""
    override = os.environ.get("QLORA_STUDIO_RUNS")
    return Path(override) if override else Path(platformdirs.user_data_dir(APP_NAME)) / "runs"
