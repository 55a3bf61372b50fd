"""The catalog ("what can I fine-tune on this GPU?"): every shipped config.json counts the parameters its model page
states, and each row's numbers are the estimate's own on that config at the chosen settings, what fits first."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_engine.planning.advice import fit_verdict, max_length_that_fits
from qlora_engine.planning.catalog import build_catalog
from qlora_engine.planning.memory import estimate_peak
from qlora_engine.planning.model_shape import catalog_models, resolve_model_config, shipped_config
from qlora_engine.protocol.config import RunConfig
from qlora_engine.protocol.queries import Catalog, read_answer

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30


def test_the_catalog_holds_about_thirty_models_each_with_a_shipped_config():
    models = catalog_models()
    assert 28 <= len(models) <= 40
    assert len({m["hub_id"] for m in models}) == len(models)
    assert {"meta-llama/Llama-3.2-3B-Instruct", "Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen3-8B", "google/gemma-2-9b-it",
            "google/gemma-3-1b-it", "mistralai/Mistral-Nemo-Instruct-2407", "microsoft/phi-4",
            "HuggingFaceTB/SmolLM2-1.7B-Instruct"} <= {m["hub_id"] for m in models}


@pytest.mark.parametrize("entry", catalog_models(), ids=lambda entry: entry["config"])
def test_each_shipped_config_counts_the_parameters_its_model_page_states(entry):
    estimate = estimate_peak(shipped_config(entry), RunConfig())
    assert not estimate.approximate, estimate.reasons
    assert estimate.total_params == pytest.approx(entry["published_params"], rel=0.02)


def size_in_name(hub_id: str) -> float | None:
    """The size a model's makers put in its id ("Qwen2.5-7B-Instruct" -> 7e9), or None when there is none."""
    found = re.search(r"(?:^|[-_])(\d+(?:\.\d+)?)([bm])(?=$|[-_])", hub_id.split("/")[1].lower())
    return float(found.group(1)) * (1e9 if found.group(2) == "b" else 1e6) if found else None


@pytest.mark.parametrize("entry", [m for m in catalog_models() if size_in_name(m["hub_id"])],
                         ids=lambda entry: entry["hub_id"])
def test_each_shipped_config_is_the_size_its_name_says(entry):
    """A second check, independent of published_params: the count from config.json against the size in the model's
    id. Makers round loosely (Llama-3.2-1B has 1.24B, gemma-2-2b 2.61B), so this catches a config of another
    size of the family, not a small slip."""
    params = estimate_peak(shipped_config(entry), RunConfig()).total_params
    assert params == pytest.approx(size_in_name(entry["hub_id"]), rel=0.35)


def test_the_size_in_a_name_is_read_as_its_makers_write_it():
    assert size_in_name("HuggingFaceTB/SmolLM2-135M-Instruct") == 135e6
    assert size_in_name("TinyLlama/TinyLlama-1.1B-Chat-v1.0") == 1.1e9
    assert size_in_name("google/gemma-2-9b-it") == 9e9
    assert size_in_name("microsoft/phi-4") is None and size_in_name("mistralai/Mistral-Nemo-Instruct-2407") is None


def test_each_row_is_the_estimate_of_its_shipped_config_at_the_chosen_settings():
    run = RunConfig(max_length=1024, micro_batch_size=2, lora_r=32)
    catalog = build_catalog(run, 12 * GIB, "--gpu-memory")
    rows = {row.hub_id: row for row in catalog.entries}
    for entry in catalog_models():
        config, row = shipped_config(entry), rows[entry["hub_id"]]
        estimate = estimate_peak(config, run)
        assert row.peak_bytes == estimate.peak_bytes and row.params == estimate.total_params
        assert row.verdict == fit_verdict(estimate, 12 * GIB)
        assert row.max_length_batch1 == max_length_that_fits(config, dataclasses.replace(run, micro_batch_size=1),
                                                             12 * GIB)
        assert row.max_length_batch4 == max_length_that_fits(config, dataclasses.replace(run, micro_batch_size=4),
                                                             12 * GIB)
    order = {"fits": 0, "tight": 1, "won't fit": 2}
    verdicts = [order[row.verdict] for row in catalog.entries]
    assert verdicts == sorted(verdicts) and verdicts[0] == 0 and verdicts[-1] == 2


def test_without_a_memory_figure_the_catalog_has_estimates_but_no_verdicts():
    catalog = build_catalog(RunConfig(), None, "no NVIDIA GPU")
    assert all(row.peak_bytes > 0 and row.verdict == "" and row.max_length_batch1 is None for row in catalog.entries)


def test_a_catalog_model_by_hub_id_is_estimated_from_its_shipped_config_before_any_download(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    entry = next(m for m in catalog_models() if m["hub_id"] == "Qwen/Qwen2.5-7B-Instruct")
    assert resolve_model_config("Qwen/Qwen2.5-7B-Instruct") == shipped_config(entry)


def test_models_catalog_answers_for_a_chosen_memory(tmp_path):
    result = subprocess.run([sys.executable, "-m", "qlora_engine", "models", "--catalog", "--gpu-memory", "12GiB",
                             "--max-length", "2048", "--json"], capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env={**os.environ, "HF_HOME": str(tmp_path / "hf"), "HOME": str(tmp_path)})
    catalog = read_answer(result.stdout, Catalog)
    assert catalog.free_bytes == 12 * GIB and catalog.settings["max_length"] == 2048
    assert catalog.entries[0].verdict == "fits" and not any(row.on_disk for row in catalog.entries)
    assert json.loads(result.stdout)["kind"] == "catalog"
