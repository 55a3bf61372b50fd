"""Talking to a model: greedy answers from the base and the tuned model, one prompt, side by side.

Used after training (the before/after comparison), by `qlora-studio chat`, and by the GUI's Chat
page through `chat --serve` (JSON lines in on stdin, streamed tokens out as events).
"""
from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qlora_engine import models
from qlora_engine.config import DEFAULT_DATA, RunConfig
from qlora_engine.events import EngineError, EventWriter

MAX_NEW_TOKENS = 48


def generate_answer(model: Any, tokenizer: Any, question: str, device: str, max_new_tokens: int = MAX_NEW_TOKENS,
                    on_text: Callable[[str], None] | None = None) -> str:
    """Greedy answer to one user question, in the chat template training used."""
    import torch

    from qlora_engine.data import prompt_text
    from qlora_engine.train import inference_mode

    encoded = tokenizer(prompt_text(question, tokenizer), add_special_tokens=False, return_tensors="pt").to(device)
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


def generate_answers(model: Any, tokenizer: Any, questions: list[str], device: str,
                     max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = 16) -> list[str]:
    """Greedy answers to many questions, batched with left padding (same answers as one at a time)."""
    from qlora_engine.data import prompt_text
    from qlora_engine.train import inference_mode

    answers = []
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        with inference_mode(model):
            for start in range(0, len(questions), batch_size):
                texts = [prompt_text(q, tokenizer) for q in questions[start:start + batch_size]]
                encoded = tokenizer(texts, add_special_tokens=False, return_tensors="pt", padding=True).to(device)
                output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                        pad_token_id=tokenizer.pad_token_id, use_cache=True)
                answers += [tokenizer.decode(row, skip_special_tokens=True).strip()
                            for row in output[:, encoded["input_ids"].shape[1]:]]
    finally:
        tokenizer.padding_side = padding_side
    return answers


def is_correct(answer: str, keywords: list[str] | None) -> bool | None:
    if not keywords:
        return None
    lowered = answer.lower()
    return any(keyword.lower() in lowered for keyword in keywords)


def heldout_questions(cfg: RunConfig, prepared: Any, tokenizer: Any) -> list[dict[str, Any]]:
    """The sample set's held-out questions (scored by keyword), else the user turns of validation rows."""
    from qlora_engine.train import SAMPLE_HELDOUT

    if cfg.data == DEFAULT_DATA and SAMPLE_HELDOUT.is_file():
        lines = SAMPLE_HELDOUT.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]
    questions = []
    for example in prepared.val_examples:
        text = tokenizer.decode([t for t, trained in zip(example.input_ids, example.trained_token_mask)
                                 if not trained], skip_special_tokens=True)
        questions.append({"question": text.strip()[-500:]})
    return questions


def load_for_chat(target: str) -> tuple[Any, Any, str, bool]:
    """(model, tokenizer, device, has_adapter) for a run folder or a plain model."""
    from peft import PeftModel

    run_dir = Path(target).expanduser()
    cfg = RunConfig.load(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else RunConfig(model=target)
    device = models.resolve_device(cfg.device)
    source = models.resolve_model(cfg.model, cfg.allow_pickle)
    tokenizer = models.load_tokenizer(source.path, cfg.trust_remote_code)
    model = models.load_quantized_model(source.path, quant_type=cfg.quant_type, double_quant=cfg.double_quant,
                                        compute_dtype=models.resolve_compute_dtype(cfg.compute_dtype, device),
                                        device=device, allow_pickle=cfg.allow_pickle,
                                        trust_remote_code=cfg.trust_remote_code)
    adapter = run_dir / "adapter"
    if (run_dir / "config.yaml").is_file():
        if not (adapter / "adapter_config.json").is_file():
            raise EngineError("no_adapter", f"{run_dir} has no finished adapter yet",
                              "Let the run finish (or resume it), then chat with it.")
        model = PeftModel.from_pretrained(model, adapter)
        return model, tokenizer, device, True
    return model, tokenizer, device, False


def answer_both(model: Any, tokenizer: Any, device: str, has_adapter: bool, question: str, max_new_tokens: int,
                on_text: Callable[[str, str], None] | None = None) -> dict[str, str]:
    """{"base": ..., "tuned": ...} (only "base" for a model without adapter)."""
    answers = {}
    if has_adapter:
        with model.disable_adapter():
            answers["base"] = generate_answer(model, tokenizer, question, device, max_new_tokens,
                                              _bind(on_text, "base"))
        answers["tuned"] = generate_answer(model, tokenizer, question, device, max_new_tokens,
                                           _bind(on_text, "tuned"))
    else:
        answers["base"] = generate_answer(model, tokenizer, question, device, max_new_tokens, _bind(on_text, "base"))
    return answers


def _bind(callback: Callable[[str, str], None] | None, which: str) -> Callable[[str], None] | None:
    return None if callback is None else (lambda text: callback(which, text))


def serve(target: str, events: EventWriter) -> int:
    """Answer JSON-line requests {"prompt": ..., "max_new_tokens": N} from stdin until it closes."""
    model, tokenizer, device, has_adapter = load_for_chat(target)
    events.emit("chat_ready", target=target, has_adapter=has_adapter, device=device)
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            prompt = str(request["prompt"])
        except (json.JSONDecodeError, KeyError, TypeError):
            events.emit("warning", message="chat request must be a JSON line with a 'prompt' field")
            continue
        answers = answer_both(model, tokenizer, device, has_adapter, prompt,
                              int(request.get("max_new_tokens", 128)),
                              lambda which, text: events.emit("chat_token", model=which, text=text))
        for which, text in answers.items():
            events.emit("chat_done", model=which, text=text)
    return 0
