"""A GGUF file checked by llama.cpp itself against the merged model in transformers: the same prompt tokens, greedy
answers (first 16 tokens), perplexity on validation rows, the chat template and the stop tokens in its metadata.

`reference()` runs the merged model once; `check_gguf()` loads one file with `llama_cpp.Llama` and compares.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlora_engine.planning.gguf_plan import LOSSLESS_ENOUGH
from qlora_engine.products.llama_cpp_tools import require_llama_cpp
from qlora_engine.training.compare import is_correct
from qlora_engine.training.end_of_turn import end_of_turn_token_id, stop_token_ids

GREEDY_TOKENS = 16  # compared token for token
MAX_NEW_TOKENS = 96  # an answer must end within this
REQUIRED_AGREEMENT = 0.9  # f16 / bf16 / q8_0: share of prompts whose first GREEDY_TOKENS are the merged model's
# Where the merged model's top two logits are closer than this, 16-bit rounding may pick either: a GGUF answer that
# leaves the merged model's there agrees (measured: f16 moves a tiny model's logits by up to 0.05).
TIE_MARGIN = 0.1
TOP_KEPT = 8  # candidate tokens kept per answer position for the tie check
ENDED_SLACK = 0.1  # f16 / bf16 / q8_0 may end fewer answers than the merged model by at most this share


@dataclass
class Reference:
    """What the merged model says and what the GGUF must keep: prompts as token ids, greedy answers, perplexity."""

    questions: list[dict[str, Any]]
    prompt_ids: list[list[int]]
    answers: list[list[int]]  # new tokens, ending at the first stop token or at MAX_NEW_TOKENS
    answer_texts: list[str]
    rows: list[list[int]]  # validation rows (token ids) for perplexity
    perplexity: float | None
    chat_template: str
    eos_token_id: int
    end_of_turn_id: int
    stop_ids: list[int]
    prompt_texts: list[str] = field(default_factory=list)
    # per answer, per position: {token: logit} of the merged model's TOP_KEPT highest (ties, see `agrees`)
    candidates: list[list[dict[int, float]]] = field(default_factory=list)

    def ended(self) -> float:
        return _ended_share(self.answers, self.stop_ids)


def _ended_share(answers: list[list[int]], stop_ids: list[int]) -> float:
    return sum(bool(a) and a[-1] in stop_ids for a in answers) / len(answers) if answers else 0.0


def reference(merged_dir: Path, questions: list[dict[str, Any]], rows: list[list[int]],
              adapter_dir: Path | None = None) -> Reference:
    """Greedy answers and perplexity of the merged model (fp32 on the CPU, its saved dtype on a GPU); with
    `adapter_dir`, of the plain base model in `merged_dir` with that PEFT adapter (what a GGUF LoRA is checked on)."""
    import torch

    from qlora_engine.model import loading
    from qlora_engine.training.data import prompt_text

    tokenizer = loading.load_tokenizer(merged_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = loading.load_plain_model(merged_dir, dtype=torch.float32 if device == "cpu" else "auto", device=device)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    stops = stop_token_ids(tokenizer, model.generation_config.eos_token_id)
    texts = [prompt_text(q["question"], tokenizer) for q in questions]
    prompt_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    answers, candidates = [], []
    with torch.no_grad():
        for ids in prompt_ids:
            output = model.generate(torch.tensor([ids], device=device), max_new_tokens=MAX_NEW_TOKENS,
                                    do_sample=False, eos_token_id=stops, pad_token_id=stops[0],
                                    attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                                    output_logits=True, return_dict_in_generate=True)
            answers.append(_until_stop(output.sequences[0, len(ids):].tolist(), stops))
            top = [torch.topk(step[0].float(), TOP_KEPT) for step in output.logits[:GREEDY_TOKENS]]
            candidates.append([dict(zip(t.indices.tolist(), t.values.tolist())) for t in top])
        nll = [_torch_nll(model, row, device) for row in rows if len(row) > 1]
    return Reference(questions=questions, prompt_ids=prompt_ids, answers=answers, rows=rows,
                     answer_texts=[tokenizer.decode(a, skip_special_tokens=True).strip() for a in answers],
                     perplexity=_perplexity(nll), chat_template=tokenizer.chat_template or "",
                     eos_token_id=tokenizer.eos_token_id, end_of_turn_id=end_of_turn_token_id(tokenizer),
                     stop_ids=stops, prompt_texts=texts, candidates=candidates)


def _until_stop(tokens: list[int], stops: list[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in stops:
            return tokens[: i + 1]
    return tokens


def _torch_nll(model: Any, row: list[int], device: str) -> tuple[float, int]:
    import torch

    ids = torch.tensor([row], device=device)
    logits = model(ids).logits[0, :-1].float()
    loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
    return float(loss), len(row) - 1


def _perplexity(nll: list[tuple[float, int]]) -> float | None:
    tokens = sum(n for _, n in nll)
    return round(math.exp(sum(total for total, _ in nll) / tokens), 4) if tokens else None


def check_gguf(path: Path, quant: str, ref: Reference, lora_path: Path | None = None) -> dict[str, Any]:
    """Load `path` (with the GGUF LoRA `lora_path` on top) with llama.cpp and compare it with the reference: the
    fields of a `gguf_exported` event."""
    import numpy as np

    llama_cpp = require_llama_cpp()
    longest = max([len(p) for p in ref.prompt_ids] + [len(r) for r in ref.rows] + [1])
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=longest + MAX_NEW_TOKENS + 8, n_batch=512, logits_all=True,
                          n_threads=os.cpu_count() or 1, seed=0, verbose=False,
                          lora_path=str(lora_path) if lora_path else None)
    try:
        vocab = llm._model.vocab
        answers = [_llama_greedy(llm, ids, ref.stop_ids) for ids in ref.prompt_ids]
        tokenized_alike = [llm.tokenize(text.encode(), add_bos=False, special=True) == ids
                           for text, ids in zip(ref.prompt_texts, ref.prompt_ids)]
        nll = [_llama_nll(llm, row, np) for row in ref.rows if len(row) > 1]
        metadata = dict(llm.metadata)
        stops_at_end_of_turn = bool(llama_cpp.llama_vocab_is_eog(vocab, ref.end_of_turn_id))
        gguf_eos = int(llama_cpp.llama_vocab_eos(vocab))
        texts = [llm.detokenize([t for t in a if t not in ref.stop_ids]).decode("utf-8", "replace").strip()
                 for a in answers]
    finally:
        llm.close()
    return _judge(path, quant, ref, answers, texts, tokenized_alike, _perplexity(nll), metadata,
                  stops_at_end_of_turn, gguf_eos)


def _llama_greedy(llm: Any, prompt_ids: list[int], stops: list[int]) -> list[int]:
    tokens: list[int] = []
    for token in llm.generate(prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        tokens.append(int(token))
        if token in stops or len(tokens) >= MAX_NEW_TOKENS:
            break
    return tokens


def _llama_nll(llm: Any, row: list[int], np: Any) -> tuple[float, int]:
    llm.reset()
    llm.eval(row)
    logits = np.asarray(llm.scores[: len(row) - 1], dtype=np.float64)
    peak = logits.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(logits - peak).sum(axis=1)) + peak[:, 0]
    return float((log_z - logits[np.arange(len(row) - 1), row[1:]]).sum()), len(row) - 1


def agrees(answer: list[int], merged: list[int], candidates: list[dict[int, float]]) -> str:
    """'same' when the first GREEDY_TOKENS are the merged model's; 'tie' when they first differ where the merged
    model's top two were within TIE_MARGIN and the GGUF took the other one (what follows then differs anyway);
    else 'different'."""
    head, expected = answer[:GREEDY_TOKENS], merged[:GREEDY_TOKENS]
    if head == expected:
        return "same"
    at = next((i for i, (a, m) in enumerate(zip(head, expected)) if a != m), min(len(head), len(expected)))
    if at >= len(candidates) or at >= len(head) or at >= len(expected):
        return "different"
    logits = candidates[at]
    chosen, taken = logits.get(expected[at]), logits.get(head[at])
    return "tie" if chosen is not None and taken is not None and chosen - taken <= TIE_MARGIN else "different"


def _judge(path: Path, quant: str, ref: Reference, answers: list[list[int]], texts: list[str],
           tokenized_alike: list[bool], perplexity: float | None, metadata: dict[str, str],
           stops_at_end_of_turn: bool, gguf_eos: int) -> dict[str, Any]:
    verdicts = [agrees(a, r, c) for a, r, c in zip(answers, ref.answers, ref.candidates or [[]] * len(answers))]
    agreement = sum(v != "different" for v in verdicts) / len(answers)
    ended, merged_ended = _ended_share(answers, ref.stop_ids), ref.ended()
    template_ok = metadata.get("tokenizer.chat_template", "") == ref.chat_template
    strict = quant in LOSSLESS_ENOUGH
    problems = []
    if not template_ok:
        problems.append("the chat template in the GGUF differs from the tokenizer's")
    if gguf_eos != ref.eos_token_id:
        problems.append(f"the GGUF's EOS is token {gguf_eos}, the tokenizer's {ref.eos_token_id}")
    if not stops_at_end_of_turn:
        problems.append(f"llama.cpp does not stop at the end-of-turn token {ref.end_of_turn_id}")
    if not all(tokenized_alike):
        problems.append("llama.cpp tokenizes the prompts differently from the tokenizer")
    if strict and agreement < REQUIRED_AGREEMENT:
        problems.append(f"greedy answers agree on {agreement:.0%} of prompts (at least {REQUIRED_AGREEMENT:.0%})")
    if strict and ended < merged_ended - ENDED_SLACK:
        problems.append(f"{ended:.0%} of answers end with the end-of-turn token, "
                        f"the merged model's {merged_ended:.0%}")
    rows = [{"question": q["question"], "merged": m, "gguf": g, "merged_correct": is_correct(m, q.get("keywords")),
             "gguf_correct": is_correct(g, q.get("keywords"))}
            for q, m, g in zip(ref.questions, ref.answer_texts, texts)]
    scored = [r for r in rows if r["gguf_correct"] is not None]
    return {"path": str(path), "quant": quant, "size_bytes": path.stat().st_size, "prompts": len(answers),
            "greedy_agreement": round(agreement, 4), "required_agreement": REQUIRED_AGREEMENT if strict else None,
            "near_ties": verdicts.count("tie"),
            "ended_with_end_of_turn": round(ended, 4), "merged_ended_with_end_of_turn": round(merged_ended, 4),
            "tokenized_alike": round(sum(tokenized_alike) / len(tokenized_alike), 4),
            "perplexity": perplexity, "merged_perplexity": ref.perplexity, "chat_template_ok": template_ok,
            "eos_token_id": gguf_eos, "end_of_turn_id": ref.end_of_turn_id,
            "stops_at_end_of_turn": stops_at_end_of_turn, "problems": problems, "ok": not problems,
            "accuracy": sum(r["gguf_correct"] for r in scored) / len(scored) if scored else None,
            "merged_accuracy": sum(r["merged_correct"] for r in scored) / len(scored) if scored else None,
            "rows": rows}
