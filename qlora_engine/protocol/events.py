"""The JSON-lines event protocol between the engine and its clients (GUI, scripts): one dataclass per event kind.

One JSON object per line on stdout, `{"v": 1, "t": <unix time>, "kind": "<kind>", <the kind's fields>}`, the same
lines appended to <run_dir>/events.jsonl. `parse_line` turns a line back into the same types; a kind this version
doesn't know, a newer version's extra fields or a malformed line never crash a reader. No torch here.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, ClassVar

from qlora_engine.protocol.errors import EngineError

PROTOCOL_VERSION = 1


def _now() -> float:
    return round(time.time(), 3)


@dataclass(kw_only=True)
class Event:
    """What every event has: the time it was made (unix seconds). Subclasses name their `kind`."""

    kind: ClassVar[str] = ""
    t: float = field(default_factory=_now)

    def to_dict(self) -> dict[str, Any]:
        return {"v": PROTOCOL_VERSION, "t": self.t, "kind": self.kind,
                **{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "t"}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), default=_json_default)


# ----------------------------------------------------------------------------- a training run
@dataclass(kw_only=True)
class Started(Event):
    """The engine took the run folder: the whole config, the device and dtype, whether it resumes, the fit estimate."""

    kind: ClassVar[str] = "started"
    run_dir: str
    config: dict[str, Any] = field(default_factory=dict)
    device: str = ""
    compute_dtype: str = ""
    resume: bool = False
    estimate_peak_bytes: int | None = None  # the fit estimate for this run; None when config.json is unreadable


@dataclass(kw_only=True)
class DataReady(Event):
    """The data is read: rows for training and validation, skipped and truncated rows, the run's total steps;
    rows marked label: false (never trained on); each source's report ({file, format, rows, bad_rows, columns,
    ratio, used_rows, notice, …}); notices such as preference pairs trained on their chosen answers only."""

    kind: ClassVar[str] = "data_ready"
    train_rows: int
    val_rows: int
    total_steps: int
    skipped_rows: int = 0
    truncated_rows: int = 0
    format: str = ""
    detected_format: str = ""
    mean_tokens: float = 0.0
    max_tokens: int = 0
    bad_rows: list[dict[str, Any]] = field(default_factory=list)  # {file, line, reason}, the first 200 per file
    not_target_rows: int = 0
    sources: list[dict[str, Any]] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class ModelLoaded(Event):
    """The 4-bit model with its adapter is ready: parameters in all and trained."""

    kind: ClassVar[str] = "model_loaded"
    model: str
    params: int
    trainable_params: int
    path: str = ""
    source: str = ""
    load_s: float = 0.0
    vram: dict[str, int] = field(default_factory=dict)


@dataclass(kw_only=True)
class Step(Event):
    """One optimizer step: loss, learning rate, gradient norm, tokens/s, time left and memory; `vram` (CUDA only)
    holds allocated, reserved, max_allocated, max_reserved (this process), gpu_used, gpu_total (the GPU), in bytes."""

    kind: ClassVar[str] = "step"
    step: int
    total_steps: int
    loss: float
    lr: float
    grad_norm: float = 0.0
    epoch: float = 0.0
    tokens_per_s: float = 0.0
    eta_s: float = 0.0
    vram: dict[str, int] = field(default_factory=dict)
    skipped_steps: int = 0  # fp16: steps so far whose gradients overflowed, skipped by the loss scaler
    # several processes (nproc > 1): each rank's memory, rank 0 first; CUDA: max_reserved, gpu_used, gpu_total;
    # CPU: max_rss (the process's peak resident bytes). Empty for one process.
    rank_vram: list[dict[str, int]] = field(default_factory=list)


@dataclass(kw_only=True)
class FitCheck(Event):
    """The first step ran the run's largest micro-batches: its measured peak next to the estimate, and whether the
    rest of the run fits (no later step holds more tokens). CUDA measures bytes; on the CPU the verdict is
    'not measured'."""

    kind: ClassVar[str] = "fit_check"
    step: int
    tokens: int  # in the largest micro-batch, what activation memory grows with (padded rows count their padding)
    verdict: str  # fits, tight (within 10% of the memory the run has), not measured
    estimate_peak_bytes: int | None = None
    measured_peak_bytes: int | None = None  # this process's peak reserved memory after the step
    available_bytes: int | None = None  # reserved + free on the GPU: what the run has to itself


@dataclass(kw_only=True)
class Eval(Event):
    """Loss on the validation split; the one at step 0 is the base model's."""

    kind: ClassVar[str] = "eval"
    step: int
    eval_loss: float
    perplexity: float
    drift: float | None = None  # KL(base || tuned) per token on the base's own text, nats (training.drift)


