"""Training data: reading files, detecting the row format, templating, label masking, the validation report.

A row becomes a conversation (list of role/content messages) or plain text, then token ids plus a
trained-token mask. Reading is line-exact so that every bad row is reported by its line number.
"""
from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlora_engine.protocol.errors import EngineError
from qlora_engine.training.end_of_turn import turn_end_text

FORMATS = ("alpaca", "chat", "prompt_completion", "text")
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "model": "assistant"}
PLAIN_TEMPLATE_USER = "### Instruction:\n{content}\n\n### Response:\n"
CHARS_PER_TOKEN_BOUND = 64


class RowError(ValueError):
    """Why one row can't be used; it becomes a BadRow report next to the row's line number."""


@dataclass
class BadRow:
    file: str
    line: int
    reason: str

    def describe(self) -> str:
        return f"{self.file} line {self.line}: {self.reason}"


@dataclass
class Example:
    """One valid row, normalized: a conversation, or plain text for the `text` format."""

    line: int
    messages: list[dict[str, str]] | None = None
    text: str | None = None


@dataclass
class Tokenized:
    input_ids: list[int]
    trained_token_mask: list[bool]
    line: int
    truncated: bool = False


@dataclass
class DataReport:
    file: str
    detected_format: str
    format: str
    rows: int = 0
    bad_rows: list[BadRow] = field(default_factory=list)
    truncated_rows: int = 0
    no_trained_tokens_rows: int = 0

    @property
    def valid_rows(self) -> int:
        return self.rows - len(self.bad_rows)


# ----------------------------------------------------------------------------- reading files
def read_records(path: Path) -> tuple[list[tuple[int, Any]], list[BadRow]]:
    """(line number, parsed record) for every row, plus the rows that could not be read at all."""
    if not path.is_file():
        raise EngineError("bad_dataset", f"data file {path} does not exist", "Check the path of the data file.")
    if path.suffix.lower() not in SUFFIXES:
        raise EngineError("bad_dataset", f"{path}: unsupported file type '{path.suffix}'",
                          f"Use one of {', '.join(SUFFIXES)}.")
    if path.stat().st_size == 0:
        raise EngineError("bad_dataset", f"{path} is empty", "Put at least a few rows of training data in it.")
    suffix = path.suffix.lower()
    if suffix == ".jsonl" or (suffix == ".json" and _looks_like_json_lines(path)):
        return _read_json_lines(path)
    if suffix == ".json":
        return _read_json_array(path)
    if suffix == ".txt":
        return _read_text_lines(path)
    if suffix == ".csv":
        return _read_csv(path)
    return _read_parquet(path)


def _looks_like_json_lines(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(4096).lstrip()
    return head.startswith(b"{")


def _read_json_lines(path: Path) -> tuple[list[tuple[int, Any]], list[BadRow]]:
    records, bad = [], []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                bad.append(BadRow(path.name, number, f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                                                      f"{exc.start + 1})"))
                continue
            try:
                records.append((number, json.loads(text)))
            except (ValueError, RecursionError) as exc:
                bad.append(BadRow(path.name, number, f"not valid JSON ({_json_problem(exc)})"))
    return records, bad


def _json_problem(exc: ValueError | RecursionError) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at column {exc.colno}"
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc).split(":")[0]  # "Exceeds the limit (4300 digits) for integer string conversion"


def _read_json_array(path: Path) -> tuple[list[tuple[int, Any]], list[BadRow]]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise EngineError("bad_dataset", f"{path}: not UTF-8 text (byte offset {exc.start})",
                          "Save the file as UTF-8.") from exc
    except json.JSONDecodeError as exc:
        raise EngineError("bad_dataset", f"{path} line {exc.lineno}: not valid JSON ({exc.msg})",
                          "Fix the JSON at that line, or save the data as .jsonl (one row per line).") from exc
    except (ValueError, RecursionError) as exc:
        raise EngineError("bad_dataset", f"{path}: not valid JSON ({_json_problem(exc)})",
                          "Fix the JSON, or save the data as .jsonl (one row per line) to see the line.") from exc
    if not isinstance(data, list):
        raise EngineError("bad_dataset", f"{path}: expected a JSON list of rows, got {type(data).__name__}",
                          "Put the rows in a top-level list [ {...}, {...} ].")
    # A JSON array has no per-row line numbers that survive reformatting; report the row's position.
    return [(index, item) for index, item in enumerate(data, start=1)], []


