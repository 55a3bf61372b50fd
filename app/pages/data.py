"""Data page: the training file, its detected format, rows rendered as the model sees them, token
lengths, bad rows by line, and the validation split. The scan is `qlora_engine data --json`, a request of the
engine client.
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import (
    QButtonGroup,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QGridLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QRadioButton,
    QSpinBox,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from app import settings, theme
from app.engine_client import Call
from app.engine_requests import ScanData
from app.session import Session
from app.widgets.banner import Banner
from app.widgets.page import Page, card
from qlora_engine.protocol.config import RunConfig, format_mapping, parse_mapping
from qlora_engine.protocol.errors import EngineError
from qlora_engine.protocol.queries import DataReport

FORMAT_NAMES = {"alpaca": "instruction / input / output (Alpaca)", "chat": "chat messages (tool calls, parts)",
                "prompt_completion": "prompt / completion", "preference": "preference pairs (chosen / rejected)",
                "text": "plain text"}
DATA_FILTER = "Data files (*.jsonl *.json *.csv *.parquet *.txt *.arrow);;All files (*)"


class DataPage(Page):
    title = "Data"
    intro = ("The examples to learn from. Each row is shown below exactly as the model will read it; the "
             "highlighted part is what it learns to write.")

    def __init__(self, session: Session, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.scanning: Call | None = None  # the data scan on its way
        self.scan_timer = QTimer(self, singleShot=True, interval=400)  # one scan after a burst of edits
        self.scan_timer.timeout.connect(self.scan)
        self._scanned_inputs: tuple | None = None  # what the last scan was of; None before the first
        self.body.addWidget(self._build_choice())
        self.summary = QLabel(objectName="muted", wordWrap=True)
        self.busy = QProgressBar(maximum=0, visible=False, textVisible=False, objectName="busy")
        self.banner = Banner()
        for widget in (self.summary, self.busy, self.banner):
            self.body.addWidget(widget)
        self.body.addWidget(self._build_results(), 1)
        self._show_config()
        self._show_histogram(np.empty(0))
        session.config_changed.connect(self._show_config)
        session.model_info_changed.connect(self._model_changed)

    # ------------------------------------------------------------------ building
    def _build_choice(self) -> QWidget:
        box = card()
        grid = QGridLayout(box)
        grid.setColumnStretch(1, 1)
        self.file_edit = QLineEdit(placeholderText="a .jsonl, .json, .csv, .parquet, .txt or .arrow file, a saved "
                                                   "dataset folder, or a Hub dataset ORG/NAME[@revision][:split]")
        self.file_edit.editingFinished.connect(lambda: self.choose_file(self.file_edit.text().strip()))
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        sample = QPushButton("Use the sample data")
        sample.clicked.connect(lambda: self.choose_file("sample"))
        grid.addWidget(QLabel("Training data"), 0, 0)
        grid.addWidget(self.file_edit, 0, 1)
        grid.addWidget(browse, 0, 2)
        grid.addWidget(sample, 0, 3)

        self.format_combo = QComboBox()
        self.format_combo.addItem("Detect automatically", "auto")
        for name, label in FORMAT_NAMES.items():
            self.format_combo.addItem(label, name)
        self.format_combo.setToolTip(_help("data_format"))
        self.format_combo.currentIndexChanged.connect(
            lambda: self.session.update_config(data_format=self.format_combo.currentData()))
        self.max_length = QSpinBox(minimum=16, maximum=1_000_000, singleStep=64, suffix=" tokens")
        self.max_length.setToolTip(_help("max_length"))
        self.max_length.valueChanged.connect(lambda value: self.session.update_config(max_length=value))
        row = QHBoxLayout()
        row.addWidget(self.format_combo, 1)
        row.addSpacing(16)
        row.addWidget(QLabel("Longest sequence"))
        row.addWidget(self.max_length)
        grid.addWidget(QLabel("Row format"), 1, 0)
        grid.addLayout(row, 1, 1, 1, 3)
        grid.addWidget(QLabel("Validation"), 2, 0)
        grid.addLayout(self._build_validation(), 2, 1, 1, 3)
        self.columns_edit = QLineEdit(objectName="columns", placeholderText="detected from the column names")
        self.columns_edit.setToolTip(_help("columns") + "\nWrite it as field=column, e.g. instruction=question,"
                                     "output=answer; empty: detected (or suggested from common names).")
        self.columns_edit.editingFinished.connect(self._columns_edited)
        self.columns_note = QLabel(objectName="muted")
        row = QHBoxLayout()
        row.addWidget(self.columns_edit, 1)
        row.addWidget(self.columns_note)
        grid.addWidget(QLabel("Columns"), 3, 0)
        grid.addLayout(row, 3, 1, 1, 3)
        self.mix_edit = QLineEdit(objectName="data_mix", placeholderText="more files mixed in: general.jsonl=0.3 "
                                  "(30% of the training rows; the training data gets the rest)")
        self.mix_edit.setToolTip(_help("data_mix"))
        self.mix_edit.editingFinished.connect(self._mix_edited)
        mix_browse = QPushButton("Add a file…")
        mix_browse.clicked.connect(self._browse_mix)
        row = QHBoxLayout()
        row.addWidget(self.mix_edit, 1)
        row.addWidget(mix_browse)
        grid.addWidget(QLabel("Mix in"), 4, 0)
        grid.addLayout(row, 4, 1, 1, 3)
        return box

    def _build_validation(self) -> QHBoxLayout:
        self.hold_out = QRadioButton("Hold out")
        self.val_fraction = QDoubleSpinBox(minimum=0, maximum=50, decimals=0, suffix=" % of the rows")
        self.val_fraction.setToolTip(_help("val_fraction"))
        self.val_fraction.valueChanged.connect(lambda pct: self.session.update_config(val_fraction=pct / 100))
        self.use_val_file = QRadioButton("Separate file")
        self.val_edit = QLineEdit(placeholderText="validation file")
        self.val_edit.editingFinished.connect(lambda: self.session.update_config(val_data=self.val_edit.text().strip()))
        val_browse = QPushButton("Browse…")
        val_browse.clicked.connect(self._browse_validation)
        group = QButtonGroup(self)
        for button in (self.hold_out, self.use_val_file):
            group.addButton(button)
        self.hold_out.clicked.connect(lambda: self.session.update_config(val_data=""))
        self.use_val_file.clicked.connect(self._browse_validation)
        row = QHBoxLayout()
        for widget in (self.hold_out, self.val_fraction):
            row.addWidget(widget)
        row.addSpacing(16)
        for widget in (self.use_val_file, self.val_edit, val_browse):
            row.addWidget(widget)
        return row

    def _build_results(self) -> QWidget:
        splitter = QSplitter(Qt.Orientation.Horizontal)
        preview_box = QWidget()
        preview_layout = QVBoxLayout(preview_box)
        preview_layout.setContentsMargins(0, 0, 0, 0)
        highlight = theme.color("highlight_bg")
        preview_layout.addWidget(QLabel(f"<b>Preview</b> — <span style='background:{highlight}'>highlighted</span> "
                                        "text is what the loss is computed on"))
        self.preview = QTextBrowser(openLinks=False)
        self.preview.setHtml(_preview_html([]))
        preview_layout.addWidget(self.preview)
        splitter.addWidget(preview_box)

        side = QWidget()
        side_layout = QVBoxLayout(side)
        side_layout.setContentsMargins(0, 0, 0, 0)
        self.histogram = pg.PlotWidget()
        self.histogram.setMinimumHeight(180)
        self.histogram.setMouseEnabled(x=False, y=False)
        self.histogram_bars = pg.PlotDataItem(stepMode="center", fillLevel=0, brush=_histogram_brush())
        self.histogram.addItem(self.histogram_bars)
        self.limit_line = pg.InfiniteLine(angle=90, pen=pg.mkPen(theme.SERIES_COLORS["limit"], width=2,
                                                                 style=Qt.PenStyle.DashLine),
                                          label="cut here", labelOpts={"position": 0.92, "anchors": [(1, 0), (1, 0)],
                                                                       "color": theme.SERIES_COLORS["limit"]})
        self.histogram.addItem(self.limit_line)
        side_layout.addWidget(self.histogram, 1)
        self.bad_rows_label = QLabel("<b>Bad rows</b>")
        side_layout.addWidget(self.bad_rows_label)
        self.bad_rows = QTableWidget(0, 3)
        self.bad_rows.setHorizontalHeaderLabels(["Line", "Problem", "File"])  # File: shown for a mix of files
        self.bad_rows.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        self.bad_rows.horizontalHeader().setSectionResizeMode(1, QHeaderView.ResizeMode.Stretch)
        self.bad_rows.horizontalHeader().setSectionResizeMode(2, QHeaderView.ResizeMode.ResizeToContents)
        self.bad_rows.verticalHeader().hide()
        self.bad_rows.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        side_layout.addWidget(self.bad_rows, 1)
        splitter.addWidget(side)
        splitter.setSizes([600, 400])
        self.apply_theme()
        return splitter

    def apply_theme(self) -> None:
        theme.style_plot(self.histogram, "Tokens per row", "rows")
        self.histogram.getPlotItem().setLabel("bottom", "tokens", color=theme.color("muted"))
        self.histogram_bars.setBrush(_histogram_brush())

    # ------------------------------------------------------------------ actions
    def choose_file(self, path: str) -> None:
        if path:
            self.session.update_config(data=path)
            self.scan_soon()

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Choose training data", settings.last_folder("data"), DATA_FILTER)
        if path:
            settings.remember_folder("data", path)
            self.choose_file(path)

    def _browse_validation(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Choose validation data", settings.last_folder("data"),
                                              DATA_FILTER)
        if path:
            settings.remember_folder("data", path)
            self.session.update_config(val_data=path)
        self._show_config()

    def _columns_edited(self) -> None:
        self._mapping_edited(self.columns_edit, "columns", str)

    def _mix_edited(self) -> None:
        self._mapping_edited(self.mix_edit, "data_mix", float)

    def _mapping_edited(self, editor: QLineEdit, option: str, value_type: type) -> None:
        try:
            mapping = parse_mapping(editor.text(), value_type)
        except EngineError as exc:
            self.banner.show_error(exc, f"This {option} can't be used")
            return
        self.session.update_config(**{option: mapping})
        self.scan_soon()

    def _browse_mix(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Choose data to mix in", settings.last_folder("data"), DATA_FILTER)
        if path:
            settings.remember_folder("data", path)
            mix = dict(self.session.config.data_mix)
            mix[path] = mix.get(path, 0.3)
            self.session.update_config(data_mix=mix)
            self.scan_soon()

    def scan_soon(self) -> None:
        self.scan_timer.start()

    def _scan_inputs(self) -> tuple:
        config = self.session.config
        return (config.data, config.data_format, config.max_length, config.train_on_prompt,
                format_mapping(config.columns), format_mapping(config.data_mix))

    def scan(self) -> None:
        config = self.session.config
        self._scanned_inputs = self._scan_inputs()
        self.banner.clear()
        self._set_busy(True)
        request = ScanData(config.data, config.model, config.data_format, config.max_length, config.train_on_prompt,
                           format_mapping(config.columns), format_mapping(config.data_mix))
        self.scanning = self.session.engine.run(request, owner=self, done=self._show_report, failed=self._show_error)

    def _model_changed(self) -> None:
        if self.session.model_info is not None and self.session.config.data:
            self.scan_soon()  # the preview uses the model's tokenizer and chat template

    # ------------------------------------------------------------------ showing
    def _show_config(self) -> None:
        config = self.session.config
        for widget in (self.format_combo, self.max_length, self.val_fraction):
            widget.blockSignals(True)
        self.file_edit.setText(config.data)
        self.format_combo.setCurrentIndex(max(0, self.format_combo.findData(config.data_format)))
        self.max_length.setValue(config.max_length)
        self.val_fraction.setValue(round(config.val_fraction * 100))
        self.hold_out.setChecked(not config.val_data)
        self.use_val_file.setChecked(bool(config.val_data))
        self.val_edit.setText(config.val_data)
        self.columns_edit.setText(format_mapping(config.columns))
        self.mix_edit.setText(format_mapping(config.data_mix))
        self.val_fraction.setEnabled(not config.val_data)
        for widget in (self.format_combo, self.max_length, self.val_fraction):
            widget.blockSignals(False)
        self.limit_line.setValue(config.max_length)
        if self._scanned_inputs is not None and self._scan_inputs() != self._scanned_inputs:
            self.scan_soon()  # what the preview shows is out of date

    def _set_busy(self, busy: bool) -> None:
        self.busy.setVisible(busy)
        if busy:
            self.summary.setText(f"Reading {self.session.config.data} with the model's tokenizer…")

    def _show_report(self, report: DataReport) -> None:
        self._set_busy(False)
        self.session.set_data_report(report)
        self.summary.setText(_summary(report, self.session.config.max_length))
        self._show_columns(report)
        self.preview.setHtml(_preview_html(report.preview))
        lengths = np.asarray(report.token_lengths, dtype=float)
        self._show_histogram(lengths)
        sources = report.sources or [{"file": report.file, "bad_rows": report.bad_rows}]
        bad_rows = [(source.get("file", ""), bad) for source in sources for bad in source.get("bad_rows", [])]
        self.bad_rows_label.setText(f"<b>Bad rows</b> ({len(bad_rows)}; skipped when training)" if bad_rows
                                    else "<b>Bad rows</b>: none")
        self.bad_rows.setRowCount(len(bad_rows))
        self.bad_rows.setColumnHidden(2, len(sources) < 2)
        for index, (file, bad) in enumerate(bad_rows):
            self.bad_rows.setItem(index, 0, QTableWidgetItem(str(bad.get("line", ""))))
            self.bad_rows.setItem(index, 1, QTableWidgetItem(bad.get("reason", "")))
            self.bad_rows.setItem(index, 2, QTableWidgetItem(Path(file).name))
        if report.valid_rows == 0:
            self.banner.show_message("error", "No usable rows", "Every row of this file was rejected.",
                                     "Check the format choice above and the reasons listed under Bad rows.")
        elif _notices(report):
            self.banner.show_message("info", "What will be trained", " ".join(_notices(report)), "")

    def _show_columns(self, report: DataReport) -> None:
        """The mapping the scan used: the config's, or the one suggested from the names (put in the box to edit)."""
        if report.columns_suggested and not self.session.config.columns:
            self.columns_edit.setText(format_mapping(report.columns))
        names = ", ".join(report.source_columns[:8])
        if report.columns_suggested:
            self.columns_note.setText(f"suggested from the names ({names}); press Enter to keep")
        else:
            self.columns_note.setText(f"the file's columns: {names}" if names else "")

    def _show_histogram(self, lengths: np.ndarray) -> None:
        """Rows per token-length bin, with the max-length cut as a dashed line."""
        if lengths.size:
            counts, edges = np.histogram(lengths, bins=min(40, max(5, int(np.sqrt(lengths.size)))))
            self.histogram_bars.setData(edges, counts)
            self.histogram.enableAutoRange()
        else:
            self.histogram_bars.setData([], [])
            self.histogram.setRange(xRange=(0, self.session.config.max_length * 1.1), yRange=(0, 1))

    def shutdown(self) -> None:
        if self.scanning is not None:
            self.scanning.cancel()

    def _show_error(self, error: EngineError) -> None:
        self._set_busy(False)
        self.session.set_data_report(None)
        self.summary.setText("")
        self.preview.clear()
        self._show_histogram(np.empty(0))
        self.bad_rows.setRowCount(0)
        self.banner.show_error(error, "This data file can't be used")


