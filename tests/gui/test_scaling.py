"""At 150% display scaling and the smallest window size, every page still lays out (screenshots to look at).

Qt reads the scale factor once at start-up, so this runs the window in a child process.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCREENSHOTS = HERE / "screenshots"
FAKE_ENGINE = [sys.executable, str(HERE / "fake_engine.py")]

SCRIPT = """
import sys
from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QApplication
from app.main import create_window

app = QApplication([])
window = create_window(app, {engine!r})
window.resize(window.minimumSize())
window.show()

def shoot():
    too_small = []
    for key in window.pages:
        window.show_page(key)
        app.processEvents()
        window.grab().save({folder!r} + f"/{{key}}-150pct.png")
        if window.centralWidget().minimumSizeHint().width() > window.centralWidget().width():
            too_small.append(key)
    print("TOO_SMALL", ",".join(too_small))
    app.quit()

QTimer.singleShot(1500, shoot)
app.exec()
"""


def test_every_page_fits_the_minimum_window_at_150_percent(tmp_path):
    SCREENSHOTS.mkdir(exist_ok=True)
    env = {**os.environ, "QT_SCALE_FACTOR": "1.5", "QT_QPA_PLATFORM": "offscreen",
           "QLORA_STUDIO_RUNS": str(tmp_path / "runs"), "XDG_CONFIG_HOME": str(tmp_path / "config"),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
    code = SCRIPT.format(engine=FAKE_ENGINE, folder=str(SCREENSHOTS))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    too_small = next(line for line in done.stdout.splitlines() if line.startswith("TOO_SMALL")).split(" ", 1)[1]
    assert too_small.strip() == "", f"pages wider than the minimum window at 150%: {too_small}"