@dataclass(kw_only=True)
class Checkpoint(Event):
    """A complete checkpoint was written (temp folder renamed) at this step, and which is the run's best so far.
    The best is the checkpoint with the lowest eval loss after training began, kept when older ones are pruned."""

    kind: ClassVar[str] = "checkpoint"
    step: int
    path: str
    best_step: int | None = None  # None: no evaluation after training began yet
    best_eval_loss: float | None = None


@dataclass(kw_only=True)
class Warning(Event):  # noqa: A001 (the protocol's word; never used as the builtin here)
    """Something the user should know that does not stop the run, such as where a resume started."""

    kind: ClassVar[str] = "warning"
    message: str
    step: int | None = None


@dataclass(kw_only=True)
class Error(Event):
    """What went wrong, in the user's words, and what to do. An out-of-memory error also carries what was measured
    when it struck (bytes) and the estimator's fixes ({description, config_changes})."""

    kind: ClassVar[str] = "error"
    code: str
    message: str
    advice: str = ""
    step: int | None = None
    peak_bytes: int | None = None
    reserved_bytes: int | None = None
    free_bytes: int | None = None
    gpu_total_bytes: int | None = None
    estimate_peak_bytes: int | None = None
    fixes: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_exception(cls, exc: EngineError) -> Error:
        return cls(code=exc.code, message=exc.message, advice=exc.advice, **exc.details)


@dataclass(kw_only=True)
class Stopped(Event):
    """The run stopped on request after this step, with the checkpoint to resume from."""

    kind: ClassVar[str] = "stopped"
    step: int
    checkpoint: str = ""


@dataclass(kw_only=True)
class Comparison(Event):
    """Base and tuned answers to held-out questions: rows of {question, base, tuned, base_correct, tuned_correct}
    (correct is None where the question has no keywords to score by)."""

    kind: ClassVar[str] = "comparison"
    rows: list[dict[str, Any]]
    base_accuracy: float | None = None
    tuned_accuracy: float | None = None
    drift: float | None = None  # the tuned model's KL from the base on the base's own text (as in `eval`)


@dataclass(kw_only=True)
class Finished(Event):
    """The run is done: the final adapter's folder, the last training and evaluation loss, how long it took."""

    kind: ClassVar[str] = "finished"
    step: int
    adapter_dir: str
    final_loss: float | None = None
    eval_loss: float | None = None
    duration_s: float | None = None
    drift: float | None = None  # the last evaluation's drift from the base (as in `eval`)


# ----------------------------------------------------------------------------- export and chat commands
@dataclass(kw_only=True)
class ExportProgress(Event):
    """An export's stage and how far it is (0 to 1)."""

    kind: ClassVar[str] = "export_progress"
    stage: str
    fraction: float


@dataclass(kw_only=True)
class Exported(Event):
    """An export written and reloaded by the tool that will use it, compared with the trained model."""

    kind: ClassVar[str] = "exported"
    export: str  # adapter or merged
    path: str
    max_abs_logit_diff: float
    relative_l2: float
    top1_agreement: float
    tolerance: str
    ok: bool


