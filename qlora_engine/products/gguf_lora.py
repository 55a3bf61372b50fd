"""`export --gguf-lora`: the adapter as a GGUF LoRA (llama.cpp's convert_lora_to_gguf.py), for people who keep one
base GGUF and swap adapters; written with the base model's f16 GGUF and checked by llama.cpp loading both, against
the plain base model with the PEFT adapter in transformers. Both files appear only when the check passed."""
from __future__ import annotations

import json
import os
from pathlib import Path

from qlora_engine.model import loading
from qlora_engine.planning.gguf_plan import supported_architectures
from qlora_engine.products import export, gguf_convert, gguf_export, gguf_verify, llama_cpp_tools
from qlora_engine.protocol.config import write_text_atomic
from qlora_engine.protocol.events import GgufExported
from qlora_engine.training.best_checkpoint import FINAL, choose_adapter


def export_gguf_lora(run_dir: Path, out: Path | None = None, progress: gguf_export.Progress = lambda s, f: None,
                     checkpoint: str = FINAL) -> GgufExported:
    cfg = export.run_config(run_dir, checkpoint)
    chosen = choose_adapter(run_dir, checkpoint)
    llama_cpp_tools.require_llama_cpp()
    converter = llama_cpp_tools.ensure_converter(progress)
    base_dir = loading.resolve_model(cfg.model, cfg.allow_pickle).path
    gguf_convert.check_architecture(base_dir, supported_architectures(converter))
    out = out or chosen.exports_dir(run_dir) / "gguf"
    gguf_export.check_resources(base_dir, ["f16"], out, merged_ready=True)
    progress("answering the check's questions with the base model and the adapter", 0.2)
    questions, rows, _ = gguf_export.verification_inputs(cfg, base_dir)
    reference = gguf_verify.reference(base_dir, questions, rows, adapter_dir=chosen.folder)
    out.mkdir(parents=True, exist_ok=True)
    gguf_export.remove_leftovers(out)
    stem, pid = gguf_export.file_stem(run_dir, chosen), os.getpid()
    finals = {"base": out / f"{stem}-base-f16.gguf", "lora": out / f"{stem}-lora-f16.gguf"}
    tmps = {name: out / f".tmp-{pid}-{path.name}" for name, path in finals.items()}
    try:
        progress("converting the base model with convert_hf_to_gguf.py", 0.4)
        gguf_convert.convert_to_gguf(base_dir, tmps["base"], "f16", converter)
        progress("converting the adapter with convert_lora_to_gguf.py", 0.6)
        gguf_convert.convert_lora_to_gguf(chosen.folder, base_dir, tmps["lora"], converter)
        progress("checking base + LoRA with llama.cpp", 0.8)
        checked = gguf_verify.check_gguf(tmps["base"], "f16", reference, lora_path=tmps["lora"])
        if checked["ok"]:
            for name in ("base", "lora"):
                os.replace(tmps[name], finals[name])
    finally:
        for path in tmps.values():
            path.unlink(missing_ok=True)
    result = GgufExported(**{**checked, "path": str(finals["lora"]), "size_bytes": finals["lora"].stat().st_size
                             if checked["ok"] else 0}, base_path=str(finals["base"]))
    if result.ok:
        write_text_atomic(chosen.exports_dir(run_dir) / "gguf-lora-verification.json",
                          json.dumps(result.to_dict(), indent=1))
    progress("verified" if result.ok else "check failed", 1.0)
    return result
