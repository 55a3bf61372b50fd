"""Monitor page: live loss, eval loss, learning rate, grad norm, tokens/s and VRAM, the log, Stop and
Resume. Events land in the engine's RunState (the one reducer, also behind the Runs page); the plots are redrawn
from it on a timer, not per event.
"""
from __future__ import annotations

from pathlib import Path

import pyqtgraph as pg
from PySide6.QtCore import Qt, QTimer, QUrl, Signal
from PySide6.QtGui import QDesktopServices
from PySide6.QtWidgets import (
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QMessageBox,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from app import formatting, theme
from app.session import Session
from app.widgets.banner import Banner
from app.widgets.page import Page, card, primary_button
from qlora_engine.protocol import events as ev
from qlora_engine.protocol.run_state import ENDED_STATUSES, LIVE_STATUSES, RunState

GIB = 2**30
DRIFT_TIP = ("How far the tuned model has moved from the base on ordinary text: its KL divergence from the base, "
             "per token, on short texts the base wrote at the start (0 = the base itself). It grows as the model "
             "learns your data; a large value means it is getting worse at everything else. Lower learning rates, "
             "fewer steps or a smaller rank keep it small.")
REDRAW_MS = 250
STATUS_TEXT = {"new": "No run yet", "loading": "Loading model and data…", "training": "Training",
               "stopping": "Stopping: finishing the step, then writing a checkpoint…", "stopped": "Stopped",
               "finished": "Finished", "failed": "Failed", "interrupted": "Interrupted"}
STATS = (("step", "Step"), ("loss", "Loss"), ("eval_loss", "Eval loss"), ("drift", "Drift"), ("lr", "Learning rate"),
         ("tokens_per_s", "Tokens / s"), ("eta", "Time left"), ("peak", "Peak VRAM"))


class MonitorPage(Page):
    title = "Monitor"
    intro = "The run as it trains. Stop writes a checkpoint first, so Resume continues where it left off."
    resume_requested = Signal(Path)

    def __init__(self, session: Session, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.state = RunState()
        self.run_name = QLabel(objectName="muted")
        self.header_row.insertWidget(1, self.run_name)
        self.body.addLayout(self._build_progress())
        self.body.addWidget(self._build_stats())
        self.fit_label = QLabel(objectName="muted", wordWrap=True)
        self.fit_label.hide()
        self.body.addWidget(self.fit_label)
        self.banner = Banner()
        self.body.addWidget(self.banner)
        splitter = QSplitter(Qt.Orientation.Vertical)
        splitter.addWidget(self._build_plots())
        self.log = QPlainTextEdit(readOnly=True, objectName="log", maximumBlockCount=5000)
        self.log.setPlaceholderText("The engine's log appears here.")
        splitter.addWidget(self.log)
        splitter.setSizes([520, 140])
        self.body.addWidget(splitter, 1)

        self._follow_offset = 0  # events.jsonl bytes already read, for a run this window did not start
        self.follow_timer = QTimer(self, interval=2000)
        self.follow_timer.timeout.connect(self._follow_file)
        self.redraw_timer = QTimer(self, interval=REDRAW_MS)
        self.redraw_timer.timeout.connect(self.redraw)
        self.redraw_timer.start()
        self.redraw()

        session.training.event.connect(self._on_live_event)
        session.training.log_line.connect(self._on_live_log)
        session.training_changed.connect(lambda _running: self._show_buttons())
        session.run_changed.connect(lambda: self.show_run(session.run_dir))

    # ------------------------------------------------------------------ building
    def _build_progress(self) -> QHBoxLayout:
        row = QHBoxLayout()
        self.status = QLabel(STATUS_TEXT["new"], objectName="bigNumber")
        self.progress = QProgressBar(maximum=1000, format="", textVisible=True)
        self.stop_button = QPushButton("Stop   (Ctrl+.)")
        self.stop_button.setProperty("danger", True)
        self.stop_button.clicked.connect(self.stop)
        self.resume_button = primary_button("Resume")
        self.resume_button.clicked.connect(self._resume)
        self.folder_button = QPushButton("Open folder")
        self.folder_button.clicked.connect(self._open_folder)
        row.addWidget(self.status)
        row.addWidget(self.progress, 1)
        for button in (self.stop_button, self.resume_button, self.folder_button):
            row.addWidget(button)
        return row

    def _build_stats(self) -> QWidget:
        box = card()
        row = QHBoxLayout(box)
        self.stat_values: dict[str, QLabel] = {}
        for key, label in STATS:
            cell = QVBoxLayout()
            cell.setSpacing(0)
            cell.addWidget(QLabel(label, objectName="factName"))
            self.stat_values[key] = QLabel("—", objectName="bigNumber")
            cell.addWidget(self.stat_values[key])
            row.addLayout(cell, 1)
        return box

    def _build_plots(self) -> QWidget:
        holder = QWidget()
        grid = QGridLayout(holder)
        grid.setContentsMargins(0, 0, 0, 0)
        self.plots = {name: pg.PlotWidget() for name in ("loss", "vram", "lr", "grad_norm", "tokens_per_s")}
        for plot in self.plots.values():
            plot.setMinimumHeight(120)
            plot.addLegend(offset=(-10, 10))
        self.curves = {
            "loss": self._curve("loss", "loss", "train"),
            "eval_loss": self._curve("loss", "eval_loss", "eval", symbol="o"),
            "drift": self._curve("loss", "drift", "drift from the base (KL)", symbol="t"),
            "vram_process": self._curve("vram", "vram_process", "this run (reserved)"),
            "vram_gpu": self._curve("vram", "vram_gpu", "whole GPU used"),
            "lr": self._curve("lr", "lr", None),
            "grad_norm": self._curve("grad_norm", "grad_norm", None),
            "tokens_per_s": self._curve("tokens_per_s", "tokens_per_s", None),
        }
        self.total_line = self._level_line("total", "GPU total")
        self.estimate_line = self._level_line("estimate", "estimated peak")
        self.measured_line = self._level_line("measured", "first step's peak (the largest)", 0.45)
        grid.addWidget(self.plots["loss"], 0, 0, 1, 3)
        grid.addWidget(self.plots["vram"], 0, 3, 1, 3)
        grid.addWidget(self.plots["lr"], 1, 0, 1, 2)
        grid.addWidget(self.plots["grad_norm"], 1, 2, 1, 2)
        grid.addWidget(self.plots["tokens_per_s"], 1, 4, 1, 2)
        grid.setRowStretch(0, 3)
        grid.setRowStretch(1, 2)
        self.apply_theme()
        return holder

    def _curve(self, plot: str, series: str, legend: str | None, symbol: str | None = None) -> pg.PlotDataItem:
        color = theme.SERIES_COLORS[series]
        return self.plots[plot].plot([], [], name=legend, pen=pg.mkPen(color, width=2), symbol=symbol,
                                     symbolSize=7, symbolBrush=color, symbolPen=None)

    def _level_line(self, key: str, label: str, position: float = 0.02) -> pg.InfiniteLine:
        anchor = (0, 0)  # text hangs below the line, so a line at the top of the plot keeps its label
        line = pg.InfiniteLine(angle=0, pen=pg.mkPen(theme.SERIES_COLORS[key], width=1.5,
                                                      style=Qt.PenStyle.DashLine),
                               label=label, labelOpts={"position": position, "anchors": [anchor, anchor],
                                                      "color": theme.SERIES_COLORS[key]})
        line.hide()
        self.plots["vram"].addItem(line)
        return line

    def apply_theme(self) -> None:
        for name, title, unit in (("loss", "Loss", ""), ("vram", "GPU memory", "GiB"), ("lr", "Learning rate", ""),
                                  ("grad_norm", "Gradient norm", ""), ("tokens_per_s", "Tokens per second", "")):
            theme.style_plot(self.plots[name], title, unit)
            self.plots[name].getPlotItem().setLabel("bottom", "step", color=theme.color("muted"))

    # ------------------------------------------------------------------ feeding
    def show_run(self, run_dir: Path | None) -> None:
        """Show a run from its events.jsonl, read from the start; live events of the session's own run are added as
        they come, and a run another window started is followed in its file."""
        self.log.clear()
        self.state, self._follow_offset = RunState(run_dir=run_dir), 0
        self.run_name.setText(run_dir.name if run_dir else "")
        self._follow_file()
        self.redraw()
        self._show_buttons()

    def _on_live_event(self, event: ev.Event) -> None:
        if self.session.is_watching_training():
            self.state.apply(event)
            if not isinstance(event, ev.UnknownEvent):  # already in the log, as the line it came on
                self.log.appendPlainText(ev.describe(event))

    def _on_live_log(self, line: str) -> None:
        if self.session.is_watching_training():
            self.log.appendPlainText(line)

    def _follow_file(self) -> None:
        """Read events.jsonl lines not seen yet (all of them for a reopened run); follows a run started by an
        earlier window, too. Like `summarize_run`, a run whose events end mid-run and whose engine is gone is
        interrupted."""
        run_dir = self.session.run_dir
        if run_dir is None or (self.session.is_training() and self.session.is_watching_training()):
            self.follow_timer.stop()
            return
        path = run_dir / "events.jsonl"
        if _file_size(path) > self._follow_offset:
            with open(path, "rb") as handle:
                handle.seek(self._follow_offset)
                chunk = handle.read()
            complete = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written waits for the next read
            self._follow_offset += len(complete)
            for line in complete.decode("utf-8", errors="replace").splitlines():
                event = ev.parse_line(line)
                if event is not None and not isinstance(event, ev.UnknownEvent):
                    self.state.apply(event)
                    self.log.appendPlainText(ev.describe(event))
        self.state.check_engine(run_dir)
        if self.state.status in ENDED_STATUSES or not path.exists():
            self.follow_timer.stop()
        elif not self.follow_timer.isActive():
            self.follow_timer.start()
        self._show_buttons()

    # ------------------------------------------------------------------ actions
    def stop(self) -> None:
        """Stop the training engine (with a checkpoint); a second Stop offers to end it at once."""
        training = self.session.training
        if not self.session.is_training():
            return
        if not training.stop_requested:
            training.stop()
            if self.session.is_watching_training():
                self.state.request_stop()
        elif QMessageBox.question(self, "Stop now?", "Stop the engine immediately, without a checkpoint? "
                                  "Steps since the last checkpoint are lost.") == QMessageBox.StandardButton.Yes:
            training.kill()
        self._show_buttons()

    def _resume(self) -> None:
        if self.session.run_dir is not None:
            self.resume_requested.emit(self.session.run_dir)

    def _open_folder(self) -> None:
        if self.session.run_dir is not None:
            QDesktopServices.openUrl(QUrl.fromLocalFile(str(self.session.run_dir)))

    # ------------------------------------------------------------------ drawing
    def redraw(self) -> None:
        state = self.state
        if not state.dirty:
            return
        state.dirty = False
        for name, curve in self.curves.items():
            series = state.series[name]
            scale = 1 / GIB if name.startswith("vram") else 1
            curve.setData(series.x, series.y * scale)
        measured_bytes = state.fit_check.measured_peak_bytes if state.fit_check else None
        for line, size_bytes in ((self.total_line, state.gpu_total_bytes),
                                 (self.estimate_line, state.estimate_peak_bytes),
                                 (self.measured_line, measured_bytes)):
            line.setVisible(bool(size_bytes))
            line.setValue((size_bytes or 0) / GIB)
        self._fit_vram_range()
        self._show_numbers()
        self._show_outcome()

    def _fit_vram_range(self) -> None:
        """Room for the curves and both level lines (auto-range ignores lines)."""
        state = self.state
        measured_bytes = (state.fit_check.measured_peak_bytes or 0) if state.fit_check else 0
        highest_bytes = max([state.gpu_total_bytes, state.estimate_peak_bytes, measured_bytes] +
                            [float(state.series[n].y.max()) for n in ("vram_process", "vram_gpu")
                             if state.series[n].count])
        if highest_bytes:
            self.plots["vram"].setYRange(0, highest_bytes / GIB * 1.08, padding=0)
        no_readings = state.step > 0 and not state.series["vram_gpu"].count + state.series["vram_process"].count
        self.plots["vram"].getPlotItem().setTitle("GPU memory: none used (this run is on the CPU)" if no_readings
                                                  else "GPU memory", color=theme.color("text"), size="10pt")

    def _show_numbers(self) -> None:
        m = self.state
        elsewhere = m.status in LIVE_STATUSES and not self._is_live()
        self.status.setText("Training elsewhere" if elsewhere else STATUS_TEXT.get(m.status, m.status))
        self.status.setToolTip("Started by an earlier window and still running: this page follows its events "
                               "file." if elsewhere else "")
        self.progress.setValue(int(m.progress * 1000))
        self.progress.setFormat(f"step {m.step} of {m.total_steps}  (epoch {m.epoch:.2f})" if m.total_steps else "")
        skipped = f" ({m.skipped_steps} skipped)" if m.skipped_steps else ""
        values = {"step": (m.step_text if m.total_steps else "—") + skipped,
                  "loss": formatting.number(m.loss), "eval_loss": formatting.number(m.eval_loss),
                  "drift": formatting.number(m.drift),
                  "lr": f"{m.lr:.2e}" if m.lr is not None else "—",
                  "tokens_per_s": f"{m.tokens_per_s:,.0f}" if m.tokens_per_s is not None else "—",
                  "eta": formatting.duration(m.eta_s) if m.status in ("training", "finished") else "—",
                  "peak": formatting.gib(m.peak_process_bytes) if m.peak_process_bytes else "—"}
        for key, text in values.items():
            self.stat_values[key].setText(text)
        self.stat_values["drift"].setToolTip(DRIFT_TIP + (f"\n\nNow: {ev.describe_drift(m.drift)}."
                                                          if m.drift is not None else ""))
        self.stat_values["step"].setToolTip(f"{m.skipped_steps} fp16 step(s) skipped by the loss scaler: their "
                                            "gradients overflowed, so nothing was applied" if m.skipped_steps else "")
        self.fit_label.setVisible(m.fit_check is not None)
        self.fit_label.setText(_fit_check_text(m.fit_check))
        self._show_buttons()

    def _show_outcome(self) -> None:
        m = self.state
        if m.error:
            self.banner.show_error(m.error, "The run stopped with an error" +
                                   (f" ({m.error.code})" if m.error.code else ""))
        elif m.status == "finished":
            self.banner.show_message("success", "Training finished",
                                     f"Adapter saved in {_short_path(m.adapter_dir)}."
                                     + _comparison_text(m.comparison),
                                     "Try it on the Chat page, or export it on the Export page.")
        elif m.status == "stopped":
            self.banner.show_message("info", "Stopped with a checkpoint", m.last_checkpoint,
                                     "Resume continues from this checkpoint.")
        elif m.model_summary or m.data_summary:
            self.banner.show_message("info", "Run details", " · ".join(s for s in (m.model_summary,
                                                                                   m.data_summary) if s))
        elif self.session.run_dir is None:
            self.banner.show_message("info", "No run to show yet", "Start one on the Train page (Ctrl+Return), "
                                     "or open an earlier run from the Runs page.")
        else:
            self.banner.clear()

    def _is_live(self) -> bool:
        return self.session.is_training() and self.session.is_watching_training()

    def _show_buttons(self) -> None:
        live = self._is_live()
        stopping = live and self.session.training.stop_requested
        self.stop_button.setEnabled(live)
        self.stop_button.setText("Stop now (no checkpoint)" if stopping else "Stop   (Ctrl+.)")
        run_dir = self.session.run_dir
        can_resume = run_dir is not None and not self.session.is_training() and self.state.can_resume
        self.resume_button.setEnabled(can_resume)
        self.folder_button.setEnabled(run_dir is not None)


def _short_path(path: str) -> str:
    """`run-name/adapter` rather than the whole path: the run folder is one click away."""
    parts = Path(path).parts
    return "/".join(parts[-2:]) if len(parts) >= 2 else path


def _comparison_text(comparison: ev.Comparison | None) -> str:
    if comparison is None:
        return ""
    text = ""
    if comparison.tuned_accuracy is not None and comparison.base_accuracy is not None:
        text = (f" On {len(comparison.rows)} held-out questions the base model answered "
                f"{comparison.base_accuracy:.0%} right, the tuned one {comparison.tuned_accuracy:.0%}.")
    if comparison.drift is not None:
        text += f" On everything else: {ev.describe_drift(comparison.drift)}; 0 is the base itself."
    return text


def _fit_check_text(check: ev.FitCheck | None) -> str:
    """The first step ran the run's largest micro-batches: what it measured, in a person's words."""
    if check is None:
        return ""
    head = f"Fit check: step 1 ran the run's largest batch ({check.tokens:,} tokens)"
    if check.measured_peak_bytes is None:
        return f"{head}; memory is measured on a CUDA GPU only (this run is on the CPU)."
    estimate = f", estimate {formatting.gib(check.estimate_peak_bytes)}" if check.estimate_peak_bytes else ""
    verdict = {"fits": "no later step needs more, so it will not run out of memory later",
               "tight": "it fits, but within 10% of the memory it has: other programs on the GPU could push it over"
               }.get(check.verdict, check.verdict)
    return (f"{head}: measured peak {formatting.gib(check.measured_peak_bytes)}{estimate}, of "
            f"{formatting.gib(check.available_bytes)} available — {verdict}.")


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