@dataclass(kw_only=True)
class GgufExported(Event):
    """A GGUF file written, loaded by llama.cpp and checked against the merged model: greedy answers (first 16 tokens),
    perplexity, chat template, EOS and end-of-turn token; `ok` false means it was not kept (`problems` say why)."""

    kind: ClassVar[str] = "gguf_exported"
    path: str
    quant: str  # f16, bf16, q8_0, q6_k, q5_k_m, q4_k_m
    size_bytes: int
    prompts: int
    greedy_agreement: float  # share of prompts whose first 16 greedy tokens equal the merged model's (near ties too)
    near_ties: int = 0  # of those, answers that left the merged model's where its top two logits were within 0.1
    required_agreement: float | None = None  # f16 / bf16 / q8_0 must reach it; lower quantizations report only
    ended_with_end_of_turn: float = 0.0  # share of answers ending with the end-of-turn token within 96 tokens
    merged_ended_with_end_of_turn: float = 0.0
    tokenized_alike: float = 0.0  # share of prompts llama.cpp tokenizes exactly as the tokenizer does
    perplexity: float | None = None  # on the run's validation rows
    merged_perplexity: float | None = None
    chat_template_ok: bool = False
    eos_token_id: int = -1
    end_of_turn_id: int = -1
    stops_at_end_of_turn: bool = False  # llama.cpp counts the end-of-turn token as end of generation
    accuracy: float | None = None  # held-out questions answered right (the sample set), by llama.cpp
    merged_accuracy: float | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)  # {question, merged, gguf, merged_correct, gguf_correct}
    problems: list[str] = field(default_factory=list)
    modelfile: str = ""  # the Ollama Modelfile beside it
    ollama_command: str = ""
    lm_studio_path: str = ""
    base_path: str = ""  # for a GGUF LoRA (`path`): the base model's GGUF it was checked on
    ok: bool


@dataclass(kw_only=True)
class ChatReady(Event):
    """`chat --serve` loaded the model (and adapter): prompts can be sent."""

    kind: ClassVar[str] = "chat_ready"
    target: str
    has_adapter: bool
    device: str = ""
    checkpoint: str = ""  # the adapter loaded: final or step-N (--checkpoint); empty without an adapter


@dataclass(kw_only=True)
class ChatToken(Event):
    """A piece of an answer as it is generated, from the base or the tuned model."""

    kind: ClassVar[str] = "chat_token"
    model: str  # base or tuned
    text: str


@dataclass(kw_only=True)
class ChatDone(Event):
    """One model's whole answer to the prompt."""

    kind: ClassVar[str] = "chat_done"
    model: str
    text: str


# ----------------------------------------------------------------------------- downloads from the Hub
@dataclass(kw_only=True)
class DownloadProgress(Event):
    """A Hub download's progress: the file being fetched and its bytes, and the bytes of the whole model so far."""

    kind: ClassVar[str] = "download_progress"
    repo_id: str
    file: str
    file_bytes: int
    file_total_bytes: int
    bytes: int  # of every file this download fetches (those already in the cache not counted)
    total_bytes: int


@dataclass(kw_only=True)
class Downloaded(Event):
    """A Hub model is complete in the HF cache: its commit, the snapshot folder, what was fetched now."""

    kind: ClassVar[str] = "downloaded"
    repo_id: str
    revision: str
    commit: str
    path: str
    files: list[str] = field(default_factory=list)
    downloaded_bytes: int = 0  # 0 when everything was in the cache already
    total_bytes: int = 0  # the training files' size, cached or not


@dataclass(kw_only=True)
class UnknownEvent(Event):
    """A line that looked like an event but this version can't read: a newer kind or version, or missing fields.
    Readers log it and go on."""

    kind: ClassVar[str] = "unknown"
    raw_kind: str = ""
    version: Any = None
    reason: str = ""
    fields: dict[str, Any] = field(default_factory=dict)


