"""The bench's `unsloth` stack: Unsloth's own documented QLoRA recipe (FastLanguageModel.from_pretrained with
load_in_4bit, then get_peft_model) on the bench's random-init weights, saved once as a model folder for it to load.
Unsloth is not a dependency: only `bench --speed --stacks unsloth` imports it (tests/gpu/unsloth_run.sh)."""
from __future__ import annotations

import gc
import os
import time
from pathlib import Path
from typing import Any

from qlora_engine.protocol.config import RunConfig

UNSLOTH_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
UNSLOTH_FOLDERS = Path(os.environ.get("QLORA_BENCH_UNSLOTH_MODELS", "/tmp/qlora-bench-unsloth"))


def unsloth_folder(model_config: dict[str, Any], cfg: RunConfig) -> Path:
    shape = "-".join(str(model_config.get(k)) for k in ("model_type", "hidden_size", "num_hidden_layers",
                                                          "vocab_size"))
    return UNSLOTH_FOLDERS / f"{shape}-{cfg.compute_dtype}-seed0"


def save_random_model(model_config: dict[str, Any], cfg: RunConfig, device: str, folder: Path) -> None:
    """The bench's random-init weights (seed 0, built on the device in the compute dtype, as build_base does before
    quantizing) saved as safetensors with a tokenizer, for stacks that load a model folder themselves."""
    import torch

    from qlora_engine.bench import models as bench_models

    torch.manual_seed(0)
    model = bench_models.random_model(model_config, cfg, device)
    partial = folder.with_name(folder.name + ".partial")
    model.save_pretrained(partial, safe_serialization=True, max_shard_size="5GB")
    _bench_tokenizer(model_config).save_pretrained(partial)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    partial.rename(folder)


def _bench_tokenizer(model_config: dict[str, Any]) -> Any:
    """A word-level tokenizer with Llama 3's special tokens: the bench feeds token ids, so only its special tokens
    matter (a pad token that exists, so that no stack adds one and resizes the embeddings)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<unk>"]
    vocab = {token: i for i, token in enumerate(special)}
    vocab.update({f"w{i}": i for i in range(len(special), min(1000, model_config["vocab_size"]))})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=special[0], eos_token=special[1],
                                   pad_token=special[2], unk_token=special[3], padding_side="right",
                                   model_max_length=model_config.get("max_position_embeddings", 131072))


def unsloth_base(model_config: dict[str, Any], cfg: RunConfig, device: str, max_seq_length: int) -> Any:
    """Unsloth's documented loading: FastLanguageModel.from_pretrained(load_in_4bit=True) (NF4, double quant, the
    compute dtype) on a folder holding the bench's random-init weights."""
    import unsloth  # noqa: F401  (first: Unsloth patches transformers and peft as it is imported)
    from unsloth import FastLanguageModel

    from qlora_engine.model.loading import resolve_compute_dtype

    folder = unsloth_folder(model_config, cfg)
    if not (folder / "config.json").is_file():
        started = time.perf_counter()
        save_random_model(model_config, cfg, device, folder)
        print(f"saved the random-init weights to {folder} in {time.perf_counter() - started:.0f} s", flush=True)
    model, _tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(folder), max_seq_length=max_seq_length, dtype=resolve_compute_dtype(cfg.compute_dtype, device),
        load_in_4bit=True, local_files_only=True)
    return model


def unsloth_peft_model(base: Any, cfg: RunConfig, max_seq_length: int) -> Any:
    """FastLanguageModel.get_peft_model as Unsloth documents it for QLoRA: the seven linear layers of every block,
    Unsloth's gradient checkpointing (activations offloaded to CPU memory), the bench's seed as random_state."""
    from unsloth import FastLanguageModel

    return FastLanguageModel.get_peft_model(
        base, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=UNSLOTH_TARGETS,
        bias="none", use_gradient_checkpointing="unsloth" if cfg.gradient_checkpointing else False,
        random_state=0, use_rslora=False, loftq_config=None, max_seq_length=max_seq_length)
