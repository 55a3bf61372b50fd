"""A conversation as the exact text the model sees (the tokenizer's own chat template, tools included where the
template has them) and the tokens the loss is computed on: each trained assistant turn, from the end of the
template's generation prompt through its end-of-turn token. Tool results, weight-0 turns and prompts never are.

Family fixes: a template that refuses a system role (Gemma 2) gets the system text folded into the first user
turn; a template without tool support gets the documented plain tool text (PLAIN_TOOLS_*); templates that
rewrite earlier turns (Qwen3 drops earlier <think> blocks, Mistral moves the system text) are followed by
finding each turn in the full text. Not here: reading rows (formats.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from qlora_engine.training.data.formats import Example
from qlora_engine.training.data.turns import UNTRAINED, RowError
from qlora_engine.training.end_of_turn import turn_end_text

PLAIN_TEMPLATE_USER = "### Instruction:\n{content}\n\n### Response:\n"
CHARS_PER_TOKEN_BOUND = 64
# Tool use for templates that have none: the tools in the system text, calls as text in the assistant's answer,
# results as a user turn (Hermes-style tags, which many tool-tuned models already know).
PLAIN_TOOLS_SYSTEM = ("You can call these tools. To call one, answer with <tool_call>{{\"name\": ..., \"arguments\": "
                      "{{...}}}}</tool_call>.\n<tools>\n{tools}\n</tools>")
PLAIN_TOOL_CALL = "<tool_call>\n{call}\n</tool_call>"
PLAIN_TOOL_RESULT = "<tool_response>\n{content}\n</tool_response>"
Span = tuple[int, int]


@dataclass
class Tokenized:
    input_ids: list[int]
    trained_token_mask: list[bool]
    line: int
    truncated: bool = False


def template_errors() -> tuple[type[BaseException], ...]:
    from jinja2 import TemplateError

    return TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError


def supports_tools(tokenizer: Any) -> bool:
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and "tool_calls" in template


# ----------------------------------------------------------------------------- rendering
def render(example: Example, tokenizer: Any) -> tuple[str, list[Span]]:
    """The exact text the model sees and the character spans the loss is computed on."""
    return render_with_exclusions(example, tokenizer)[:2]


def render_with_exclusions(example: Example, tokenizer: Any) -> tuple[str, list[Span], list[Span]]:
    """The text, the trained spans, and the spans never trained even with train_on_prompt (tool results,
    weight-0 turns)."""
    if example.text is not None:
        bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
        text = bos + example.text + eos
        return text, [(len(bos), len(text))], []
    messages, tools = example.messages, example.tools
    has_template = bool(getattr(tokenizer, "chat_template", None))
    uses_tools = tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
    if uses_tools and not (has_template and supports_tools(tokenizer)):
        messages, tools = plain_tools(messages, tools)
    if has_template:
        return _render_chat_template(messages, tools, tokenizer)
    return _render_plain(messages, tokenizer)


def plain_tools(messages: list[dict[str, Any]], tools: list[dict] | None) -> tuple[list[dict[str, Any]], None]:
    """Tool use as plain turns: schemas into the system text, calls into the answer, results as a user turn
    (consecutive user turns merged, so templates that insist on alternating roles take them; a merged turn with a
    tool result in it is a tool result: never trained)."""
    plain: list[dict[str, Any]] = []
    if tools:
        listed = PLAIN_TOOLS_SYSTEM.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if messages and messages[0]["role"] == "system":
            plain.append({**messages[0], "content": messages[0]["content"] + "\n\n" + listed})
            messages = messages[1:]
        else:
            plain.append({"role": "system", "content": listed})
    for message in messages:
        if message["role"] == "tool":
            message = {"role": "user", "content": PLAIN_TOOL_RESULT.format(content=message["content"]),
                       "tool_result": True}
        elif message.get("tool_calls"):
            calls = [PLAIN_TOOL_CALL.format(call=json.dumps({"name": c["function"]["name"],
                                                             "arguments": c["function"]["arguments"]},
                                                            ensure_ascii=False)) for c in message["tool_calls"]]
            text = "\n".join(([message["content"]] if message["content"].strip() else []) + calls)
            message = {k: v for k, v in message.items() if k != "tool_calls"} | {"content": text}
        if plain and message["role"] == "user" and plain[-1]["role"] == "user":
            merged = plain[-1]["content"] + "\n" + message["content"]
            # a turn holding a tool result is never trained, whatever joined it (train_on_prompt included)
            plain[-1] = {**plain[-1], "content": merged, "tool_result": plain[-1].get("tool_result", False)
                         or message.get("tool_result", False)}
            continue
        plain.append(message)
    return plain, None


def fold_system(messages: list[dict[str, Any]], *, into_last: bool = False) -> list[dict[str, Any]] | None:
    """The system text put at the start of the first user turn, as Gemma's model card says to (or of the last
    one, where Mistral's template puts it when it asks for an answer); None when there is nothing to fold."""
    if not messages or messages[0]["role"] != "system":
        return None
    rest = messages[1:]
    users = [i for i, m in enumerate(rest) if m["role"] == "user"]
    if not users:
        return None
    index = users[-1] if into_last else users[0]
    folded = {**rest[index], "content": messages[0]["content"] + "\n\n" + rest[index]["content"]}
    return rest[:index] + [folded] + rest[index + 1:]


