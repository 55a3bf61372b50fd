"""Runs page: every run in the runs folder with its status, steps, loss and duration, each folded from its
events.jsonl by the engine's RunState; reopen its plots, resume it, chat with it, export it, or delete it (after
asking).
"""
from __future__ import annotations

import time
from pathlib import Path

from PySide6.QtCore import Qt, QUrl, Signal
from PySide6.QtGui import QColor, QDesktopServices
from PySide6.QtWidgets import (
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QMessageBox,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QWidget,
)

from app import formatting, settings, theme
from app.session import Session
from app.widgets.banner import Banner
from app.widgets.page import Page, primary_button
from qlora_engine.protocol.errors import EngineError
from qlora_engine.protocol.run_folders import delete_run
from qlora_engine.protocol.run_state import RunState, list_runs

COLUMNS = ("Run", "Status", "Model", "Steps", "Final loss", "Eval loss", "Drift", "Duration", "Started")
STATUS_COLORS = {"finished": "good", "failed": "bad", "stopped": "warn", "interrupted": "warn"}
STATUS_WORDS = {"new": "not started", "loading": "training elsewhere", "training": "training elsewhere",
                "stopping": "stopping", "finished": "finished", "failed": "failed", "stopped": "stopped (resumable)",
                "interrupted": "interrupted"}


