"""Fit page: this run's estimated peak GPU memory, term by term, against the GPU's free memory; the
verdict; fixes as one-click buttons; and "Fit to my GPU". The numbers come from qlora_engine.planning, asked
through the engine client (app/engine_requests.py) so the window never waits for them.
"""
from __future__ import annotations

import dataclasses
import html
from typing import Any

from PySide6.QtCore import Qt, QTimer
from PySide6.QtGui import QColor, QIcon, QPixmap
from PySide6.QtWidgets import (
    QDoubleSpinBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from app.engine_client import Call
from app.engine_requests import EstimateFit, FitToGpu, ModelToPlan, PlanPrecision, SparePrecision
from app.formatting import gib, size
from app.session import Session
from app.widgets.banner import Banner
from app.widgets.gpu_choice import GpuChoice
from app.widgets.memory_bar import TERM_COLORS, BarSegment, MemoryBar
from app.widgets.page import Page, card, primary_button
from qlora_engine.protocol.config import RunConfig
from qlora_engine.protocol.errors import EngineError
from qlora_engine.protocol.queries import Advice, Estimate, EstimateReport, Fix, PrecisionPlanReport

GIB = 2**30
TERM_NAMES = {"nf4_weights": "4-bit weights", "quant_constants": "Quantization constants",
              "layers_16bit": "16-bit layers", "lora_weights": "LoRA weights", "lora_gradients": "LoRA gradients",
              "optimizer_states": "Optimizer states", "activations": "Activations",
              "logits_and_loss": "Logits and loss", "cuda_context": "CUDA context",
              "allocator_slack": "Allocator slack", "precision_weights": "Linear weights (precision budget)",
              "ddp_gradient_buffer": "All-reduce buffer", "fsdp_gathered_layers": "Gathered layers (FSDP)"}
QUANTIZED_TERMS = ("nf4_weights", "quant_constants")
MIN_SPARE_BYTES = 64 * 2**20  # below this the offer is not worth a line
VERDICT_TEXT = {"fits": "Fits", "tight": "Tight: fits, with little room to spare", "won't fit": "Won't fit"}


class FitPage(Page):
    title = "Fit"
    intro = ("Will this run fit in GPU memory? Estimated from the model's shape and your options before "
             "anything is loaded.")

    def __init__(self, session: Session, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.advice: Advice | None = None
        self._fitted_config: RunConfig | None = None  # the options "Fit to my GPU" chose, while its note shows
        self.estimating: Call | None = None  # the estimate on its way
        self.fitting: Call | None = None  # "Fit to my GPU" on its way
        self.body.addWidget(self._build_target_row())
        self.body.addWidget(self._build_result())
        self.banner = Banner()
        self.body.addWidget(self.banner)
        self.body.addWidget(self._build_breakdown(), 1)
        self.body.addWidget(self._build_fixes())
        self.precision = PrecisionOffer(session, self)
        self.body.addWidget(self.precision)
        self.update_timer = QTimer(self, singleShot=True, interval=150)
        self.update_timer.timeout.connect(self.update_estimate)
        for signal in (session.config_changed, session.model_info_changed):
            signal.connect(self.update_timer.start)
        self.plan_for.show_gpus()

    # ------------------------------------------------------------------ building
    def _build_target_row(self) -> GpuChoice:
        self.plan_for = GpuChoice(self.session, "Another GPU, with this much free memory:", "fit/custom_gib", 8.0)
        self.target, self.custom_gib = self.plan_for.target, self.plan_for.custom_gib
        self.plan_for.choice_changed.connect(self.update_estimate)
        self.plan_for.custom_changed.connect(self.update_estimate)
        return self.plan_for

    def _build_result(self) -> QWidget:
        box = card()
        layout = QVBoxLayout(box)
        top = QHBoxLayout()
        self.verdict = QLabel("—", objectName="verdict")
        self.headline = QLabel(objectName="muted", wordWrap=True)
        top.addWidget(self.verdict)
        top.addWidget(self.headline, 1)
        layout.addLayout(top)
        self.bar = MemoryBar()
        layout.addWidget(self.bar)
        self.limits = QLabel(objectName="muted", wordWrap=True)
        layout.addWidget(self.limits)
        return box

    def _build_breakdown(self) -> QTableWidget:
        self.table = QTableWidget(0, 3)
        self.table.setHorizontalHeaderLabels(["Part", "Size", "What it is"])
        self.table.verticalHeader().hide()
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.table.setWordWrap(True)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(1, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(2, QHeaderView.ResizeMode.Stretch)
        return self.table

    def _build_fixes(self) -> QWidget:
        holder = QWidget()
        layout = QVBoxLayout(holder)
        layout.setContentsMargins(0, 0, 0, 0)
        row = QHBoxLayout()
        self.fixes_title = QLabel("<b>What would help</b>")
        self.fit_button = primary_button("Fit to my GPU")
        self.fit_button.setToolTip("Keep the longest sequences and the effective batch you chose, lowering them "
                                   "only as far as needed, and turn on memory savers only if batch 1 doesn't fit.")
        self.fit_button.clicked.connect(self.fit_to_gpu)
        row.addWidget(self.fixes_title, 1)
        row.addWidget(self.fit_button)
        layout.addLayout(row)
        self.fix_rows = QVBoxLayout()
        layout.addLayout(self.fix_rows)
        return holder

    # ------------------------------------------------------------------ estimating (requests of the engine client)
    def model_to_plan(self) -> ModelToPlan:
        """The chosen model; an imported .gguf is read from the folder model-info reported."""
        info = self.session.model_info
        return ModelToPlan(self.session.config.model, info.path if info else "")

    def is_estimating(self) -> bool:
        """Whether an estimate (or a fit to the GPU) is still to come: one is due or on its way."""
        return self.update_timer.isActive() or any(call is not None and call.is_running()
                                                   for call in (self.estimating, self.fitting))

    def update_estimate(self) -> None:
        free_bytes, total_bytes = self.plan_for.free_and_total_bytes()
        request = EstimateFit(self.model_to_plan(), self.session.config, free_bytes, self.target.currentText())
        self.estimating = self.session.engine.run(
            request, owner=self, done=lambda report: self._estimate_done(report, total_bytes),
            failed=self._estimate_failed)

    def _estimate_done(self, report: EstimateReport, total_bytes: int | None) -> None:
        self.advice = report.advice
        if self.session.config != self._fitted_config:  # keep "Fitted to the GPU" until the options change again
            self.banner.clear()
            self._fitted_config = None
        self._show_estimate(report.estimate, report.advice, report.advice.free_bytes, total_bytes)

    def _estimate_failed(self, error: EngineError) -> None:
        self.advice = None
        self._show_error(error)

    def fit_to_gpu(self) -> None:
        free_bytes, _ = self.plan_for.free_and_total_bytes()
        self.fit_button.setEnabled(False)
        self.fitting = self.session.engine.run(FitToGpu(self.model_to_plan(), self.session.config, free_bytes),
                                               owner=self, done=self._fitted, failed=self._nothing_fits)

    def _fitted(self, changes: dict[str, Any]) -> None:
        self.fit_button.setEnabled(True)
        self.apply_changes(changes)
        self._fitted_config = self.session.config
        described = ", ".join(f"{name} {value}" for name, value in changes.items()) or "nothing: it already fits"
        self.banner.show_message("success", "Fitted to the GPU", f"Changed {described}.")

    def _nothing_fits(self, error: EngineError) -> None:
        self.fit_button.setEnabled(True)
        self.banner.show_message("error", "Nothing fits", error.message, error.advice)

    def apply_changes(self, changes: dict[str, Any]) -> None:
        self.session.update_config(**changes)
        self.update_estimate()

    # ------------------------------------------------------------------ showing
    def _show_estimate(self, peak: Estimate, advice: Advice, free_bytes: int,
                       total_bytes: int | None) -> None:
        self._show_verdict(advice.verdict)
        approximate = " (approximate: " + "; ".join(peak.reasons) + ")" if peak.approximate else ""
        config = self.session.config
        per_card = f" per card ({config.nproc} processes, {config.parallel})" if config.nproc > 1 else ""
        self.headline.setText(f"Estimated peak {gib(peak.peak_bytes)}{per_card} of {gib(free_bytes)} free"
                              f"{approximate}.")
        segments = [BarSegment(TERM_NAMES.get(t.name, t.name), t.bytes, TERM_COLORS[i % len(TERM_COLORS)])
                    for i, t in enumerate(peak.terms)]
        self.bar.set_data(segments, free_bytes, total_bytes)
        self.limits.setText(_limits_text(advice, self.session.config) +
                            "".join(f"<br>⚠ {html.escape(w)}" for w in peak.warnings))
        self._show_terms(peak, segments)
        self._show_fixes(advice)
        self.precision.show_for(peak, free_bytes)
        self._ask_about_sharding(advice)

    def _ask_about_sharding(self, advice: Advice) -> None:
        """A run that fits no single card, on a machine with several: the per-card peak with the 4-bit weights
        sharded over all of them (parallel: fsdp), said under the limits."""
        cards = len(self.session.gpu_report.gpus) if self.session.gpu_report else 0
        if advice.verdict != "won't fit" or cards < 2 or self.session.config.parallel == "fsdp":
            return
        free_bytes, _ = self.plan_for.free_and_total_bytes()
        sharded = dataclasses.replace(self.session.config, nproc=cards, parallel="fsdp")
        self.session.engine.run(EstimateFit(self.model_to_plan(), sharded, free_bytes, self.target.currentText()),
                                owner=self, done=lambda report: self._show_sharding(report, cards),
                                failed=lambda _error: None)

    def _show_sharding(self, report: EstimateReport, cards: int) -> None:
        """The sharded per-card peak under the limits; where it fits, sharding first among the fixes, one click."""
        fits = report.advice.verdict != "won't fit"
        self.limits.setText(self.limits.text() + f"<br>Sharding is needed: no single card holds this run. With the "
                            f"4-bit weights split over the {cards} cards (parallel: fsdp) each needs "
                            f"{gib(report.estimate.peak_bytes)}: " + (f"it fits on {cards} cards." if fits else
                            f"still too large for {cards} cards."))
        if fits and self.advice is not None:
            changes = {"nproc": cards, "parallel": "fsdp", "optimizer": "adamw"}  # fsdp takes torch's AdamW only
            fix = Fix(f"shard the 4-bit weights over the {cards} cards (nproc {cards}, parallel fsdp, optimizer adamw)",
                      self.advice.peak_bytes - report.estimate.peak_bytes, changes, True, kind="memory")
            self.fixes_title.setText("<b>What would help</b>")
            self.fix_rows.insertWidget(0, self._fix_row(fix))

    def _show_terms(self, peak: Estimate, segments: list[BarSegment]) -> None:
        self.table.setRowCount(len(peak.terms))
        for row, (term, segment) in enumerate(zip(peak.terms, segments, strict=True)):
            swatch = QPixmap(12, 12)
            swatch.fill(QColor(segment.color))
            name = QTableWidgetItem(QIcon(swatch), segment.name)
            amount = QTableWidgetItem(size(term.bytes))
            amount.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            for column, item in enumerate((name, amount, QTableWidgetItem(term.note))):
                item.setToolTip(term.note)
                self.table.setItem(row, column, item)
        self.table.resizeRowsToContents()

    def _show_fixes(self, advice: Advice) -> None:
        while self.fix_rows.count():
            widget = self.fix_rows.takeAt(0).widget()
            if widget is not None:
                widget.hide()
                widget.deleteLater()
        if advice.verdict == "fits":
            self.fixes_title.setText("<b>No changes needed.</b> Spare memory can make the steps faster:"
                                     if advice.fixes else "<b>No changes needed.</b> Fit to my GPU can still use "
                                     "spare memory for larger batches.")
        else:
            self.fixes_title.setText("<b>What would help</b>" if advice.fixes else "")
        for fix in advice.fixes[:5]:
            self.fix_rows.addWidget(self._fix_row(fix))

    def _fix_row(self, fix: Fix) -> QWidget:
        """One fix: what it changes and saves (wrapped), and an Apply button that makes the change."""
        row = card()
        layout = QHBoxLayout(row)
        layout.setContentsMargins(10, 4, 6, 4)
        if fix.kind == "speed":  # for a run that fits: it costs spare memory
            text = f"{html.escape(fix.description)} — costs <b>{size(-fix.saving_bytes)}</b>, still fits"
        else:
            outcome = "fits after this" if fix.fits_after else "helps, but not enough alone"
            text = f"{html.escape(fix.description)} — saves <b>{size(fix.saving_bytes)}</b>, {outcome}"
        description = QLabel(text, wordWrap=True)
        apply = QPushButton("Apply", objectName="apply_fix")
        apply.setToolTip("Changes " + ", ".join(f"{k} → {v}" for k, v in fix.config_changes.items()))
        apply.clicked.connect(lambda _checked=False, changes=fix.config_changes: self.apply_changes(changes))
        layout.addWidget(description, 1)
        layout.addWidget(apply)
        return row

    def _show_verdict(self, verdict: str) -> None:
        self.verdict.setText(VERDICT_TEXT.get(verdict, verdict) or "—")
        self.verdict.setProperty("verdict", verdict.replace("won't fit", "wont_fit"))
        self.verdict.style().unpolish(self.verdict)
        self.verdict.style().polish(self.verdict)

    def _show_error(self, error: EngineError) -> None:
        self._show_verdict("")
        self.headline.setText("")
        self.limits.setText("")
        self.bar.set_data([], None, None)
        self.table.setRowCount(0)
        self._show_fixes(Advice("", 0, 0, None, None, []))
        self.fixes_title.setText("")
        self.precision.hide()
        self.banner.show_error(error, "The memory estimate can't be made")


def _limits_text(advice: Advice, run: Any) -> str:
    parts = []
    if advice.max_length_that_fits is not None:
        parts.append(f"longest sequence that fits at micro-batch {run.micro_batch_size}: "
                     f"{advice.max_length_that_fits:,} tokens")
    if advice.batch_that_fits is not None:
        parts.append(f"largest micro-batch at {run.max_length} tokens: {advice.batch_that_fits}")
    return ("Limits: " + "; ".join(parts) + ".") if parts else "Not even batch 1 at 16 tokens fits."


class PrecisionOffer(QWidget):
    """"Use N GiB of spare memory for precision": the bits per weight it buys (planning, in-process), the
    quantization error it removes (measured by the engine's `precision` command on the model's weights), and a
    button that sets precision_budget_bits; or, when the run already has a budget, a way back to plain 4-bit."""

    def __init__(self, session: Session, page: FitPage) -> None:
        super().__init__()
        self.session, self.page = session, page
        self.spare_bytes = 0
        self.current_weight_bytes = 0
        self.bits: float | None = None
        self.report: PrecisionPlanReport | None = None  # the last measurement
        self.pending: Call | None = None  # the bits for the chosen spare, or the measurement, on its way
        box = card()
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(box)
        layout = QVBoxLayout(box)
        row = QHBoxLayout()
        self.title = QLabel(wordWrap=True)
        self.spend_gib = QDoubleSpinBox(decimals=3, singleStep=0.1, suffix=" GiB")
        self.spend_gib.setToolTip("How much of the spare memory goes to the weights' precision; the rest stays "
                                  "free.")
        self.spend_gib.valueChanged.connect(self._spend_changed)
        self.measure_button = QPushButton("Measure the error it removes", objectName="measure_precision")
        self.measure_button.setToolTip("Quantizes every linear weight of the model in every format (a minute for a "
                                       "small model, longer for a large one); nothing is trained.")
        self.measure_button.clicked.connect(self.measure)
        self.use_button = QPushButton(objectName="use_precision")
        self.use_button.clicked.connect(self.use)
        row.addWidget(self.title, 1)
        row.addWidget(self.spend_gib)
        row.addWidget(self.measure_button)
        row.addWidget(self.use_button)
        layout.addLayout(row)
        self.result = QLabel(objectName="muted", wordWrap=True)
        layout.addWidget(self.result)
        self._say("")
        self.hide()

    def show_for(self, peak: Estimate, free_bytes: int) -> None:
        budget = self.session.config.precision_budget_bits
        self.spare_bytes = free_bytes - peak.peak_bytes
        self.current_weight_bytes = sum(t.bytes for t in peak.terms if t.name in QUANTIZED_TERMS)
        if budget > 0:
            self._show_set_budget(budget)
        elif self.spare_bytes < MIN_SPARE_BYTES or not self.current_weight_bytes:
            self.hide()
            return
        else:
            self.spend_gib.show()
            self.measure_button.show()
            self.spend_gib.blockSignals(True)
            self.spend_gib.setMaximum(self.spare_bytes / GIB)
            if self.spend_gib.value() <= 0 or self.spend_gib.value() > self.spend_gib.maximum():
                self.spend_gib.setValue(int(self.spare_bytes / GIB * 1000) / 1000)
            self.spend_gib.blockSignals(False)
            self._spend_changed()
        self.show()

    def _show_set_budget(self, budget: float) -> None:
        self.title.setText(f"<b>Precision</b>: this run spends a budget of {budget:g} bits per linear weight "
                           "(each matrix 4-bit in blocks of 32 to 256, int8 or 16-bit, for the least error).")
        self.spend_gib.hide()
        self.measure_button.hide()
        self.use_button.setText("Back to plain 4-bit")
        self.use_button.setToolTip("Sets precision_budget_bits to 0: every matrix 4-bit in blocks of 64.")
        self.bits = 0.0
        self.use_button.setEnabled(True)

    def _spend_changed(self) -> None:
        spend = int(self.spend_gib.value() * GIB)
        self.use_button.setEnabled(False)
        self._say("")
        self.pending = self.session.engine.run(
            SparePrecision(self.page.model_to_plan(), self.current_weight_bytes, spend), owner=self,
            done=lambda answer, spend=spend: self._bits_known(*answer, spend), failed=self._failed)

    def _bits_known(self, bits: float, bits_now: float, spend: int) -> None:
        self.bits = bits
        self.title.setText(f"<b>Spare memory can buy precision</b>: use {size(spend)} of the "
                           f"{size(self.spare_bytes)} spare for a budget of <b>{bits:.2f} bits per weight</b> "
                           f"(plain 4-bit: {bits_now:.2f}).")
        self.use_button.setText(f"Use {self.spend_gib.value():.3g} GiB for precision")
        self.use_button.setToolTip(f"Sets precision_budget_bits to {bits:.2f}: the engine gives each weight matrix the "
                                   "format (4-bit blocks of 32 to 256, int8 or 16-bit) that makes the total "
                                   "quantization error smallest within it.")
        self.use_button.setEnabled(bits > 4.03)
        self.measure_button.setEnabled(bits > 4.03)

    def measure(self) -> None:
        if self.bits is None:
            return
        cfg = self.session.config
        self.measure_button.setEnabled(False)
        self._say("Measuring: every linear weight quantized in every format…")
        self.pending = self.session.engine.run(
            PlanPrecision(cfg.model, self.bits, cfg.quant_type, cfg.double_quant), owner=self,
            done=self._measured, failed=self._failed)

    def _measured(self, report: PrecisionPlanReport) -> None:
        self.report = report
        self.measure_button.setEnabled(True)
        reduction = 1 - report.relative_error / report.plain_relative_error if report.plain_relative_error else 0
        formats = ", ".join(f"{count} {name}" for name, count in report.counts.items())
        self._say(f"Mean relative error of the linear weights: {report.plain_relative_error:.4f} in plain "
                            f"4-bit → <b>{report.relative_error:.4f}</b> ({reduction:.1%} less), "
                            f"{report.bits_per_weight:.3f} bits per weight used; matrices: {html.escape(formats)}.")

    def _failed(self, error: EngineError) -> None:
        self.measure_button.setEnabled(True)
        self._say(f"⚠ {html.escape(error.message)}")

    def _say(self, text: str) -> None:
        self.result.setText(text)
        self.result.setVisible(bool(text))

    def is_busy(self) -> bool:
        return self.pending is not None and self.pending.is_running()

    def use(self) -> None:
        if self.bits is not None:
            self.page.apply_changes({"precision_budget_bits": round(self.bits, 2)})