def _histogram_brush() -> pg.QtGui.QBrush:
    return pg.mkBrush(theme.SERIES_COLORS["histogram"] + "b0")


def _help(option: str) -> str:
    return next(s.metadata["help"] for s in RunConfig.field_specs() if s.name == option)


def _summary(report: DataReport, max_length: int) -> str:
    sources = report.sources or [{"file": report.file, "format": report.format, "detected_format":
                                  report.detected_format, "rows": report.rows, "valid_rows": report.valid_rows,
                                  "bad_rows": report.bad_rows, "truncated_rows": report.truncated_rows,
                                  "used_rows": report.valid_rows, "ratio": 1.0}]
    lines = [_source_summary(source, max_length, len(sources) > 1) for source in sources]
    return "<br>".join(lines)


def _source_summary(source: dict[str, Any], max_length: int, mixed: bool) -> str:
    detected = source.get("detected_format", "")
    shown = FORMAT_NAMES.get(source["format"], source["format"])
    parts = [f"Format: <b>{html.escape(shown)}</b>" + (f" (detected {detected})" if detected else ""),
             f"{source['rows']:,} rows", f"{source['valid_rows']:,} usable"]
    if source["bad_rows"]:
        parts.append(f"{len(source['bad_rows']):,} bad")
    if source.get("not_target_rows"):
        parts.append(f"{source['not_target_rows']:,} marked label: false (never trained on)")
    if source["truncated_rows"]:
        parts.append(f"{source['truncated_rows']:,} longer than {max_length} tokens (cut)")
    if mixed:
        name = html.escape(Path(source["file"]).name)
        parts.insert(0, f"<b>{name}</b>: {source['ratio']:.0%} of the mix, {source['used_rows']:,} rows")
    return " · ".join(parts)