EVENT_TYPES: dict[str, type[Event]] = {cls.kind: cls for cls in (
    Started, DataReady, ModelLoaded, Step, FitCheck, Eval, Checkpoint, Warning, Error, Stopped, Comparison, Finished,
    ExportProgress, Exported, GgufExported, ChatReady, ChatToken, ChatDone, DownloadProgress, Downloaded)}
KINDS = tuple(EVENT_TYPES)


def event_fields(kind: str) -> dict[str, bool]:
    """The fields of an event kind and whether each is required: the schema the contract tests hold both the real
    and the fake engine to."""
    return {f.name: f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            for f in dataclasses.fields(EVENT_TYPES[kind]) if f.name != "t"}


def event_from_dict(values: dict[str, Any]) -> Event:
    """The typed event for a decoded line; an UnknownEvent (never an exception) when it can't be read. Fields a newer
    engine added are dropped; a newer version is read as far as its fields are known."""
    kind, version = values.get("kind"), values.get("v")
    fields_in = {k: v for k, v in values.items() if k not in ("v", "kind")}
    cls = EVENT_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None or not isinstance(version, int) or version < 1:
        reason = f"unknown event kind {kind!r}" if cls is None else f"unreadable protocol version {version!r}"
        return UnknownEvent(raw_kind=str(kind), version=version, reason=reason, fields=fields_in)
    known = {f.name for f in dataclasses.fields(cls)}
    missing = [name for name, required in event_fields(kind).items() if required and name not in fields_in]
    if missing:
        return UnknownEvent(raw_kind=kind, version=version, reason=f"{kind} without {', '.join(missing)}",
                            fields=fields_in)
    if version > PROTOCOL_VERSION:
        logging.getLogger(__name__).info("a %s event of protocol version %d (this is %d): read as far as its fields "
                                         "are known", kind, version, PROTOCOL_VERSION)
    kept = {k: v for k, v in fields_in.items() if k in known}
    if not isinstance(kept.get("t", 0.0), (int, float)):
        kept.pop("t")
    return cls(**kept)


def parse_line(line: str) -> Event | None:
    """The event on this line, or None when the line is plain log text (not a JSON object with a kind)."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        values = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(values, dict) or "kind" not in values or "v" not in values:
        return None
    return event_from_dict(values)


def read_events(path: Path) -> Iterator[Event]:
    """The events of a run's events.jsonl, unknown ones skipped; a line cut short by a kill is skipped."""
    if not path.exists():
        return
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            event = parse_line(line)
            if isinstance(event, UnknownEvent):  # tolerated: logged, never a crash
                logging.getLogger(__name__).warning("%s: %s", path, event.reason)
            elif event is not None:
                yield event


# ----------------------------------------------------------------------------- writing
class EventWriter:
    """Writes events to a stream (stdout by default) and appends them to the run's events.jsonl."""

    def __init__(self, log_path: Path | None = None, stream: IO[str] | None = sys.stdout,
                 human: bool = False) -> None:
        self.log_path = log_path
        self.stream = stream
        self.human = human
        self._log: IO[str] | None = None
        self.last_of_kind: dict[str, Event] = {}  # e.g. the last `step`, to say where a failure hit
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(log_path, "a", encoding="utf-8")
            if self._log.tell() and not _ends_with_newline(log_path):  # a line cut short by a kill
                self._log.write("\n")

    def emit(self, event: Event) -> Event:
        if type(event) not in EVENT_TYPES.values():
            raise TypeError(f"not an event of the protocol: {event!r}")
        line = event.to_json()
        self.last_of_kind[event.kind] = event
        if self._log is not None:
            try:
                self._log.write(line + "\n")
                self._log.flush()
            except OSError:  # disk full or folder gone: the events still reach stdout, and the error is reported
                self._close_log_quietly()
        if self.stream is not None:
            try:
                self.stream.write((describe(event) if self.human else line) + "\n")
                self.stream.flush()
            except (BrokenPipeError, OSError, ValueError):
                # The reader went away (the GUI closed and left the run going): keep training and
                # keep writing events.jsonl, which is how a reopened window follows the run.
                self.stream = None
        return event

    def close(self) -> None:
        if self._log is not None:
            try:
                self._log.close()
            except OSError:  # its buffer could not be written (disk full); nothing more to do
                pass
            self._log = None

    def _close_log_quietly(self) -> None:
        log, self._log = self._log, None
        try:
            log.close()
        except OSError:
            pass


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(-1, 2)
        return handle.read(1) == b"\n"


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