class _Template:
    """The tokenizer's chat template applied to a conversation (and its tools), without our private keys."""

    def __init__(self, tokenizer: Any, tools: list[dict] | None) -> None:
        self.tokenizer, self.tools = tokenizer, tools

    def __call__(self, messages: list[dict[str, Any]], generation: bool = False) -> str:
        bare = [{k: v for k, v in m.items() if k not in (UNTRAINED, "tool_result")} for m in messages]
        return self.tokenizer.apply_chat_template(bare, tools=self.tools, tokenize=False,
                                                  add_generation_prompt=generation)

    def or_none(self, messages: list[dict[str, Any]], generation: bool = False) -> str | None:
        try:
            return self(messages, generation)
        except template_errors():
            return None


def _render_chat_template(messages: list[dict[str, Any]], tools: list[dict] | None,
                          tokenizer: Any) -> tuple[str, list[Span], list[Span]]:
    apply = _Template(tokenizer, tools)
    try:
        full = apply(messages)
    except template_errors() as exc:
        folded = fold_system(messages)
        full = apply.or_none(folded) if folded else None
        if full is None:
            raise RowError(f"the model's chat template refuses this conversation ({_first_line(exc)})") from None
        messages = folded
    if _drops_system_text(messages, full):  # Mistral's: only a conversation that ends with a question has it
        folded = fold_system(messages, into_last=True)
        refolded = apply.or_none(folded) if folded else None
        if refolded is not None and not _drops_system_text(messages, refolded):
            messages, full = folded, refolded
    end_text = _end_of_turn_text(tokenizer)
    trained, never, cursor = [], [], 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            is_result = message["role"] == "tool" or message.get("tool_result", False)
            found = (is_result and _turn_by_prefixes(full, messages, index, apply)) or \
                _find_text(full, message["content"], cursor)
            if found:
                cursor = max(cursor, found[1])
                if is_result:
                    never.append(found)
            continue
        span = _assistant_span(full, messages, index, apply, end_text, cursor)
        if span is None:
            continue
        cursor = span[1]
        (trained if message.get(UNTRAINED, True) else never).append(span)
    return full, trained, never


def _turn_by_prefixes(full: str, messages: list[dict[str, Any]], index: int, apply: _Template) -> Span | None:
    """A turn's whole text, where the turns before it and through it both render as prefixes of the full text (a
    tool result the template writes as JSON text is found this way, not by its content)."""
    before = apply.or_none(messages[:index]) if index > 0 else None
    upto = apply.or_none(messages[: index + 1]) if before is not None else None
    if upto is None or not (full.startswith(upto) and upto.startswith(before)) or len(upto) == len(before):
        return None
    return len(before), len(upto)


def _drops_system_text(messages: list[dict[str, Any]], full: str) -> bool:
    system = messages[0]["content"].strip() if messages and messages[0]["role"] == "system" else ""
    return bool(system) and system not in full


