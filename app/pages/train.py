"""Train page: a preset to start from, every engine option (generated from RunConfig), and Start."""
from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QButtonGroup,
    QComboBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

from app.presets import Preset, load_presets
from app.session import Session
from app.widgets.banner import Banner
from app.widgets.config_form import ConfigForm
from app.widgets.page import Page, primary_button


class PresetCard(QPushButton):
    """A checkable button showing a preset's name and its one-line description, wrapped."""

    def __init__(self, preset: Preset, parent: QWidget | None = None) -> None:
        super().__init__(parent, checkable=True, objectName=f"preset_{preset.name}")
        self.setProperty("preset", True)
        self.setToolTip("Sets " + ", ".join(f"{k} = {v}" for k, v in preset.config.items()))
        layout = QVBoxLayout(self)
        layout.setContentsMargins(12, 8, 12, 8)
        title = QLabel(f"<b>{preset.label}</b>")
        description = QLabel(preset.description, wordWrap=True)
        for label in (title, description):
            label.setAttribute(Qt.WidgetAttribute.WA_TransparentForMouseEvents)
            layout.addWidget(label)
        layout.addStretch(1)
        self.setMinimumHeight(self.fontMetrics().height() * 4 + 20)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)


class TrainPage(Page):
    title = "Train"
    intro = ("Pick a preset, adjust any option (hover one for what it does and what it costs in memory), "
             "then start. Training runs in the background; the Monitor page follows it.")
    start_requested = Signal()

    def __init__(self, session: Session, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.presets = load_presets()
        self.body.addLayout(self._build_presets())
        self.body.addLayout(self._build_gpus_row())
        self.body.addWidget(QLabel("◆ changes how much GPU memory the run needs. Hover any option for its "
                                   "explanation.", objectName="muted"))
        self.form = ConfigForm()
        self.form.changed.connect(lambda name, value: self.session.update_config(**{name: value}))
        scroll = QScrollArea(widgetResizable=True)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        scroll.setWidget(self.form)
        self.body.addWidget(scroll, 1)
        self.banner = Banner()
        self.body.addWidget(self.banner)
        self.body.addLayout(self._build_start_row())
        session.config_changed.connect(self._show_config)
        session.training_changed.connect(self._show_training)
        session.gpu_changed.connect(self._show_gpus)
        self._show_gpus()
        self._show_config()

    def _build_presets(self) -> QHBoxLayout:
        row = QHBoxLayout()
        self.preset_buttons = QButtonGroup(self)
        self.preset_buttons.setExclusive(False)  # none is checked when the options match no preset
        for preset in self.presets:
            button = PresetCard(preset)
            button.clicked.connect(lambda _checked, p=preset: self.apply_preset(p))
            self.preset_buttons.addButton(button)
            row.addWidget(button, 1)
        return row

    def _build_gpus_row(self) -> QHBoxLayout:
        """GPUs: how many of the detected cards the run uses (nproc; several start through torchrun)."""
        row = QHBoxLayout()
        self.gpus = QComboBox(objectName="gpus")
        self.gpus.setToolTip("Several cards: one engine process per card through torchrun (parallel: ddp = each "
                             "holds the model and trains its share of every batch; fsdp = the 4-bit weights are "
                             "split over the cards).")
        self.gpus.activated.connect(lambda index: self.session.update_config(nproc=self.gpus.itemData(index)))
        row.addWidget(QLabel("GPUs"))
        row.addWidget(self.gpus, 1)
        return row

    def _show_gpus(self) -> None:
        report = self.session.gpu_report
        cards = report.gpus if report is not None else []
        self.gpus.clear()
        if not cards:
            self.gpus.addItem("no NVIDIA GPU detected: one process on the CPU", 1)
        for count in range(1, len(cards) + 1):
            names = ", ".join(f"{gpu.index}: {gpu.name}" for gpu in cards[:count])
            self.gpus.addItem(f"{count} of {len(cards)} ({names})" + (" — through torchrun" if count > 1 else ""),
                              count)
        self.gpus.setEnabled(len(cards) > 1)
        self._select_gpus(self.session.config.nproc)

    def _select_gpus(self, nproc: int) -> None:
        detected = max(len(self.session.gpu_report.gpus) if self.session.gpu_report else 0, 1)
        while self.gpus.count() > detected:  # an earlier "set in the options" entry
            self.gpus.removeItem(self.gpus.count() - 1)
        index = self.gpus.findData(nproc)
        if index < 0:  # more processes than detected cards (the CPU, or several machines): say so, keep it
            self.gpus.addItem(f"{nproc} processes (set in the options)", nproc)
            index = self.gpus.count() - 1
        self.gpus.setCurrentIndex(index)

    def _build_start_row(self) -> QHBoxLayout:
        row = QHBoxLayout()
        self.summary = QLabel(objectName="muted", wordWrap=True)
        self.start_button = primary_button("Start training   (Ctrl+Return)")
        self.start_button.setMinimumHeight(36)
        self.start_button.clicked.connect(self.start_requested)
        row.addWidget(self.summary, 1)
        row.addWidget(self.start_button)
        return row

    def apply_preset(self, preset: Preset) -> None:
        self.session.update_config(**preset.config)
        self._show_config()

    def show_config_error(self, message: str, advice: str) -> None:
        self.banner.show_message("error", "The run can't start with these options", message, advice)

    def _show_config(self) -> None:
        config = self.session.config
        self.form.set_values(config)
        self._select_gpus(config.nproc)
        for button, preset in zip(self.preset_buttons.buttons(), self.presets, strict=True):
            button.setChecked(preset.matches(config))
        steps = f"{config.max_steps} steps" if config.max_steps else f"{config.epochs:g} epoch(s)"
        model = "the bundled SmolLM2-135M" if config.model == "default" else config.model
        data = "the sample data" if config.data == "sample" else config.data
        self.summary.setText(f"This run: {model} on {data}, {steps}, batch {config.micro_batch_size} × "
                             f"{config.grad_accum}, sequences up to {config.max_length} tokens, LoRA rank "
                             f"{config.lora_r}" + (f", {config.nproc} processes ({config.parallel})"
                                                   if config.nproc > 1 else "") + ".")
        self.banner.clear()

    def _show_training(self, running: bool) -> None:
        self.start_button.setEnabled(not running)
        self.start_button.setText("Training…" if running else "Start training   (Ctrl+Return)")
