"""llama.cpp's own tools, pinned: the converter scripts (from llama-cpp-python's source distribution) and the
`llama_cpp` binding (the `gguf` extra). Holds where they are and how they get there; not the conversion itself.

The wheel of llama-cpp-python carries the library but not `convert_hf_to_gguf.py`, which is only in the sdist's
`vendor/llama.cpp/`. So the converter is taken from that sdist, whose sha256 is pinned here (PyPI publishes the same
hash): fetched once with pip (or given as a file), its converter files extracted unchanged into the tools folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

from qlora_engine.planning.gguf_plan import LLAMA_CPP_PYTHON_VERSION, converter_dir, supported_architectures, tools_dir
from qlora_engine.protocol.errors import EngineError, write_failure

__all__ = ["converter_dir", "ensure_converter", "require_llama_cpp", "supported_architectures", "tools_dir"]

SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
# The two scripts as llama.cpp ships them in that sdist; checked again every time the tools are used.
SCRIPT_SHA256 = {"convert_hf_to_gguf.py": "e9a1da876330bbce9687541ab31736542a01b4ac43c6686126514a50f122fb7f",
                 "convert_lora_to_gguf.py": "3c5f109f3d7a5ef530ea388d8e994512df6f544ce1aa8b2e39be446223637b93"}
VENDOR_PREFIX = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
# What the converters import: the scripts, llama.cpp's `conversion` package and its own gguf-py (which the
# scripts put first on sys.path, so the gguf package they use is the one they were written against).
KEPT_PREFIXES = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/gguf/", "LICENSE")
SDIST_ENV = "QLORA_STUDIO_LLAMA_CPP_SDIST"
MANIFEST = "manifest.json"
INSTALL_ADVICE = 'Install the GGUF tools: pip install "qlora-studio[gguf]" (builds llama.cpp, about 10 minutes).'


def require_llama_cpp() -> object:
    """The `llama_cpp` binding at the pinned version, or an error saying how to install it."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise EngineError("gguf_tools_missing", f"llama-cpp-python is not installed ({exc})", INSTALL_ADVICE) from exc
    version = getattr(llama_cpp, "__version__", "?")
    if version != LLAMA_CPP_PYTHON_VERSION:
        raise EngineError("gguf_tools_missing", f"llama-cpp-python {version} is installed; GGUF export is tested "
                          f"with {LLAMA_CPP_PYTHON_VERSION} only", INSTALL_ADVICE)
    return llama_cpp


def ensure_converter(progress: Callable[[str, float], None] = lambda stage, fraction: None) -> Path:
    """The folder holding llama.cpp's converter scripts, extracted from the pinned sdist on first use."""
    folder = converter_dir()
    if not _intact(folder):
        progress(f"fetching llama.cpp's converter (llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist, once)", 0.02)
        sdist = Path(os.environ[SDIST_ENV]) if os.environ.get(SDIST_ENV) else download_sdist(tools_dir())
        extract_converter(sdist, folder)
    return folder


def _intact(folder: Path) -> bool:
    if not (folder / MANIFEST).is_file():
        return False
    return all((folder / name).is_file() and file_sha256(folder / name) == digest
               for name, digest in SCRIPT_SHA256.items())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_sdist(into: Path) -> Path:
    """The pinned sdist, fetched by pip from the package index (pip checks the index's hash, we check ours)."""
    target = into / SDIST_NAME
    if target.is_file() and file_sha256(target) == SDIST_SHA256:
        return target
    into.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               "--dest", str(into), f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not target.is_file():
        raise EngineError("gguf_tools_missing", f"could not download {SDIST_NAME}: {result.stderr.strip()[-400:]}",
                          f"Connect to the internet once, or download {SDIST_NAME} from PyPI yourself and set "
                          f"{SDIST_ENV} to its path.")
    return target


def extract_converter(sdist: Path, folder: Path) -> None:
    """Unpack the converter files of the sdist (after checking its hash) into `folder`, atomically."""
    if not sdist.is_file() or file_sha256(sdist) != SDIST_SHA256:
        raise EngineError("gguf_tools_mismatch", f"{sdist} is not llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}'s "
                          f"sdist (sha256 {SDIST_SHA256[:12]}… expected)",
                          f"Download {SDIST_NAME} from PyPI again (or unset {SDIST_ENV}).")
    tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    manifest: dict[str, str] = {}
    try:
        with tarfile.open(sdist, "r:gz") as archive:
            for member in archive:
                name = member.name.removeprefix(VENDOR_PREFIX)
                if name == member.name or not member.isfile() or not name.startswith(KEPT_PREFIXES):
                    continue
                destination = tmp / name
                destination.parent.mkdir(parents=True, exist_ok=True)
                with archive.extractfile(member) as source, open(destination, "wb") as out:
                    shutil.copyfileobj(source, out)
                manifest[name] = file_sha256(destination)
        (tmp / MANIFEST).write_text(json.dumps({"sdist": SDIST_NAME, "sdist_sha256": SDIST_SHA256,
                                                "files": manifest}, indent=1), encoding="utf-8")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        error = write_failure(exc, "llama.cpp's converter", folder.parent, "export again")
        if error is None:
            raise
        raise error from exc
    if not _intact(folder):
        raise EngineError("gguf_tools_mismatch", f"the converter in {folder} differs from the pinned one",
                          f"Delete {folder} and export again.")
