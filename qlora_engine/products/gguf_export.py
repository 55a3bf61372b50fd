"""`export --gguf`: a finished run as GGUF files for llama.cpp / Ollama / LM Studio, each checked by llama.cpp.

The merged 16-bit export (made first when missing or older than the adapter) is converted by llama.cpp's own
converter to one 16-bit GGUF, quantized by llama.cpp's quantizer, and every file is loaded by llama.cpp and compared
with the merged model. Files are written under temp names and renamed only when verified: an earlier export stays.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qlora_engine.model import loading
from qlora_engine.planning import gguf_plan
from qlora_engine.planning.gguf_plan import plan_gguf, shape_params
from qlora_engine.products import export, gguf_convert, gguf_verify, llama_cpp_tools, lm_studio, modelfile
from qlora_engine.protocol.config import RunConfig, write_text_atomic
from qlora_engine.protocol.errors import EngineError
from qlora_engine.protocol.events import GgufExported
from qlora_engine.protocol.run_lock import process_alive
from qlora_engine.training.best_checkpoint import FINAL, AdapterChoice, choose_adapter

MAX_PROMPTS = 36  # the sample's held-out questions; a run's validation prompts beyond this are not asked
MAX_ROWS = 16  # validation rows for the perplexity
Progress = Callable[[str, float], None]


def export_gguf(run_dir: Path, quants: list[str], out: Path | None = None, progress: Progress = lambda s, f: None,
                lm_studio_copy: bool = False, checkpoint: str = FINAL) -> list[GgufExported]:
    """Write, verify and keep one GGUF per quantization (plus a Modelfile each) of the final adapter or a
    checkpoint's (`checkpoint`); raises when any failed its check, after keeping those that passed."""
    cfg = export.run_config(run_dir, checkpoint)
    chosen = choose_adapter(run_dir, checkpoint)
    llama_cpp_tools.require_llama_cpp()
    converter = llama_cpp_tools.ensure_converter(progress)
    out = out or chosen.exports_dir(run_dir) / "gguf"
    base_dir = _base_model_dir(cfg)
    gguf_convert.check_architecture(base_dir, llama_cpp_tools.supported_architectures(converter))
    merged_dir = chosen.exports_dir(run_dir) / "merged"
    check_resources(base_dir, quants, out, merged_ready=gguf_plan.merged_is_current(run_dir, chosen.name))
    if not gguf_plan.merged_is_current(run_dir, chosen.name):
        export.export_run(run_dir, "merged", progress=lambda stage, f: progress(f"merged: {stage}", 0.05 + 0.25 * f),
                          checkpoint=chosen.name)
    progress("answering the check's questions with the merged model", 0.35)
    questions, rows, system = verification_inputs(cfg, merged_dir)
    reference = gguf_verify.reference(merged_dir, questions, rows)
    out.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out)
    stem = file_stem(run_dir, chosen)
    source_type = "f16" if _saved_dtype(merged_dir) == "float16" else "bf16"
    source = out / f".tmp-{os.getpid()}-{stem}-source-{source_type}.gguf"
    tokenizer = loading.load_tokenizer(merged_dir)
    results = []
    try:
        progress(f"converting with llama.cpp's convert_hf_to_gguf.py ({source_type})", 0.45)
        gguf_convert.convert_to_gguf(merged_dir, source, source_type, converter)
        for index, quant in enumerate(quants):
            fraction = 0.5 + 0.45 * index / len(quants)
            results.append(_one_file(source, source_type, quant, out, stem, reference,
                                     modelfile.build_modelfile(f"{stem}-{quant}.gguf", tokenizer, system), progress,
                                     fraction, lm_studio_copy))
    finally:
        source.unlink(missing_ok=True)
    record = chosen.exports_dir(run_dir) / VERIFICATION_FILE
    write_text_atomic(record, json.dumps(merged_record(record, results), indent=1))
    progress("verified", 1.0)
    return results


VERIFICATION_FILE = "gguf-verification.json"


def merged_record(record: Path, results: list[GgufExported]) -> list[dict[str, Any]]:
    """The verification record after this export: one entry per file, earlier exports' entries kept; a file whose
    new check failed keeps its earlier passing entry while that file is still there (the failed attempt noted)."""
    try:
        earlier = json.loads(record.read_text(encoding="utf-8")) if record.is_file() else []
    except (OSError, ValueError):
        earlier = []
    entries = {entry["path"]: entry for entry in earlier if isinstance(entry, dict) and "path" in entry}
    for result in results:
        kept = entries.get(result.path)
        if not result.ok and kept is not None and kept.get("ok") and Path(result.path).is_file():
            entries[result.path] = {**kept, "later_attempt_problems": result.problems}
        else:
            entries[result.path] = result.to_dict()
    return list(entries.values())


