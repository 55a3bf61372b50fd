"""Talking to a model: greedy answers from the base and the tuned model, one prompt, side by side.

Used after training (the before/after comparison), by `qlora-studio chat`, and by the GUI's Chat
page through `chat --serve` (JSON lines in on stdin, streamed tokens out as events).
"""
from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qlora_engine.model import adapter_init, loading, run_base
from qlora_engine.model.generation import generate_answer
from qlora_engine.protocol import events as ev
from qlora_engine.protocol.config import RunConfig
from qlora_engine.protocol.errors import EngineError
from qlora_engine.protocol.events import EventWriter
from qlora_engine.training.best_checkpoint import FINAL, choose_adapter
from qlora_engine.training.data import prompt_text


def load_for_chat(target: str, checkpoint: str = FINAL) -> tuple[Any, Any, str, bool]:
    """(model, tokenizer, device, has_adapter) for a run folder (its final adapter, or the checkpoint's that
    `checkpoint` names: best, step-N) or a plain model."""
    from peft import PeftModel

    run_dir = Path(target).expanduser()
    is_run = (run_dir / "config.yaml").is_file()
    if not is_run and checkpoint not in ("", FINAL):
        raise EngineError("bad_checkpoint", f"--checkpoint {checkpoint} needs a run folder; {target} is not one "
                          "(no config.yaml)", "Pass the run folder whose checkpoint to chat with.")
    cfg = RunConfig.load(run_dir / "config.yaml") if is_run else RunConfig(model=target)
    adapter = choose_adapter(run_dir, checkpoint).folder if is_run else None  # a bad choice fails before loading
    device = loading.resolve_device(cfg.device)
    source = loading.resolve_model(cfg.model, cfg.allow_pickle)
    tokenizer = loading.load_tokenizer(source.path, cfg.trust_remote_code)
    compute_dtype = loading.resolve_compute_dtype(cfg.compute_dtype, device)
    if adapter is not None:
        # the base as the run trained on it: its precision plan, the base its adapter start left
        model = run_base.load_trained_base(cfg, source.path, device, compute_dtype, run_dir)
        model = PeftModel.from_pretrained(model, adapter)
        if (run_dir / adapter_init.INIT_FILE).is_file():  # the "base" side answers as training began
            adapter_init.remember_start(model, run_dir / adapter_init.INIT_FILE)
        return model, tokenizer, device, True
    model = loading.load_quantized_model(source.path, quant_type=cfg.quant_type, double_quant=cfg.double_quant,
                                        compute_dtype=compute_dtype, device=device, allow_pickle=cfg.allow_pickle,
                                        trust_remote_code=cfg.trust_remote_code)
    return model, tokenizer, device, False


def answer_both(model: Any, tokenizer: Any, device: str, has_adapter: bool, question: str, max_new_tokens: int,
                on_text: Callable[[str, str], None] | None = None) -> dict[str, str]:
    """{"base": ..., "tuned": ...} (only "base" for a model without adapter)."""
    prompt = prompt_text(question, tokenizer)
    answers = {}
    if has_adapter:
        with adapter_init.as_started(model):
            answers["base"] = generate_answer(model, tokenizer, prompt, device, max_new_tokens,
                                              _bind(on_text, "base"))
        answers["tuned"] = generate_answer(model, tokenizer, prompt, device, max_new_tokens,
                                           _bind(on_text, "tuned"))
    else:
        answers["base"] = generate_answer(model, tokenizer, prompt, device, max_new_tokens, _bind(on_text, "base"))
    return answers


def _bind(callback: Callable[[str, str], None] | None, which: str) -> Callable[[str], None] | None:
    return None if callback is None else (lambda text: callback(which, text))


def serve(target: str, events: EventWriter, checkpoint: str = FINAL) -> int:
    """Answer JSON-line requests {"prompt": ..., "max_new_tokens": N} from stdin until it closes."""
    model, tokenizer, device, has_adapter = load_for_chat(target, checkpoint)
    chosen = choose_adapter(Path(target).expanduser(), checkpoint).name if has_adapter else ""
    events.emit(ev.ChatReady(target=target, has_adapter=has_adapter, device=device, checkpoint=chosen))
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            prompt = str(request["prompt"])
        except (json.JSONDecodeError, KeyError, TypeError):
            events.emit(ev.Warning(message="chat request must be a JSON line with a 'prompt' field"))
            continue
        answers = answer_both(model, tokenizer, device, has_adapter, prompt,
                              int(request.get("max_new_tokens", 128)),
                              lambda which, text: events.emit(ev.ChatToken(model=which, text=text)))
        for which, text in answers.items():
            events.emit(ev.ChatDone(model=which, text=text))
    return 0
