"""The Export page's GGUF results: each file's check by llama.cpp (greedy agreement with the merged model, answers
ending with the end-of-turn token, perplexity, held-out questions right, kept or not), and for the file picked in
the table "Add to LM Studio", "Create in Ollama" (when `ollama` is on PATH) and the command to run by hand.
"""
from __future__ import annotations

import html
import shlex
import shutil
from pathlib import Path

from PySide6.QtCore import Signal
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import (
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from app.engine_requests import AddGgufTo
from app.formatting import size
from app.session import Session
from app.widgets.page import card
from qlora_engine.protocol import events as ev
from qlora_engine.protocol.errors import EngineError
from qlora_engine.protocol.queries import AddedTo

COLUMNS = ["File", "Size", "Same first 16 tokens", "Ends with end of turn", "Perplexity", "Held-out right",
           "Result"]
APP_NAMES = {"lm-studio": "LM Studio", "ollama": "Ollama"}


def ollama_on_path() -> bool:
    return shutil.which("ollama") is not None


def percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.0f}%"


def result_cells(result: ev.GgufExported) -> list[str]:
    """One table row: what llama.cpp's check of this file measured, next to the merged model's figures."""
    agreement = f"{percent(result.greedy_agreement)} of {result.prompts}"
    agreement += (f" (needs {percent(result.required_agreement)})" if result.required_agreement is not None
                  else " (reported)")
    ends = f"{percent(result.ended_with_end_of_turn)} (merged {percent(result.merged_ended_with_end_of_turn)})"
    perplexity = "—"
    if result.perplexity is not None and result.merged_perplexity:
        change = 100 * (result.perplexity / result.merged_perplexity - 1)
        perplexity = f"{result.perplexity:.3g} vs {result.merged_perplexity:.3g} ({change:+.1f}%)"
    right = "—"
    if result.accuracy is not None:
        right = f"{percent(result.accuracy)} (merged {percent(result.merged_accuracy)})"
    verdict = ("kept, verified" + (" with the base f16" if result.base_path else "")) if result.ok else "not kept"
    name = Path(result.path).name
    return [name, size(result.size_bytes) if result.size_bytes else "—", agreement, ends, perplexity, right, verdict]


