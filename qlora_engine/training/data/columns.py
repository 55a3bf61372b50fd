"""Column mapping: a file's own column names put onto the fields of a row shape (`columns: {instruction: question,
output: answer}`), and a mapping suggested from the names datasets commonly use when no shape is detected.

Not here: the shapes themselves (formats.py).
"""
from __future__ import annotations

from typing import Any

from qlora_engine.training.data.formats import detect_format

FIELDS = ("instruction", "input", "output", "system", "prompt", "completion", "text", "messages", "conversations",
          "chosen", "rejected", "label", "tools")
# The names other datasets give a question and an answer, most telling first (Dolly's context is alpaca's input).
QUESTION_NAMES = ("question", "query", "problem", "prompt", "request", "instruction_text", "inputs", "input",
                  "source", "human", "user")
ANSWER_NAMES = ("answer", "response", "output", "target", "targets", "completion", "solution", "reply",
                "assistant", "gpt", "answers")
CONTEXT_NAMES = ("context", "input", "passage", "document")
SYSTEM_NAMES = ("system_prompt", "system_message")


def apply_columns(record: Any, columns: dict[str, str]) -> Any:
    """The record with each mapped column renamed to its field (columns the record lacks are left alone)."""
    if not columns or not isinstance(record, dict):
        return record
    renamed = dict(record)
    for target, column in columns.items():
        if column in record and column != target:
            renamed[target] = renamed.pop(column)
    return renamed


def suggest_columns(names: list[str]) -> dict[str, str]:
    """{field: column} that makes rows with these columns an alpaca row; {} when they already are a shape or
    nothing fits. Names are compared without case."""
    if detect_format(dict.fromkeys(names)) is not None:
        return {}
    by_lower = {name.strip().lower(): name for name in names}
    answer = _first(by_lower, ANSWER_NAMES)
    question = by_lower.get("instruction") or _first(by_lower, tuple(n for n in QUESTION_NAMES
                                                                     if by_lower.get(n) != answer))
    if answer is None or question is None:
        return {}
    mapping = {"instruction": question, "output": answer}
    context = _first(by_lower, tuple(n for n in CONTEXT_NAMES if by_lower.get(n) not in (question, answer)))
    if context is not None:
        mapping["input"] = context
    system = _first(by_lower, SYSTEM_NAMES)
    if system is not None:
        mapping["system"] = system
    return {target: column for target, column in mapping.items() if target != column}


def _first(by_lower: dict[str, str], candidates: tuple[str, ...]) -> str | None:
    return next((by_lower[name] for name in candidates if name in by_lower), None)


def record_columns(records: list[tuple[int, Any]]) -> list[str]:
    """The column names of a file, in the order first seen (the first 200 rows)."""
    names: dict[str, None] = {}
    for _, record in records[:200]:
        if isinstance(record, dict):
            names.update(dict.fromkeys(str(key) for key in record))
    return list(names)
