"""A colored message box for errors (with the engine's advice), warnings, info and success."""
from __future__ import annotations

import html
from typing import Protocol

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QFrame, QLabel, QVBoxLayout, QWidget


class ShownError(Protocol):
    """What an error shows: an EngineError, or an `error` event (ev.Error) of the engine."""

    code: str
    message: str
    advice: str


class Banner(QFrame):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent, objectName="banner")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(12, 8, 12, 8)
        self.label = QLabel(wordWrap=True, textFormat=Qt.TextFormat.RichText)
        self.label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout.addWidget(self.label)
        self.hide()

    def show_message(self, kind: str, title: str, message: str = "", advice: str = "") -> None:
        parts = [f"<b>{html.escape(title, quote=False)}</b>"]
        if message:
            parts.append(html.escape(message, quote=False))
        if advice:
            parts.append(f"<i>What to do:</i> {html.escape(advice, quote=False)}")
        self.label.setText("<br>".join(parts))
        self.setProperty("kind", kind)
        self.style().unpolish(self)
        self.style().polish(self)
        self.show()

    def show_error(self, error: ShownError, title: str = "") -> None:
        heading = title or "Something went wrong" + (f" ({error.code})" if error.code else "")
        self.show_message("error", heading, error.message, error.advice)

    def clear(self) -> None:
        self.label.clear()
        self.hide()
