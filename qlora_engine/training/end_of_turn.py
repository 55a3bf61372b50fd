"""The tokens that end an assistant's turn: what the chat template writes right after an answer (`<|im_end|>`,
`<|eot_id|>`, `<end_of_turn>` …) and the model's EOS. Training must teach them; exports must keep them."""
from __future__ import annotations

from typing import Any

PROBE_ANSWER = "Probe answer 7."


def turn_end_text(tokenizer: Any) -> str:
    """The text the chat template puts right after an assistant answer, up to the first line break or the next
    turn ('' without a template)."""
    if not getattr(tokenizer, "chat_template", None):
        return tokenizer.eos_token or ""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Q"},
                                              {"role": "assistant", "content": PROBE_ANSWER}], tokenize=False)
    after = rendered.split(PROBE_ANSWER, 1)[1] if PROBE_ANSWER in rendered else ""
    return after.split("\n", 1)[0]


def end_of_turn_token_id(tokenizer: Any) -> int | None:
    """The special token that closes an assistant turn in the chat template, else the EOS."""
    text = turn_end_text(tokenizer).strip()
    special = {token: tokenizer.convert_tokens_to_ids(token) for token in tokenizer.all_special_tokens}
    special |= {str(t): i for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()
                if getattr(t, "special", False)}
    for token in sorted(special, key=len, reverse=True):
        if token and text.startswith(token):
            return special[token]
    if text:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            return ids[0]
    return tokenizer.eos_token_id


def stop_token_ids(tokenizer: Any, generation_eos: int | list[int] | None = None) -> list[int]:
    """Every id that ends an answer: the end-of-turn token, the tokenizer's EOS and generation_config's EOS."""
    ids = [end_of_turn_token_id(tokenizer), tokenizer.eos_token_id]
    ids += generation_eos if isinstance(generation_eos, list) else [generation_eos]
    return [i for i in dict.fromkeys(ids) if i is not None]
