"""resources/presets.yaml: each preset names real options with values the engine accepts."""
from __future__ import annotations

import dataclasses

from app.presets import load_presets
from qlora_engine.protocol.config import RunConfig


def test_each_preset_is_a_valid_partial_run_config():
    presets = load_presets()
    assert [p.name for p in presets] == ["quick_test", "balanced", "thorough"]
    for preset in presets:
        config = dataclasses.replace(RunConfig(), **preset.config).validate()
        assert preset.matches(config)


def test_presets_get_heavier_in_the_order_shown():
    quick, balanced, thorough = load_presets()
    assert quick.config["max_steps"] > 0  # a quick test is bounded whatever the data size
    assert quick.config["lora_r"] < balanced.config["lora_r"] < thorough.config["lora_r"]
    assert quick.config["max_length"] < balanced.config["max_length"] < thorough.config["max_length"]