def _read_text_lines(path: Path) -> tuple[list[tuple[int, Any]], list[BadRow]]:
    records, bad = [], []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                bad.append(BadRow(path.name, number, f"not UTF-8 text (byte 0x{raw[exc.start]:02x})"))
                continue
            if text.strip():
                records.append((number, {"text": text}))
    return records, bad


def _read_csv(path: Path) -> tuple[list[tuple[int, Any]], list[BadRow]]:
    """CSV rows by the line they start on (a quoted field may span lines); a row with broken quoting, the wrong
    number of fields or bytes that are not UTF-8 is a bad row. An empty cell counts as a missing field."""
    undecodable: dict[int, str] = {}

    def decoded_lines() -> Iterator[str]:
        for number, raw in enumerate(path.read_bytes().splitlines(keepends=True), start=1):
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                undecodable[number] = f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"
                yield raw.decode("utf-8", errors="replace")

    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # a row may be megabytes long: it is truncated later
    reader = csv.reader(decoded_lines(), strict=True)  # strict: a stray quote is an error, not a silent merge
    header = [name.lstrip("\ufeff").strip() for name in next(reader, [])]
    records, bad = [], []
    while True:
        first_line = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            runs_on = f" (the row runs on to line {reader.line_num})" if reader.line_num > first_line else ""
            bad.append(BadRow(path.name, first_line, f"broken CSV quoting: {exc}{runs_on}"))
            continue
        lines = range(first_line, reader.line_num + 1)
        problem = next((undecodable[n] for n in lines if n in undecodable), None)
        if problem is None and len(fields) != len(header) and any(field.strip() for field in fields):
            problem = f"{len(fields)} field(s), but the header has {len(header)}"
        if problem:
            bad.append(BadRow(path.name, first_line, problem))
        elif any(field.strip() for field in fields):  # blank lines are skipped
            records.append((first_line, {name: value or None for name, value in zip(header, fields)}))
    return records, bad


def _read_parquet(path: Path) -> tuple[list[tuple[int, Any]], list[BadRow]]:
    """Parquet rows through `datasets`, numbered from 1 (a binary file has no lines)."""
    import datasets

    datasets.disable_progress_bars()
    try:
        table = datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
    except Exception as exc:  # pyarrow's many error types: the file is not readable parquet
        raise EngineError("bad_dataset", f"{path}: could not be read as parquet ({exc})",
                          "Export the file again, or save the data as .jsonl or .csv.") from exc
    return [(index, row) for index, row in enumerate(table, start=1)], []


# ----------------------------------------------------------------------------- formats
def detect_format(record: Any) -> str | None:
    if not isinstance(record, dict):
        return None
    keys = set(record)
    if "messages" in keys or "conversations" in keys:
        return "chat"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    return None


def detect_majority_format(records: list[tuple[int, Any]]) -> str | None:
    counts: dict[str, int] = {}
    for _, record in records[:200]:
        found = detect_format(record)
        if found:
            counts[found] = counts.get(found, 0) + 1
    return max(counts, key=counts.get) if counts else None


def normalize(record: Any, data_format: str, line: int) -> Example:
    """The row as an Example, or RowError with a reason a person can act on."""
    if not isinstance(record, dict):
        raise RowError(f"expected an object with fields, got {type(record).__name__}")
    if data_format == "text":
        return Example(line, text=_text_field(record, "text"))
    if data_format == "alpaca":
        instruction = _text_field(record, "instruction")
        context = _text_field(record, "input", required=False)
        user = f"{instruction}\n\n{context}" if context.strip() else instruction
        messages = [{"role": "user", "content": user},
                    {"role": "assistant", "content": _text_field(record, "output", response=True)}]
        system = _text_field(record, "system", required=False)
        return Example(line, messages=([{"role": "system", "content": system}] if system.strip() else []) + messages)
    if data_format == "prompt_completion":
        return Example(line, messages=[{"role": "user", "content": _text_field(record, "prompt")},
                                       {"role": "assistant", "content": _text_field(record, "completion",
                                                                                    response=True)}])
    if data_format == "chat":
        return Example(line, messages=_chat_messages(record))
    raise RowError(f"unknown format {data_format!r}")


