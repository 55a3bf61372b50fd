"""Everything the pages ask the engine, as typed requests for app/engine_client: GPU detection, a model's facts,
a data file's scan, the memory estimate and "fit to my GPU". Each runs off the GUI thread; no Qt here.

Light requests call the engine's torch-free planning code in this process; the others run an engine command
(`model-info --json`, `data --json`) whose one JSON object is the answer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from app.engine_client import Call, EngineQuery, Request
from qlora_engine.planning import hardware
from qlora_engine.planning.advice import Advice, advise, fit_to_gpu
from qlora_engine.planning.memory import Estimate, estimate_peak
from qlora_engine.planning.model_shape import load_model_config, resolve_model_config
from qlora_engine.protocol.config import RunConfig


@dataclass(frozen=True)
class DetectGpus(Request[hardware.GpuReport]):
    """What NVML sees now (no GPU is an answer, not an error)."""

    key: ClassVar[str] = "gpus"

    def run(self, call: Call) -> hardware.GpuReport:
        return hardware.detect_gpus()


@dataclass(frozen=True)
class ReadModelInfo(EngineQuery[dict[str, Any]]):
    """`model-info <model> --json`: a model's facts (path, source, architecture, params, context length, …);
    a .gguf is imported on the way, which can take a minute."""

    key: ClassVar[str] = "model_info"
    model: str
    allow_pickle: bool = False

    def args(self) -> list[str]:
        return ["model-info", self.model, "--json"] + (["--allow-pickle"] if self.allow_pickle else [])

    def read(self, answer: dict[str, Any]) -> dict[str, Any]:
        return answer


@dataclass(frozen=True)
class ScanData(EngineQuery[dict[str, Any]]):
    """`data <file> --json`: the detected format, rows, bad rows by line, token lengths and preview rows, read with
    the model's tokenizer."""

    key: ClassVar[str] = "data"
    data: str
    model: str
    data_format: str
    max_length: int
    train_on_prompt: bool = False

    def args(self) -> list[str]:
        args = ["data", self.data, "--model", self.model, "--format", self.data_format,
                "--max-length", str(self.max_length), "--json"]
        return args + (["--train-on-prompt"] if self.train_on_prompt else [])

    def read(self, answer: dict[str, Any]) -> dict[str, Any]:
        return answer


@dataclass(frozen=True)
class ModelToPlan:
    """The model the estimate is for: its spec, and the folder model-info reported (an imported .gguf's)."""

    model: str
    path: str = ""

    def config_json(self) -> dict[str, Any]:
        if self.model != "default" and self.path:
            return load_model_config(self.path)
        return resolve_model_config(self.model)


@dataclass(frozen=True)
class FitEstimate:
    peak: Estimate
    advice: Advice
    free_bytes: int
    total_bytes: int | None


@dataclass(frozen=True)
class EstimateFit(Request[FitEstimate]):
    """The run's estimated peak memory, term by term, and the verdict and fixes for `free_bytes`."""

    key: ClassVar[str] = "estimate"
    model: ModelToPlan
    config: RunConfig
    free_bytes: int
    total_bytes: int | None = None

    def run(self, call: Call) -> FitEstimate:
        model_config = self.model.config_json()
        return FitEstimate(estimate_peak(model_config, self.config),
                           advise(model_config, self.config, self.free_bytes), self.free_bytes, self.total_bytes)


@dataclass(frozen=True)
class FitToGpu(Request[dict[str, Any]]):
    """The option changes that make the run fit `free_bytes`; an EngineError when not even batch 1 fits."""

    key: ClassVar[str] = "fit_to_gpu"
    model: ModelToPlan
    config: RunConfig
    free_bytes: int

    def run(self, call: Call) -> dict[str, Any]:
        return fit_to_gpu(self.model.config_json(), self.config, self.free_bytes)
