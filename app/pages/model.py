"""Model page: choose the bundled default, a Hugging Face folder or a .gguf file, and see its facts.

The facts come from `qlora_engine model-info --json`, a request of the engine client (a .gguf is imported there).
"""
from __future__ import annotations

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
    QVBoxLayout,
    QWidget,
)

from app import formatting, settings
from app.engine_client import Call
from app.engine_requests import ReadModelInfo
from app.session import Session
from app.widgets.banner import Banner
from app.widgets.page import Page, card, fact_label
from qlora_engine.protocol.errors import EngineError
from qlora_engine.protocol.queries import ModelInfo

BUSY_TEXT = "Reading the model… (a .gguf is converted once; that can take a minute)"
SOURCES = {"default": "bundled with QLoRA Studio", "folder": "Hugging Face folder", "gguf": ".gguf file, imported",
           "hub": "Hugging Face Hub, in the HF cache"}


class ModelPage(Page):
    title = "Model"
    intro = ("The model to fine-tune. Its weights stay frozen in 4-bit; training adds a small adapter on top. "
             "Start with the bundled model to see the whole path in minutes.")

    def __init__(self, session: Session, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.reading: Call | None = None  # the model-info request on its way
        self.body.addWidget(self._build_choice())
        self.busy = QProgressBar(maximum=0, visible=False, textVisible=False, objectName="busy")
        self.busy_label = QLabel(BUSY_TEXT, objectName="muted", visible=False, wordWrap=True)
        self.banner = Banner()
        self.body.addWidget(self.busy_label)
        self.body.addWidget(self.busy)
        self.body.addWidget(self.banner)
        self.body.addWidget(self._build_facts())
        self.body.addStretch(1)
        self._show_choice(session.config.model)

    def _build_choice(self) -> QWidget:
        box = card()
        layout = QVBoxLayout(box)
        self.use_default = QRadioButton("Bundled default: SmolLM2-135M-Instruct (135M parameters, fast even on a CPU)")
        self.use_folder = QRadioButton("A Hugging Face model folder (config.json + .safetensors files)")
        self.use_gguf = QRadioButton("A .gguf file (converted to safetensors once, then cached)")
        self.choice = QButtonGroup(self)
        for button in (self.use_default, self.use_folder, self.use_gguf):
            self.choice.addButton(button)
            layout.addWidget(button)
        row = QHBoxLayout()
        self.path_edit = QLineEdit(placeholderText="path to a model folder or a .gguf file")
        self.path_edit.returnPressed.connect(lambda: self.choose_model(self.path_edit.text().strip()))
        browse_folder = QPushButton("Folder…")
        browse_folder.clicked.connect(self._browse_folder)
        browse_gguf = QPushButton(".gguf file…")
        browse_gguf.clicked.connect(self._browse_gguf)
        row.addWidget(self.path_edit, 1)
        row.addWidget(browse_folder)
        row.addWidget(browse_gguf)
        layout.addLayout(row)
        self.use_default.clicked.connect(lambda: self.choose_model("default"))
        self.use_folder.clicked.connect(self._browse_folder)
        self.use_gguf.clicked.connect(self._browse_gguf)
        return box

    def _build_facts(self) -> QWidget:
        self.facts_card = card()
        form = QFormLayout(self.facts_card)
        form.setHorizontalSpacing(24)
        self.facts: dict[str, QLabel] = {}
        for key, label in (("name", "Model"), ("architecture", "Architecture"), ("params", "Parameters"),
                           ("context_length", "Context length"), ("vocab_size", "Vocabulary"),
                           ("layers", "Layers × hidden size"), ("has_chat_template", "Chat template"),
                           ("source", "Source"), ("path", "Files")):
            self.facts[key] = fact_label()
            form.addRow(QLabel(label, objectName="factName"), self.facts[key])
        self.facts_card.hide()
        return self.facts_card

    # ------------------------------------------------------------------ actions
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

    # ------------------------------------------------------------------ showing
    def _show_choice(self, spec: str) -> None:
        button = self.use_default if spec == "default" else self.use_gguf if spec.endswith(".gguf") else self.use_folder
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
            "path": info.path,
        }
        for key, text in values.items():
            self.facts[key].setText(str(text))
        self.facts_card.show()
        if info.custom_code and not self.session.config.trust_remote_code:
            self.banner.show_message("warning", "This model ships its own Python code",
                                     "It may not load without it.",
                                     "Turn on 'Trust remote code' in Train › Model only if you trust its author.")

    def shutdown(self) -> None:
        if self.reading is not None:
            self.reading.cancel()

    def _show_error(self, error: EngineError) -> None:
        self._set_busy(False)
        self.facts_card.hide()
        self.session.set_model_info(None)
        self.banner.show_error(error, "This model can't be used")
