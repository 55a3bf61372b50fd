"""A horizontal stacked bar of memory terms, with markers for the GPU's free and total memory."""
from __future__ import annotations

from dataclasses import dataclass

from PySide6.QtCore import QRectF, QSize, Qt
from PySide6.QtGui import QColor, QPainter, QPen
from PySide6.QtWidgets import QSizePolicy, QWidget

from app import theme
from app.formatting import gib

TERM_COLORS = ("#6366f1", "#0ea5e9", "#14b8a6", "#22c55e", "#84cc16", "#eab308", "#f97316", "#ef4444",
               "#ec4899", "#a855f7", "#64748b", "#78716c")


@dataclass
class BarSegment:
    name: str
    size_bytes: int
    color: str


class MemoryBar(QWidget):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.segments: list[BarSegment] = []
        self.free_bytes: int | None = None
        self.total_bytes: int | None = None
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)

    def sizeHint(self) -> QSize:  # noqa: N802 (Qt override)
        return QSize(600, self._bar_height() + 2 * self.fontMetrics().height() + 14)

    def minimumSizeHint(self) -> QSize:  # noqa: N802
        return QSize(200, self.sizeHint().height())

    def _bar_height(self) -> int:
        return self.fontMetrics().height() * 2

    def set_data(self, segments: list[BarSegment], free_bytes: int | None, total_bytes: int | None) -> None:
        self.segments, self.free_bytes, self.total_bytes = segments, free_bytes, total_bytes
        self.update()

    def paintEvent(self, _event: object) -> None:  # noqa: N802
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        bar = QRectF(4, 4, self.width() - 8, self._bar_height())
        painter.setPen(QPen(QColor(theme.color("border"))))
        painter.setBrush(QColor(theme.color("alt")))
        painter.drawRoundedRect(bar, 5, 5)
        used = sum(s.size_bytes for s in self.segments)
        scale_bytes = max(used, self.total_bytes or 0, self.free_bytes or 0, 1) * 1.04
        x = bar.left()
        painter.setPen(Qt.PenStyle.NoPen)
        for segment in self.segments:
            width = bar.width() * segment.size_bytes / scale_bytes
            painter.setBrush(QColor(segment.color))
            painter.drawRect(QRectF(x, bar.top() + 1, width, bar.height() - 2))
            x += width
        line_height = self.fontMetrics().height()
        self._marker(painter, bar, scale_bytes, self.free_bytes, "free", theme.color("good"), bar.bottom() + 4)
        if self.total_bytes and self.total_bytes != self.free_bytes:
            self._marker(painter, bar, scale_bytes, self.total_bytes, "total", theme.color("muted"),
                         bar.bottom() + 4 + line_height)

    def _marker(self, painter: QPainter, bar: QRectF, scale_bytes: float, size_bytes: int | None, word: str,
                color: str, text_top: float) -> None:
        """A dashed line across the bar at `size_bytes`, labelled below it."""
        if not size_bytes:
            return
        x = bar.left() + bar.width() * size_bytes / scale_bytes
        painter.setPen(QPen(QColor(color), 2, Qt.PenStyle.DashLine))
        painter.drawLine(int(x), int(bar.top() - 2), int(x), int(bar.bottom() + 2))
        text = f"{word} {gib(size_bytes)}"
        text_width = self.fontMetrics().horizontalAdvance(text) + 4
        left = min(max(bar.left(), x - text_width / 2), bar.right() - text_width)
        painter.setPen(QColor(color))
        painter.drawText(QRectF(left, text_top, text_width, self.fontMetrics().height() + 2),
                         Qt.AlignmentFlag.AlignCenter, text)
