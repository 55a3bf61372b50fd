"""Row shapes: detecting which one a file holds and reading a row of it into an Example (a conversation, or plain
text), with RowError naming what is wrong with a row.

Shapes: alpaca, chat (messages / ShareGPT conversations, tool use, content parts, per-turn weights),
prompt/completion (text or message lists; a KTO `label: false` row is never a target), preference
(prompt / chosen / rejected: SFT on the chosen answer) and text. Not here: column renaming (columns.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qlora_engine.protocol.config import DATA_FORMATS
from qlora_engine.training.data.turns import (
    NotATarget,
    RowError,
    check_answers,
    check_encodable,
    messages_of,
    tools_of,
)

FORMATS = DATA_FORMATS
LABEL_KEYS = ("label", "kto_tag")  # TRL's unpaired preference label, LLaMA-Factory's kto_tag


@dataclass
class Example:
    """One valid row, normalized: a conversation (with the row's tool schemas), or plain text for `text`."""

    line: int
    messages: list[dict[str, Any]] | None = None
    text: str | None = None
    tools: list[dict[str, Any]] | None = None


def detect_format(record: Any) -> str | None:
    if not isinstance(record, dict):
        return None
    keys = set(record)
    if "chosen" in keys and "rejected" in keys:
        return "preference"
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
    """The row as an Example; RowError with a reason a person can act on, NotATarget for a `label: false` row."""
    if not isinstance(record, dict):
        raise RowError(f"expected an object with fields, got {type(record).__name__}")
    if data_format == "text":
        return Example(line, text=text_field(record, "text"))
    if any(record.get(key) is False for key in LABEL_KEYS):
        raise NotATarget("marked as an undesirable answer (label: false): not trained on")
    readers = {"alpaca": _alpaca, "prompt_completion": _prompt_completion, "chat": _chat, "preference": _preference}
    if data_format not in readers:
        raise RowError(f"unknown format {data_format!r}")
    messages = readers[data_format](record)
    check_answers(messages)
    return Example(line, messages=messages, tools=tools_of(record.get("tools")))


def text_field(record: dict, name: str, *, required: bool = True, response: bool = False) -> str:
    value = record.get(name)
    if value is None:
        if required:
            raise RowError(f"missing field '{name}'")
        return ""
    if not isinstance(value, str):
        raise RowError(f"field '{name}' must be text, got {type(value).__name__}")
    check_encodable(value, f"field '{name}'")
    if required and not value.strip():
        raise RowError(f"empty {'response' if response else 'field'} '{name}'")
    return value


def _system(record: dict) -> list[dict[str, Any]]:
    system = text_field(record, "system", required=False)
    return [{"role": "system", "content": system}] if system.strip() else []


def _alpaca(record: dict) -> list[dict[str, Any]]:
    instruction = text_field(record, "instruction")
    context = text_field(record, "input", required=False)
    user = f"{instruction}\n\n{context}" if context.strip() else instruction
    return [*_system(record), *_history(record), {"role": "user", "content": user},
            {"role": "assistant", "content": text_field(record, "output", response=True)}]


def _history(record: dict) -> list[dict[str, Any]]:
    """Alpaca's optional `history`: earlier [question, answer] pairs (LLaMA-Factory), trained on like the last."""
    history = record.get("history")
    if history in (None, []):
        return []
    if not isinstance(history, list) or not all(isinstance(pair, list) and len(pair) == 2 and
                                                all(isinstance(text, str) for text in pair) for pair in history):
        raise RowError("field 'history' must be a list of [question, answer] pairs of text")
    turns = []
    for question, answer in history:
        check_encodable(question + answer, "field 'history'")
        turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return turns


def _side(record: dict, name: str, role: str) -> list[dict[str, Any]]:
    """A prompt or an answer given as text, as one message, or as a list of messages (TRL's conversational form)."""
    value = record.get(name)
    if value is None:
        raise RowError(f"missing field '{name}'")
    if isinstance(value, str):
        return [{"role": role, "content": text_field(record, name, response=role == "assistant")}]
    if isinstance(value, dict):
        value = [value]
    return messages_of(value, name, need_answer=False)


def _prompt_completion(record: dict) -> list[dict[str, Any]]:
    return [*_system(record), *_side(record, "prompt", "user"), *_side(record, "completion", "assistant")]


def _chat(record: dict) -> list[dict[str, Any]]:
    if "messages" not in record and "conversations" not in record:
        raise RowError("missing field 'messages' (or ShareGPT 'conversations')")
    key = "messages" if "messages" in record else "conversations"
    messages = messages_of(record.get(key), key, need_answer=False)
    has_system = any(m["role"] == "system" for m in messages)
    return messages if has_system else [*_system(record), *messages]


def _preference(record: dict) -> list[dict[str, Any]]:
    """Until preference training exists: the prompt (or conversation) and the chosen answer; the rejected one is
    checked to be there and left out."""
    if "prompt" in record:
        prompt = _side(record, "prompt", "user")
    elif "messages" in record or "conversations" in record:
        prompt = _chat(record)
    elif "instruction" in record:
        prompt = _alpaca({**record, "output": "-"})[:-1]
    else:
        prompt = []  # TRL's implicit prompt: chosen and rejected hold the whole conversation
    _side(record, "rejected", "assistant")
    return [*(_system(record) if "prompt" in record else []), *prompt, *_side(record, "chosen", "assistant")]
