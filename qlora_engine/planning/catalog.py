"""The catalog ("what can I fine-tune on this GPU?"): about 30 popular open models shipped as their config.json
(resources/model_configs/, listed in resources/catalog.json), each estimated at the chosen settings against free
memory before anything is downloaded. Every number is memory.estimate_peak's and advice.py's.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from qlora_engine.planning.advice import fit_verdict, max_length_that_fits
from qlora_engine.planning.memory import estimate_peak
from qlora_engine.planning.model_shape import catalog_models, model_shape, shipped_config
from qlora_engine.protocol.config import RunConfig
from qlora_engine.protocol.errors import EngineError
from qlora_engine.protocol.queries import Catalog, CatalogEntry

VERDICT_ORDER = {"fits": 0, "tight": 1, "won't fit": 2, "": 3}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
SETTINGS_SHOWN = ("max_length", "micro_batch_size", "lora_r", "target_modules", "gradient_checkpointing",
                  "optimizer", "compute_dtype")


def download_bytes(config: dict[str, Any], params: int) -> int:
    """The weights as the Hub stores them: parameters x the bytes of config.json's torch_dtype (bf16 if unsaid)."""
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    return params * DTYPE_BYTES.get(dtype, 2)


def catalog_entry(entry: dict[str, Any], run: RunConfig, free_bytes: int | None) -> CatalogEntry:
    config = shipped_config(entry)
    estimate = estimate_peak(config, run)
    row = CatalogEntry(
        name=entry["name"], hub_id=entry["hub_id"], params=estimate.total_params,
        published_params=entry["published_params"], download_bytes=download_bytes(config, estimate.total_params),
        gated=entry["gated"], license=entry["license"], peak_bytes=estimate.peak_bytes,
        approximate=estimate.approximate, context_length=model_shape(config)[0].max_position_embeddings)
    if free_bytes is not None:
        row.verdict = fit_verdict(estimate, free_bytes)
        row.max_length_batch1 = max_length_that_fits(config, dataclasses.replace(run, micro_batch_size=1), free_bytes)
        row.max_length_batch4 = max_length_that_fits(config, dataclasses.replace(run, micro_batch_size=4), free_bytes)
    return row


def build_catalog(run: RunConfig, free_bytes: int | None, memory_source: str) -> Catalog:
    """Every catalog model at `run`'s settings, what fits first."""
    entries = []
    for entry in catalog_models():
        try:
            entries.append(catalog_entry(entry, run, free_bytes))
        except EngineError as exc:  # a shipped config the estimate can't read is a bug in the catalog
            raise EngineError("bad_model_config", f"catalog model {entry['name']}: {exc.message}",
                              "Reinstall QLoRA Studio; if it persists, report it.") from exc
    # Within fits / tight the largest model first; among those that don't fit, the closest to fitting first.
    entries.sort(key=lambda row: (VERDICT_ORDER[row.verdict], row.peak_bytes if row.verdict == "won't fit"
                                  else -row.params))
    settings = {name: getattr(run, name) for name in SETTINGS_SHOWN}
    return Catalog(memory_source=memory_source, free_bytes=free_bytes, settings=settings, entries=entries)


def format_catalog(catalog: Catalog) -> str:
    """The catalog as a terminal table."""
    gib = 2**30
    memory = (f"{catalog.memory_source}, {catalog.free_bytes / gib:.1f} GiB free" if catalog.free_bytes is not None
              else f"{catalog.memory_source} (pass --gpu-memory 12GiB to check a card)")
    settings = ", ".join(f"{k} {v}" for k, v in catalog.settings.items())
    lines = [f"What can be fine-tuned: {memory}", f"at {settings}", "",
             f"{'model':<30}{'hub id':<46}{'params':>8}{'download':>10}{'peak':>8}  {'verdict':<10}"
             f"{'longest at batch 1':>19}{'at 4':>7}"]
    for row in catalog.entries:
        lock = " (gated)" if row.gated else ""
        lines.append(f"{row.name[:29]:<30}{(row.hub_id + lock)[:45]:<46}{row.params / 1e9:>7.2f}B"
                     f"{row.download_bytes / 1e9:>8.1f}GB{row.peak_bytes / gib:>6.1f}Gi  {row.verdict or '-':<10}"
                     f"{row.max_length_batch1 or '-':>19}{row.max_length_batch4 or '-':>7}")
    return "\n".join(lines)
