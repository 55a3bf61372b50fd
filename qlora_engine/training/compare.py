"""The before / after comparison that ends a run: the base and the tuned model answer held-out questions (the sample
set's, scored by keyword; else the validation rows' prompts)."""
from __future__ import annotations

import json
from typing import Any

from qlora_engine.model import adapter_init, generation
from qlora_engine.protocol.config import DEFAULT_DATA, RunConfig
from qlora_engine.resources import resources_dir
from qlora_engine.training import data

SAMPLE_HELDOUT = resources_dir() / "sample" / "heldout.jsonl"


def is_correct(answer: str, keywords: list[str] | None) -> bool | None:
    if not keywords:
        return None
    lowered = answer.lower()
    return any(keyword.lower() in lowered for keyword in keywords)


def heldout_questions(cfg: RunConfig, prepared: Any, tokenizer: Any) -> list[dict[str, Any]]:
    """The sample set's held-out questions (scored by keyword), else the user turns of validation rows."""
    if cfg.data == DEFAULT_DATA and SAMPLE_HELDOUT.is_file():
        lines = SAMPLE_HELDOUT.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]
    questions = []
    for example in prepared.val_examples:
        text = tokenizer.decode([t for t, trained in zip(example.input_ids, example.trained_token_mask)
                                 if not trained], skip_special_tokens=True)
        questions.append({"question": text.strip()[-500:]})
    return questions


def compare_answers(cfg: RunConfig, model: Any, tokenizer: Any, prepared: Any, device: str) -> dict[str, Any]:
    """Base vs tuned answers to held-out questions (the sample set's, else validation prompts)."""
    questions = heldout_questions(cfg, prepared, tokenizer)[: cfg.compare_questions]
    prompts = [data.prompt_text(q["question"], tokenizer) for q in questions]
    with adapter_init.as_started(model):  # the model as training began (a LoftQ / PiSSA start included)
        base_answers = generation.generate_answers(model, tokenizer, prompts, device)
    tuned_answers = generation.generate_answers(model, tokenizer, prompts, device)
    rows = [{**question, "base": base, "tuned": tuned,
             "base_correct": is_correct(base, question.get("keywords")),
             "tuned_correct": is_correct(tuned, question.get("keywords"))}
            for question, base, tuned in zip(questions, base_answers, tuned_answers)]
    scored = [r for r in rows if r["base_correct"] is not None]
    return {"rows": rows,
            "base_accuracy": sum(r["base_correct"] for r in scored) / len(scored) if scored else None,
            "tuned_accuracy": sum(r["tuned_correct"] for r in scored) / len(scored) if scored else None}
