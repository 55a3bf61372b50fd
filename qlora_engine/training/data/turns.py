"""One chat turn as the chat template wants it: roles of every dialect (ShareGPT, OpenAI, tool use), content as
text or a list of parts, tool calls with their arguments as objects, per-turn weights.

Not here: which row shape holds the turns (formats.py), how they are rendered (templates.py).
"""
from __future__ import annotations

import json
from typing import Any

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
         "bot": "assistant", "chatbot": "assistant", "system": "system",
         "tool": "tool", "observation": "tool", "ipython": "tool", "function": "tool", "tool_response": "tool",
         "function_response": "tool", "function_call": "function_call"}
MEDIA_PARTS = ("image", "image_url", "input_image", "audio", "input_audio", "video", "video_url", "file")
WEIGHT_KEYS = ("weight", "loss_weight")
UNTRAINED = "train"  # key set to False on an assistant turn that is not trained on (weight 0); never rendered


class RowError(ValueError):
    """Why one row can't be used; it becomes a BadRow report next to the row's line number."""


class NotATarget(RowError):
    """A row marked as an undesirable answer (KTO-style `label: false`): counted, never trained on."""


def check_encodable(text: str, where: str) -> None:
    """JSON can carry a lone UTF-16 surrogate ("\\ud800"): no tokenizer can encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RowError(f"{where} holds an invalid character (a lone surrogate \\u{ord(text[exc.start]):04x} at "
                       f"character {exc.start + 1})") from None


def content_text(value: Any, where: str) -> str:
    """Text content, or a list of parts ({type: text, text | value}) joined in order as chat templates join them.
    Image, audio or video parts are refused: this engine trains text models."""
    if isinstance(value, str):
        check_encodable(value, where)
        return value
    if not isinstance(value, list):
        raise RowError(f"{where}: content must be text or a list of parts, got {type(value).__name__}")
    texts = []
    for number, part in enumerate(value, start=1):
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict):
            raise RowError(f"{where}: content part {number} must be an object, got {type(part).__name__}")
        kind = part.get("type", next((k for k in MEDIA_PARTS if k in part), "text"))
        if kind in MEDIA_PARTS:
            raise RowError(f"{where}: images/audio are not supported (content part {number} is {kind!r})")
        text = part.get("text", part.get("value"))
        if kind != "text" or not isinstance(text, str):
            raise RowError(f"{where}: content part {number} is not a text part ({{type: text, text: ...}})")
        texts.append(text)
    joined = "".join(texts)
    check_encodable(joined, where)
    return joined


def tool_result_text(value: Any, where: str) -> str:
    """A tool's result: text, parts, or a JSON value (written back as JSON, as the tool returned it)."""
    if isinstance(value, (dict, int, float, bool)) or value is None:
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list) and not all(isinstance(part, dict) and "type" in part for part in value):
        return json.dumps(value, ensure_ascii=False)
    return content_text(value, where)


def tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    """OpenAI `tool_calls` / a ShareGPT `function_call` value (JSON text, one call or a list of calls) as
    [{type: function, function: {name, arguments: {...}}}], the form chat templates render."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise RowError(f"{where}: the tool call is not valid JSON ({{\"name\": ..., \"arguments\": {{...}}}})") \
                from None
    calls = value if isinstance(value, list) else [value]
    if not calls:
        raise RowError(f"{where}: an empty list of tool calls")
    return [_tool_call(call, where) for call in calls]


def _tool_call(call: Any, where: str) -> dict[str, Any]:
    if not isinstance(call, dict):
        raise RowError(f"{where}: a tool call must be an object with name and arguments")
    function = call.get("function", call)
    if not isinstance(function, dict):
        raise RowError(f"{where}: a tool call's 'function' must be an object")
    name = function.get("name")
    if not isinstance(name, str) or not name.strip():
        raise RowError(f"{where}: a tool call has no function name")
    check_encodable(name, where)
    arguments = function.get("arguments", function.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except (ValueError, RecursionError):
            raise RowError(f"{where}: the arguments of tool call {name!r} are not valid JSON") from None
    if not isinstance(arguments, dict):
        raise RowError(f"{where}: the arguments of tool call {name!r} must be an object")
    _check_json_text(arguments, where)
    made: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if isinstance(call.get("id"), str):
        made["id"] = call["id"]
    return made


def _check_json_text(value: Any, where: str) -> None:
    try:
        check_encodable(json.dumps(value, ensure_ascii=False), where)
    except (TypeError, ValueError, RecursionError):
        raise RowError(f"{where} can't be written as JSON") from None


def is_trained(turn: dict[str, Any], where: str) -> bool:
    """OpenAI's `weight` (or `loss_weight`): 0 keeps an assistant turn in the context but out of the loss."""
    for key in WEIGHT_KEYS:
        weight = turn.get(key)
        if weight is None:
            continue
        if isinstance(weight, (bool, int, float)) and weight in (0, 1):
            return bool(weight)
        raise RowError(f"{where}: '{key}' must be 0 or 1, got {weight!r}")
    return True


