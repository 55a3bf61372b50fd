"""Generation inside a training process: greedy answers, streamed or batched, without disturbing later training
steps (`inference_mode`). Prompts arrive already rendered in the chat template."""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

MAX_NEW_TOKENS = 48


@contextmanager
def inference_mode(model: Any) -> Iterator[None]:
    """Evaluation / generation inside a training process without breaking later training steps.

    bitsandbytes (0.50) repacks 4-bit weights for CPU inference when a Linear4bit runs in eval mode,
    and training after that silently diverges. So dropout and checkpointing are switched off module
    by module, while the 4-bit layers keep `training=True`; everything is restored afterwards.
    """
    import bitsandbytes as bnb
    import torch

    modes = {module: module.training for module in model.modules()}
    for module in modes:
        module.training = isinstance(module, bnb.nn.Linear4bit)
    try:
        with torch.no_grad():
            yield
    finally:
        for module, mode in modes.items():
            module.training = mode



def generate_answer(model: Any, tokenizer: Any, prompt: str, device: str, max_new_tokens: int = MAX_NEW_TOKENS,
                    on_text: Callable[[str], None] | None = None) -> str:
    """Greedy answer to one prompt (already in the chat template: training.data.prompt_text); with `on_text`,
    each new piece of text is passed to it as it is generated."""
    import torch

    encoded = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(device)
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": tokenizer.pad_token_id,
              "use_cache": True}
    with inference_mode(model):
        if on_text is None:
            output = model.generate(**encoded, **kwargs)
            return tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        errors: list[BaseException] = []

        def work() -> None:
            try:
                with torch.no_grad():
                    model.generate(**encoded, **kwargs, streamer=streamer)
            except BaseException as exc:  # re-raised in the caller's thread below
                errors.append(exc)
                streamer.end()

        thread = threading.Thread(target=work)
        thread.start()
        pieces = []
        for piece in streamer:
            pieces.append(piece)
            on_text(piece)
        thread.join()
        if errors:
            raise errors[0]
        return "".join(pieces).strip()


def generate_answers(model: Any, tokenizer: Any, prompts: list[str], device: str,
                     max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = 16) -> list[str]:
    """Greedy answers to many prompts, batched with left padding (same answers as one at a time)."""
    answers = []
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        with inference_mode(model):
            for start in range(0, len(prompts), batch_size):
                texts = prompts[start:start + batch_size]
                encoded = tokenizer(texts, add_special_tokens=False, return_tensors="pt", padding=True).to(device)
                output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                        pad_token_id=tokenizer.pad_token_id, use_cache=True)
                answers += [tokenizer.decode(row, skip_special_tokens=True).strip()
                            for row in output[:, encoded["input_ids"].shape[1]:]]
    finally:
        tokenizer.padding_side = padding_side
    return answers
