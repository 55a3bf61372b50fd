"""`qlora-studio-gui`: start the window. Heavy work never happens in this process."""
from __future__ import annotations

import os
import sys

from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QApplication

from app import settings, theme
from app.session import Session
from app.window import MainWindow


def broken_qt_binding() -> str:
    """Why this PySide6 can't run the app, or "" when it can."""
    import PySide6

    if PySide6.__version__ == "6.12.0" and sys.version_info < (3, 12):
        # Seen here: every Qt call that returns nothing drops a reference to None; after a few thousand
        # calls the interpreter aborts ("deallocating None"). Python 3.12+ never frees None, 6.11 is fine.
        return ("PySide6 6.12.0 crashes on Python < 3.12 (it drops a reference to None on every Qt call). "
                "Install PySide6-Essentials 6.11 (pip install 'PySide6-Essentials<6.12') or use Python 3.12+.")
    return ""


def create_window(app: QApplication, engine_command: list[str] | None = None) -> MainWindow:
    """The window with its session, theme and first checks started; tests call this too."""
    theme.apply_theme(app, settings.theme())
    session = Session(settings.runs_folder(), engine_command)
    window = MainWindow(session)
    window.pages["gpu"].refresh()
    window.pages["model"].refresh()
    return window


def main(argv: list[str] | None = None) -> int:
    problem = broken_qt_binding()
    if problem:
        print(f"qlora-studio-gui: {problem}", file=sys.stderr)
        return 1
    argv = list(sys.argv if argv is None else argv)
    # --smoke-test: open the window, say so, quit (the launchers' end-to-end test); other flags go to Qt.
    smoke_test = "--smoke-test" in argv
    app = QApplication([a for a in argv if a != "--smoke-test"])
    app.setApplicationName("QLoRA Studio")
    app.setOrganizationName(settings.ORGANIZATION)
    app.setDesktopFileName("qlora-studio")
    app.setWindowIcon(theme.app_icon())
    window = create_window(app)
    window.show()
    if smoke_test:
        QTimer.singleShot(0, lambda: (print("window shown", flush=True), app.quit()))
    exit_code = app.exec()
    if window.detached_processes:
        # Qt would kill a child QProcess while tearing down; leave now so the engine keeps training.
        sys.stdout.flush()
        os._exit(exit_code)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
