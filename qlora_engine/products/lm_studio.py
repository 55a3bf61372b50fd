""""Add to LM Studio": a verified GGUF placed in LM Studio's models folder, in its `<publisher>/<model>/<file>.gguf`
layout, hard-linked when on the same drive (no second copy), else copied to a temp name and renamed."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from qlora_engine.protocol.errors import EngineError, write_failure

MODELS_ENV = "QLORA_STUDIO_LMSTUDIO_MODELS"
PUBLISHER = "qlora-studio"


def models_folder() -> Path:
    """LM Studio's models folder: $QLORA_STUDIO_LMSTUDIO_MODELS, ~/.lmstudio/models, or the older
    ~/.cache/lm-studio/models when only that one exists."""
    if os.environ.get(MODELS_ENV):
        return Path(os.environ[MODELS_ENV]).expanduser()
    current, older = Path.home() / ".lmstudio" / "models", Path.home() / ".cache" / "lm-studio" / "models"
    return older if older.is_dir() and not current.is_dir() else current


def add_to_lm_studio(gguf: Path, model_name: str, folder: Path | None = None) -> Path:
    """Put `gguf` at <models>/qlora-studio/<model_name>/<file>; returns where it is now."""
    target = (folder or models_folder()) / PUBLISHER / model_name / gguf.name
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    if target.exists() and os.path.samefile(target, gguf):
        return target  # already linked (rename() of one hard link onto another would do nothing)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.unlink(missing_ok=True)
        try:
            os.link(gguf, tmp)
        except OSError:  # another drive, or a file system without hard links
            shutil.copyfile(gguf, tmp)
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise (write_failure(exc, "the GGUF into LM Studio's models folder", target.parent, "add it again")
               or EngineError("write_failed", str(exc))) from exc
    return target
