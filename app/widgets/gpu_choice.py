"""The "Plan for" row of the Fit page and the Model page's catalog: a detected GPU (its free memory as last read,
the card a run would train on picked first) or a GPU with a typed amount of free memory, kept in the settings."""
from __future__ import annotations

from PySide6.QtCore import Signal
from PySide6.QtWidgets import QComboBox, QDoubleSpinBox, QHBoxLayout, QLabel, QWidget

from app import settings
from app.formatting import gib
from app.session import Session
from qlora_engine.planning import hardware
from qlora_engine.planning.hardware import GpuInfo

GIB = 2**30
CUSTOM = "custom"  # the entry's data: plan for the typed amount


class GpuChoice(QWidget):
    """A list of the detected GPUs plus `custom_label`, and the amount of free memory that entry plans for (hidden
    or greyed out while a detected GPU is picked). Follows the session's GPU report."""

    choice_changed = Signal()  # another entry picked, or the GPUs listed again
    custom_changed = Signal()  # the typed amount changed

    def __init__(self, session: Session, custom_label: str, settings_key: str, default_gib: float,
                 hide_unused_amount: bool = False, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.session, self.custom_label, self.settings_key = session, custom_label, settings_key
        self.hide_unused_amount = hide_unused_amount
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        self.target = QComboBox()
        self.custom_gib = QDoubleSpinBox(minimum=0.5, maximum=1024, decimals=1, singleStep=1, suffix=" GiB free")
        self.custom_gib.setValue(float(settings.store().value(settings_key, default_gib)))
        row.addWidget(QLabel("Plan for"))
        row.addWidget(self.target, 1)
        row.addWidget(self.custom_gib)
        self.target.currentIndexChanged.connect(self._target_changed)
        self.custom_gib.valueChanged.connect(self._custom_changed)
        session.gpu_changed.connect(self.show_gpus)

    def show_gpus(self) -> None:
        """List the session's GPUs; the one a run would train on is picked, the typed amount when there is none."""
        report = self.session.gpu_report
        self.target.blockSignals(True)
        self.target.clear()
        for gpu in report.gpus if report else []:
            self.target.addItem(f"GPU {gpu.index}: {gpu.name} ({gib(gpu.free_bytes)} free of "
                                f"{gib(gpu.total_bytes)})", gpu.index)
        self.target.addItem(self.custom_label, CUSTOM)
        training = hardware.training_gpu(report) if report and report.gpus else None
        self.target.setCurrentIndex(max(0, self.target.findData(training.index)) if training else
                                    self.target.findData(CUSTOM))
        self.target.blockSignals(False)
        self._target_changed()

    def chosen_gpu(self) -> GpuInfo | None:
        """The detected GPU picked; None when planning for the typed amount."""
        report, choice = self.session.gpu_report, self.target.currentData()
        return next((g for g in report.gpus if g.index == choice), None) if report and choice != CUSTOM else None

    def free_and_total_bytes(self) -> tuple[int, int | None]:
        gpu = self.chosen_gpu()
        if gpu is None:
            return int(self.custom_gib.value() * GIB), None
        return gpu.free_bytes, gpu.total_bytes

    def description(self) -> str:
        """What is planned for, in a sentence's words: "GPU 0: NVIDIA …" or "a GPU with 12 GiB free"."""
        gpu = self.chosen_gpu()
        return f"GPU {gpu.index}: {gpu.name}" if gpu else f"a GPU with {self.custom_gib.value():g} GiB free"

    def _target_changed(self) -> None:
        custom = self.target.currentData() == CUSTOM
        if self.hide_unused_amount:
            self.custom_gib.setVisible(custom)
        else:
            self.custom_gib.setEnabled(custom)
        self.choice_changed.emit()

    def _custom_changed(self, value: float) -> None:
        settings.store().setValue(self.settings_key, value)
        self.custom_changed.emit()
