"""The advanced options panel, generated from RunConfig's fields (type, choices, range, help, memory).

Adding an option to qlora_engine/config.py adds it here, with its tooltip; nothing is listed twice.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from PySide6.QtCore import Signal
from PySide6.QtGui import QValidator
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
        QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from qlora_engine.protocol.config import RunConfig, format_mapping, mapping_value_type, parse_mapping
from qlora_engine.protocol.errors import EngineError

GROUP_TITLES = {"model": "Model", "data": "Data", "lora": "LoRA adapter", "quantization": "4-bit quantization",
                "train": "Optimization", "speed": "Speed", "run": "Run"}
INT_LIMIT = 2**31 - 1


# Abbreviations in option names, spelled out for the label (the name itself shows in the tooltip).
LABEL_WORDS = {"lora": "LoRA", "lr": "LR", "val": "validation", "grad": "gradient", "accum": "accumulation",
               "quant": "quantization", "dir": "folder"}
LABELS = {"lora_r": "LoRA rank (r)", "eval_steps": "Evaluate every N steps", "save_steps": "Checkpoint every N steps",
          "micro_batch_size": "Micro-batch size", "fp32_residual": "fp32 residual stream",
          "init_lora": "Adapter start", "loftq_iters": "LoftQ iterations", "use_dora": "DoRA", "use_rslora": "rsLoRA",
          "precision_budget_bits": "Precision budget (bits/weight)"}
# The first line of these options' tooltips: what the option does and what it costs.
SUMMARIES = {
    "init_lora": "Adapter start: LoftQ corrects the 4-bit error, PiSSA / OLoRA take the main directions; costs "
                 "an SVD per layer at load.",
    "loftq_iters": "LoftQ rounds of quantize + SVD: more fit the 4-bit base closer; each costs one more SVD per "
                   "layer at load.",
    "use_dora": "DoRA trains a magnitude per output too; often a bit better, but slower (peft's path, not fused).",
    "use_rslora": "rsLoRA scales by alpha / sqrt(r) so high ranks keep learning; free.",
    "precision_budget_bits": "More bits where 4-bit loses most (exact solver); costs this many bits per weight "
                             "(0 = plain 4-bit).",
}


def option_label(name: str) -> str:
    if name in LABELS:
        return LABELS[name]
    words = [LABEL_WORDS.get(word, word) for word in name.split("_")]
    label = " ".join(words)
    return label[0].upper() + label[1:]


def option_tooltip(spec: dataclasses.Field) -> str:
    meta = spec.metadata
    text = f"{meta['help']}\n(option: {spec.name})"
    if spec.name in SUMMARIES:  # the one line first; the details a reader may want after it
        text = f"{SUMMARIES[spec.name]}\n\n{text}"
    if meta["memory"]:
        text += f"\nMemory: {meta['memory']}"
    return text


class ScientificSpinBox(QDoubleSpinBox):
    """A float box that shows 2e-4 as `0.0002` and accepts `2e-4` typed in."""

    def textFromValue(self, value: float) -> str:  # noqa: N802 (Qt override)
        return f"{value:g}"

    def valueFromText(self, text: str) -> float:  # noqa: N802
        try:
            return float(text)
        except ValueError:
            return self.value()

    def validate(self, text: str, pos: int) -> object:
        try:
            float(text)
        except ValueError:
            acceptable = text in ("", "-", ".") or text.endswith(("e", "e-", "E", "E-"))
            return (QValidator.State.Intermediate if acceptable else QValidator.State.Invalid, text, pos)
        return (QValidator.State.Acceptable, text, pos)


def _editor_for(spec: dataclasses.Field) -> QWidget:
    meta, kind = spec.metadata, str(spec.type)
    if kind == "bool":
        return QCheckBox()
    if meta["choices"]:
        combo = QComboBox(minimumContentsLength=6)
        combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        combo.addItems([str(choice) for choice in meta["choices"]])
        return combo
    if kind == "int":
        box = QSpinBox()
        box.setRange(int(meta["minimum"]) if meta["minimum"] is not None else -INT_LIMIT,
                     int(meta["maximum"]) if meta["maximum"] is not None else INT_LIMIT)
        return box
    if kind == "float":
        box = ScientificSpinBox()
        box.setDecimals(10)
        box.setRange(meta["minimum"] if meta["minimum"] is not None else -1e9,
                     meta["maximum"] if meta["maximum"] is not None else 1e9)
        box.setSingleStep(_step_for(spec.default))
        return box
    return QLineEdit()


def _step_for(default: float) -> float:
    if not default:
        return 0.1
    return 10 ** math.floor(math.log10(abs(default)))


class ConfigForm(QWidget):
    """One group box per option group; emits `changed(name, value)` as the user edits."""

    changed = Signal(str, object)

    def __init__(self, groups: tuple[str, ...] | None = None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.editors: dict[str, QWidget] = {}
        self.mappings: dict[str, type] = {}  # mapping options and their value type
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        columns = (QVBoxLayout(), QVBoxLayout())
        specs = RunConfig.field_specs()
        wanted = groups or tuple(dict.fromkeys(spec.metadata["group"] for spec in specs))
        for index, group in enumerate(wanted):
            box = QGroupBox(GROUP_TITLES.get(group, group.title()))
            form = QFormLayout(box)
            form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
            form.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)  # narrow window, large font: stack
            for spec in (s for s in specs if s.metadata["group"] == group):
                self._add_row(form, spec)
            columns[index % 2].addWidget(box)
        for column in columns:
            column.addStretch(1)
            row.addLayout(column, 1)

    def _add_row(self, form: QFormLayout, spec: dataclasses.Field) -> None:
        editor = _editor_for(spec)
        editor.setObjectName(f"option_{spec.name}")
        tooltip = option_tooltip(spec)
        label = QLabel(option_label(spec.name) + (" ◆" if spec.metadata["memory"] else ""))
        for widget in (label, editor):
            widget.setToolTip(tooltip)
            widget.setStatusTip(spec.metadata["help"])
        if spec.name == "run_dir":
            editor.setPlaceholderText("a new folder in the runs folder")
        if str(spec.type).startswith("dict"):  # a mapping option, written name=value,name=value
            self.mappings[spec.name] = mapping_value_type(spec)
            editor.setPlaceholderText("name=value,name=value")
        self.editors[spec.name] = editor
        self._connect(spec.name, editor)
        form.addRow(label, editor)

    def _connect(self, name: str, editor: QWidget) -> None:
        def emit(value: Any) -> None:
            self.changed.emit(name, value)
        if isinstance(editor, QCheckBox):
            editor.toggled.connect(emit)
        elif isinstance(editor, QComboBox):
            editor.currentTextChanged.connect(emit)
        elif isinstance(editor, (QSpinBox, QDoubleSpinBox)):
            editor.valueChanged.connect(emit)
        elif name in self.mappings:
            editor.editingFinished.connect(lambda: self._emit_mapping(name, editor))
        else:
            editor.editingFinished.connect(lambda: emit(editor.text().strip()))

    def _emit_mapping(self, name: str, editor: QLineEdit) -> None:
        try:
            self.changed.emit(name, parse_mapping(editor.text(), self.mappings[name]))
        except EngineError as exc:
            editor.setToolTip(f"{exc.message}. {exc.advice}")

    def set_values(self, config: RunConfig) -> None:
        """Show the config's values without echoing them back as edits."""
        for name, editor in self.editors.items():
            value = getattr(config, name)
            editor.blockSignals(True)
            if isinstance(editor, QCheckBox):
                editor.setChecked(bool(value))
            elif isinstance(editor, QComboBox):
                editor.setCurrentText(str(value))
            elif isinstance(editor, (QSpinBox, QDoubleSpinBox)):
                editor.setValue(value)
            elif editor.text() != (text := format_mapping(value) if name in self.mappings else str(value)):
                editor.setText(text)
            editor.blockSignals(False)