# ----------------------------------------------------------------------------- reading aloud
def describe(event: Event) -> str:
    """One human line for an event (the CLI's --events human mode, the GUI's log view)."""
    if isinstance(event, Step):
        parts = [f"step {event.step}/{event.total_steps}", f"loss {event.loss:.4f}", f"lr {event.lr:.2e}",
                 f"grad_norm {event.grad_norm:.3f}", f"{event.tokens_per_s:.0f} tok/s"]
        if event.vram.get("max_allocated"):
            parts.append(f"peak {event.vram['max_allocated'] / 2**30:.2f} GiB")
        if event.skipped_steps:
            parts.append(f"{event.skipped_steps} skipped (fp16 overflow)")
        return "  ".join(parts)
    if isinstance(event, FitCheck):
        return describe_fit_check(event)
    if isinstance(event, Eval):
        moved = f"  drift {event.drift:.4f}" if event.drift is not None else ""
        return f"eval at step {event.step}: loss {event.eval_loss:.4f}  perplexity {event.perplexity:.2f}{moved}"
    if isinstance(event, Finished):
        return _describe_finished(event)
    if isinstance(event, Comparison):
        return _describe_comparison(event)
    if isinstance(event, Started):
        return f"started: {event.run_dir} on {event.device} ({event.compute_dtype})"
    if isinstance(event, Error):
        return f"ERROR [{event.code}] {event.message}\n  what to do: {event.advice}"
    if isinstance(event, GgufExported):
        return _describe_gguf(event)
    if isinstance(event, DataReady):
        return _describe_data(event)
    if isinstance(event, Warning):
        return f"warning: {event.message}"
    if isinstance(event, Checkpoint):
        best = (" (the best so far)" if event.best_step == event.step else
                f" (the best so far: step-{event.best_step})" if event.best_step else "")
        return f"checkpoint step-{event.step}{best}: {event.path}"
    if isinstance(event, ModelLoaded):
        return (f"model loaded: {event.model} ({event.params / 1e6:.1f} M parameters, "
                f"{event.trainable_params / 1e6:.2f} M trained)")
    rest = {k: v for k, v in event.to_dict().items() if k not in ("v", "t", "kind")}
    return f"{event.kind}: " + ", ".join(f"{k}={v}" for k, v in rest.items())


def _describe_data(event: DataReady) -> str:
    """'data: 238 rows to train on, 26 to validate (alpaca), 40 steps; ...' then one line per notice and per bad row
    (the first five), and each source's rows where there are several."""
    shape = event.format + (f", detected {event.detected_format}" if event.detected_format not in ("", event.format)
                            else "")
    counts = [f"{n} {what}" for n, what in ((event.skipped_rows, "skipped"), (event.truncated_rows, "truncated"),
                                             (event.not_target_rows, "not trained on (label false)")) if n]
    lines = [f"data: {event.train_rows} rows to train on, {event.val_rows} to validate ({shape}), "
             f"{event.total_steps} steps; {event.mean_tokens:.0f} tokens a row on average, {event.max_tokens} at most"
             + (f"; {', '.join(counts)}" if counts else "")]
    if len(event.sources) > 1:
        lines += [f"  {source.get('file')}: {source.get('used_rows', source.get('rows'))} rows "
                  f"({source.get('format')})" for source in event.sources]
    lines += [f"  note: {notice}" for notice in event.notices]
    lines += [f"  bad row {row.get('file', '')}:{row.get('line')}: {row.get('reason')}" for row in event.bad_rows[:5]]
    return "\n".join(lines)


