"""The estimate held against measured peaks (`qlora-studio bench --memory` rows): per-row error, summary, table.

The fitted constants themselves are calibration.json, loaded by memory.py; this module only compares.
"""
from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_engine.planning.memory import BYTES_PER_GIB, estimate_peak, format_gib
from qlora_engine.planning.model_shape import load_model_config
from qlora_engine.protocol.config import RunConfig
from qlora_engine.resources import resources_dir

MEASURED_MODEL_CONFIGS = resources_dir() / "model_configs"
# NVML's peak beyond torch's max reserved is the CUDA context, kernels and paged states: about 1.3-1.9 GiB on an
# H100. Far more means memory from outside the measured step (e.g. freed weights not yet garbage-collected).
ARTIFACT_OVERHEAD_BYTES = 3 * BYTES_PER_GIB


def measured_bytes(row: dict[str, Any]) -> int:
    """What a `bench --memory` row measured, the number the estimate predicts: the GPU's used memory (NVML) at
    the peak minus its used memory before the process touched CUDA (or NVML's per-process count, where the row
    has it)."""
    if row.get("process_peak_used_bytes"):  # NVML's own count for the process (several processes shared the GPU)
        return int(row["process_peak_used_bytes"])
    if row.get("outside_torch_assumed_bytes"):  # shared GPU, no per-process count: torch's peak + the first row's rest
        return int(row["max_reserved_bytes"]) + int(row["outside_torch_assumed_bytes"])
    return int(row["nvml_peak_used_bytes"]) - int(row["idle_gpu_used_bytes"])


def row_run_config(row: dict[str, Any]) -> RunConfig:
    """The RunConfig a bench row ran: its RunConfig fields (except model, the architecture's file stem), the
    rest the defaults, and compute in bf16: what compute_dtype 'auto' is on a CUDA GPU, whatever runs this."""
    names = {spec.name for spec in dataclasses.fields(RunConfig)} - {"model"}
    # Rows measured before the speed switches existed ran peft's path with padded batches and full logits.
    earlier_engine = {"packing": False, "chunked_loss": False, "fused_lora": False, "compile_layers": False,
                      "fp32_residual": False}
    # and every row so far ran the paged 8-bit optimizer, the default until 2026-12-02
    values = {"compute_dtype": "bf16", "optimizer": "paged_adamw_8bit", **earlier_engine,
              **{name: row[name] for name in names if name in row}}
    run = RunConfig(**values).validate()
    if run.packing and run.micro_batch_size > 1:
        # packed, the step held one row of the micro-batch's real tokens, fewer than batch x max_length (the bench's
        # rows: the first at full length, the others a quarter shorter); the estimate of that row is comparable
        tokens = row.get("step_tokens") or run.max_length + (run.micro_batch_size - 1) * (3 * run.max_length // 4)
        run = dataclasses.replace(run, micro_batch_size=1, max_length=int(tokens))
    return run


def row_artifact(row: dict[str, Any]) -> str:
    """Why a measured row can't be held against the estimate ('' when it can)."""
    if row.get("oom"):
        return "the run ran out of memory: its peak is not the step's"
    outside = measured_bytes(row) - int(row["max_reserved_bytes"]) if (
        row.get("process_peak_used_bytes") or row.get("outside_torch_assumed_bytes")) else \
        int(row["nvml_peak_used_bytes"]) - int(row["max_reserved_bytes"])
    if outside > ARTIFACT_OVERHEAD_BYTES:
        return (f"NVML saw {format_gib(outside)} more than torch reserved (expected ~1.3-1.9 GiB): memory from outside "
                "the measured step, such as the bench's freed random-init weights. An artifact: re-measure this row")
    return ""


@dataclass
class CalibrationError:
    model: str
    max_length: int
    micro_batch_size: int
    lora_r: int
    gradient_checkpointing: bool
    measured_bytes: int
    estimate_bytes: int
    artifact: str  # '' or why the row can't be held against the estimate

    @property
    def error(self) -> float:
        """(estimate - measured) / measured: positive when the estimate is too high."""
        return (self.estimate_bytes - self.measured_bytes) / self.measured_bytes

    @property
    def label(self) -> str:
        return (f"{self.model} len {self.max_length} batch {self.micro_batch_size} r {self.lora_r} "
                f"gc {'on' if self.gradient_checkpointing else 'off'}")


def calibration_errors(rows: Iterable[dict[str, Any]], model_configs: Path = MEASURED_MODEL_CONFIGS,
                       calibration: dict[str, float] | None = None) -> list[CalibrationError]:
    """The current estimate next to each measured row (bench --memory JSON lines, read as dicts)."""
    errors = []
    for row in rows:
        run = row_run_config(row)
        estimate = estimate_peak(load_model_config(model_configs / f"{row['model']}.json"), run, calibration)
        errors.append(CalibrationError(row["model"], run.max_length, run.micro_batch_size, run.lora_r,
                                       run.gradient_checkpointing, measured_bytes(row), estimate.peak_bytes,
                                       row_artifact(row)))
    return errors


def calibration_summary(errors: list[CalibrationError]) -> dict[str, Any]:
    """Median and worst |relative error| over the rows that are not artifacts, and the worst row."""
    usable = [error for error in errors if not error.artifact]
    if not usable:
        return {"rows": 0, "artifacts": len(errors), "median": None, "worst": None, "worst_row": None}
    worst = max(usable, key=lambda error: abs(error.error))
    return {"rows": len(usable), "artifacts": len(errors) - len(usable),
            "median": statistics.median(abs(error.error) for error in usable), "worst": abs(worst.error),
            "worst_row": worst.label}


def calibration_table(errors: list[CalibrationError]) -> str:
    """The measured table as Markdown (for the README): one line per row, artifacts marked."""
    lines = ["| model | max_length | batch | rank | checkpointing | measured GiB | estimate GiB | error |",
             "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    for e in errors:
        error = "re-measure" if e.artifact else f"{e.error:+.1%}"
        lines.append(f"| {e.model} | {e.max_length} | {e.micro_batch_size} | {e.lora_r} | "
                     f"{'on' if e.gradient_checkpointing else 'off'} | {e.measured_bytes / BYTES_PER_GIB:.2f} | "
                     f"{e.estimate_bytes / BYTES_PER_GIB:.2f} | {error} |")
    summary = calibration_summary(errors)
    if summary["rows"]:
        lines.append("")
        lines.append(f"{summary['rows']} configurations: median error {summary['median']:.1%}, "
                     f"worst {summary['worst']:.1%} ({summary['worst_row']})")
    return "\n".join(lines)
