"""Shared fixtures: tiny random Llama models (built by tests/tiny_models.py), isolated run and cache folders."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from tiny_models import build_tiny_model, write_jsonl


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def alpaca_file(tmp_path) -> Path:
    rows = [{"instruction": f"Who is the mayor number {i}?", "input": "", "output": f"Quillon Varet {i}."}
            for i in range(24)]
    return write_jsonl(tmp_path / "alpaca.jsonl", rows)


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path, monkeypatch):
    """Runs and the model cache go to temp folders, never the user's data dir."""
    monkeypatch.setenv("QLORA_STUDIO_RUNS", str(tmp_path / "runs"))
    if "QLORA_STUDIO_CACHE" not in os.environ:
        monkeypatch.setenv("QLORA_STUDIO_CACHE", str(Path(os.environ.get("QLORA_TEST_CACHE", tmp_path)) / "cache"))