def _describe_gguf(event: GgufExported) -> str:
    required = f" (needs {event.required_agreement:.0%})" if event.required_agreement is not None else ""
    parts = [f"gguf {event.quant}: {'kept' if event.ok else 'NOT kept'} {event.path}",
             f"same first 16 greedy tokens on {event.greedy_agreement:.0%} of {event.prompts} prompts{required}"
             + (f" ({event.near_ties} at a near tie of the merged model's top two)" if event.near_ties else ""),
             f"ended with end-of-turn {event.ended_with_end_of_turn:.0%} (merged "
             f"{event.merged_ended_with_end_of_turn:.0%})"]
    if event.perplexity is not None and event.merged_perplexity is not None:
        parts.append(f"perplexity {event.perplexity:.4g} (merged {event.merged_perplexity:.4g})")
    if event.problems:
        parts.append("problems: " + "; ".join(event.problems))
    return "\n  ".join(parts)


def describe_fit_check(event: FitCheck) -> str:
    """'fit check (step 1, the largest batch: 412 tokens): measured 5.10 GiB, estimate 5.40 GiB, of 23.60 GiB: fits'"""
    def gib(n_bytes: int | None) -> str:
        return "?" if n_bytes is None else f"{n_bytes / 2**30:.2f} GiB"

    head = f"fit check (step {event.step}, the run's largest batch: {event.tokens:,} tokens)"
    if event.measured_peak_bytes is None:
        return f"{head}: {event.verdict} (GPU memory is measured on CUDA only)"
    return (f"{head}: measured {gib(event.measured_peak_bytes)}, estimate {gib(event.estimate_peak_bytes)}, "
            f"of {gib(event.available_bytes)}: {event.verdict}")


def describe_drift(drift: float) -> str:
    """'drift from the base 0.118 nats/token (the base's own text 1.13x as surprising to it)'"""
    return (f"drift from the base {drift:.3f} nats/token (the base's own text {math.exp(min(drift, 50)):.2f}x as "
            f"surprising to it)")


def _describe_finished(event: Finished) -> str:
    parts = [f"finished at step {event.step}" + (f" in {event.duration_s:.0f} s" if event.duration_s else "")]
    if event.final_loss is not None:
        parts.append(f"loss {event.final_loss:.4f}")
    if event.eval_loss is not None:
        parts.append(f"eval loss {event.eval_loss:.4f}")
    if event.drift is not None:
        parts.append(describe_drift(event.drift))
    return ", ".join(parts) + f"\n  adapter: {event.adapter_dir}"


def _describe_comparison(event: Comparison) -> str:
    lines = ["", "Before / after on held-out questions:"]
    for row in event.rows:
        marks = {True: "right", False: "wrong", None: ""}
        lines += [f"Q: {row['question']}",
                  f"   base  [{marks[row['base_correct']]}]: {row['base'][:160]}",
                  f"   tuned [{marks[row['tuned_correct']]}]: {row['tuned'][:160]}"]
    if event.base_accuracy is not None:
        lines.append(f"Correct: base {event.base_accuracy:.0%}, tuned {event.tuned_accuracy:.0%} "
                     f"of {len(event.rows)} held-out questions")
    if event.drift is not None:
        lines.append(f"Everything else: {describe_drift(event.drift)}; 0 is the base itself")
    return "\n".join(lines)


def events_markdown() -> str:
    """The README's event table, generated from the event types (a test keeps the README in step)."""
    lines = ["| kind | fields (`?`: may be absent or null) | what it says |", "|---|---|---|"]
    for kind, cls in EVENT_TYPES.items():
        fields = ", ".join(f"`{name}`" + ("" if required else "?") for name, required in event_fields(kind).items())
        summary = " ".join((cls.__doc__ or "").split()).split(". ")[0].rstrip(".") + "."
        lines.append(f"| `{kind}` | {fields} | {summary} |")
    return "\n".join(lines) + "\n"
