"""Which options a resumed run may change: the one place this rule lives (the CLI and the loop both ask it).

A resume must continue the run it checkpointed. Options that change the data order (which rows, how they are cut,
shuffled and batched) or what the adapter is (its shape, its base model) are refused, naming the stored and the
given value; options that only change how long, how often or how fast it runs are accepted and reported. An option
not named here is refused: a new option is treated as unsafe until it is judged safe. No torch here.
"""
from __future__ import annotations

from typing import Any

from qlora_engine.protocol.errors import EngineError

DATA_ORDER_OPTIONS = ("data", "data_format", "val_data", "val_fraction", "bad_rows", "train_on_prompt", "max_length",
                      "micro_batch_size", "grad_accum", "packing", "seed")
ADAPTER_OPTIONS = ("model", "lora_r", "lora_alpha", "target_modules", "init_lora", "loftq_iters", "use_dora",
                   "use_rslora", "quant_type", "double_quant", "precision_budget_bits", "optimizer")
# How the run is spread over processes: each rank's share of a micro-batch and the dropout streams depend on it.
LAYOUT_OPTIONS = ("nproc", "parallel")
# Safe: the run goes on from the same weights, optimizer state and data position. The learning-rate options take
# effect from the resumed step on (a lower learning rate after a NaN loss is the usual reason to resume).
SAFE_OPTIONS = ("max_steps", "epochs", "eval_steps", "save_steps", "compare_questions", "early_stopping_patience",
                "early_stopping_min_delta", "run_dir", "device",
                "learning_rate", "lr_scheduler", "warmup_steps", "weight_decay", "max_grad_norm", "lora_dropout",
                "compute_dtype", "fp32_residual", "gradient_checkpointing", "fused_lora", "chunked_loss",
                "compile_layers", "activation_memory_budget", "allow_pickle", "trust_remote_code")


def _why_refused(name: str) -> str:
    if name in DATA_ORDER_OPTIONS:
        return "changes the data order"
    if name in ADAPTER_OPTIONS:
        return "changes the adapter or what it was trained on"
    if name in LAYOUT_OPTIONS:
        return "changes how the run is split over processes: resume with the same number of processes"
    return "is not known to be safe to change on resume"


def _shown(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def check_resume(stored: dict[str, Any], given: dict[str, Any], where: str) -> list[str]:
    """Compare the run's stored options with those a resume would use. Refused changes raise one EngineError naming
    each (stored and given value); the accepted ones come back as lines for the log ('max_steps 30 -> 60')."""
    changed = [name for name in given if name in stored and given[name] != stored[name]]
    refused = [name for name in changed if name not in SAFE_OPTIONS]
    if refused:
        details = "; ".join(f"{name} was {_shown(stored[name])}, given {_shown(given[name])} ({_why_refused(name)})"
                            for name in refused)
        raise EngineError("resume_changes_run", f"--resume of {where} would change the run: {details}",
                          "Resume with the run's own values (leave these options out), or start a new run "
                          "(without --resume, another --run-dir) to train with the new ones.")
    return [f"{name} {_shown(stored[name])} -> {_shown(given[name])}" for name in changed]
