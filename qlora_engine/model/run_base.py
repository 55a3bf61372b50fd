"""The frozen base of a run, as training saw it: uniform 4-bit (transformers' bitsandbytes loading) or the
mixed-precision plan of precision_budget, and the base a LoftQ / PiSSA / OLoRA start left (adapter_init).

Training, resume, chat and export all build the base here, from the run folder's files, so they agree.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from qlora_engine.model import adapter_init, loading, precision_budget
from qlora_engine.protocol.config import RunConfig


def load_base(cfg: RunConfig, model_path: Path, device: str, compute_dtype: Any, run_dir: Path | None = None,
              sharded: bool = False) -> Any:
    """The quantized base model (`sharded`: stored so that FSDP can shard it); with a precision budget, the plan in
    `run_dir` (made and written there if absent)."""
    if cfg.precision_budget_bits <= 0:
        return loading.load_quantized_model(model_path, quant_type=cfg.quant_type, double_quant=cfg.double_quant,
                                            compute_dtype=compute_dtype, device=device,
                                            allow_pickle=cfg.allow_pickle, trust_remote_code=cfg.trust_remote_code,
                                            shardable=sharded)

    def load_16bit() -> Any:
        return loading.load_plain_model(model_path, dtype=compute_dtype, device="cpu", allow_pickle=cfg.allow_pickle,
                                        trust_remote_code=cfg.trust_remote_code)

    plan_path = run_dir / precision_budget.PLAN_FILE if run_dir is not None else None
    model, _ = precision_budget.planned_model(load_16bit, cfg, compute_dtype, device, plan_path)
    return model


def load_trained_base(cfg: RunConfig, model_path: Path, device: str, compute_dtype: Any, run_dir: Path) -> Any:
    """The base of a finished run, the adapter not yet on it: plan applied, the init's base changes rebuilt."""
    model = load_base(cfg, model_path, device, compute_dtype, run_dir)
    init_file = run_dir / adapter_init.INIT_FILE
    if init_file.is_file():
        adapter_init.apply_corrections(model, init_file, model_path)
    return model


def adapter_is_residual(run_dir: Path) -> bool:
    """Whether the run's adapter start (PiSSA, OLoRA) moved part of the weights into the adapter: then the adapter
    alone is not a change to the original model and is exported converted (adapter_init.adapter_over_original)."""
    init_file = run_dir / adapter_init.INIT_FILE
    return init_file.is_file() and adapter_init.init_method(init_file) in adapter_init.RESIDUAL_STARTS
