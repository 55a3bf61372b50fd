"""The Train page's presets, read from resources/presets.yaml (each a partial RunConfig)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from app.paths import resource
from qlora_engine.protocol.config import RunConfig


@dataclass
class Preset:
    name: str
    label: str
    description: str
    config: dict[str, Any]

    def matches(self, config: RunConfig) -> bool:
        return all(getattr(config, key) == value for key, value in self.config.items())


def load_presets(path: Path | None = None) -> list[Preset]:
    entries = yaml.safe_load((path or resource("presets.yaml")).read_text(encoding="utf-8")) or []
    return [Preset(e["name"], e["label"], e["description"], dict(e["config"])) for e in entries]