def message(turn: Any, where: str) -> dict[str, Any]:
    """One turn of any dialect as {role, content[, tool_calls][, name]} (role: system, user, assistant, tool)."""
    if not isinstance(turn, dict):
        raise RowError(f"{where} must be an object")
    raw_role = turn.get("role", turn.get("from"))
    role = ROLES.get(raw_role.strip().lower()) if isinstance(raw_role, str) else None
    if role is None:
        raise RowError(f"{where}: unknown role {raw_role!r} (expected user/assistant/system/tool/function_call)")
    content = turn["content"] if "content" in turn else turn.get("value")
    if role == "function_call":  # ShareGPT with tools: the assistant's call, its value a JSON object
        made: dict[str, Any] = {"role": "assistant", "content": "", "tool_calls": tool_calls(content, where)}
    elif role == "tool":
        made = {"role": "tool", "content": tool_result_text(content, where)}
        for key in ("name", "tool_call_id"):
            if isinstance(turn.get(key), str):
                made[key] = turn[key]
    else:
        calls = turn.get("tool_calls") or ([turn["function_call"]] if turn.get("function_call") else [])
        if content is None and role == "assistant" and calls:
            content = ""
        made = {"role": role, "content": content_text(content, where) if content is not None else _missing(where)}
        if role == "assistant" and calls:
            made["tool_calls"] = tool_calls(calls, where)
    if made["role"] == "assistant" and not is_trained(turn, where):
        made[UNTRAINED] = False
    return made


def _missing(where: str) -> str:
    raise RowError(f"{where}: content must be text, got nothing")


def messages_of(turns: Any, key: str, *, need_answer: bool = True) -> list[dict[str, Any]]:
    """A list of turns as messages; with need_answer, at least one trained, non-empty assistant turn."""
    if not isinstance(turns, list) or not turns:
        raise RowError(f"field '{key}' must be a non-empty list of turns")
    messages = [message(turn, f"turn {index} of '{key}'" if key != "messages" and key != "conversations"
                        else f"turn {index}") for index, turn in enumerate(turns, start=1)]
    if need_answer:
        check_answers(messages)
    return messages


def check_answers(messages: list[dict[str, Any]]) -> None:
    answers = [m for m in messages if m["role"] == "assistant"]
    if not answers:
        raise RowError("no assistant turn to learn from")
    trained = [m for m in answers if m.get(UNTRAINED, True)]
    if not trained:
        raise RowError("every assistant turn has weight 0: nothing to learn from")
    if not all(m["content"].strip() or m.get("tool_calls") for m in trained):
        raise RowError("empty response in an assistant turn")


def tools_of(value: Any) -> list[dict[str, Any]] | None:
    """A row's `tools`: a list of JSON schemas, or that list as JSON text (LLaMA-Factory's ShareGPT)."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise RowError("field 'tools' is not valid JSON (a list of function schemas)") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(tool, dict) for tool in value):
        raise RowError("field 'tools' must be a list of function schemas (objects)")
    _check_json_text(value, "field 'tools'")
    return value or None
