"""Everything the pages ask the engine, as typed requests for app/engine_client: GPU detection, a model's facts,
a data file's scan, the memory estimate, "fit to my GPU", a GGUF export's needs. Each runs off the GUI thread; no
Qt here.

Light requests call the engine's torch-free planning code in this process; the others run an engine command
(`model-info --json`, `data --json`) whose answer is one of qlora_engine.protocol.queries' types.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from app.engine_client import Call, EngineQuery, Request
from qlora_engine.planning import gguf_plan, hardware, precision_memory
from qlora_engine.planning.advice import advise, fit_to_gpu
from qlora_engine.planning.catalog import build_catalog
from qlora_engine.planning.memory import estimate_peak
from qlora_engine.planning.model_shape import load_model_config, model_shape, resolve_model_config
from qlora_engine.protocol import queries
from qlora_engine.protocol.config import RunConfig
from qlora_engine.protocol.run_folders import FINAL_ADAPTER, exports_folder


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
        args += ["--columns", self.columns] if self.columns else []
        args += ["--data-mix", self.data_mix] if self.data_mix else []
        return args + (["--train-on-prompt"] if self.train_on_prompt else [])


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
class SparePrecision(Request["tuple[float, float]"]):
    """(the precision budget that `spare_bytes` more memory for the linear weights buys, their bits per weight now),
    both in bits per linear weight."""

    key: ClassVar[str] = "spare_precision"
    model: ModelToPlan
    current_weight_bytes: int
    spare_bytes: int

    def run(self, call: Call) -> tuple[float, float]:
        shape, _ = model_shape(self.model.config_json())
        now = self.current_weight_bytes * 8 / precision_memory.linear_weight_count(shape)
        return precision_memory.bits_for_spare(shape, self.current_weight_bytes, self.spare_bytes), now


@dataclass(frozen=True)
class PlanPrecision(EngineQuery[queries.PrecisionPlanReport]):
    """`precision <model> --bits N --json`: the quantization error a precision budget buys, measured on the model's
    weights (every matrix quantized in every format: a minute for a small model, longer for a large one)."""

    key: ClassVar[str] = "precision"
    answer_type: ClassVar[type[queries.Answer]] = queries.PrecisionPlanReport
    model: str
    bits: float
    quant_type: str = "nf4"
    double_quant: bool = True

    def args(self) -> list[str]:
        return ["precision", self.model, "--bits", f"{self.bits:g}", "--quant-type", self.quant_type,
                "--double-quant" if self.double_quant else "--no-double-quant", "--json"]


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
    checkpoint: str = FINAL_ADAPTER  # or step-N: that checkpoint's adapter, its exports in exports/step-N

    def run(self, call: Call) -> gguf_plan.ExportNeeds:
        run_dir = Path(self.run_dir)
        out = Path(self.out).expanduser() if self.out else exports_folder(run_dir, self.checkpoint) / "gguf"
        quants = ["f16"] if self.lora else list(self.quants)
        merged = self.lora or gguf_plan.merged_is_current(run_dir, self.checkpoint)
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


# ----------------------------------------------------------------------------- the Model page's sources
@dataclass(frozen=True)
class SearchHub(EngineQuery[queries.HubSearch]):
    """`models --search TEXT --json`: text-generation models on the Hub whose id contains `text`."""

    key: ClassVar[str] = "hub_search"
    answer_type: ClassVar[type[queries.Answer]] = queries.HubSearch
    text: str

    def args(self) -> list[str]:
        return ["models", "--search", self.text, "--json"]


@dataclass(frozen=True)
class ListLocalModels(EngineQuery[queries.LocalModels]):
    """`models --json`: the HF cache's models and the .gguf files in Ollama's and LM Studio's folders."""

    key: ClassVar[str] = "local_models"
    answer_type: ClassVar[type[queries.Answer]] = queries.LocalModels

    def args(self) -> list[str]:
        return ["models", "--json"]


@dataclass(frozen=True)
class ReadHubToken(EngineQuery[queries.HubToken]):
    """`hub-token --json`: whether huggingface_hub has a token, and where it is kept (never the token)."""

    key: ClassVar[str] = "hub_token"
    answer_type: ClassVar[type[queries.Answer]] = queries.HubToken

    def args(self) -> list[str]:
        return ["hub-token", "--json"]


@dataclass(frozen=True)
class SaveHubToken(EngineQuery[queries.HubToken]):
    """`hub-token --save --json` with the token on stdin: checked with the Hub, stored where huggingface_hub keeps
    it. The token is on no command line and in no repr."""

    key: ClassVar[str] = "hub_token"
    answer_type: ClassVar[type[queries.Answer]] = queries.HubToken
    token: str = field(repr=False)

    def args(self) -> list[str]:
        return ["hub-token", "--save", "--json"]

    def stdin_text(self) -> str:
        return self.token + "\n"


@dataclass(frozen=True)
class BuildCatalog(Request[queries.Catalog]):
    """The catalog of popular models at `config`'s settings against `free_bytes` (None: estimates, no verdicts):
    the answer `models --catalog --json` gives, computed in this process."""

    key: ClassVar[str] = "catalog"
    config: RunConfig
    free_bytes: int | None
    memory_source: str

    def run(self, call: Call) -> queries.Catalog:
        return build_catalog(self.config, self.free_bytes, self.memory_source)


@dataclass(frozen=True)
class CheckGgufExport(Request["bool | None"]):
    """Whether llama.cpp's converter knows the model's architecture; None until the converter is on this machine."""

    key: ClassVar[str] = "gguf_support"
    model: ModelToPlan

    def run(self, call: Call) -> bool | None:
        return gguf_plan.gguf_export_supported(self.model.config_json())
