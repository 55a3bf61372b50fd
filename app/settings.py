"""What the app remembers between sessions (QSettings): last folders, runs folder, theme.

Window geometry is saved by the main window itself with the same QSettings.
"""
from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QSettings

from app.paths import default_runs_folder

ORGANIZATION = "QLoRA Studio"
APPLICATION = "qlora-studio"


def store() -> QSettings:
    return QSettings(ORGANIZATION, APPLICATION)


def runs_folder() -> Path:
    return Path(str(store().value("runs_folder", str(default_runs_folder()))))


def set_runs_folder(path: Path) -> None:
    store().setValue("runs_folder", str(path))


def last_folder(purpose: str) -> str:
    """The folder a file dialog for `purpose` (model, data, export) opened last, or home."""
    return str(store().value(f"last_folder/{purpose}", str(Path.home())))


def remember_folder(purpose: str, chosen_path: str) -> None:
    folder = Path(chosen_path)
    if not folder.is_dir():
        folder = folder.parent
    store().setValue(f"last_folder/{purpose}", str(folder))


def theme() -> str:
    return str(store().value("theme", "light"))


def set_theme(name: str) -> None:
    store().setValue("theme", name)
