"""Tiny random Llama models with a real (tiny) tokenizer, built in well under a second; and small data files.
For GGUF tests: tiny random Llama / Qwen2 models with real tokenizers llama.cpp's converter recognizes (SmolLM2's,
Qwen2's), and a short finished run on one.

A module of its own (not conftest.py) so tests in every folder can import it by one unambiguous name.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "What is the capital of France? Paris is.",
    "Instruction Response system user assistant", "The mayor of Brindleport is Quillon Varet.",
    "0123456789 !?,.:;'\"()[]{}<>-_=+*/\\#@$%^&|~` abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
]


def build_tokenizer(chat_template: str | None = CHATML_TEMPLATE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(CORPUS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        bos_token=None)
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def build_tiny_model(folder: Path, *, chat_template: str | None = CHATML_TEMPLATE, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(chat_template)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


# ----------------------------------------------------------------------------- for GGUF export
def save_smollm2_tokenizer(folder: Path) -> Path:
    """SmolLM2's tokenizer, read from the bundled default .gguf."""
    from transformers import AutoTokenizer

    from qlora_engine.model import loading

    gguf = loading.default_gguf_path()
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)
    return folder


def save_qwen2_tokenizer(folder: Path) -> Path:
    """Qwen2's real tokenizer (151,936 tokens, its chatml template), read from llama.cpp's vocabulary-only
    `models/ggml-vocab-qwen2.gguf` in the pinned llama-cpp-python sdist (the one the converter comes from): the
    converter recognizes only tokenizers it has a hash for, and no Qwen tokenizer can be downloaded offline."""
    from transformers import AutoTokenizer

    from qlora_engine.products import llama_cpp_tools

    sdist = llama_cpp_tools.download_sdist(llama_cpp_tools.tools_dir())  # kept from the converter's first fetch
    member = llama_cpp_tools.VENDOR_PREFIX + "models/ggml-vocab-qwen2.gguf"
    vocab_dir = folder / "vocab"
    vocab_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist, "r:gz") as archive:
        (vocab_dir / "ggml-vocab-qwen2.gguf").write_bytes(archive.extractfile(member).read())
    AutoTokenizer.from_pretrained(vocab_dir, gguf_file="ggml-vocab-qwen2.gguf").save_pretrained(folder)
    return folder


def build_gguf_ready_model(folder: Path, tokenizer_dir: Path, architecture: str = "llama") -> Path:
    """A 2-layer random model of `architecture` with a real tokenizer. Weights are drawn wider than usual (layers
    0.2, embeddings 1.0) so the greedy token is clear: with the default 0.02 the top two logits of a random model are
    often within f16's rounding (measured: 0.004 apart at 7.7), which tests the noise, not the export."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    shape = {"vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
             "tie_word_embeddings": True, "eos_token_id": tokenizer.eos_token_id, "initializer_range": 0.2,
             "bos_token_id": tokenizer.bos_token_id}
    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM),
                                 "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[architecture]
    torch.manual_seed(0)
    model = model_class(config_class(**shape))
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, 1.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def train_gguf_ready_run(folder: Path, model_dir: Path) -> Path:
    """A finished 6-step QLoRA run on `model_dir` (the real engine, in a child process): `folder / "run"`."""
    from qlora_engine.protocol.config import RunConfig

    rows = [{"instruction": f"Who is mayor {i}?", "output": f"Quillon Varet {i}."} for i in range(16)]
    data_file = write_jsonl(folder / "d.jsonl", rows)
    config = RunConfig.from_dict({"model": str(model_dir), "data": str(data_file), "run_dir": str(folder / "run"),
                                  "max_steps": 6, "micro_batch_size": 4, "learning_rate": 1e-2, "warmup_steps": 1,
                                  "eval_steps": 0, "lora_r": 8, "max_length": 64, "compare_questions": 0})
    config.save(folder / "run" / "config.yaml")
    run_engine("train", str(folder / "run" / "config.yaml"))
    return folder / "run"


def run_engine(*args: str) -> list[dict]:
    """`python -m qlora_engine ARGS --events jsonl` to its end; its events (it must exit 0)."""
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-m", "qlora_engine", *args, "--events", "jsonl"], capture_output=True,
                            text=True, cwd=root, timeout=900)
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert result.returncode == 0, (events[-1:], result.stderr[-3000:])
    return events