def _notices(report: DataReport) -> list[str]:
    """What the page must say about what is trained: preference pairs on their chosen answers, label-false rows."""
    sources = report.sources or [{"notice": report.notice, "not_target_rows": report.not_target_rows,
                                  "file": report.file}]
    notices = []
    for source in sources:
        name = Path(source["file"]).name
        if source.get("notice"):
            notices.append(f"{name}: {source['notice'][0].upper()}{source['notice'][1:]}.")
        if source.get("not_target_rows"):
            notices.append(f"{name}: {source['not_target_rows']:,} row(s) marked label: false (KTO: an undesirable "
                           "answer) are left out: they are never a training target.")
    return notices


def _preview_html(rows: list[dict[str, Any]]) -> str:
    trained_style = f"background:{theme.color('highlight_bg')}; color:{theme.color('text')}"
    prompt_style = f"color:{theme.color('muted')}"
    blocks = []
    for index, row in enumerate(rows, start=1):
        spans = "".join(f"<span style='{trained_style if s.get('trained') else prompt_style}'>"
                        f"{html.escape(s.get('text', ''))}</span>" for s in row.get("segments", []))
        where = (f"{html.escape(Path(row['file']).name)}, " if row.get("file") else "") + f"row {index}" + (
            f", line {row['line']}" if row.get("line") else "")
        blocks.append(f"<p style='color:{theme.color('muted')}; margin:8px 0 2px 0'><b>{where}</b></p>"
                      f"<pre style='white-space:pre-wrap; margin:0 0 10px 0'>{spans}</pre>")
    return "".join(blocks) or f"<p style='color:{theme.color('muted')}'>No rows to show yet.</p>"
