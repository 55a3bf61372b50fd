"""GPU page: what NVML sees (name, memory, driver, compute capability, bf16), or plainly that there is
no NVIDIA GPU and training runs on the CPU. Detection is a request of the engine client (off the GUI thread).
"""
from __future__ import annotations

import html

from PySide6.QtWidgets import QGridLayout, QLabel, QProgressBar, QPushButton, QVBoxLayout, QWidget

from app.engine_requests import DetectGpus
from app.formatting import gib
from app.session import Session
from app.widgets.banner import Banner
from app.widgets.page import Page, card
from qlora_engine.planning import hardware
from qlora_engine.protocol.errors import EngineError

# What people ask first. QLoRA's 4-bit weights are about half a byte per parameter; the rest is activations,
# the adapter and CUDA's own overhead. The Fit page computes the real number for a given model and settings.
SIZE_GUIDE = (("6 GiB", "models up to about 3B parameters"), ("8 GiB", "up to about 7–8B, with short sequences"),
              ("12–16 GiB", "7–8B comfortably, 13–14B with short sequences"),
              ("24 GiB", "up to about 30B"), ("48 GiB", "up to about 70B"))
CPU_EXPLANATION = ("Training runs on the CPU. That is fine for the bundled 135M-parameter model (minutes) and "
                   "much too slow for billion-parameter models. The Fit page can still plan for a GPU you "
                   "intend to use.")


class GpuPage(Page):
    title = "GPU"
    intro = "The graphics card training will use. QLoRA needs an NVIDIA GPU for speed; memory decides what fits."
    def __init__(self, session: Session, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.refresh_button = QPushButton("Check again")
        self.refresh_button.clicked.connect(self.refresh)
        self.header_row.addWidget(self.refresh_button)
        self.banner = Banner()
        self.body.addWidget(self.banner)
        self.cards = QVBoxLayout()
        self.body.addLayout(self.cards)
        self.body.addWidget(self._guide_card())
        self.body.addStretch(1)
        self.status = QLabel("Looking for NVIDIA GPUs…", objectName="muted")
        self.cards.addWidget(self.status)

    def refresh(self) -> None:
        self.refresh_button.setEnabled(False)
        self.session.engine.run(DetectGpus(), owner=self, done=self.show_report, failed=self._show_failure)

    def _show_failure(self, error: EngineError) -> None:
        """Detection itself broke (a bug; NVML's own failures come as a report's problem): plan as without a GPU."""
        self.show_report(hardware.GpuReport(problem=error.message))
        self.banner.show_error(error, "GPU detection failed")

    def show_report(self, report: hardware.GpuReport) -> None:
        self.refresh_button.setEnabled(True)
        self._clear_cards()
        self.banner.clear()
        if report.gpus:
            for gpu in report.gpus:
                self.cards.addWidget(self._gpu_card(gpu, report))
        else:
            self.cards.addWidget(self._cpu_card(report.problem))
            if not _is_plain_absence(report.problem):
                self.banner.show_message("error", "GPU detection failed", report.problem,
                                         "Update or reinstall the NVIDIA driver, then press Check again.")
        self.session.set_gpu_report(report)

    def _clear_cards(self) -> None:
        while self.cards.count():
            widget = self.cards.takeAt(0).widget()
            if widget is not None:
                widget.hide()
                widget.deleteLater()

    def _gpu_card(self, gpu: hardware.GpuInfo, report: hardware.GpuReport) -> QWidget:
        box = card()
        grid = QGridLayout(box)
        grid.setColumnStretch(1, 1)
        training = hardware.training_gpus(report, self.session.config.nproc)
        rank = next((rank for rank, used in enumerate(training) if used.index == gpu.index), None)
        role = "" if rank is None else "  ·  training uses this one" if len(training) == 1 else \
            f"  ·  training uses this one (process {rank} of {len(training)})"
        grid.addWidget(QLabel(f"GPU {gpu.index}: {html.escape(gpu.name)}{role}", objectName="bigNumber"), 0, 0, 1, 2)
        used = QProgressBar(maximum=1000, value=int(1000 * gpu.used_bytes / max(gpu.total_bytes, 1)))
        used.setFormat(f"{gib(gpu.used_bytes)} used of {gib(gpu.total_bytes)}  ·  {gib(gpu.free_bytes)} free")
        major, minor = gpu.compute_capability
        facts = [("Memory", used),
                 ("Compute", f"capability {major}.{minor}  ·  bf16 "
                             + ("yes" if gpu.bf16_supported else "no (fp16 is used instead)")),
                 ("Driver", f"{report.driver_version or '?'}  ·  supports CUDA {report.cuda_driver_version or '?'}"),
                 ("Now", f"{_or_unknown(gpu.utilization_percent, '%')} busy  ·  "
                         f"{_or_unknown(gpu.temperature_c, ' °C')}")]
        for row, (name, value) in enumerate(facts, start=1):
            grid.addWidget(QLabel(name, objectName="factName"), row, 0)
            grid.addWidget(value if isinstance(value, QWidget) else QLabel(value), row, 1)
        return box

    def _guide_card(self) -> QWidget:
        box = card()
        grid = QGridLayout(box)
        grid.setColumnStretch(1, 1)
        grid.addWidget(QLabel("<b>Rough guide</b>: what a GPU's memory trains with QLoRA (the Fit page gives the "
                              "estimate for your model and settings)", wordWrap=True), 0, 0, 1, 2)
        for row, (memory, models) in enumerate(SIZE_GUIDE, start=1):
            grid.addWidget(QLabel(memory, objectName="factName"), row, 0)
            grid.addWidget(QLabel(models), row, 1)
        return box

    def _cpu_card(self, problem: str) -> QWidget:
        box = card()
        layout = QVBoxLayout(box)
        layout.addWidget(QLabel("No NVIDIA GPU found", objectName="bigNumber"))
        layout.addWidget(QLabel(CPU_EXPLANATION, wordWrap=True))
        detail = QLabel(f"Details: {problem}", objectName="muted", wordWrap=True)
        layout.addWidget(detail)
        return box


def _is_plain_absence(problem: str) -> bool:
    return problem.startswith(hardware.NO_GPU_MESSAGE) or problem == hardware.NO_PYNVML_MESSAGE


def _or_unknown(value: int | None, unit: str) -> str:
    return "?" if value is None else f"{value}{unit}"
