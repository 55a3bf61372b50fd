"""Export page: write the adapter (PEFT) or a merged 16-bit model, with progress, then show the check
that the export reloads and gives the same logits. Runs `qlora_engine export` in a child process.
"""
from __future__ import annotations

import html
from pathlib import Path

from PySide6.QtCore import QUrl
from PySide6.QtGui import QDesktopServices
from PySide6.QtWidgets import (
    QButtonGroup,
    QFileDialog,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QRadioButton,
    QVBoxLayout,
    QWidget,
)

from app import settings
from app.engine_process import EngineProcess
from app.session import Session
from app.widgets.banner import Banner
from app.widgets.page import Page, card, primary_button
from qlora_engine.protocol import events as ev
from qlora_engine.protocol.run_state import summarize_run

KINDS = {
    "adapter": ("Adapter only", "A few megabytes. Load it on top of the same base model with "
                "PeftModel.from_pretrained(base, folder)."),
    "merged": ("Merged 16-bit model", "A standalone model: the base dequantized to 16-bit with the adapter "
               "merged in. As large as the base in 16-bit; loads with AutoModelForCausalLM.from_pretrained."),
}


class ExportPage(Page):
    title = "Export"
    intro = "Save the result in the formats other tools load. Every export is reloaded and checked after writing."

    def __init__(self, session: Session, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.engine = EngineProcess(session.engine_command, self)
        self.engine.export_progress.connect(self._on_progress)
        self.engine.exported.connect(self._on_exported)
        self.engine.error.connect(lambda event: self.banner.show_error(event, "The export failed"))
        self.engine.exited.connect(lambda _code: self._show_state())
        self.run_label = QLabel(objectName="muted", wordWrap=True)
        self.body.addWidget(self.run_label)
        self.body.addWidget(self._build_choice())
        row = QHBoxLayout()
        self.progress = QProgressBar(maximum=1000, format="", visible=False)
        self.export_button = primary_button("Export")
        self.export_button.clicked.connect(self.export)
        row.addWidget(self.export_button)
        row.addWidget(self.progress, 1)
        row.addStretch(0)  # takes the room while the progress bar is hidden
        self.body.addLayout(row)
        self.banner = Banner()
        self.body.addWidget(self.banner)
        self.open_button = QPushButton("Open the export folder")
        self.open_button.clicked.connect(self._open_result)
        self.open_button.hide()
        self.body.addWidget(self.open_button)
        self.body.addStretch(1)
        self.result_path = ""
        session.run_changed.connect(self._show_state)
        session.training_changed.connect(lambda _running: self._show_state())  # an adapter may exist now
        self._show_state()

    def _build_choice(self) -> QWidget:
        box = card()
        layout = QVBoxLayout(box)
        self.kind_group = QButtonGroup(self)
        for kind, (label, explanation) in KINDS.items():
            button = QRadioButton(label, objectName=f"kind_{kind}")
            button.setProperty("kind", kind)
            self.kind_group.addButton(button)
            layout.addWidget(button)
            note = QLabel(explanation, objectName="muted", wordWrap=True)
            note.setContentsMargins(26, 0, 0, 6)
            layout.addWidget(note)
            button.toggled.connect(lambda _on: self._show_destination())
        self.kind_group.buttons()[0].setChecked(True)
        grid = QGridLayout()
        self.destination = QLineEdit()
        browse = QPushButton("Choose…")
        browse.clicked.connect(self._browse)
        grid.addWidget(QLabel("Save to"), 0, 0)
        grid.addWidget(self.destination, 0, 1)
        grid.addWidget(browse, 0, 2)
        layout.addLayout(grid)
        return box

    def kind(self) -> str:
        return self.kind_group.checkedButton().property("kind")

    # ------------------------------------------------------------------ actions
    def export(self) -> None:
        run_dir = self.session.run_dir
        if run_dir is None or self.engine.is_running():
            return
        self.banner.clear()
        self.open_button.hide()
        self.progress.setValue(0)
        self.progress.setFormat("Starting…")
        self.progress.show()
        args = ["export", str(run_dir), f"--{self.kind()}", "--events", "jsonl"]
        if self.destination.text().strip():
            args += ["--out", self.destination.text().strip()]
        self.engine.start(args)
        self._show_state()

    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Export to", settings.last_folder("export"))
        if folder:
            settings.remember_folder("export", folder)
            run_name = self.session.run_dir.name if self.session.run_dir else "model"
            self.destination.setText(str(Path(folder) / f"{run_name}-{self.kind()}"))

    def _open_result(self) -> None:
        if self.result_path:
            QDesktopServices.openUrl(QUrl.fromLocalFile(self.result_path))

    # ------------------------------------------------------------------ events
    def _on_progress(self, event: ev.ExportProgress) -> None:
        stage = event.stage
        self.progress.setValue(int(1000 * event.fraction))
        self.progress.setFormat(f"{stage[:1].upper()}{stage[1:]}…  %p%")  # the engine's stage is a phrase

    def _on_exported(self, event: ev.Exported) -> None:
        self.progress.setValue(1000)
        self.progress.setFormat("Done")
        self.result_path = event.path
        check = (f"Reloaded and compared with the in-app model: largest logit difference "
                 f"{event.max_abs_logit_diff:.3g} (allowed: {event.tolerance}), relative L2 difference "
                 f"{event.relative_l2:.3g}, same next token {100 * event.top1_agreement:.1f}% of the time")
        if event.ok:
            self.banner.show_message("success", f"Exported and verified: {self.result_path}", check + ".")
        else:
            self.banner.show_message("warning", f"Exported, but the check failed: {self.result_path}", check + ".",
                                     "The files were written but don't reproduce the model closely enough; "
                                     "prefer the adapter export, and report this.")
        self.open_button.show()

    # ------------------------------------------------------------------ showing
    def _show_destination(self) -> None:
        run_dir = self.session.run_dir
        if run_dir is not None:
            self.destination.setPlaceholderText(str(run_dir / "exports" / self.kind()))

    def _show_state(self) -> None:
        run_dir = self.session.run_dir
        exporting = self.engine.is_running()
        summary = summarize_run(run_dir) if run_dir else None
        if summary is None:
            self.run_label.setText("No run chosen. Train one, or pick a finished run on the Runs page.")
        elif not summary.has_adapter:
            self.run_label.setText(f"Run <b>{html.escape(summary.name)}</b> has no adapter yet: let it finish "
                                   f"(or resume it) first.")
        else:
            self.run_label.setText(f"Exporting run <b>{html.escape(summary.name)}</b>"
                                   + (f", final loss {summary.final_loss:.4g}" if summary.final_loss else "") + ".")
        self.export_button.setEnabled(bool(summary and summary.has_adapter) and not exporting)
        self.export_button.setText("Exporting…" if exporting else "Export")
        self._show_destination()

    def showEvent(self, event: object) -> None:  # noqa: N802 (Qt override)
        self._show_state()
        super().showEvent(event)

    def shutdown(self) -> None:
        self.engine.kill()
