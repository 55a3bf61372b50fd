"""`qlora-studio-gui`: start the window. Heavy work never happens in this process."""
from __future__ import annotations

import os
import sys

from PySide6.QtWidgets import QApplication

from app import settings, theme
from app.session import Session
from app.window import MainWindow


def create_window(app: QApplication, engine_command: list[str] | None = None) -> MainWindow:
    """The window with its session, theme and first checks started; tests call this too."""
    theme.apply_theme(app, settings.theme())
    session = Session(settings.runs_folder(), engine_command)
    window = MainWindow(session)
    window.pages["gpu"].refresh()
    window.pages["model"].refresh()
    return window


def main(argv: list[str] | None = None) -> int:
    app = QApplication(sys.argv if argv is None else argv)
    app.setApplicationName("QLoRA Studio")
    app.setOrganizationName(settings.ORGANIZATION)
    app.setDesktopFileName("qlora-studio")
    app.setWindowIcon(theme.app_icon())
    window = create_window(app)
    window.show()
    exit_code = app.exec()
    if window.detached_processes:
        # Qt would kill a child QProcess while tearing down; leave now so the engine keeps training.
        sys.stdout.flush()
        os._exit(exit_code)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
