"""Model page: choose the bundled default, a Hugging Face Hub id, a model folder or a .gguf file, and see its facts
(and whether GGUF export will take it); find one in the catalog, on the Hub or on disk (model_sources.py); download
a Hub model with per-file progress and a cancel.

The facts come from `model-info --json` (a Hub id: its config.json alone, no weights), a download is the engine's
`pull` process speaking download_progress / downloaded events.
"""
from __future__ import annotations

from PySide6.QtGui import QShowEvent
from PySide6.QtWidgets import (
    QButtonGroup,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QRadioButton,
    QSizePolicy,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from app import formatting, settings
from app.engine_client import Call
from app.engine_process import EngineProcess
from app.engine_requests import CheckGgufExport, ModelToPlan, ReadModelInfo
from app.pages.model_sources import CatalogPanel, HubPanel, LocalPanel
from app.session import Session
from app.widgets.banner import Banner
from app.widgets.page import Page, card, fact_label
from qlora_engine.protocol import events as ev
from qlora_engine.protocol.errors import EngineError
from qlora_engine.protocol.model_ref import parse_hub_ref
from qlora_engine.protocol.queries import LocalModels, ModelInfo

BUSY_TEXT = "Reading the model… (a .gguf is converted once; that can take a minute)"
SOURCES = {"default": "bundled with QLoRA Studio", "folder": "Hugging Face folder", "gguf": ".gguf file, imported",
           "hub": "Hugging Face Hub, in the HF cache"}
FACTS = (("name", "Model"), ("architecture", "Architecture"), ("params", "Parameters"),
         ("context_length", "Context length"), ("vocab_size", "Vocabulary"), ("layers", "Layers × hidden size"),
         ("has_chat_template", "Chat template"), ("source", "Source"), ("downloaded", "Downloaded"),
         ("gguf", "GGUF export"), ("path", "Files"))


class ModelPage(Page):
    title = "Model"
    intro = ("The model to fine-tune. Its weights stay frozen in 4-bit; training adds a small adapter on top. "
             "Start with the bundled model to see the whole path in minutes.")

    def __init__(self, session: Session, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.reading: Call | None = None  # the model-info request on its way
        self.checking_gguf: Call | None = None
        top = QHBoxLayout()
        top.addWidget(self._build_choice(), 1)
        top.addWidget(self._build_facts(), 1)
        self.body.addLayout(top)
        self.busy = QProgressBar(maximum=0, visible=False, textVisible=False, objectName="busy")
        self.busy_label = QLabel(BUSY_TEXT, objectName="muted", visible=False, wordWrap=True)
        self.banner = Banner()
        self.body.addWidget(self.busy_label)
        self.body.addWidget(self.busy)
        self.body.addWidget(self.banner)
        self.body.addWidget(self._build_download())
        self.body.addWidget(self._build_sources(), 1)
        self._show_choice(session.config.model)

    def _build_choice(self) -> QWidget:
        box = card()
        layout = QVBoxLayout(box)
        # short labels (the page must fit the smallest window at 150% scaling); the rest in each tooltip
        self.use_default = QRadioButton("Bundled: SmolLM2-135M-Instruct")
        self.use_default.setToolTip("The bundled default model: small, fast even on a CPU")
        self.use_hub = QRadioButton("Hugging Face Hub: ORG/NAME")
        self.use_hub.setToolTip("A model on the Hugging Face Hub, downloaded into the HF cache other tools share")
        self.use_folder = QRadioButton("A model folder")
        self.use_folder.setToolTip("A Hugging Face model folder: config.json, the tokenizer and .safetensors files")
        self.use_gguf = QRadioButton("A .gguf file")
        self.use_gguf.setToolTip("A .gguf file: converted to safetensors once, then cached")
        self.choice = QButtonGroup(self)
        for button in (self.use_default, self.use_hub, self.use_folder, self.use_gguf):
            self.choice.addButton(button)
            layout.addWidget(button)
        row = QHBoxLayout()
        self.path_edit = QLineEdit(placeholderText="a Hub id (Qwen/Qwen2.5-0.5B-Instruct), a folder or a .gguf file")
        self.path_edit.returnPressed.connect(lambda: self.choose_model(self.path_edit.text().strip()))
        browse_folder = QPushButton("Folder…")
        browse_folder.clicked.connect(self._browse_folder)
        browse_gguf = QPushButton(".gguf file…")
        browse_gguf.clicked.connect(self._browse_gguf)
        row.addWidget(self.path_edit, 1)
        row.addWidget(browse_folder)
        row.addWidget(browse_gguf)
        layout.addLayout(row)
        layout.addStretch(1)
        self.use_default.clicked.connect(lambda: self.choose_model("default"))
        self.use_hub.clicked.connect(self._pick_hub)
        self.use_folder.clicked.connect(self._browse_folder)
        self.use_gguf.clicked.connect(self._browse_gguf)
        return box

    def _build_facts(self) -> QWidget:
        self.facts_card = card()
        form = self.facts_form = QFormLayout(self.facts_card)
        form.setHorizontalSpacing(24)
        form.setVerticalSpacing(4)
        self.facts: dict[str, QLabel] = {}
        for key, label in FACTS:
            self.facts[key] = fact_label()
            form.addRow(QLabel(label, objectName="factName"), self.facts[key])
        # Its facts are read whole: the tabs below give up height first.
        self.facts_card.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Minimum)
        self.facts_card.hide()
        return self.facts_card

    def _build_download(self) -> QWidget:
        self.download_card = card()
        layout = QVBoxLayout(self.download_card)
        row = QHBoxLayout()
        self.download_label = QLabel(wordWrap=True)
        self.cancel_button = QPushButton("Cancel download")
        self.cancel_button.clicked.connect(self.cancel_download)
        row.addWidget(self.download_label, 1)
        row.addWidget(self.cancel_button)
        layout.addLayout(row)
        self.download_bar = QProgressBar(maximum=1000, textVisible=False)
        layout.addWidget(self.download_bar)
        self.download_card.hide()
        self.pull = EngineProcess(self.session.engine_command, self)
        self.pull.event.connect(self._on_pull_event)
        self.pull.exited.connect(self._on_pull_exited)
        self.pulling = ""  # the Hub id being downloaded
        self.pull_cancelled = False
        self.files_seen: list[str] = []  # the files of this download, in the order they started
        return self.download_card

    def _build_sources(self) -> QWidget:
        self.tabs = QTabWidget()
        self.catalog = CatalogPanel(self.session)
        self.hub = HubPanel(self.session)
        self.local = LocalPanel(self.session)
        self.tabs.addTab(self.catalog, "What fits this GPU")
        self.tabs.addTab(self.hub, "Search the Hub")
        self.tabs.addTab(self.local, "On this computer")
        self.catalog.download_requested.connect(self.download)
        self.hub.download_requested.connect(self.download)
        self.hub.use_requested.connect(self.choose_model)
        self.local.use_requested.connect(self.choose_model)
        self.local.listed.connect(self._show_on_disk)
        return self.tabs

    def showEvent(self, event: QShowEvent) -> None:  # noqa: N802 (Qt override)
        super().showEvent(event)
        if self.local.stale:  # the catalog marks what is on disk already
            self.local.refresh()

    # ------------------------------------------------------------------ choosing
    def refresh(self) -> None:
        self.choose_model(self.session.config.model)

    def choose_model(self, spec: str) -> None:
        if not spec:
            return
        self._show_choice(spec)
        self.session.update_config(model=spec)
        self.session.set_model_info(None)
        self.banner.clear()
        self.facts_card.hide()  # the facts shown are another model's until the answer comes
        self._set_busy(True)
        self.reading = self.session.engine.run(ReadModelInfo(spec, self.session.config.allow_pickle), owner=self,
                                               done=self._show_facts, failed=self._show_error,
                                               progress=self._show_progress)

    def _pick_hub(self) -> None:
        self.tabs.setCurrentWidget(self.hub)
        self.path_edit.setFocus()
        if not parse_hub_ref(self.path_edit.text().strip()):
            self.path_edit.clear()

    def _browse_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose a model folder", settings.last_folder("model"))
        if folder:
            settings.remember_folder("model", folder)
            self.choose_model(folder)
        else:
            self._show_choice(self.session.config.model)

    def _browse_gguf(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Choose a .gguf file", settings.last_folder("model"),
                                              "GGUF models (*.gguf)")
        if path:
            settings.remember_folder("model", path)
            self.choose_model(path)
        else:
            self._show_choice(self.session.config.model)

    # ------------------------------------------------------------------ downloading
    def download(self, hub_id: str) -> None:
        """`pull hub_id`: what training needs into the HF cache; the run's model once it is there."""
        if self.pull.is_running():
            self.banner.show_message("warning", f"{self.pulling} is still downloading",
                                     advice="Wait for it, or cancel it first.")
            return
        self.banner.clear()
        self.pulling, self.pull_cancelled, self.files_seen = hub_id, False, []
        self.download_label.setText(f"Downloading {hub_id}: asking the Hub for its files…")
        self.download_bar.setValue(0)
        self.cancel_button.setEnabled(True)
        self.download_card.show()
        self.pull.start(["pull", hub_id, "--events", "jsonl"]
                        + (["--allow-pickle"] if self.session.config.allow_pickle else []))

    def cancel_download(self) -> None:
        self.pull_cancelled = True
        self.pull.kill()

    def _on_pull_event(self, event: ev.Event) -> None:
        if isinstance(event, ev.DownloadProgress):
            if event.file not in self.files_seen:
                self.files_seen.append(event.file)
            self.download_bar.setValue(int(1000 * event.bytes / event.total_bytes) if event.total_bytes else 0)
            self.download_label.setText(
                f"Downloading {event.repo_id}: {event.file}, {formatting.size(event.file_bytes)} of "
                f"{formatting.size(event.file_total_bytes)} (file {len(self.files_seen)}); "
                f"{formatting.size(event.bytes)} of {formatting.size(event.total_bytes)} in all")
        elif isinstance(event, ev.Downloaded):
            self.download_card.hide()
            self.local.refresh()  # the catalog marks it on disk too
            self.choose_model(event.repo_id)  # (clears the banner: the message below comes after)
            fetched = (f"{formatting.size(event.downloaded_bytes)} fetched" if event.downloaded_bytes
                       else "every file was there already")
            self.banner.show_message("success", f"{event.repo_id} is in the HF cache",
                                     f"{len(event.files)} files, {formatting.size(event.total_bytes)} ({fetched}). "
                                     "It is the run's model now, and loads offline.")
        elif isinstance(event, ev.Error) and not self.pull_cancelled:
            self.download_card.hide()
            self.banner.show_error(event, f"{self.pulling} was not downloaded")

    def _on_pull_exited(self, _code: int) -> None:
        self.cancel_button.setEnabled(False)
        if self.pull_cancelled:
            self.download_bar.setValue(0)
            self.download_label.setText(f"Download of {self.pulling} cancelled. Files already complete are kept: "
                                        "downloading it again fetches only the rest.")

    def _show_on_disk(self, answer: LocalModels) -> None:
        self.catalog.set_on_disk({m.model for m in answer.models if m.source == "hf_cache" and m.complete})

    # ------------------------------------------------------------------ showing
    def _show_choice(self, spec: str) -> None:
        button = (self.use_default if spec == "default" else self.use_gguf if spec.endswith(".gguf")
                  else self.use_hub if parse_hub_ref(spec) else self.use_folder)
        button.setChecked(True)
        self.path_edit.setText("" if spec == "default" else spec)

    def _set_busy(self, busy: bool) -> None:
        self.busy.setVisible(busy)
        self.busy_label.setVisible(busy)
        self.busy_label.setText(BUSY_TEXT)

    def _show_progress(self, log_line: str) -> None:
        """The engine's latest log line under the busy bar: a long .gguf import shows it is moving."""
        self.busy_label.setText(f"{BUSY_TEXT}\n{log_line[:160]}")

    def _show_facts(self, info: ModelInfo) -> None:
        self._set_busy(False)
        self.session.set_model_info(info)
        layers, hidden = info.num_layers, info.hidden_size
        values = {
            "name": "SmolLM2-135M-Instruct (bundled)" if info.source == "default" else
            info.original or self.session.config.model,
            "architecture": info.architecture or "unknown",
            "params": formatting.count(info.params),
            "context_length": f"{info.context_length:,} tokens" if info.context_length else "—",
            "vocab_size": f"{info.vocab_size:,} tokens" if info.vocab_size else "—",
            "layers": f"{layers} × {hidden}" if layers and hidden else "—",
            "has_chat_template": "yes: chat rows are formatted the way the model was taught" if
            info.has_chat_template else "no: rows use a plain \"### Instruction / ### Response\" layout",
            "source": SOURCES.get(info.source, info.source),
            "downloaded": self._download_text(info) if info.source == "hub" else "",
            "gguf": "checking…",
            "path": info.path,
        }
        for key, text in values.items():
            self.facts[key].setText(str(text))
        self.facts_form.setRowVisible(self.facts["downloaded"], info.source == "hub")
        self.facts_card.show()
        self.checking_gguf = self.session.engine.run(CheckGgufExport(ModelToPlan(info.original or "default",
                                                                                 info.path)),
                                                     owner=self, done=lambda known: self._show_gguf(info, known),
                                                     failed=lambda error: self.facts["gguf"].setText(error.message))
        if info.custom_code and not self.session.config.trust_remote_code:
            self.banner.show_message("warning", "This model ships its own Python code",
                                     "It may not load without it.",
                                     "Turn on 'Trust remote code' in Train › Model only if you trust its author.")

    @staticmethod
    def _download_text(info: ModelInfo) -> str:
        if info.downloaded:
            return "yes, in the HF cache (loads offline)"
        return (f"not yet: {formatting.size(info.download_bytes)} to fetch (Download, or training fetches it "
                "first); only its config was read")

    def _show_gguf(self, info: ModelInfo, known: bool | None) -> None:
        if known is None:
            text = "checked at the first GGUF export (it fetches llama.cpp's converter)"
        elif known:
            text = f"yes: llama.cpp's converter knows {info.architecture}"
        else:
            text = (f"no: llama.cpp's converter has no {info.architecture}; the adapter and merged exports still "
                    "work")
        self.facts["gguf"].setText(text)

    def shutdown(self) -> None:
        for call in (self.reading, self.checking_gguf):
            if call is not None:
                call.cancel()
        for panel in (self.catalog, self.hub, self.local):
            panel.shutdown()
        if self.pull.is_running():
            self.pull_cancelled = True
            self.pull.kill()
            self.pull.wait_for_exit(3000)

    def _show_error(self, error: EngineError) -> None:
        self._set_busy(False)
        self.facts_card.hide()
        self.session.set_model_info(None)
        self.banner.show_error(error, "This model can't be used")