def _text_field(record: dict, name: str, *, required: bool = True, response: bool = False) -> str:
    value = record.get(name)
    if value is None:
        if required:
            raise RowError(f"missing field '{name}'")
        return ""
    if not isinstance(value, str):
        raise RowError(f"field '{name}' must be text, got {type(value).__name__}")
    _check_encodable(value, f"field '{name}'")
    if required and not value.strip():
        raise RowError(f"empty {'response' if response else 'field'} '{name}'")
    return value


def _check_encodable(text: str, where: str) -> None:
    """JSON can carry a lone UTF-16 surrogate ("\\ud800"): no tokenizer can encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RowError(f"{where} holds an invalid character (a lone surrogate \\u{ord(text[exc.start]):04x} at "
                       f"character {exc.start + 1})") from None


def _chat_messages(record: dict) -> list[dict[str, str]]:
    if "messages" not in record and "conversations" not in record:
        raise RowError("missing field 'messages' (or ShareGPT 'conversations')")
    key = "messages" if "messages" in record else "conversations"
    turns = record.get(key)
    if not isinstance(turns, list) or not turns:
        raise RowError(f"field '{key}' must be a non-empty list of turns")
    messages = []
    for index, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise RowError(f"turn {index} of '{key}' must be an object")
        raw_role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        role = SHAREGPT_ROLES.get(raw_role) if isinstance(raw_role, str) else None
        if role is None:
            raise RowError(f"turn {index}: unknown role {raw_role!r} (expected user/assistant/system)")
        if not isinstance(content, str):
            raise RowError(f"turn {index}: content must be text, got {type(content).__name__}")
        _check_encodable(content, f"turn {index}")
        messages.append({"role": role, "content": content})
    answers = [m for m in messages if m["role"] == "assistant"]
    if not answers:
        raise RowError("no assistant turn to learn from")
    if not all(m["content"].strip() for m in answers):
        raise RowError("empty response in an assistant turn")
    return messages


# ----------------------------------------------------------------------------- templating and masking
def render(example: Example, tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    """The exact text the model sees and the character spans the loss is computed on."""
    if example.text is not None:
        text = (tokenizer.bos_token or "") + example.text + (tokenizer.eos_token or "")
        return text, [(len(tokenizer.bos_token or ""), len(text))]
    if getattr(tokenizer, "chat_template", None):
        return _render_chat_template(example.messages, tokenizer)
    return _render_plain(example.messages, tokenizer)


def _render_chat_template(messages: list[dict[str, str]], tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant" or index == 0:
            continue
        prefix = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if full.startswith(upto) and upto.startswith(prefix):
            spans.append((len(prefix), len(upto)))
        else:  # templates that rewrite earlier turns: fall back to finding the answer text itself
            start = full.find(message["content"], spans[-1][1] if spans else 0)
            if start >= 0:  # with the end-of-turn text after it, so the model learns to stop
                end = start + len(message["content"])
                closing = turn_end_text(tokenizer).strip()
                end += len(closing) if closing and full.startswith(closing, end) else 0
                spans.append((start, end))
    return full, spans


def _render_plain(messages: list[dict[str, str]], tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    text, spans = tokenizer.bos_token or "", []
    for message in messages:
        if message["role"] == "system":
            text += message["content"] + "\n\n"
        elif message["role"] == "user":
            text += PLAIN_TEMPLATE_USER.format(content=message["content"])
        else:
            start = len(text)
            text += message["content"] + (tokenizer.eos_token or "") + "\n\n"
            spans.append((start, len(text) - 2))
    return text, spans


def prompt_text(question: str, tokenizer: Any) -> str:
    """The text a user question becomes before generation, in the same template training used."""
    messages = [{"role": "user", "content": question}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return (tokenizer.bos_token or "") + PLAIN_TEMPLATE_USER.format(content=question)


def tokenize(example: Example, tokenizer: Any, max_length: int, train_on_prompt: bool) -> Tokenized:
    text, spans = render(example, tokenizer)
    # Only the first max_length tokens are kept, so a huge row (a 10 MB line takes ~20 s to tokenize whole) is cut
    # first, far beyond where those tokens end: tokens average far fewer than CHARS_PER_TOKEN_BOUND characters
    # (a pathological row of only very long tokens keeps fewer than max_length tokens, and is still truncated).
    cut = len(text) > max_length * CHARS_PER_TOKEN_BOUND
    if cut:
        text = text[: max_length * CHARS_PER_TOKEN_BOUND]
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    if train_on_prompt:
        mask = [True] * len(ids)
    else:
        mask = [any(start <= token_start < end for start, end in spans) for token_start, _ in offsets]
    truncated = cut or len(ids) > max_length
    return Tokenized(ids[:max_length], mask[:max_length], example.line, truncated)


# ----------------------------------------------------------------------------- whole files
@dataclass
class PreparedData:
    examples: list[Tokenized]
    report: DataReport


def prepare_file(path: Path, tokenizer: Any, *, data_format: str, max_length: int, train_on_prompt: bool,
                 bad_rows: str = "skip") -> PreparedData:
    """Read, validate and tokenize one file; raises EngineError when bad rows must stop the run."""
    records, unreadable = read_records(path)
    detected = detect_majority_format(records)
    chosen = detected if data_format == "auto" else data_format
    if chosen is None:
        keys = sorted(records[0][1])[:8] if records and isinstance(records[0][1], dict) else []
        raise EngineError("bad_dataset", f"{path}: could not detect the row format (fields: {', '.join(keys)})",
                          "Rows need instruction/output (alpaca), messages or conversations (chat), "
                          "prompt/completion, or text. Rename the columns or pick the format by hand.")
    report = DataReport(path.name, detected or "unknown", chosen, rows=len(records) + len(unreadable),
                        bad_rows=list(unreadable))
    examples = []
    for line, record in records:
        try:
            example = normalize(record, chosen, line)
        except RowError as exc:
            report.bad_rows.append(BadRow(path.name, line, str(exc)))
            continue
        tokenized = tokenize(example, tokenizer, max_length, train_on_prompt)
        report.truncated_rows += tokenized.truncated
        if not any(tokenized.trained_token_mask[1:]):
            report.no_trained_tokens_rows += 1
            continue
        examples.append(tokenized)
    report.bad_rows.sort(key=lambda bad: bad.line)
    _check_outcome(path, report, examples, bad_rows)
    return PreparedData(examples, report)


def _check_outcome(path: Path, report: DataReport, examples: list[Tokenized], bad_rows: str) -> None:
    if report.bad_rows and bad_rows == "stop":
        first = "; ".join(bad.describe() for bad in report.bad_rows[:3])
        raise EngineError("bad_dataset", f"{len(report.bad_rows)} bad row(s): {first}",
                          "Fix these rows, or set bad_rows: skip to train without them.")
    if not examples:
        detail = f" First problem: {report.bad_rows[0].describe()}." if report.bad_rows else ""
        if report.no_trained_tokens_rows:
            detail += f" {report.no_trained_tokens_rows} row(s) had no response tokens left after truncation."
        raise EngineError("bad_dataset", f"{path}: no usable rows out of {report.rows}.{detail}",
                          f"Check the format ({report.format}) and the fields of the rows, or raise max_length.")


def split_validation(examples: list[Tokenized], fraction: float, seed: int) -> tuple[list[Tokenized],
                                                                                       list[Tokenized]]:
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    count = min(max(1, round(len(examples) * fraction)), len(examples) - 1)
    held = set(order[:count])
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


def preview_segments(example: Tokenized, tokenizer: Any) -> list[dict[str, Any]]:
    """The row as runs of text with the trained flag: what the Data page highlights."""
    segments: list[dict[str, Any]] = []
    for token_id, trained in zip(example.input_ids, example.trained_token_mask):
        piece = tokenizer.decode([token_id])
        if segments and segments[-1]["trained"] == trained:
            segments[-1]["text"] += piece
        else:
            segments.append({"text": piece, "trained": trained})
    return segments
