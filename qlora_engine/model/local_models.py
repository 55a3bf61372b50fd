"""Models already on disk: what the HF cache holds (huggingface_hub's scan_cache_dir), and the .gguf files in
Ollama's and LM Studio's model folders (which the GGUF import can load). Listing only: nothing is read beyond
config.json and a GGUF's header, nothing is downloaded or converted.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from qlora_engine.model.hub import hf_cache_dir, snapshot_is_complete
from qlora_engine.protocol.queries import LocalModel, LocalModels

GGUF_MAGIC = b"GGUF"
OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"


def ollama_folders() -> list[Path]:
    """OLLAMA_MODELS, else the user's ~/.ollama/models and the Linux service's /usr/share/ollama/.ollama/models."""
    if os.environ.get("OLLAMA_MODELS"):
        return [Path(os.environ["OLLAMA_MODELS"]).expanduser()]
    return [Path.home() / ".ollama" / "models", Path("/usr/share/ollama/.ollama/models")]


def lm_studio_folders() -> list[Path]:
    """LM Studio's models folder: ~/.lmstudio/models (0.3 and later), ~/.cache/lm-studio/models before."""
    return [Path.home() / ".lmstudio" / "models", Path.home() / ".cache" / "lm-studio" / "models"]


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == GGUF_MAGIC
    except OSError:
        return False


def gguf_architecture(path: Path) -> str | None:
    """general.architecture from the file's header, or None when it can't be read."""
    try:
        from gguf import GGUFReader

        field = GGUFReader(path).get_field("general.architecture")
        return bytes(field.parts[field.data[0]]).decode("utf-8") if field is not None else None
    except Exception:  # a damaged or unknown file: listed, its architecture unknown
        return None


# ----------------------------------------------------------------------------- the HF cache
def hf_cache_models(cache_dir: Path | None = None) -> list[LocalModel]:
    """Each model repo in the cache, at its newest revision: safetensors repos by id, GGUF repos by file."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(cache_dir or hf_cache_dir())
    except CacheNotFound:
        return []
    models = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        revision = max(repo.revisions, key=lambda r: ("main" in r.refs, r.last_modified))
        folder = Path(revision.snapshot_path)
        ggufs = sorted(f.file_path for f in revision.files if f.file_name.endswith(".gguf"))
        if (folder / "config.json").is_file():
            models.append(LocalModel(
                name=repo.repo_id, source="hf_cache", model=repo.repo_id, path=str(folder), format="safetensors",
                size_bytes=revision.size_on_disk, architecture=_config_architecture(folder / "config.json"),
                complete=snapshot_is_complete(folder), commit=revision.commit_hash))
        models += [LocalModel(name=f"{repo.repo_id}/{path.name}", source="hf_cache", model=str(path), path=str(path),
                              format="gguf", size_bytes=path.stat().st_size, architecture=gguf_architecture(path),
                              commit=revision.commit_hash) for path in ggufs]
    return models


def _config_architecture(path: Path) -> str | None:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return (config.get("architectures") or [config.get("model_type")])[0]


# ----------------------------------------------------------------------------- Ollama, LM Studio
def ollama_models(folder: Path) -> list[LocalModel]:
    """Ollama keeps each model as a manifest (manifests/<registry>/<namespace>/<name>/<tag>) naming blobs; the
    model layer's blob is a GGUF file without the suffix."""
    models = []
    for manifest in sorted(p for p in (folder / "manifests").rglob("*") if p.is_file()):
        try:
            layers = json.loads(manifest.read_text(encoding="utf-8")).get("layers", [])
        except (OSError, ValueError):
            continue
        digest = next((layer.get("digest", "") for layer in layers if layer.get("mediaType") == OLLAMA_MODEL_LAYER),
                      "")
        blob = folder / "blobs" / digest.replace(":", "-")
        if not digest or not blob.is_file() or not is_gguf(blob):
            continue
        namespace, name, tag = manifest.parts[-3:]
        models.append(LocalModel(
            name=(f"{name}:{tag}" if namespace == "library" else f"{namespace}/{name}:{tag}"), source="ollama",
            model=str(blob), path=str(blob), format="gguf", size_bytes=blob.stat().st_size,
            architecture=gguf_architecture(blob)))
    return models


def gguf_files(folder: Path, source: str) -> list[LocalModel]:
    """Every .gguf under an LM Studio-style folder (<publisher>/<model>/<file>.gguf); vision projectors left out."""
    return [LocalModel(name=str(path.relative_to(folder)), source=source, model=str(path), path=str(path),
                       format="gguf", size_bytes=path.stat().st_size, architecture=gguf_architecture(path))
            for path in sorted(folder.rglob("*.gguf")) if path.is_file() and not path.name.startswith("mmproj")]


def local_models(cache_dir: Path | None = None) -> LocalModels:
    """Everything on disk, and each folder looked in (whether it exists)."""
    cache = cache_dir or hf_cache_dir()
    answer = LocalModels(models=hf_cache_models(cache), folders=[{"source": "hf_cache", "path": str(cache),
                                                                   "exists": cache.is_dir()}])
    for source, folders, lister in (("ollama", ollama_folders(), ollama_models),
                                    ("lm_studio", lm_studio_folders(), lambda f: gguf_files(f, "lm_studio"))):
        for folder in folders:
            answer.folders.append({"source": source, "path": str(folder), "exists": folder.is_dir()})
            if folder.is_dir():
                answer.models += lister(folder)
    return answer
