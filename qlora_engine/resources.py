"""Where the bundled resources (sample data, presets, themes, icon) are, installed or in a checkout.

Installed, resources/ is the package `qlora_studio_resources`; in a plain checkout it is the folder beside us.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

CHECKOUT_RESOURCES = Path(__file__).resolve().parent.parent / "resources"


def resources_dir() -> Path:
    spec = importlib.util.find_spec("qlora_studio_resources")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return CHECKOUT_RESOURCES
