"""Everything the pages ask the engine, as typed requests for app/engine_client: GPU detection, a model's facts,
a data file's scan, the memory estimate, "fit to my GPU", a GGUF export's needs. Each runs off the GUI thread; no
Qt here.

Light requests call the engine's torch-free planning code in this process; the others run an engine command
(`model-info --json`, `data --json`) whose answer is one of qlora_engine.protocol.queries' types.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from app.engine_client import Call, EngineQuery, Request
from qlora_engine.planning import gguf_plan, hardware
from qlora_engine.planning.advice import advise, fit_to_gpu
from qlora_engine.planning.memory import estimate_peak
from qlora_engine.planning.model_shape import load_model_config, resolve_model_config
from qlora_engine.protocol import queries
from qlora_engine.protocol.config import RunConfig


@dataclass(frozen=True)
class DetectGpus(Request[hardware.GpuReport]):
    """What NVML sees now (no GPU is an answer, not an error)."""

    key: ClassVar[str] = "gpus"

    def run(self, call: Call) -> hardware.GpuReport:
        return hardware.detect_gpus()


@dataclass(frozen=True)
class ReadModelInfo(EngineQuery[queries.ModelInfo]):
    """`model-info <model> --json`: a model's facts (path, source, architecture, params, context length, …);
    a .gguf is imported on the way, which can take a minute."""

    key: ClassVar[str] = "model_info"
    answer_type: ClassVar[type[queries.Answer]] = queries.ModelInfo
    model: str
    allow_pickle: bool = False

    def args(self) -> list[str]:
        return ["model-info", self.model, "--json"] + (["--allow-pickle"] if self.allow_pickle else [])


@dataclass(frozen=True)
class ScanData(EngineQuery[queries.DataReport]):
    """`data <file> --json`: the detected format, rows, bad rows by line, token lengths and preview rows, read with
    the model's tokenizer."""

    key: ClassVar[str] = "data"
    answer_type: ClassVar[type[queries.Answer]] = queries.DataReport
    data: str
    model: str
    data_format: str
    max_length: int
    train_on_prompt: bool = False

    columns: str = ""  # field=column,… (config.format_mapping)
    data_mix: str = ""  # source=ratio,…
    def args(self) -> list[str]:
        args = ["data", self.data, "--model", self.model, "--format", self.data_format,
                "--max-length", str(self.max_length), "--json"]
        return args + (["--train-on-prompt"] if self.train_on_prompt else [])
        args += ["--columns", self.columns] if self.columns else []
        args += ["--data-mix", self.data_mix] if self.data_mix else []


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
class EstimateFit(Request[queries.EstimateReport]):
    """The run's estimated peak memory, term by term, and the verdict and fixes for `free_bytes`: the answer
    `estimate --json` gives, computed in this process."""

    key: ClassVar[str] = "estimate"
    model: ModelToPlan
    config: RunConfig
    free_bytes: int
    memory_source: str = ""

    def run(self, call: Call) -> queries.EstimateReport:
        model_config = self.model.config_json()
        return queries.EstimateReport(model=self.model.model, estimate=estimate_peak(model_config, self.config),
                                      memory_source=self.memory_source,
                                      advice=advise(model_config, self.config, self.free_bytes))


@dataclass(frozen=True)
class FitToGpu(Request[dict[str, Any]]):
    """The option changes that make the run fit `free_bytes`; an EngineError when not even batch 1 fits."""

    key: ClassVar[str] = "fit_to_gpu"
    model: ModelToPlan
    config: RunConfig
    free_bytes: int

    def run(self, call: Call) -> dict[str, Any]:
        return fit_to_gpu(self.model.config_json(), self.config, self.free_bytes)


@dataclass(frozen=True)
class PlanGgufExport(Request[gguf_plan.ExportNeeds]):
    """A run's GGUF export before it starts: each file's estimated size, the RAM and disk it needs against what this
    machine has, whether llama.cpp knows the architecture. `lora`: the adapter as a GGUF LoRA, written with the base
    model's f16 GGUF (no merge)."""

    key: ClassVar[str] = "gguf_plan"
    run_dir: str
    model: str
    quants: tuple[str, ...]
    out: str = ""
    lora: bool = False

    def run(self, call: Call) -> gguf_plan.ExportNeeds:
        run_dir = Path(self.run_dir)
        out = Path(self.out).expanduser() if self.out else run_dir / "exports" / "gguf"
        quants = ["f16"] if self.lora else list(self.quants)
        merged = self.lora or gguf_plan.merged_is_current(run_dir)
        return gguf_plan.export_needs(resolve_model_config(self.model), quants, out, merged_exists=merged)


@dataclass(frozen=True)
class AddGgufTo(EngineQuery[queries.AddedTo]):
    """`add-to lm-studio|ollama FILE --json`: an exported GGUF into LM Studio's models folder (hard-linked or
    copied), or `ollama create` on the Modelfile beside it."""

    key: ClassVar[str] = "add_gguf_to"
    answer_type: ClassVar[type[queries.Answer]] = queries.AddedTo
    app: str  # lm-studio or ollama
    gguf: str
    name: str

    def args(self) -> list[str]:
        return ["add-to", self.app, self.gguf, "--name", self.name, "--json"]
