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
    # the quick test keeps the default rank: it has to teach in 40 steps (a smaller rank saves it no real time)
    assert quick.config["lora_r"] <= balanced.config["lora_r"] < thorough.config["lora_r"]
    assert quick.config["max_length"] < balanced.config["max_length"] < thorough.config["max_length"]


def test_the_quick_test_ends_with_the_before_after_comparison_and_no_preset_keeps_the_old_learning_rate():
    """The quick test shows whether training taught anything (base vs tuned answers); 2e-4 taught the sample facts
    nothing in 30 steps, and the engine's learning-rate sweep moved the default to 1e-3 (README: Presets)."""
    presets = load_presets()
    quick = presets[0]
    assert quick.config["compare_questions"] > 0
    assert all(p.config["learning_rate"] >= 5e-4 for p in presets)
    assert quick.config["learning_rate"] == RunConfig().learning_rate
