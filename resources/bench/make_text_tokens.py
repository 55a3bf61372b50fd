"""Builds text_tokens.npy: real English text (the long descriptions of permissively licensed Python packages,
as installed in a venv) tokenized with the bundled SmolLM2 tokenizer, for `qlora-studio bench --speed`.

Run from the repo root with the project's venv active: python resources/bench/make_text_tokens.py
"""
from __future__ import annotations

import importlib.metadata
from pathlib import Path

import numpy as np

from qlora_engine.model import loading

PACKAGES = ["numpy", "requests", "transformers", "datasets", "peft", "accelerate", "pyyaml", "platformdirs",
            "safetensors", "tokenizers", "huggingface-hub", "fsspec", "pyarrow", "pandas", "hypothesis", "pytest",
            "urllib3", "idna", "certifi", "charset-normalizer", "jinja2", "markupsafe", "filelock", "tqdm",
            "packaging", "psutil", "regex", "pyqtgraph", "multiprocess", "dill", "xxhash", "aiohttp", "attrs",
            "networkx", "sympy", "mpmath", "typing-extensions", "six", "python-dateutil", "pytz", "tzdata"]
TOKENS = 104_448  # 51 rows of 2048


def main() -> None:
    texts = []
    for name in PACKAGES:
        try:
            description = importlib.metadata.metadata(name).get_payload()
        except importlib.metadata.PackageNotFoundError:
            continue
        if description and len(description) > 500:
            texts.append(description.strip())
    tokenizer = loading.load_tokenizer(loading.resolve_model("default").path)
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
    if len(ids) < TOKENS:
        raise SystemExit(f"only {len(ids)} tokens of text found; install more packages")
    out = Path(__file__).with_name("text_tokens.npy")
    np.save(out, np.asarray(ids[:TOKENS], dtype=np.uint16))
    print(f"{out}: {TOKENS} tokens from {len(texts)} package descriptions")


if __name__ == "__main__":
    main()
