"""Light and dark looks: the Fusion palette, resources/themes/<name>.qss, and matching plot colors."""
from __future__ import annotations

import pyqtgraph as pg
from PySide6.QtGui import QColor, QFont, QIcon, QPalette
from PySide6.QtWidgets import QApplication

from app.paths import resource

THEMES = ("light", "dark")

# Colors the style sheet cannot reach: palette roles, plots, the memory bar.
COLORS = {
    "light": {"window": "#f4f5f8", "base": "#ffffff", "alt": "#eef0f5", "text": "#1c2130", "muted": "#5b6375",
              "accent": "#4f46e5", "accent_text": "#ffffff", "grid": "#d7dbe4", "border": "#cfd4de",
              "good": "#15803d", "warn": "#b45309", "bad": "#b91c1c", "highlight_bg": "#fde68a"},
    "dark": {"window": "#1a1d24", "base": "#22262f", "alt": "#2a2f3a", "text": "#e6e8ee", "muted": "#9aa3b5",
             "accent": "#8b8cf8", "accent_text": "#11131a", "grid": "#3a4050", "border": "#3a4050",
             "good": "#4ade80", "warn": "#fbbf24", "bad": "#f87171", "highlight_bg": "#6b5a12"},
}

# One color per plotted quantity; chosen to read on both backgrounds.
SERIES_COLORS = {"loss": "#3b82f6", "eval_loss": "#f97316", "drift": "#e11d48", "lr": "#a855f7", "grad_norm": "#14b8a6",
                 "tokens_per_s": "#22c55e", "vram_process": "#3b82f6", "vram_gpu": "#ef4444",
                 "total": "#64748b", "estimate": "#f59e0b", "measured": "#10b981", "histogram": "#6366f1",
                 "limit": "#ef4444"}

_current = "light"


def current() -> str:
    return _current


def color(role: str) -> str:
    return COLORS[_current][role]


def apply_theme(app: QApplication, name: str) -> None:
    global _current
    _current = name if name in THEMES else "light"
    colors = COLORS[_current]
    app.setStyle("Fusion")
    app.setPalette(_palette(colors))
    app.setStyleSheet(resource("themes", f"{_current}.qss").read_text(encoding="utf-8"))
    pg.setConfigOptions(background=colors["base"], foreground=colors["muted"], antialias=True)


def _palette(colors: dict[str, str]) -> QPalette:
    palette = QPalette()
    roles = {QPalette.ColorRole.Window: "window", QPalette.ColorRole.Base: "base",
             QPalette.ColorRole.AlternateBase: "alt", QPalette.ColorRole.Button: "alt",
             QPalette.ColorRole.WindowText: "text", QPalette.ColorRole.Text: "text",
             QPalette.ColorRole.ButtonText: "text", QPalette.ColorRole.ToolTipBase: "base",
             QPalette.ColorRole.ToolTipText: "text", QPalette.ColorRole.Highlight: "accent",
             QPalette.ColorRole.HighlightedText: "accent_text", QPalette.ColorRole.PlaceholderText: "muted",
             QPalette.ColorRole.Link: "accent"}
    for role, key in roles.items():
        palette.setColor(role, QColor(colors[key]))
    for role in (QPalette.ColorRole.WindowText, QPalette.ColorRole.Text, QPalette.ColorRole.ButtonText):
        palette.setColor(QPalette.ColorGroup.Disabled, role, QColor(colors["muted"]))
    return palette


def style_plot(plot: pg.PlotWidget, title: str, y_label: str = "") -> None:
    """Give a plot the current theme's background, axes and title."""
    colors = COLORS[_current]
    plot.setBackground(colors["base"])
    item = plot.getPlotItem()
    item.setTitle(title, color=colors["text"], size="10pt")
    item.showGrid(x=True, y=True, alpha=0.25)
    for side in ("left", "bottom"):
        axis = item.getAxis(side)
        axis.enableAutoSIPrefix(False)  # "GiB (x0.001)" reads worse than 0.87
        axis.setPen(pg.mkPen(colors["border"]))
        axis.setTextPen(pg.mkPen(colors["muted"]))
    if y_label:
        item.setLabel("left", y_label, color=colors["muted"])
    if item.legend is not None:
        item.legend.setLabelTextColor(colors["text"])


def app_icon() -> QIcon:
    return QIcon(str(resource("icon.svg")))


def monospace_font() -> QFont:
    font = QFont("DejaVu Sans Mono")
    font.setStyleHint(QFont.StyleHint.Monospace)
    return font
