"""Which of a run's adapters a page uses: the final one (the default) or one of its checkpoints, the best marked with
its eval loss. The Export and Chat pages pass the choice to the engine as `--checkpoint step-N`."""
from __future__ import annotations

from PySide6.QtCore import Signal
from PySide6.QtWidgets import QComboBox, QHBoxLayout, QLabel, QWidget

from qlora_engine.protocol.run_folders import FINAL_ADAPTER
from qlora_engine.protocol.run_state import RunState


class CheckpointPicker(QWidget):
    """A label and a list of the run's adapters ("final adapter (step 40, eval loss 0.61)", "step 20 (best eval
    loss 0.54)", …); empty when the run has none."""

    changed = Signal()

    def __init__(self, label: str = "Adapter", parent: QWidget | None = None) -> None:
        super().__init__(parent)
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        self.combo = QComboBox(objectName="checkpoint_picker")
        self.combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToContents)
        self.combo.setToolTip("The run's final adapter, or one of its checkpoints: the one with the best eval loss "
                              "is kept even when older checkpoints are pruned.")
        self.combo.currentIndexChanged.connect(lambda _index: self.changed.emit())
        row.addWidget(QLabel(label))
        row.addWidget(self.combo)
        row.addStretch(1)

    def show_run(self, state: RunState | None) -> None:
        """The run's adapters; the one picked stays picked while the run still has it, else the final adapter."""
        choices = state.adapter_choices() if state is not None else []
        if choices == self.choices():
            return
        keep = self.choice()
        self.combo.blockSignals(True)
        self.combo.clear()
        for value, label in choices:
            self.combo.addItem(label, value)
        index = self.combo.findData(keep) if keep else -1
        self.combo.setCurrentIndex(index if index >= 0 else 0 if choices else -1)
        self.combo.setEnabled(bool(choices))
        self.combo.blockSignals(False)
        if self.choice() != keep:
            self.changed.emit()

    def choices(self) -> list[tuple[str, str]]:
        return [(self.combo.itemData(i), self.combo.itemText(i)) for i in range(self.combo.count())]

    def choice(self) -> str:
        """final, step-N, or "" when the run has no adapter."""
        return self.combo.currentData() or ""

    def pick(self, value: str) -> None:
        self.combo.setCurrentIndex(self.combo.findData(value))

    def engine_args(self) -> list[str]:
        """`--checkpoint step-N` for a checkpoint, nothing for the final adapter (the engine's default)."""
        return [] if self.choice() in ("", FINAL_ADAPTER) else ["--checkpoint", self.choice()]
