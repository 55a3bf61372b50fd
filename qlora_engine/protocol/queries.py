"""The typed answers of the engine's query commands (`model-info`, `data`, `estimate`, `models` with `--json`) and of
the estimate in-process: one dataclass per answer, versioned JSON out and the same types back in. No torch here.

An answer is one JSON object: {"v": 1, "kind": "<kind>", <its fields>}; a failure is the kind "error" with code,
message and advice, read back as the EngineError it was.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

from qlora_engine.protocol.errors import EngineError

ANSWER_VERSION = 1


@dataclass(kw_only=True)
class Answer:
    kind: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return {"v": ANSWER_VERSION, "kind": self.kind, **dataclasses.asdict(self)}

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Answer:
        """Fields this version doesn't know are dropped (a newer engine may add some)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass(kw_only=True)
class ModelInfo(Answer):
    """Facts the Model page shows, from config.json and the tokenizer files (no weights loaded)."""

    kind: ClassVar[str] = "model_info"
    path: str
    source: str  # default, folder, gguf or hub
    original: str  # what the user asked for
    architecture: str
    model_type: str | None = None
    params: int | None = None
    vocab_size: int | None = None
    context_length: int | None = None
    hidden_size: int | None = None
    num_layers: int | None = None
    tied_embeddings: bool = False
    has_chat_template: bool = False
    custom_code: bool = False
    downloaded: bool = True  # a Hub model: its weights are in the HF cache (else only config and tokenizer files)
    download_bytes: int = 0  # a Hub model not downloaded yet: what downloading what training needs fetches


@dataclass(kw_only=True)
class DataReport(Answer):
    """A data source read as training would read it: format, rows, bad rows by line ({line, reason}), token
    lengths of the usable rows, the first rows as segments ({text, trained}), the column mapping used; with a mix,
    each source's own report in `sources` (the top-level fields are the first source's)."""

    kind: ClassVar[str] = "data_report"
    file: str
    format: str
    detected_format: str
    rows: int
    valid_rows: int
    bad_rows: list[dict[str, Any]] = field(default_factory=list)
    truncated_rows: int = 0
    no_trained_tokens_rows: int = 0
    token_lengths: list[int] = field(default_factory=list)
    preview: list[dict[str, Any]] = field(default_factory=list)  # {file, line, segments}
    not_target_rows: int = 0  # rows marked label: false: counted, never trained on
    columns: dict[str, str] = field(default_factory=dict)  # {field: column} applied to the rows
    columns_suggested: bool = False  # the mapping was suggested from common names, not given
    source_columns: list[str] = field(default_factory=list)  # the file's own column names
    notice: str = ""  # e.g. preference pairs are trained on their chosen answers only
    sources: list[dict[str, Any]] = field(default_factory=list)  # with data_mix: each source's report


# ----------------------------------------------------------------------------- the memory estimate
@dataclass
class Term:
    name: str
    bytes: int
    note: str


