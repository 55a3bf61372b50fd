"""Whole sources into training examples: read, map columns, detect the shape, validate, tokenize and mask each row
(a report per source), mix several sources by their ratios, hold out a validation split, and the preview.

Not here: how rows are read (sources.py), shaped (formats.py) or rendered (templates.py).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_engine.protocol.errors import EngineError
from qlora_engine.training.data.columns import apply_columns, record_columns, suggest_columns
from qlora_engine.training.data.formats import detect_format, detect_majority_format, normalize
from qlora_engine.training.data.report import BadRow, DataReport
from qlora_engine.training.data.sources import read_records
from qlora_engine.training.data.templates import Tokenized, tokenize
from qlora_engine.training.data.turns import NotATarget, RowError


@dataclass
class PreparedData:
    examples: list[Tokenized]
    report: DataReport


@dataclass
class PreparedMix:
    """The training rows of several sources mixed by ratio, with each source's own report (in the given order)."""

    examples: list[Tokenized]
    parts: list[PreparedData]

    @property
    def reports(self) -> list[DataReport]:
        return [part.report for part in self.parts]


def source_name(path: Path | str) -> str:
    """How reports name a source: a file or folder by its name, a Hub dataset by its id."""
    path = Path(path)
    return path.name if path.exists() else path.as_posix()


def prepare_file(path: Path | str, tokenizer: Any, *, data_format: str, max_length: int, train_on_prompt: bool,
                 bad_rows: str = "skip", columns: dict[str, str] | None = None) -> PreparedData:
    """Read, validate and tokenize one source; raises EngineError when bad rows must stop the run."""
    records, unreadable = read_records(path)
    name = source_name(path)
    names = record_columns(records)
    mapping, suggested = columns_for(names, columns or {})
    if mapping:
        records = [(line, apply_columns(record, mapping)) for line, record in records]
    detected = detect_majority_format(records)
    chosen = detected if data_format == "auto" else data_format
    if chosen is None:
        raise EngineError("bad_dataset", f"{path}: could not detect the row format (fields: {', '.join(names[:8])})",
                          "Rows need instruction/output (alpaca), messages or conversations (chat), "
                          "prompt/completion, prompt/chosen/rejected (preference), or text. Map the columns "
                          "(columns: {instruction: QUESTION_COLUMN, output: ANSWER_COLUMN}) or pick the format.")
    report = DataReport(name, detected or "unknown", chosen, rows=len(records) + len(unreadable),
                        bad_rows=list(unreadable), columns=mapping, columns_suggested=suggested,
                        source_columns=names)
    examples = []
    for line, record in records:
        try:
            tokenized = tokenize(normalize(record, chosen, line), tokenizer, max_length, train_on_prompt)
        except NotATarget:
            report.not_target_rows += 1
            continue
        except RowError as exc:
            report.bad_rows.append(BadRow(name, line, _with_columns(str(exc), mapping)))
            continue
        report.truncated_rows += tokenized.truncated
        if not any(tokenized.trained_token_mask[1:]):
            report.no_trained_tokens_rows += 1
            continue
        examples.append(tokenized)
    report.bad_rows.sort(key=lambda bad: bad.line)
    report.used_rows = len(examples)
    _check_outcome(path, report, examples, bad_rows)
    return PreparedData(examples, report)


def columns_for(names: list[str], columns: dict[str, str]) -> tuple[dict[str, str], bool]:
    """The mapping used for a source with these columns: the given one where its columns are there, else one
    suggested from common names (flagged as suggested) when the columns are no known shape."""
    given = {target: column for target, column in columns.items() if column in names}
    if given:
        return given, False
    if detect_format(dict.fromkeys(names)) is None:
        suggested = suggest_columns(names)
        return suggested, bool(suggested)
    return {}, False


def _with_columns(reason: str, mapping: dict[str, str]) -> str:
    """A reason that names a mapped field also names the file's column: "missing field 'output' (column 'answer')"."""
    named = [f"column '{column}'" for target, column in mapping.items() if f"'{target}'" in reason]
    return f"{reason} ({', '.join(named)})" if named else reason


def _check_outcome(path: Path | str, report: DataReport, examples: list[Tokenized], bad_rows: str) -> None:
    if report.bad_rows and bad_rows == "stop":
        first = "; ".join(bad.describe() for bad in report.bad_rows[:3])
        raise EngineError("bad_dataset", f"{len(report.bad_rows)} bad row(s): {first}",
                          "Fix these rows, or set bad_rows: skip to train without them.")
    if not examples:
        detail = f" First problem: {report.bad_rows[0].describe()}." if report.bad_rows else ""
        if report.not_target_rows:
            detail += f" {report.not_target_rows} row(s) are marked label: false (never trained on)."
        if report.no_trained_tokens_rows:
            detail += f" {report.no_trained_tokens_rows} row(s) had no response tokens left after truncation."
        raise EngineError("bad_dataset", f"{path}: no usable rows out of {report.rows}.{detail}",
                          f"Check the format ({report.format}) and the fields of the rows, or raise max_length.")


# ----------------------------------------------------------------------------- several sources
def mix_ratios(extra: list[float], where: str = "data_mix") -> list[float]:
    """The first source's share is what the others leave: [0.3] -> [0.7, 0.3]."""
    if any(not 0 < ratio < 1 for ratio in extra) or sum(extra) >= 1:
        raise EngineError("bad_config", f"{where}: each ratio must be between 0 and 1 and together below 1 (the "
                          f"main data gets the rest), got {', '.join(f'{r:g}' for r in extra)}",
                          "Write it as {general.jsonl: 0.3}: 30% of the training rows from general.jsonl, 70% "
                          "from data.")
    return [1 - sum(extra), *extra]


def prepare_mix(sources: list[tuple[Path | str, float]], tokenizer: Any, *, seed: int,
                **options: Any) -> PreparedMix:
    """Each source prepared on its own (its own report), then mixed so that each gives its ratio of the rows:
    the source that runs out first is used whole, the others are sampled (seeded) down to their share."""
    parts = [prepare_file(path, tokenizer, **options) for path, _ in sources]
    ratios = [ratio for _, ratio in sources]
    if len(parts) == 1:
        parts[0].report.ratio = 1.0
        return PreparedMix(parts[0].examples, parts)
    total = min(len(part.examples) / ratio for part, ratio in zip(parts, ratios))
    examples: list[Tokenized] = []
    for index, (part, ratio) in enumerate(zip(parts, ratios)):
        count = min(len(part.examples), max(1, round(total * ratio)))
        chosen = sorted(random.Random(seed + index).sample(range(len(part.examples)), count))
        examples += [part.examples[i] for i in chosen]
        part.report.ratio, part.report.used_rows = ratio, count
    return PreparedMix(examples, parts)


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
