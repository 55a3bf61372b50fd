"""What the pages share: the run config being edited, the chosen model's and data's facts, the GPU
to plan for, the engine client for requests and the training engine process. Pages read and change it; it knows
no widgets.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, Signal

from app.engine_client import EngineClient
from app.engine_command import default_engine_command
from app.engine_process import EngineProcess
from qlora_engine.planning.hardware import GpuReport
from qlora_engine.protocol.config import RunConfig
from qlora_engine.protocol.queries import DataReport, ModelInfo
from qlora_engine.protocol.run_folders import CONFIG_NAME, new_run_dir


class Session(QObject):
    config_changed = Signal()
    model_info_changed = Signal()
    data_report_changed = Signal()
    gpu_changed = Signal()
    run_changed = Signal()  # the run the Monitor, Chat and Export pages are about
    runs_folder_changed = Signal()
    training_changed = Signal(bool)  # a training engine started (True) or ended (False)

    def __init__(self, runs_folder: Path, engine_command: list[str] | None = None,
                 parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.engine_command = engine_command or default_engine_command()
        self.runs_folder = runs_folder
        self.config = RunConfig()
        self.model_info: ModelInfo | None = None
        self.data_report: DataReport | None = None
        self.gpu_report: GpuReport | None = None  # None until detection has run
        self.run_dir: Path | None = None  # the run being looked at
        self.training_run_dir: Path | None = None  # the run the training engine is working on
        self.engine = EngineClient(self.engine_command, self)  # requests (model info, data scan, estimate, GPUs)
        self.training = EngineProcess(self.engine_command, self)
        self.training.exited.connect(lambda _code: self.training_changed.emit(False))

    # ------------------------------------------------------------------ config
    def update_config(self, **changes: Any) -> None:
        """Change options; values are range-checked by the widgets, the whole config at Start."""
        changed = {k: v for k, v in changes.items() if getattr(self.config, k) != v}
        if changed:
            self.config = dataclasses.replace(self.config, **changed)
            self.config_changed.emit()

    def set_model_info(self, info: ModelInfo | None) -> None:
        self.model_info = info
        self.model_info_changed.emit()

    def set_data_report(self, report: DataReport | None) -> None:
        self.data_report = report
        self.data_report_changed.emit()

    def set_gpu_report(self, report: GpuReport) -> None:
        self.gpu_report = report
        self.gpu_changed.emit()

    def set_runs_folder(self, folder: Path) -> None:
        self.runs_folder = folder
        self.runs_folder_changed.emit()

    def select_run(self, run_dir: Path | None) -> None:
        self.run_dir = run_dir
        self.run_changed.emit()

    # ------------------------------------------------------------------ training
    def start_training(self) -> Path:
        """Write a new run folder's config.yaml and start the engine on it; a bad_config EngineError if invalid."""
        config = dataclasses.replace(self.config).validate()
        run_dir = Path(config.run_dir) if config.run_dir else new_run_dir(self.runs_folder, config.model)
        config.run_dir = str(run_dir)
        config.save(run_dir / CONFIG_NAME)
        self.training_run_dir = run_dir
        self.select_run(run_dir)
        self.training.start(["train", str(run_dir / CONFIG_NAME), "--run-dir", str(run_dir), "--events", "jsonl"])
        self.training_changed.emit(True)
        return run_dir

    def resume_training(self, run_dir: Path) -> None:
        self.training_run_dir = run_dir
        self.select_run(run_dir)
        self.training.start(["train", "--resume", "--run-dir", str(run_dir), "--events", "jsonl"])
        self.training_changed.emit(True)

    def is_training(self) -> bool:
        return self.training.is_running()

    def is_watching_training(self) -> bool:
        """Whether the run being looked at is the one this window is training."""
        return self.run_dir is not None and self.run_dir == self.training_run_dir