@dataclass
class Estimate:
    """The predicted peak GPU memory of a run's training step, as named terms."""

    terms: list[Term]
    approximate: bool
    reasons: list[str]  # why approximate
    warnings: list[str] = field(default_factory=list)  # what the user should know even when exact
    total_params: int = 0
    trainable_params: int = 0

    @property
    def peak_bytes(self) -> int:
        return sum(term.bytes for term in self.terms)

    def bytes_of(self, name: str) -> int:
        return next(term.bytes for term in self.terms if term.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {"peak_bytes": self.peak_bytes, "terms": [dataclasses.asdict(term) for term in self.terms],
                "approximate": self.approximate, "reasons": self.reasons, "warnings": self.warnings,
                "total_params": self.total_params, "trainable_params": self.trainable_params}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Estimate:
        return cls(terms=[Term(**term) for term in values["terms"]], approximate=values["approximate"],
                   reasons=values["reasons"], warnings=values.get("warnings", []),
                   total_params=values.get("total_params", 0), trainable_params=values.get("trainable_params", 0))


FIX_KINDS = ("memory", "speed")


@dataclass
class Fix:
    """A change the estimator offers: `memory` saves memory toward a fit (a run that doesn't fit gets these), `speed`
    spends spare memory on faster steps (a run that fits; its saving is negative, a cost)."""

    description: str
    saving_bytes: int
    config_changes: dict[str, Any]
    fits_after: bool  # the run with these changes gets the verdict "fits"
    kind: str  # one of FIX_KINDS


@dataclass
class Advice:
    """The verdict for a run against the free memory, and what to change when it doesn't fit."""

    verdict: str
    peak_bytes: int
    free_bytes: int
    max_length_that_fits: int | None  # at the chosen batch; None when not even the shortest fits
    batch_that_fits: int | None  # at the chosen max_length; None when not even batch 1 fits
    fixes: list[Fix]

    def fixes_of(self, kind: str) -> list[Fix]:
        """The fixes of one kind ("memory" or "speed"), in their order."""
        return [fix for fix in self.fixes if fix.kind == kind]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Advice:
        return cls(**{**values, "fixes": [Fix(**fix) for fix in values["fixes"]]})


@dataclass(kw_only=True)
class EstimateReport(Answer):
    """`estimate --json`: the estimate, where the free memory figure came from, and (with a free memory figure) the
    verdict, fixes and the changes that make it fit."""

    kind: ClassVar[str] = "estimate"
    model: str
    estimate: Estimate
    memory_source: str = ""
    advice: Advice | None = None
    fit_to_gpu: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"v": ANSWER_VERSION, "kind": self.kind, "model": self.model, "estimate": self.estimate.to_dict(),
                "memory_source": self.memory_source, "advice": self.advice.to_dict() if self.advice else None,
                "fit_to_gpu": self.fit_to_gpu}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EstimateReport:
        return cls(model=values["model"], estimate=Estimate.from_dict(values["estimate"]),
                   memory_source=values.get("memory_source", ""),
                   advice=Advice.from_dict(values["advice"]) if values.get("advice") else None,
                   fit_to_gpu=values.get("fit_to_gpu"))


# ----------------------------------------------------------------------------- models on disk, on the Hub, the catalog
def _known_fields(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    known = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in known}


@dataclass
class LocalModel:
    """A model already on disk: in the HF cache (by Hub id) or a .gguf in Ollama's or LM Studio's folders."""

    name: str  # the Hub id, or Ollama's name:tag, or the file's name
    source: str  # hf_cache, ollama or lm_studio
    model: str  # what to pass as `model`: the Hub id, or the .gguf's path
    path: str
    format: str  # safetensors or gguf
    size_bytes: int
    architecture: str | None = None
    complete: bool = True  # every weight file the index names is there
    commit: str | None = None


@dataclass(kw_only=True)
class LocalModels(Answer):
    """`models --json`: what is on disk, and each folder looked in ({source, path, exists})."""

    kind: ClassVar[str] = "local_models"
    models: list[LocalModel] = field(default_factory=list)
    folders: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LocalModels:
        return cls(models=[LocalModel(**_known_fields(LocalModel, m)) for m in values.get("models", [])],
                   folders=values.get("folders", []))


@dataclass
class CatalogEntry:
    """One popular model against a GPU: its size, download, and the estimate at the chosen settings."""

    name: str
    hub_id: str
    params: int  # counted from its config.json
    published_params: int  # as its model page states
    download_bytes: int  # the weights as stored (params x bytes of its torch_dtype)
    gated: bool
    license: str
    peak_bytes: int  # the estimate at the chosen settings
    approximate: bool = False
    verdict: str = ""  # fits, tight, won't fit; empty without a memory figure
    max_length_batch1: int | None = None  # the longest max_length that fits at micro-batch 1
    max_length_batch4: int | None = None
    context_length: int = 0
    on_disk: bool = False


@dataclass(kw_only=True)
class Catalog(Answer):
    """`models --catalog --json`: the catalog against free memory at the chosen settings, what fits first."""

    kind: ClassVar[str] = "catalog"
    memory_source: str
    free_bytes: int | None
    settings: dict[str, Any] = field(default_factory=dict)
    entries: list[CatalogEntry] = field(default_factory=list)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Catalog:
        return cls(memory_source=values["memory_source"], free_bytes=values.get("free_bytes"),
                   settings=values.get("settings", {}),
                   entries=[CatalogEntry(**_known_fields(CatalogEntry, e)) for e in values.get("entries", [])])