def _one_file(source: Path, source_type: str, quant: str, out: Path, stem: str, reference: gguf_verify.Reference,
              ollama: modelfile.Modelfile, progress: Progress, fraction: float, lm_studio_copy: bool) -> GgufExported:
    final = out / f"{stem}-{quant}.gguf"
    tmp = out / f".tmp-{os.getpid()}-{stem}-{quant}.gguf"
    try:
        if quant == source_type:
            shutil.copyfile(source, tmp)
        else:
            progress(f"quantizing to {quant} with llama.cpp", fraction)
            gguf_convert.quantize_gguf(source, tmp, quant)
        progress(f"checking {quant} with llama.cpp", fraction + 0.02)
        checked = gguf_verify.check_gguf(tmp, quant, reference)
        if not checked["ok"]:
            return GgufExported(**{**checked, "path": str(final)})
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)  # a failed, killed or interrupted step leaves no partial file
    path = final.with_suffix(".Modelfile")
    write_text_atomic(path, ollama.text)
    result = GgufExported(**{**checked, "path": str(final)}, modelfile=str(path),
                          ollama_command=modelfile.ollama_command(modelfile.ollama_name(stem), path))
    if lm_studio_copy:
        result.lm_studio_path = str(lm_studio.add_to_lm_studio(final, stem))
    return result


def failures_error(results: list[GgufExported]) -> EngineError | None:
    failed = [r for r in results if not r.ok]
    if not failed:
        return None
    what = "; ".join(f"{r.quant}: {', '.join(r.problems)}" for r in failed)
    return EngineError("export_mismatch", f"GGUF check failed, file not kept: {what}",
                       "Any files that passed were kept. Report this with the run folder.")


# ----------------------------------------------------------------------------- inputs and checks
def file_stem(run_dir: Path, chosen: AdapterChoice) -> str:
    """The run's name, and the checkpoint's for a checkpoint's files (they sit side by side in LM Studio, Ollama)."""
    return run_dir.name if chosen.name == FINAL else f"{run_dir.name}-{chosen.name}"


def _base_model_dir(cfg: RunConfig) -> Path:
    return loading.resolve_model(cfg.model, cfg.allow_pickle).path


def _saved_dtype(merged_dir: Path) -> str:
    config = json.loads((merged_dir / "config.json").read_text(encoding="utf-8"))
    return str(config.get("dtype") or config.get("torch_dtype") or "bfloat16")


def verification_inputs(cfg: RunConfig, merged_dir: Path) -> tuple[list[dict[str, Any]], list[list[int]], str]:
    """The check's questions (the sample's held-out ones, else the validation prompts), validation rows for the
    perplexity, and the training data's system prompt; the fixed prompt alone when the data is gone."""
    from qlora_engine.training import compare, loop

    tokenizer = loading.load_tokenizer(merged_dir)
    try:
        prepared = loop.prepare_data(cfg, tokenizer)
    except EngineError:
        return [{"question": export.FIXED_PROMPT}], [], ""
    questions = compare.heldout_questions(cfg, prepared, tokenizer)[:MAX_PROMPTS] or [{"question": export.FIXED_PROMPT}]
    rows = [example.input_ids for example in prepared.val_examples[:MAX_ROWS]]
    return questions, rows, _system_prompt(cfg)


def _system_prompt(cfg: RunConfig) -> str:
    from qlora_engine.training import data, loop

    try:
        records, _ = data.read_records(loop.data_path(cfg.data))
        fmt = cfg.data_format if cfg.data_format != "auto" else data.detect_majority_format(records)
        examples = []
        for line, record in records:
            try:
                examples.append(data.normalize(record, fmt, line))
            except data.RowError:
                continue
    except (EngineError, OSError):
        return ""
    return modelfile.training_system_prompt(examples)


def check_resources(base_dir: Path, quants: list[str], out: Path, merged_ready: bool) -> None:
    """Stop before the merge when RAM or disk is short, naming how much is needed and there."""
    from qlora_engine.planning.model_shape import load_model_config, model_shape

    try:
        plan = plan_gguf(shape_params(model_shape(load_model_config(base_dir))[0]), quants,
                         merged_exists=merged_ready)
    except EngineError:
        return  # a config the plan can't read: the merge itself will say more
    problems = gguf_plan.resource_problems(plan, out, gguf_plan.free_disk_bytes(out), gguf_plan.available_ram_bytes())
    if problems:
        raise problems[0]


def remove_leftovers(out: Path) -> None:
    """Temp files of a killed export (their pid no longer runs) go; a running export's stay."""
    for leftover in out.glob(".tmp-*.gguf"):
        owner = leftover.name.split("-")[1]
        if owner.isdigit() and int(owner) != os.getpid() and process_alive(int(owner)):
            continue
        leftover.unlink(missing_ok=True)
