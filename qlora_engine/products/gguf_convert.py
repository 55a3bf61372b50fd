"""A merged 16-bit folder to GGUF files with llama.cpp's own code: `convert_hf_to_gguf.py` (the pinned copy) writes the
16-bit GGUF, llama.cpp's quantizer (`llama_model_quantize` through the `llama_cpp` binding) makes the others.

Both run in a child process (the converter is a script; the quantizer is C++ that may abort) and write to the path
given, which callers make a temp name; on failure the partial file is removed and the error says what to do.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from qlora_engine.products.llama_cpp_tools import INSTALL_ADVICE
from qlora_engine.protocol.errors import EngineError, write_failure

# llama.cpp's file types (llama.h's llama_ftype), by the names the CLI takes.
FTYPE_NAMES = {"f16": "LLAMA_FTYPE_MOSTLY_F16", "bf16": "LLAMA_FTYPE_MOSTLY_BF16", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
               "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
               "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
LOG_TAIL_CHARS = 1200


def check_architecture(merged_dir: Path, supported: set[str]) -> str:
    """The model's architecture, or an error before anything is merged when the converter has no class for it."""
    config = json.loads((merged_dir / "config.json").read_text(encoding="utf-8"))
    architectures = config.get("architectures") or [config.get("model_type", "?")]
    if supported and not set(architectures) & supported:
        raise EngineError("gguf_unsupported_architecture",
                          f"llama.cpp's converter has no support for {', '.join(architectures)}",
                          "Export the merged model (--merged) and use it with transformers, or pick a model "
                          "llama.cpp supports (Llama, Qwen, Mistral, Gemma, Phi, SmolLM …) for the next run.")
    return architectures[0]


def convert_to_gguf(merged_dir: Path, out_file: Path, outtype: str, converter: Path) -> None:
    """Run llama.cpp's convert_hf_to_gguf.py on the merged folder, writing `out_file` (f16 or bf16)."""
    command = [sys.executable, str(converter / "convert_hf_to_gguf.py"), str(merged_dir),
               "--outfile", str(out_file), "--outtype", outtype]
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # its own gguf-py, not another version
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode == 0 and out_file.is_file():
        return
    out_file.unlink(missing_ok=True)
    raise conversion_error(result.stderr + result.stdout, out_file.parent)


def convert_lora_to_gguf(adapter_dir: Path, base_dir: Path, out_file: Path, converter: Path) -> None:
    """Run llama.cpp's convert_lora_to_gguf.py on a PEFT adapter (f16), its base's config read from `base_dir`."""
    command = [sys.executable, str(converter / "convert_lora_to_gguf.py"), str(adapter_dir), "--base", str(base_dir),
               "--outfile", str(out_file), "--outtype", "f16"]
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode == 0 and out_file.is_file():
        return
    out_file.unlink(missing_ok=True)
    raise conversion_error(result.stderr + result.stdout, out_file.parent)


def conversion_error(log: str, folder: Path) -> EngineError:
    """What a failed convert_hf_to_gguf.py run means, from its log."""
    tail = log.strip()[-LOG_TAIL_CHARS:]
    last_line = (log.strip().splitlines() or [""])[-1]  # a known cause: its traceback would bury the advice
    if "pre-tokenizer was not recognized" in log or "Cannot find" in log and "tokenizer" in log:
        return EngineError("gguf_tokenizer_unsupported",
                           "llama.cpp's converter cannot read this model's tokenizer (its pre-tokenizer is not one "
                           "llama.cpp knows)", "Use the merged export with transformers, or a model whose tokenizer "
                           "llama.cpp supports. The converter said: " + last_line)
    if "is not supported" in log or "Unsupported" in log and "architecture" in log.lower():
        return EngineError("gguf_unsupported_architecture", "llama.cpp's converter does not support this model",
                           "Use the merged export with transformers. The converter said: " + last_line)
    failure = write_failure(RuntimeError(log), "the GGUF file", folder, "export again")
    if failure is not None and failure.code == "disk_full":
        return failure
    return EngineError("gguf_convert_failed", "llama.cpp's converter failed", "Converter log:\n" + tail)


def quantize_gguf(source: Path, out_file: Path, quant: str) -> None:
    """llama.cpp's quantizer, `source` (16-bit GGUF) to `out_file` at `quant`, in a child process."""
    command = [sys.executable, "-m", "qlora_engine.products.gguf_convert", str(source), str(out_file), quant]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode == 0 and out_file.is_file():
        return
    out_file.unlink(missing_ok=True)
    log = result.stderr + result.stdout
    if "No module named 'llama_cpp'" in log:
        raise EngineError("gguf_tools_missing", "llama-cpp-python is not installed", INSTALL_ADVICE)
    failure = write_failure(RuntimeError(log), f"the {quant} GGUF file", out_file.parent, "export again")
    if failure is not None and failure.code == "disk_full":
        raise failure
    raise EngineError("gguf_quantize_failed", f"llama.cpp's quantizer failed to make {quant} (exit "
                      f"{result.returncode})", "Quantizer log:\n" + log.strip()[-LOG_TAIL_CHARS:])


def _quantize_main(argv: list[str]) -> int:
    """The child process: one call of llama_model_quantize."""
    import ctypes

    import llama_cpp

    source, out_file, quant = argv
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPE_NAMES[quant])
    params.nthread = os.cpu_count() or 1
    return int(llama_cpp.llama_model_quantize(source.encode(), out_file.encode(), ctypes.byref(params)))


if __name__ == "__main__":
    sys.exit(_quantize_main(sys.argv[1:]))
