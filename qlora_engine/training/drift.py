"""How far the tuned model has moved from the model training began with, on text that model writes itself.

Once per run, the starting model continues a fixed set of general openers (plain text, and chat questions when the
tokenizer has a chat template), sampled at temperature 1 from a seed of its own: text the base itself would write,
whatever the user's data and language. At each evaluation the same weights run on those continuations twice, as
started (`adapter_init.as_started`: the adapter off, or a LoftQ / PiSSA start swapped in) and as trained, and the
drift is the mean per-token KL divergence KL(start || now) over the continuation tokens, in nats. 0 is the base
itself; exp(drift) is about how many times more surprising the tuned model finds the base's own text (its
perplexity on it, relative). No second model in memory, no data needed.

The continuations are kept in the run folder (`drift_samples.json`) so a resumed run measures on the same text, and
sampling leaves the random state as it found it, so a run trains the same with the measure on or off.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qlora_engine.model import adapter_init
from qlora_engine.model.generation import inference_mode
from qlora_engine.protocol.config import RunConfig, write_text_atomic
from qlora_engine.resources import resources_dir
from qlora_engine.training import data

PROMPTS_FILE = resources_dir() / "drift" / "prompts.json"
SAMPLES_FILE = "drift_samples.json"
NEW_TOKENS = 32
SAMPLE_SEED_OFFSET = 7919  # the samples' seed: the run's seed moved away from the streams training draws
SAMPLE_BATCH = 32  # continuations written at once: on a CPU a step costs about the same for 1 or 32 of them
SCORE_BATCH = 16  # continuations scored at once: their logits, twice, stay below what an evaluation batch holds


@dataclass
class Sample:
    """One continuation: the prompt's token ids and the ids the starting model wrote after them."""

    prompt_ids: list[int]
    new_ids: list[int]


def prompts(tokenizer: Any) -> list[str]:
    """The openers as the model sees them: plain text, and the chat questions in the model's chat template."""
    listed = json.loads(PROMPTS_FILE.read_text(encoding="utf-8"))
    texts = [(tokenizer.bos_token or "") + text for text in listed["text"]]
    if getattr(tokenizer, "chat_template", None):
        texts += [data.prompt_text(question, tokenizer) for question in listed["chat"]]
    return texts


def sample_continuations(model: Any, tokenizer: Any, count: int, seed: int, device: str) -> list[Sample]:
    """`count` continuations by the starting model, the openers taken in turn; the random state is restored after."""
    texts = prompts(tokenizer)
    chosen = [texts[i % len(texts)] for i in range(count)]
    cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    cpu_state = torch.get_rng_state()
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    samples: list[Sample] = []
    try:
        torch.manual_seed(seed + SAMPLE_SEED_OFFSET)
        with adapter_init.as_started(model), inference_mode(model):
            for start in range(0, count, SAMPLE_BATCH):
                encoded = tokenizer(chosen[start:start + SAMPLE_BATCH], add_special_tokens=False, return_tensors="pt",
                                    padding=True).to(device)
                output = model.generate(**encoded, max_new_tokens=NEW_TOKENS, do_sample=True, temperature=1.0,
                                        top_k=0, top_p=1.0, pad_token_id=tokenizer.pad_token_id, use_cache=True)
                width = encoded["input_ids"].shape[1]
                for row, mask, new in zip(encoded["input_ids"], encoded["attention_mask"], output[:, width:]):
                    samples.append(Sample(prompt_ids=row[mask.bool()].tolist(),
                                          new_ids=_until_end(new.tolist(), tokenizer)))
    finally:
        tokenizer.padding_side = padding_side
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)
    return [s for s in samples if s.new_ids]


def _until_end(ids: list[int], tokenizer: Any) -> list[int]:
    """The generated ids up to and including the first end-of-sequence (what follows is padding)."""
    ends = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    for i, token in enumerate(ids):
        if token in ends:
            return ids[:i + 1]
    return ids


def load_or_sample(run_dir: Path, model: Any, tokenizer: Any, cfg: RunConfig, device: str,
                   keep: bool = True) -> list[Sample]:
    """The run's continuations: read back from the run folder (a resumed run), else sampled now and, when `keep`
    (rank 0 of a sharded run, whose other ranks sample alongside it), kept there."""
    path = run_dir / SAMPLES_FILE
    if path.is_file():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            if stored.get("samples") and len(stored["samples"]) <= cfg.drift_samples:
                return [Sample(**s) for s in stored["samples"]]
        except (ValueError, TypeError, KeyError):  # unreadable: sampled again from the same seed
            pass
    samples = sample_continuations(model, tokenizer, cfg.drift_samples, cfg.seed, device)
    if keep:
        write_text_atomic(path, json.dumps({"new_tokens": NEW_TOKENS, "seed": cfg.seed,
                                            "samples": [s.__dict__ for s in samples]}))
    return samples


def drift_from_start(model: Any, samples: list[Sample], pad_id: int, device: str) -> float:
    """Mean per-token KL(start || now) over the continuation tokens, in nats (0 for the starting model)."""
    total, tokens = 0.0, 0
    with inference_mode(model):
        for start in range(0, len(samples), SCORE_BATCH):
            ids, attention, scored = _batch(samples[start:start + SCORE_BATCH], pad_id, device)
            with adapter_init.as_started(model):
                before = _log_probs(model, ids, attention, scored)
            now = _log_probs(model, ids, attention, scored)
            total += float((before.exp() * (before - now)).sum())
            tokens += int(scored.sum())
    return max(total / max(tokens, 1), 0.0)


def _batch(samples: list[Sample], pad_id: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask, and the positions whose next token is a continuation token."""
    width = max(len(s.prompt_ids) + len(s.new_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(samples), width), dtype=torch.long)
    scored = torch.zeros((len(samples), width), dtype=torch.bool)
    for i, sample in enumerate(samples):
        row = sample.prompt_ids + sample.new_ids
        ids[i, :len(row)] = torch.tensor(row)
        attention[i, :len(row)] = 1
        scored[i, len(sample.prompt_ids) - 1:len(row) - 1] = True  # position t predicts token t + 1
    return ids.to(device), attention.to(device), scored.to(device)


def _log_probs(model: Any, ids: torch.Tensor, attention: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
    return torch.log_softmax(logits[scored].float(), dim=-1)
