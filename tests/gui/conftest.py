"""GUI test set-up: offscreen Qt, settings in a temp folder, the fake engine, and screenshots.

Screenshots land in tests/gui/screenshots/ (git-ignored); look at them after a change to a page.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest  # noqa: E402

HERE = Path(__file__).resolve().parent
SCREENSHOTS = HERE / "screenshots"
FAKE_ENGINE = [sys.executable, str(HERE / "fake_engine.py")]


def pytest_configure(config: pytest.Config) -> None:
    from app.main import broken_qt_binding

    problem = broken_qt_binding()
    if problem:
        pytest.exit(problem, returncode=3)


@pytest.fixture(autouse=True)
def _isolated_settings(tmp_path, monkeypatch):
    """QSettings and the runs folder in temp folders, never the user's."""
    from PySide6.QtCore import QSettings

    QSettings.setPath(QSettings.Format.NativeFormat, QSettings.Scope.UserScope, str(tmp_path / "settings"))
    monkeypatch.setenv("QLORA_STUDIO_RUNS", str(tmp_path / "runs"))
    monkeypatch.delenv("FAKE_ENGINE_SCENARIO", raising=False)


@pytest.fixture
def scenario(monkeypatch):
    """Pick how the fake engine's `train` behaves: ok, slow, crash or error."""
    return lambda name: monkeypatch.setenv("FAKE_ENGINE_SCENARIO", name)


@pytest.fixture
def fake_engine() -> list[str]:
    """The command that starts tests/gui/fake_engine.py in place of `python -m qlora_engine`."""
    return FAKE_ENGINE


@pytest.fixture
def window(qtbot, qapp):
    from app.main import create_window

    window = create_window(qapp, FAKE_ENGINE)
    window.resize(1280, 840)
    qtbot.addWidget(window)
    window.show()
    qtbot.waitUntil(lambda: window.session.model_info is not None and window.session.gpu_report is not None,
                    timeout=10_000)
    yield window
    window.session.training.kill()
    window.session.training.wait_for_exit(3000)
    for page in window.pages.values():
        if hasattr(page, "shutdown"):
            page.shutdown()


@pytest.fixture
def screenshot(qtbot):
    """screenshot(window, "monitor-normal") writes tests/gui/screenshots/monitor-normal.png."""
    SCREENSHOTS.mkdir(exist_ok=True)

    def take(widget, name: str) -> Path:
        qtbot.wait(150)  # let queued shows, layouts and plot axes settle, as a person would see them
        path = SCREENSHOTS / f"{name}.png"
        assert widget.grab().save(str(path)), f"could not write {path}"
        return path

    return take