class GgufResults(QWidget):
    """The table of checked GGUF files and what to do with the picked one."""

    message = Signal(str, str, str, str)  # kind, title, text, advice: for the page's banner

    def __init__(self, session: Session, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.shown: list[ev.GgufExported] = []
        self.adding = None  # the add-to call on its way
        box = card(self)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(box)
        layout = QVBoxLayout(box)
        self.heading = QLabel("<b>Checked by llama.cpp</b>")
        layout.addWidget(self.heading)
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.verticalHeader().hide()
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QTableWidget.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QTableWidget.SelectionMode.SingleSelection)
        self.table.setWordWrap(True)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.itemSelectionChanged.connect(self._show_actions)
        layout.addWidget(self.table)
        self.problems_label = QLabel(wordWrap=True, objectName="problems")
        layout.addWidget(self.problems_label)
        layout.addLayout(self._build_actions())
        self.command_label = QLabel(objectName="muted")
        layout.addWidget(self.command_label)
        row = QHBoxLayout()
        self.command = QLineEdit(readOnly=True, objectName="command")
        self.copy_button = QPushButton("Copy")
        self.copy_button.clicked.connect(lambda: QGuiApplication.clipboard().setText(self.command.text()))
        row.addWidget(self.command, 1)
        row.addWidget(self.copy_button)
        layout.addLayout(row)
        self.hide()

    def _build_actions(self) -> QHBoxLayout:
        row = QHBoxLayout()
        self.lm_studio_button = QPushButton("Add to LM Studio")
        self.lm_studio_button.setToolTip("Hard-links (or copies) the file into LM Studio's models folder, under "
                                         "qlora-studio/<run>/")
        self.lm_studio_button.clicked.connect(lambda: self.add_to("lm-studio"))
        self.ollama_button = QPushButton("Create in Ollama")
        self.ollama_button.setToolTip("Runs the ollama create command below (Ollama copies the file into its store)")
        self.ollama_button.clicked.connect(lambda: self.add_to("ollama"))
        row.addWidget(self.lm_studio_button)
        row.addWidget(self.ollama_button)
        row.addStretch(1)
        return row

    # ------------------------------------------------------------------ showing
    def show_results(self, results: list[ev.GgufExported]) -> None:
        self.shown = []
        self.table.setRowCount(0)
        for result in results:
            self.add_result(result)
        self.setVisible(bool(results))

    def add_result(self, result: ev.GgufExported) -> None:
        self.shown.append(result)
        row = self.table.rowCount()
        self.table.insertRow(row)
        for column, text in enumerate(result_cells(result)):
            item = QTableWidgetItem(text)
            item.setToolTip(text)
            self.table.setItem(row, column, item)
        self.table.resizeRowsToContents()
        self.table.setFixedHeight(self.table.horizontalHeader().height() + 6
                                  + sum(self.table.rowHeight(r) for r in range(self.table.rowCount())))
        self.show()
        kept = [i for i, r in enumerate(self.shown) if r.ok]
        self.table.selectRow(kept[-1] if kept else row)  # the newest kept file
        self._show_actions()

    def picked(self) -> ev.GgufExported | None:
        rows = self.table.selectionModel().selectedRows()
        return self.shown[rows[0].row()] if rows and rows[0].row() < len(self.shown) else None

    def set_busy(self, busy: bool) -> None:
        self._busy = busy
        self._show_actions()

    def _show_actions(self) -> None:
        result = self.picked()
        usable = result is not None and result.ok and Path(result.path).is_file() and not result.base_path
        idle = not getattr(self, "_busy", False) and not (self.adding is not None and self.adding.is_running())
        self.lm_studio_button.setEnabled(usable and idle)
        self.ollama_button.setVisible(ollama_on_path())
        self.ollama_button.setEnabled(usable and idle and bool(result and result.modelfile))
        failed = result is not None and not result.ok
        self.problems_label.setText(f"<b>{result.quant} was not kept:</b> " + html.escape("; ".join(result.problems))
                                    + ". Files that passed were kept." if failed else "")
        self.problems_label.setVisible(failed)
        if result is not None and result.base_path:
            self.command_label.setText("Use it with llama.cpp (the base GGUF and the LoRA on top):")
            self.command.setText(f"llama-cli -m {shlex.quote(result.base_path)} --lora {shlex.quote(result.path)}")
        elif result is not None and result.ok and result.ollama_command:
            self.command_label.setText("Create it in Ollama by hand (the Modelfile sits beside the file):")
            self.command.setText(result.ollama_command)
        else:
            self.command_label.setText("")
            self.command.clear()
        self.command.setVisible(bool(self.command.text()))
        self.copy_button.setVisible(bool(self.command.text()))

    # ------------------------------------------------------------------ actions
    def add_to(self, app: str) -> None:
        result = self.picked()
        if result is None or self.session.run_dir is None:
            return
        request = AddGgufTo(app=app, gguf=result.path, name=self.session.run_dir.name)
        self.adding = self.session.engine.run(request, owner=self, done=self._added, failed=self._add_failed)
        self._show_actions()

    def is_adding(self) -> bool:
        return self.adding is not None and self.adding.is_running()

    def _added(self, answer: AddedTo) -> None:
        if answer.app == "lm-studio":
            self.message.emit("success", f"Added to LM Studio: {answer.where}",
                              "In LM Studio's models folder, publisher qlora-studio.", "")
        else:
            self.message.emit("success", f"Created in Ollama as {answer.where}",
                              f"Run it: ollama run {answer.where}", "")
        self._show_actions()

    def _add_failed(self, error: EngineError) -> None:
        self.message.emit("error", f"Could not add it ({error.code})", error.message, error.advice)
        self._show_actions()
