"""Export page: the adapter (PEFT), a merged 16-bit model, GGUF files for llama.cpp / Ollama / LM Studio at the
quantizations picked (their sizes and the RAM and disk the export needs shown before it starts), or the adapter as a
GGUF LoRA; progress; then each file's check. Runs `qlora_engine export` in a child process; the plan and "Add to LM
Studio" / "Create in Ollama" are engine-client requests. The GGUF results table is app/widgets/gguf_results.py.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

from PySide6.QtCore import Qt, QTimer, QUrl
from PySide6.QtGui import QDesktopServices
from PySide6.QtWidgets import (
    QButtonGroup,
    QCheckBox,
    QFileDialog,
    QGridLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QRadioButton,
    QScrollArea,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from app import settings
from app.engine_client import Call
from app.engine_process import EngineProcess
from app.engine_requests import PlanGgufExport
from app.formatting import size
from app.session import Session
from app.widgets.banner import Banner
from app.widgets.checkpoint_picker import CheckpointPicker
from app.widgets.gguf_results import GgufResults
from app.widgets.page import Page, card, primary_button
from qlora_engine.planning.gguf_plan import DEFAULT_QUANT, LOSSLESS_ENOUGH, QUANTS, ExportNeeds
from qlora_engine.protocol import events as ev
from qlora_engine.protocol.errors import EngineError
from qlora_engine.protocol.run_folders import exports_folder
from qlora_engine.protocol.run_state import summarize_run

KINDS = {
    "adapter": ("Adapter only", "A few megabytes. Load it on top of the same base model with "
                "PeftModel.from_pretrained(base, folder)."),
    "merged": ("Merged 16-bit model", "A standalone model: the base dequantized to 16-bit with the adapter merged in; "
               "loads with AutoModelForCausalLM.from_pretrained."),
    "gguf": ("GGUF for llama.cpp, Ollama and LM Studio", "Made from the merged model by llama.cpp's own converter "
             "and quantizer; every file is loaded by llama.cpp and checked against the merged model, with an Ollama "
             "Modelfile beside it."),
    "gguf-lora": ("Adapter as a GGUF LoRA", "For one base GGUF with adapters swapped: the adapter in llama.cpp's "
                  "LoRA format plus the base model's f16 GGUF, checked by llama.cpp loading both."),
}
QUANT_NOTES = {"f16": "16-bit, as trained", "bf16": "16-bit, as trained", "q8_0": "8-bit, near lossless",
               "q6_k": "6-bit", "q5_k_m": "5-bit", "q4_k_m": "4-bit, the usual choice"}
VERIFICATION_FILES = ("gguf-verification.json", "gguf-lora-verification.json")


class ExportPage(Page):
    title = "Export"
    intro = "Save the result in the formats other tools load. Every export is reloaded and checked after writing."

    def __init__(self, session: Session, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.needs: ExportNeeds | None = None  # the GGUF plan for the chosen quantizations, once it came
        self.plan_error: EngineError | None = None
        self.planning: Call | None = None  # the plan on its way
        self.plan_timer = QTimer(self, singleShot=True, interval=150)
        self.plan_timer.timeout.connect(self.update_plan)
        self.engine = EngineProcess(session.engine_command, self)
        self.engine.export_progress.connect(self._on_progress)
        self.engine.exported.connect(self._on_exported)
        self.engine.gguf_exported.connect(self._on_gguf_exported)
        self.engine.error.connect(lambda event: self.banner.show_error(event, f"The export failed ({event.code})"))
        self.engine.exited.connect(self._on_exit)
        content = QWidget()
        layout = QVBoxLayout(content)
        layout.setContentsMargins(0, 0, 8, 0)
        self.run_label = QLabel(objectName="muted", wordWrap=True)
        layout.addWidget(self.run_label)
        layout.addWidget(self._build_choice())
        self.gguf_plan_box = self._build_plan()
        layout.addWidget(self.gguf_plan_box)
        layout.addLayout(self._build_action_row())
        self.banner = Banner()
        layout.addWidget(self.banner)
        self.open_button = QPushButton("Open the export folder")
        self.open_button.clicked.connect(self._open_result)
        self.open_button.hide()
        layout.addWidget(self.open_button, 0, Qt.AlignmentFlag.AlignLeft)
        self.results = GgufResults(session)
        self.results.message.connect(self._show_action_result)
        layout.addWidget(self.results)
        layout.addStretch(1)
        self.scroll = QScrollArea(widgetResizable=True)
        self.scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        self.scroll.setWidget(content)
        self.body.addWidget(self.scroll, 1)
        self.result_path = ""
        session.run_changed.connect(self._run_changed)
        session.training_changed.connect(lambda _running: self._show_state())  # an adapter may exist now
        self.kind_group.buttons()[0].setChecked(True)  # shows the adapter's choice
        self._run_changed()

    # ------------------------------------------------------------------ building
    def _build_choice(self) -> QWidget:
        box = card()
        layout = QVBoxLayout(box)
        self.checkpoint_picker = CheckpointPicker("Export from")
        self.checkpoint_picker.changed.connect(self._checkpoint_changed)
        layout.addWidget(self.checkpoint_picker)
        self.kind_group = QButtonGroup(self)
        for kind, (label, explanation) in KINDS.items():
            button = QRadioButton(label, objectName=f"kind_{kind}")
            button.setProperty("kind", kind)
            self.kind_group.addButton(button)
            layout.addWidget(button)
            note = QLabel(explanation, objectName="muted", wordWrap=True)
            note.setContentsMargins(26, 0, 0, 4)
            layout.addWidget(note)
            button.toggled.connect(lambda on: on and self._kind_changed())
        grid = QGridLayout()
        self.destination = QLineEdit()
        self.destination.textEdited.connect(lambda _text: self.plan_timer.start())
        browse = QPushButton("Choose…")
        browse.clicked.connect(self._browse)
        grid.addWidget(QLabel("Save to"), 0, 0)
        grid.addWidget(self.destination, 0, 1)
        grid.addWidget(browse, 0, 2)
        layout.addLayout(grid)
        return box

    def _build_quant_picker(self) -> QWidget:
        self.quant_picker = QWidget()
        row = QHBoxLayout(self.quant_picker)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(QLabel("Quantizations (one file each):"))
        self.quant_boxes: dict[str, QCheckBox] = {}
        for quant in QUANTS:
            box = QCheckBox(quant, objectName=f"quant_{quant}", checked=quant == DEFAULT_QUANT)
            box.setToolTip(QUANT_NOTES[quant])
            box.toggled.connect(lambda _on: (self.plan_timer.start(), self._show_state()))
            self.quant_boxes[quant] = box
            row.addWidget(box)
        row.addStretch(1)
        return self.quant_picker

    def _build_plan(self) -> QWidget:
        holder = card()
        layout = QVBoxLayout(holder)
        layout.addWidget(QLabel("<b>What the GGUF export writes and needs</b> (estimated before it starts)"))
        layout.addWidget(self._build_quant_picker())
        self.plan_table = QTableWidget(0, 3)
        self.plan_table.setHorizontalHeaderLabels(["File", "Estimated size", "Check after writing"])
        self.plan_table.verticalHeader().hide()
        self.plan_table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.plan_table.setSelectionMode(QTableWidget.SelectionMode.NoSelection)
        header = self.plan_table.horizontalHeader()
        for column in (0, 1):
            header.setSectionResizeMode(column, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(2, QHeaderView.ResizeMode.Stretch)
        layout.addWidget(self.plan_table)
        self.needs_label = QLabel(objectName="muted", wordWrap=True)
        layout.addWidget(self.needs_label)
        self.needs_banner = Banner()
        layout.addWidget(self.needs_banner)
        return holder

    def _build_action_row(self) -> QHBoxLayout:
        row = QHBoxLayout()
        self.progress = QProgressBar(maximum=1000, format="", visible=False)
        self.export_button = primary_button("Export")
        self.export_button.clicked.connect(self.export)
        row.addWidget(self.export_button)
        row.addWidget(self.progress, 1)
        row.addStretch(0)  # takes the room while the progress bar is hidden
        return row

    # ------------------------------------------------------------------ choices
    def kind(self) -> str:
        return self.kind_group.checkedButton().property("kind")

    def quants(self) -> list[str]:
        return [quant for quant, box in self.quant_boxes.items() if box.isChecked()]

    def is_gguf(self) -> bool:
        return self.kind() in ("gguf", "gguf-lora")

    def _kind_changed(self) -> None:
        self.quant_picker.setVisible(self.kind() == "gguf")
        self.gguf_plan_box.setVisible(self.is_gguf() and self.session.run_dir is not None)
        self.plan_timer.start()
        self._show_state()

    def _checkpoint_changed(self) -> None:
        """Another adapter of the run: its own exports folder, its stored results, its GGUF plan."""
        self.results.show_results(self._stored_results())
        self._show_destination()
        self.plan_timer.start()

    def _run_changed(self) -> None:
        self.checkpoint_picker.show_run(summarize_run(self.session.run_dir) if self.session.run_dir else None)
        self.banner.clear()
        self.open_button.hide()
        self.progress.hide()
        self.results.show_results(self._stored_results())
        self.gguf_plan_box.setVisible(self.is_gguf() and self.session.run_dir is not None)
        self.plan_timer.start()
        self._show_state()

    # ------------------------------------------------------------------ the plan
    def update_plan(self) -> None:
        """Ask for the GGUF export's sizes and needs (in this process, off the GUI thread)."""
        summary = summarize_run(self.session.run_dir) if self.session.run_dir else None
        self.needs, self.plan_error = None, None
        if not self.is_gguf() or summary is None or (self.kind() == "gguf" and not self.quants()):
            self._show_plan()
            return
        if not self.needs_label.text():  # a plan shown stays until the new one comes (no flicker per tick)
            self.needs_label.setText("Estimating the files' sizes…")
        request = PlanGgufExport(run_dir=str(summary.run_dir), model=summary.model or "default",
                                 quants=tuple(self.quants()), out=self.destination.text().strip(),
                                 lora=self.kind() == "gguf-lora", checkpoint=self.checkpoint_picker.choice() or "final")
        self.planning = self.session.engine.run(request, owner=self, done=self._plan_came,
                                                failed=self._plan_failed)

    def is_planning(self) -> bool:
        return self.planning is not None and self.planning.is_running()

    def _plan_came(self, needs: ExportNeeds) -> None:
        self.needs = needs
        self._show_plan()

    def _plan_failed(self, error: EngineError) -> None:
        self.plan_error = error
        self._show_plan()

    def _show_plan(self) -> None:
        needs, lora = self.needs, self.kind() == "gguf-lora"
        files = needs.plan.file_bytes if needs else {}
        self.plan_table.setRowCount(len(files))
        stem = self.session.run_dir.name if self.session.run_dir else "run"
        for row, (quant, file_bytes) in enumerate(files.items()):
            name = f"{stem}-base-f16.gguf  (+ the LoRA)" if lora else f"{stem}-{quant}.gguf"
            check = ("the first 16 greedy tokens equal the merged model's on ≥ 90% of prompts"
                     if quant in LOSSLESS_ENOUGH else "agreement and perplexity measured and reported")
            if lora:
                check = "llama.cpp with base + LoRA against the base model with the PEFT adapter"
            for column, text in enumerate((name, f"≈ {size(file_bytes)}", f"{QUANT_NOTES[quant]}; {check}")):
                self.plan_table.setItem(row, column, QTableWidgetItem(text))
        self.plan_table.setFixedHeight(self.plan_table.horizontalHeader().height() + 4
                                       + sum(self.plan_table.rowHeight(r) for r in range(len(files))))
        self.needs_label.setText(self._needs_text())
        self._show_problems()
        self._show_state()

    def _needs_text(self) -> str:
        needs = self.needs
        if self.plan_error is not None:
            return f"Could not estimate the export: {self.plan_error.message}"
        if needs is None:
            return "Pick at least one quantization." if self.kind() == "gguf" and self.session.run_dir else ""
        ram = "unknown" if needs.available_ram_bytes is None else f"{size(needs.available_ram_bytes)} available"
        merge = "" if self.kind() == "gguf-lora" else " (the merge, the 16-bit GGUF it is quantized from, the files)"
        text = (f"Needs about {size(needs.plan.disk_bytes)} of disk{merge}: {size(needs.free_disk_bytes)} free on "
                f"the drive of {needs.out}. About {size(needs.plan.ram_bytes)} of RAM: {ram}.")
        architecture = ", ".join(needs.architectures) or "this architecture"
        if needs.supported is True:
            text += f" llama.cpp's converter knows {architecture}."
        elif needs.supported is None:
            text += " Whether llama.cpp's converter knows it is checked when the converter is fetched (first export)."
        return text

    def _show_problems(self) -> None:
        needs = self.needs
        if needs is not None and needs.supported is False:
            self.needs_banner.show_message(
                "error", "GGUF export does not support this model",
                f"llama.cpp's converter has no class for {', '.join(needs.architectures) or 'its architecture'}.",
                "Export the merged 16-bit model instead; tools that read safetensors load it.")
        elif needs is not None and needs.problems:
            said = " ".join(p.message[:1].upper() + p.message[1:] + "." for p in needs.problems)
            self.needs_banner.show_message("warning", "Not enough room for this export", said,
                                           needs.problems[0].advice)
        else:
            self.needs_banner.clear()

    def plan_blocks_export(self) -> bool:
        if self.kind() == "gguf" and not self.quants():
            return True
        return self.needs is not None and (bool(self.needs.problems) or self.needs.supported is False)

    # ------------------------------------------------------------------ actions
    def export(self) -> None:
        run_dir = self.session.run_dir
        if run_dir is None or self.engine.is_running():
            return
        self.banner.clear()
        self.open_button.hide()
        self.results.show_results([])
        self.progress.setValue(0)
        self.progress.setFormat("Starting…")
        self.progress.show()
        args = ["export", str(run_dir), f"--{self.kind()}", "--events", "jsonl", *self.checkpoint_picker.engine_args()]
        if self.kind() == "gguf":
            args += ["--quant", ",".join(self.quants())]
        if self.destination.text().strip():
            args += ["--out", self.destination.text().strip()]
        self.engine.start(args)
        self._show_state()

    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Export to", settings.last_folder("export"))
        if folder:
            settings.remember_folder("export", folder)
            run_name = self.session.run_dir.name if self.session.run_dir else "model"
            run_name += "".join(f"-{arg}" for arg in self.checkpoint_picker.engine_args()[1:])  # its step-N
            self.destination.setText(str(Path(folder) / f"{run_name}-{self.kind()}"))
            self.plan_timer.start()

    def _open_result(self) -> None:
        if self.result_path:
            QDesktopServices.openUrl(QUrl.fromLocalFile(self.result_path))

    def _show_action_result(self, kind: str, title: str, text: str, advice: str) -> None:
        self.banner.show_message(kind, title, text, advice)

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

    def _on_gguf_exported(self, event: ev.GgufExported) -> None:
        self.results.add_result(event)
        self.result_path = str(Path(event.path).parent)
        self.open_button.show()
        QTimer.singleShot(0, lambda: self.scroll.ensureWidgetVisible(self.results))  # after the layout grew

    def _on_exit(self, code: int) -> None:
        kept = [r for r in self.results.shown if r.ok]
        if code == 0 and self.results.shown:
            self.progress.setValue(1000)
            self.progress.setFormat("Done")
            lora = any(r.base_path for r in kept)
            against = "the base model with the PEFT adapter" if lora else "the merged model"
            record = VERIFICATION_FILES[1] if lora else VERIFICATION_FILES[0]
            self.banner.show_message("success", f"Exported and verified by llama.cpp: {len(kept)} "
                                     f"file{'s' if len(kept) != 1 else ''} in {self.result_path}",
                                     f"Each was loaded by llama.cpp and compared with {against}; the table below "
                                     f"has the results (also in exports/{record}).")
        elif code != 0:
            self.progress.setFormat("Failed")
        self.plan_timer.start()  # the merged export may be there now: less to write next time
        self._show_state()

    # ------------------------------------------------------------------ showing
    def _stored_results(self) -> list[ev.GgufExported]:
        """The run's last GGUF exports, from their *-verification.json files."""
        run_dir = self.session.run_dir
        results: list[ev.GgufExported] = []
        for name in VERIFICATION_FILES if run_dir else ():
            path = exports_folder(run_dir, self.checkpoint_picker.choice() or "final") / name
            try:
                stored = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
            except (OSError, ValueError):
                continue
            for values in stored if isinstance(stored, list) else [stored]:
                event = ev.event_from_dict(values) if isinstance(values, dict) else None
                if isinstance(event, ev.GgufExported):
                    results.append(event)
        return results

    def _show_destination(self) -> None:
        run_dir = self.session.run_dir
        if run_dir is not None:
            folder = "gguf" if self.is_gguf() else self.kind()
            exports = exports_folder(run_dir, self.checkpoint_picker.choice() or "final")
            self.destination.setPlaceholderText(str(exports / folder))

    def _show_state(self) -> None:
        run_dir = self.session.run_dir
        exporting = self.engine.is_running()
        summary = summarize_run(run_dir) if run_dir else None
        self.checkpoint_picker.show_run(summary)
        if summary is None:
            self.run_label.setText("No run chosen. Train one, or pick a finished run on the Runs page.")
        elif not summary.has_adapter and self.checkpoint_picker.choice():
            self.run_label.setText(f"Run <b>{html.escape(summary.name)}</b> has no final adapter yet: export one of "
                                   f"its checkpoints, or resume the run to finish it.")
        elif not summary.has_adapter:
            self.run_label.setText(f"Run <b>{html.escape(summary.name)}</b> has no adapter yet: let it finish "
                                   f"(or resume it) first.")
        else:
            self.run_label.setText(f"Exporting run <b>{html.escape(summary.name)}</b>"
                                   + (f", final loss {summary.final_loss:.4g}" if summary.final_loss else "") + ".")
        ready = bool(summary and self.checkpoint_picker.choice()) and not exporting
        self.export_button.setEnabled(ready and not (self.is_gguf() and self.plan_blocks_export()))
        self.export_button.setText("Exporting…" if exporting else "Export")
        self.results.set_busy(exporting)
        self._show_destination()

    def showEvent(self, event: object) -> None:  # noqa: N802 (Qt override)
        self._show_state()
        super().showEvent(event)

    def shutdown(self) -> None:
        self.engine.kill()
