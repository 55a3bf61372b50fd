"""The frame every page shares: a title, one line saying what the page is for, then its content."""
from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QFrame, QHBoxLayout, QLabel, QPushButton, QVBoxLayout, QWidget


class Page(QWidget):
    title = ""
    intro = ""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(24, 18, 24, 18)
        outer.setSpacing(12)
        title = QLabel(self.title, objectName="pageTitle")
        intro = QLabel(self.intro, objectName="pageIntro", wordWrap=True)
        self.header_row = QHBoxLayout()
        self.header_row.addWidget(title)
        self.header_row.addStretch(1)
        outer.addLayout(self.header_row)
        outer.addWidget(intro)
        self.body = QVBoxLayout()
        self.body.setSpacing(12)
        outer.addLayout(self.body, 1)


def card(parent: QWidget | None = None) -> QFrame:
    frame = QFrame(parent, objectName="card")
    frame.setFrameShape(QFrame.Shape.NoFrame)
    return frame


def primary_button(text: str, parent: QWidget | None = None) -> QPushButton:
    button = QPushButton(text, parent)
    button.setProperty("primary", True)
    button.setCursor(Qt.CursorShape.PointingHandCursor)
    return button


def fact_label(text: str = "") -> QLabel:
    label = QLabel(text)
    label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    label.setWordWrap(True)
    return label
