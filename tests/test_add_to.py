"""`qlora-studio add-to lm-studio|ollama FILE --json`, the command behind the Export page's "Add to LM Studio" and
"Create in Ollama": its typed answer, the file's place in LM Studio's folder, and what it says without Ollama."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from qlora_engine.protocol import queries
from qlora_engine.protocol.errors import EngineError

ROOT = Path(__file__).resolve().parent.parent


def add_to(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qlora_engine", "add-to", *args, "--json"], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, **env}, timeout=300)


def test_add_to_lm_studio_hard_links_the_file_into_its_layout(tmp_path):
    gguf = tmp_path / "exports" / "my-run-q4_k_m.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + bytes(64))
    result = add_to("lm-studio", str(gguf), "--name", "my-run",
                    env={"QLORA_STUDIO_LMSTUDIO_MODELS": str(tmp_path / "lms")})
    answer = queries.read_answer(result.stdout, queries.AddedTo)
    placed = tmp_path / "lms" / "qlora-studio" / "my-run" / gguf.name
    assert result.returncode == 0 and answer.app == "lm-studio" and Path(answer.where) == placed
    assert os.path.samefile(placed, gguf)


def test_create_in_ollama_without_ollama_says_what_to_run(tmp_path):
    gguf = tmp_path / "my-run-q4_k_m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(64))
    result = add_to("ollama", str(gguf), "--name", "My Run", env={"PATH": str(Path(sys.executable).parent)})
    try:
        queries.read_answer(result.stdout, queries.AddedTo)
    except EngineError as exc:
        assert exc.code == "ollama_missing"
        assert f"ollama create my-run -f {gguf.with_suffix('.Modelfile')}" in exc.advice
    else:
        raise AssertionError("add-to ollama answered without ollama on PATH")
    assert result.returncode == 1