class RunsPage(Page):
    title = "Runs"
    intro = "Every run is a folder with its config, events, checkpoints and exports."
    open_requested = Signal(Path, str)  # run folder, page to show it on (monitor, chat, export)
    resume_requested = Signal(Path)

    def __init__(self, session: Session, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.runs: list[RunState] = []
        folder_row = QHBoxLayout()
        self.folder_label = QLabel(objectName="muted", wordWrap=True)
        change = QPushButton("Change runs folder…")
        change.clicked.connect(self._choose_folder)
        refresh = QPushButton("Refresh")
        refresh.clicked.connect(self.refresh)
        folder_row.addWidget(self.folder_label, 1)
        folder_row.addWidget(change)
        folder_row.addWidget(refresh)
        self.body.addLayout(folder_row)
        self.banner = Banner()
        self.body.addWidget(self.banner)
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.setSelectionBehavior(QTableWidget.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QTableWidget.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.table.setAlternatingRowColors(True)
        self.table.verticalHeader().hide()
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.table.itemSelectionChanged.connect(self._show_buttons)
        self.table.doubleClicked.connect(lambda: self._open("monitor"))
        self.body.addWidget(self.table, 1)
        self.empty_label = QLabel("No runs yet. Runs appear here once you start training.", objectName="muted",
                                  alignment=Qt.AlignmentFlag.AlignCenter)
        self.body.addWidget(self.empty_label)
        self.body.addLayout(self._build_buttons())
        session.runs_folder_changed.connect(self.refresh)
        session.training_changed.connect(lambda _running: self.refresh())
        self.refresh()

    def _build_buttons(self) -> QHBoxLayout:
        row = QHBoxLayout()
        self.open_button = primary_button("Open plots")
        self.open_button.clicked.connect(lambda: self._open("monitor"))
        self.resume_button = QPushButton("Resume")
        self.resume_button.clicked.connect(self._resume)
        self.chat_button = QPushButton("Chat with it")
        self.chat_button.clicked.connect(lambda: self._open("chat"))
        self.export_button = QPushButton("Export…")
        self.export_button.clicked.connect(lambda: self._open("export"))
        self.folder_button = QPushButton("Show folder")
        self.folder_button.clicked.connect(self._show_folder)
        self.delete_button = QPushButton("Delete…")
        self.delete_button.setProperty("danger", True)
        self.delete_button.clicked.connect(self._delete)
        for button in (self.open_button, self.resume_button, self.chat_button, self.export_button,
                       self.folder_button):
            row.addWidget(button)
        row.addStretch(1)
        row.addWidget(self.delete_button)
        return row

    # ------------------------------------------------------------------ showing
    def refresh(self) -> None:
        folder = self.session.runs_folder
        self.folder_label.setText(f"Runs folder: {folder}")
        self.banner.clear()
        try:
            folder.mkdir(parents=True, exist_ok=True)  # a folder that can't exist is said now, not at Start
            self.runs = list_runs(folder)
        except OSError as exc:
            self.runs = []
            self.banner.show_message("error", "The runs folder can't be read", str(exc),
                                     "Choose another folder with Change runs folder….")
        selected = self.selected()
        self.table.setRowCount(len(self.runs))
        for row, run in enumerate(self.runs):
            for column, text in enumerate(self._cells(run)):
                item = QTableWidgetItem(text)
                if column >= 3:
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                if column == 1 and run.status in STATUS_COLORS:
                    item.setForeground(QColor(theme.color(STATUS_COLORS[run.status])))
                if column == 1 and run.error is not None:
                    item.setToolTip(run.error.message)
                self.table.setItem(row, column, item)
            if selected is not None and run.run_dir == selected.run_dir:
                self.table.selectRow(row)
        self.table.setVisible(bool(self.runs))
        self.empty_label.setVisible(not self.runs)
        self._show_buttons()

    def _cells(self, run: RunState) -> list[str]:
        training_here = self.session.is_training() and run.run_dir == self.session.training_run_dir
        status = "training now" if training_here else STATUS_WORDS.get(run.status, run.status)
        model = "SmolLM2-135M (bundled)" if run.model == "default" else Path(run.model).name
        steps = run.step_text if run.step or run.total_steps else "—"
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(run.started_at)) if run.started_at else "—"
        return [run.name, status, model, steps, formatting.number(run.final_loss),
                formatting.number(run.eval_loss), formatting.number(run.drift), formatting.duration(run.duration_s),
                started]

    def selected(self) -> RunState | None:
        rows = self.table.selectionModel().selectedRows() if self.table.selectionModel() else []
        return self.runs[rows[0].row()] if rows and rows[0].row() < len(self.runs) else None

    def select(self, run_dir: Path) -> None:
        for row, run in enumerate(self.runs):
            if run.run_dir == run_dir:
                self.table.selectRow(row)

    def _show_buttons(self) -> None:
        run = self.selected()
        busy = run is not None and self.session.is_training() and run.run_dir == self.session.training_run_dir
        self.open_button.setEnabled(run is not None)
        self.resume_button.setEnabled(run is not None and run.can_resume and not self.session.is_training())
        self.chat_button.setEnabled(run is not None and run.has_adapter)
        self.export_button.setEnabled(run is not None and run.has_adapter)
        self.folder_button.setEnabled(run is not None)
        self.delete_button.setEnabled(run is not None and not busy)

    # ------------------------------------------------------------------ actions
    def _open(self, page: str) -> None:
        run = self.selected()
        if run is not None:
            self.open_requested.emit(run.run_dir, page)

    def _resume(self) -> None:
        run = self.selected()
        if run is not None:
            self.resume_requested.emit(run.run_dir)

    def _show_folder(self) -> None:
        run = self.selected()
        if run is not None:
            QDesktopServices.openUrl(QUrl.fromLocalFile(str(run.run_dir)))

    def _delete(self) -> None:
        run = self.selected()
        if run is None or not self.confirm_delete(run):
            return
        try:
            delete_run(run.run_dir, self.session.runs_folder)
        except EngineError as exc:
            self.banner.show_error(exc, f"Could not delete {run.name}")
            return
        except OSError as exc:
            self.banner.show_message("error", f"Could not delete {run.name}", str(exc),
                                     "Close programs using files in it, then try again.")
            return
        if self.session.run_dir == run.run_dir:
            self.session.select_run(None)
        self.refresh()

    def confirm_delete(self, run: RunState) -> bool:
        answer = QMessageBox.question(self, "Delete run?", f"Delete the run folder {run.run_dir}?\n\nIts checkpoints, "
                                      "adapter and exports inside it are deleted too. This can't be undone.")
        return answer == QMessageBox.StandardButton.Yes

    def _choose_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Runs folder", str(self.session.runs_folder))
        if folder:
            settings.set_runs_folder(Path(folder))
            self.session.set_runs_folder(Path(folder))