@dataclass
class HubModel:
    """A Hub search result: what the Model page's search list shows before anything is downloaded."""

    repo_id: str
    downloads: int = 0
    likes: int = 0
    gated: bool = False
    license: str = ""
    params: int | None = None  # the Hub's safetensors count
    model_type: str | None = None
    supported: bool = False  # an architecture the estimate knows (any causal LM transformers loads can train)


@dataclass(kw_only=True)
class HubSearch(Answer):
    """`models --search TEXT --json`: Hub models matching a name, most downloaded first."""

    kind: ClassVar[str] = "hub_search"
    query: str
    results: list[HubModel] = field(default_factory=list)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> HubSearch:
        return cls(query=values["query"], results=[HubModel(**_known_fields(HubModel, r))
                                                   for r in values.get("results", [])])


@dataclass(kw_only=True)
class HubToken(Answer):
    """`hub-token --json`: whether huggingface_hub has a token to send and where it is kept; never the token."""

    kind: ClassVar[str] = "hub_token"
    present: bool
    source: str = ""  # the HF_TOKEN environment variable, or the file it is stored in
    user: str | None = None  # the Hub's name for its owner, when it was just checked


@dataclass(kw_only=True)
class AddedTo(Answer):
    """`add-to lm-studio|ollama FILE --json`: a verified GGUF put in LM Studio's models folder, or created as an
    Ollama model from the Modelfile beside it."""

    kind: ClassVar[str] = "added_to"
    app: str  # lm-studio or ollama
    gguf: str
    where: str  # LM Studio: the file in its models folder; Ollama: the model's name
    output: str = ""  # what ollama create printed


@dataclass(kw_only=True)
class PrecisionPlanReport(Answer):
    """`precision <model> --bits N`: what a precision budget buys, measured on the model's weights (the mean relative
    Frobenius error of its linear weights, plain 4-bit against the plan) and how many matrices get each format."""

    kind: ClassVar[str] = "precision_plan"
    model: str
    budget_bits: float
    bits_per_weight: float  # what the plan uses (never above the budget)
    weight_bytes: int  # the linear weights under the plan
    plain_weight_bytes: int  # the same in plain 4-bit, blocks of 64
    relative_error: float
    plain_relative_error: float
    counts: dict[str, int] = field(default_factory=dict)  # format name -> matrices


@dataclass(kw_only=True)
class Failure(Answer):
    """A query that failed: the EngineError it raised."""

    kind: ClassVar[str] = "error"
    code: str
    message: str
    advice: str = ""

    @classmethod
    def from_exception(cls, exc: EngineError) -> Failure:
        return cls(code=exc.code, message=exc.message, advice=exc.advice)


ANSWER_TYPES: dict[str, type[Answer]] = {cls.kind: cls for cls in (
    ModelInfo, DataReport, EstimateReport, LocalModels, Catalog, HubSearch, HubToken, AddedTo, PrecisionPlanReport,
    Failure)}


def read_answer(text: str, expected: type[Answer]) -> Answer:
    """The answer in a query command's stdout (all of it, else its last JSON line), as `expected`; a Failure is
    raised as its EngineError, anything unreadable as a `bad_answer` one."""
    candidates = [text] + [line for line in reversed(text.splitlines()) if line.lstrip().startswith("{")]
    for candidate in candidates:
        try:
            values = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        if not isinstance(values, dict):
            continue
        if values.get("kind") == Failure.kind:
            raise EngineError(values.get("code", "internal"), values.get("message", ""), values.get("advice", ""))
        if values.get("kind") == expected.kind and isinstance(values.get("v"), int):
            try:
                return expected.from_dict(values)
            except (TypeError, KeyError) as exc:
                raise EngineError("bad_answer", f"the engine's {expected.kind} answer lacks a field: {exc}",
                                  "The app and the engine are from different versions: reinstall QLoRA Studio."
                                  ) from exc
    raise EngineError("bad_answer", f"the engine printed no {expected.kind} answer",
                      "The log has what it printed instead; if it happens again, report the log.")
