""""Add to LM Studio": the file lands in LM Studio's <publisher>/<model>/<file>.gguf layout, hard-linked on the same
drive (no second copy of a multi-GB file); and Ollama's command when ollama is absent."""
from __future__ import annotations

import pytest

from qlora_engine.products import lm_studio, modelfile
from qlora_engine.protocol.errors import EngineError


def test_a_gguf_is_hard_linked_into_lm_studios_layout(tmp_path, monkeypatch):
    gguf = tmp_path / "exports" / "run-q4_k_m.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF fake payload")
    monkeypatch.setenv(lm_studio.MODELS_ENV, str(tmp_path / "lmstudio"))
    placed = lm_studio.add_to_lm_studio(gguf, "my-run")
    assert placed == tmp_path / "lmstudio" / "qlora-studio" / "my-run" / "run-q4_k_m.gguf"
    assert placed.read_bytes() == gguf.read_bytes() and placed.stat().st_ino == gguf.stat().st_ino
    assert lm_studio.add_to_lm_studio(gguf, "my-run") == placed  # again: replaced, no temp file left
    assert [p.name for p in placed.parent.iterdir()] == ["run-q4_k_m.gguf"]


def test_without_ollama_the_error_gives_the_command_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EngineError) as caught:
        modelfile.ollama_create("my-run", tmp_path / "run.Modelfile")
    assert caught.value.code == "ollama_missing"
    assert f"ollama create my-run -f {tmp_path / 'run.Modelfile'}" in caught.value.advice