def _assistant_span(full: str, messages: list[dict[str, Any]], index: int, apply: _Template, end_text: str,
                    cursor: int) -> Span | None:
    """Where assistant turn `index` is in the full text: from the end of the generation prompt that precedes it
    (when rendering the turns before it is a prefix of the whole) or else from its own text, through the
    end-of-turn text."""
    message = messages[index]
    prefix = apply.or_none(messages[:index], generation=True) if index > 0 else None
    if prefix is not None and len(prefix) >= cursor and full.startswith(prefix):
        start = len(prefix)
    else:
        needle = message["content"] if message["content"].strip() else _call_name(message)
        found = _find_text(full, needle, cursor)
        if found is None:
            return None
        start = found[0]
    end = full.find(end_text, start) if end_text else -1
    if end >= 0:
        return start, end + len(end_text)
    upto = apply.or_none(messages[: index + 1])
    if upto is not None and full.startswith(upto) and len(upto) > start:
        return start, len(upto)
    found = _find_text(full, message["content"], start)
    return (start, found[1]) if found else None


def _call_name(message: dict[str, Any]) -> str:
    calls = message.get("tool_calls") or []
    return calls[0]["function"]["name"] if calls else ""


def _find_text(full: str, text: str, cursor: int) -> Span | None:
    """Where `text` (as templates often trim it) first occurs at or after `cursor`."""
    needle = text.strip()
    if not needle:
        return None
    start = full.find(needle, cursor)
    return (start, start + len(needle)) if start >= 0 else None


_END_TEXTS: dict[tuple[int, str, str], str] = {}


def _end_of_turn_text(tokenizer: Any) -> str:
    """The template's end-of-turn text (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `</s>` …), once per tokenizer."""
    key = (id(tokenizer), str(tokenizer.chat_template), str(tokenizer.eos_token))
    if key not in _END_TEXTS:
        try:
            _END_TEXTS[key] = turn_end_text(tokenizer).strip()
        except template_errors():
            _END_TEXTS[key] = (tokenizer.eos_token or "").strip()
    return _END_TEXTS[key]


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _render_plain(messages: list[dict[str, Any]], tokenizer: Any) -> tuple[str, list[Span], list[Span]]:
    text, trained, never = tokenizer.bos_token or "", [], []
    for message in messages:
        if message["role"] == "system":
            text += message["content"] + "\n\n"
        elif message["role"] == "user":
            start = len(text)
            text += PLAIN_TEMPLATE_USER.format(content=message["content"])
            if message.get("tool_result"):
                never.append((start, len(text)))
        else:
            start = len(text)
            text += message["content"] + (tokenizer.eos_token or "")
            (trained if message.get(UNTRAINED, True) else never).append((start, len(text)))
            text += "\n\n"
    return text, trained, never


def prompt_text(question: str, tokenizer: Any) -> str:
    """The text a user question becomes before generation, in the same template training used."""
    messages = [{"role": "user", "content": question}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return (tokenizer.bos_token or "") + PLAIN_TEMPLATE_USER.format(content=question)


# ----------------------------------------------------------------------------- tokens and the mask
def tokenize(example: Example, tokenizer: Any, max_length: int, train_on_prompt: bool) -> Tokenized:
    text, spans, never = render_with_exclusions(example, tokenizer)
    # Only the first max_length tokens are kept, so a huge row (a 10 MB line takes ~20 s to tokenize whole) is cut
    # first, far beyond where those tokens end: tokens average far fewer than CHARS_PER_TOKEN_BOUND characters
    # (a pathological row of only very long tokens keeps fewer than max_length tokens, and is still truncated).
    cut = len(text) > max_length * CHARS_PER_TOKEN_BOUND
    if cut:
        text = text[: max_length * CHARS_PER_TOKEN_BOUND]
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    if train_on_prompt:
        mask = [not _overlaps(token, never) for token in offsets]
    else:
        mask = [_overlaps(token, spans) for token in offsets]
    truncated = cut or len(ids) > max_length
    return Tokenized(ids[:max_length], mask[:max_length], example.line, truncated)


def _overlaps(token: tuple[int, int], spans: list[Span]) -> bool:
    """A token is in a span when any of its characters is (a token that begins with the space before an answer
    belongs to the answer); a zero-width token counts by its position."""
    start, end = token
    end = max(end, start + 1)
    return any(start < span_end and end > span_start for span_start, span_end in spans)
