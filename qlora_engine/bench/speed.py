"""`qlora-studio bench --speed`: the engine against the plain Hugging Face QLoRA stack, side by side, on this GPU.

Every (stack, workload) runs in a process of its own on a random-init model of the chosen architecture, built with
the same seed, so every stack starts from the same weights and sees the same real-text token stream. Recorded:
tokens/s (non-padding), torch's peak allocated memory and NVML's peak GPU used after the model is built, and the
loss of every step (speed that changes the result does not count). Workloads:
  fixed     batch 1 x max_length rows of real text, one optimizer step per row
  variable  micro-batches of 4 instruction-like examples (lengths: median 250 tokens, long tail to 4096; loss on
            the response part), padded to the longest by the plain stacks, packed by the engine
  long      one row of each length in --lengths (memory against sequence length)
The `unsloth` stack is Unsloth's documented QLoRA recipe (FastLanguageModel.from_pretrained(load_in_4bit=True) on a
folder holding the same random-init weights, saved once as safetensors; get_peft_model with
use_gradient_checkpointing="unsloth"), trained by the same plain loop as the plain stack (autocast as
Trainer(bf16=True) / Trainer(fp16=True) with its GradScaler). `--compute-dtype fp16` runs every stack in fp16: the
plain stacks and Unsloth with torch's GradScaler (what Trainer(fp16=True) does), the engine as it is (no loss
scaling: a non-finite loss skips the update).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import re
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from qlora_engine.bench import speed_report
from qlora_engine.bench.speed_report import GIB, STACKS
from qlora_engine.protocol.config import RunConfig
from qlora_engine.protocol.errors import EngineError
from qlora_engine.resources import resources_dir

TEXT_TOKENS = resources_dir() / "bench" / "text_tokens.npy"
LONG_STACKS = {"unsloth"}  # besides the engine's: stacks that run the long workload without --long-all-stacks
ENGINE_SWITCHES = {"engine": {}, "engine_eager": {"compile_layers": False},
                   "engine_bf16_residual": {"fp32_residual": False},
                   "engine_unfused": {"fused_lora": False, "compile_layers": False},
                   "engine_baseline": {"packing": False, "chunked_loss": False, "fused_lora": False,
                                       "compile_layers": False}}
VARIABLE_MEDIAN_TOKENS, VARIABLE_MAX_TOKENS, VARIABLE_BATCH, PROMPT_FRACTION = 250, 4096, 4, 0.3


def engine_switches(stack: str) -> dict[str, Any] | None:
    """The run options an engine stack changes from the defaults; None for a stack that is not the engine's.
    Besides the named stacks, `engine@OPTION=VALUE[+OPTION=VALUE...]` runs the engine with any run options changed
    (e.g. `engine@activation_memory_budget=0.2`): variants side by side in one bench without a new stack name."""
    if stack in ENGINE_SWITCHES:
        return ENGINE_SWITCHES[stack]
    if not stack.startswith("engine@"):
        return None
    types = {f.name: f.type for f in dataclasses.fields(RunConfig)}
    switches: dict[str, Any] = {}
    for item in stack.removeprefix("engine@").split("+"):
        name, _, text = item.partition("=")
        if name not in types or not text:
            raise EngineError("bad_config", f"stack {stack!r}: {item!r} is not OPTION=VALUE with a run option's name",
                              "Write it as engine@OPTION=VALUE[+OPTION=VALUE], e.g. engine@optimizer=adamw.")
        kind = types[name] if isinstance(types[name], str) else types[name].__name__
        switches[name] = {"bool": lambda t: t.lower() in ("1", "true", "yes", "on"), "int": int,
                          "float": float}.get(kind, str)(text)
    return switches


# ----------------------------------------------------------------------------- workloads
def text_stream() -> Any:
    import numpy as np

    return np.load(TEXT_TOKENS).astype("int64")


def take(stream: Any, start: int, length: int) -> list[int]:
    """`length` tokens from the stream starting at `start`, wrapping around."""
    return [int(stream[(start + i) % len(stream)]) for i in range(length)]


def variable_lengths(count: int, seed: int = 0) -> list[int]:
    """Instruction-dataset lengths: log-normal with the median at 250 tokens, a long tail cut at 4096."""
    import random

    rng = random.Random(seed)
    return [max(32, min(VARIABLE_MAX_TOKENS, round(rng.lognormvariate(math.log(VARIABLE_MEDIAN_TOKENS), 0.9))))
            for _ in range(count)]


def workload_rows(workload: str, steps: int, max_length: int, lengths: list[int],
                  batch_scale: int = 1) -> list[list[Any]]:
    """Per step, its examples as data.Tokenized (ids, trained mask). Same for every stack. `batch_scale` k: k times
    the rows per step (fixed: k rows, variable: 4k), the next rows of the same stream (k = 1: the usual workload)."""
    from qlora_engine.training.data import Tokenized

    stream = text_stream()
    if workload == "fixed":
        return [[Tokenized(take(stream, row * max_length, max_length), [True] * max_length, row, False)
                 for row in range(step * batch_scale, (step + 1) * batch_scale)] for step in range(steps)]
    if workload == "long":
        return [[Tokenized(take(stream, 0, length), [True] * length, 0, False)] for length in lengths]
    per_step = VARIABLE_BATCH * batch_scale
    sizes, offset, steps_rows = variable_lengths(steps * per_step), 0, []
    for step in range(steps):
        rows = []
        for size in sizes[step * per_step:(step + 1) * per_step]:
            prompt = int(size * PROMPT_FRACTION)
            rows.append(Tokenized(take(stream, offset, size), [False] * prompt + [True] * (size - prompt), step, False))
            offset += size
        steps_rows.append(rows)
    return steps_rows


# ----------------------------------------------------------------------------- the stacks
def build_base(stack: str, model_config: dict[str, Any], cfg: RunConfig, device: str,
               max_seq_length: int = 0, shardable: bool = False) -> Any:
    """The same random-init weights for every stack: 4-bit for QLoRA stacks, bf16 for lora16; Unsloth loads them
    from the folder they were saved to (built with the same seed the first time)."""
    import torch

    from qlora_engine.bench import models

    if stack == "unsloth":
        from qlora_engine.bench.unsloth_stack import unsloth_base

        return unsloth_base(model_config, cfg, device, max_seq_length or cfg.max_length)
    torch.manual_seed(0)
    if stack == "plain_liger":
        _apply_liger(model_config)
    if stack == "lora16":
        return models.random_model(model_config, cfg, device)
    return models.random_quantized_model(model_config, cfg, device, shardable=shardable)


def _apply_liger(model_config: dict[str, Any]) -> None:
    import liger_kernel.transformers as liger

    patch = getattr(liger, f"apply_liger_kernel_to_{model_config['model_type']}")
    patch(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True)


def setup_stack(stack: str, base: Any, cfg: RunConfig, max_seq_length: int = 0,
                ranks: Any = None) -> tuple[Any, Any, Any]:
    """(model, optimizer, step function) for a stack; the step takes a list of Tokenized rows and returns
    (loss, gradient norm before clipping, whether the update was skipped by the loss scaler). With several `ranks`
    (the engine's stacks only, inside torchrun) each rank trains its share of a step's rows, as a run does."""
    import torch

    from qlora_engine.training import distributed, loop, sharding

    ranks = ranks or distributed.Ranks()
    switches = engine_switches(stack)
    if switches is not None:  # the engine's own optimizer default unless the stack names one
        cfg = dataclasses.replace(cfg, optimizer=RunConfig().optimizer, **switches).validate()
        sharded = sharding.sharded_run(cfg.parallel, ranks)
        model = loop.attach_lora(base, cfg, sharded=sharded)
        trainable = [p for p in model.parameters() if p.requires_grad]
        ranks.broadcast_parameters(trainable)
        if sharded:  # as a run shards: each decoder layer over all ranks
            sharding.shard_layers(model, ranks, cfg.device)
            trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = loop.build_optimizer(cfg, trainable)
        loop.freeze_heap()

        # fp16: the engine's own dynamic loss scaling, as a run uses it (none in bf16 and fp32)
        scaler = loop.loss_scaler(torch.float16 if cfg.compute_dtype == "fp16" else None, cfg.device)

        def engine_step(rows: list[Any]) -> tuple[float, float, bool]:
            share = sharding.share(ranks, rows, sharded)
            batches = [loop.micro_batch(share, cfg, 0, cfg.device)] if share else []
            scale = scaler.get_scale() if scaler is not None else 0.0
            loss, grad_norm = loop.training_step(model, batches, trainable, optimizer, cfg.max_grad_norm,
                                                 cfg.chunked_loss, scaler=scaler, ranks=ranks, sharded=sharded)
            # skipped: a non-finite loss, or gradients that overflowed in fp16 (the scaler then lowers its scale)
            return loss, grad_norm, not math.isfinite(loss) or (scaler is not None and scaler.get_scale() < scale)

        return model, optimizer, engine_step
    if ranks.several:
        raise EngineError("bad_config", f"stack {stack!r}: only the engine's stacks run in several processes",
                          "Use --stacks engine (or engine@OPTION=VALUE) with --nproc.")
    if stack == "unsloth":
        from qlora_engine.bench.unsloth_stack import unsloth_peft_model

        model = unsloth_peft_model(base, cfg, max_seq_length or cfg.max_length)
        autocast = torch.autocast(cfg.device, dtype=torch.bfloat16 if cfg.compute_dtype == "bf16" else torch.float16) \
            if cfg.device == "cuda" and cfg.compute_dtype in ("bf16", "fp16") else nullcontext()
    else:
        model = plain_peft_model(stack, base, cfg)
        autocast = set_plain_precision(stack, model, cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = loop.build_optimizer(cfg, trainable)
    # Trainer(fp16=True) scales the loss (torch's GradScaler through accelerate); bf16 and fp32 need none
    scaler = torch.amp.GradScaler(cfg.device) if cfg.compute_dtype == "fp16" and stack != "plain_fp32" else None

    def plain_step(rows: list[Any]) -> tuple[float, float, bool]:
        batch = loop.collate(rows, 0, cfg.device)  # right-padded to the longest row, as HF's collators do
        with autocast:
            loss = model(**batch).loss
        if scaler is None:
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm))
            optimizer.step()
            skipped = False
        else:
            scale = scaler.get_scale()
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm))
            scaler.step(optimizer)  # skipped where the unscaled gradients hold an inf or a NaN
            scaler.update()
            skipped = scaler.get_scale() < scale
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach()), grad_norm, skipped

    return model, optimizer, plain_step


def lora_checksum(model: Any) -> dict[str, Any]:
    """The first LoRA A matrices' sums (in module order): equal across stacks when their LoRA init is the same.
    A sharded model's are gathered whole first (every rank calls this)."""
    from qlora_engine.training.sharding import whole

    first = [(name, whole(p.detach())) for name, p in model.named_parameters() if "lora_A" in name][:3]
    return {"names": [name for name, _ in first], "sums": [round(float(p.double().sum()), 6) for _, p in first],
            "abs_sums": [round(float(p.double().abs().sum()), 4) for _, p in first],
            "dtypes": sorted({str(p.dtype) for name, p in model.named_parameters() if p.requires_grad})}


def set_plain_precision(stack: str, model: Any, cfg: RunConfig) -> Any:
    """Set a plain stack's precision and return the context its forward runs in: bf16 autocast as
    Trainer(bf16=True); for plain_fp32, the reference the other stacks' loss curves are held against, the 4-bit
    layers are switched to fp32 compute (same weights) and nothing is autocast."""
    import torch

    if stack == "plain_fp32":
        for module in model.modules():
            if hasattr(module, "compute_dtype"):  # bitsandbytes' 4-bit layers
                module.compute_dtype = torch.float32
        return nullcontext()
    if cfg.compute_dtype in ("bf16", "fp16") and cfg.device == "cuda":  # Trainer(bf16=True) / Trainer(fp16=True)
        return torch.autocast(cfg.device, dtype=torch.bfloat16 if cfg.compute_dtype == "bf16" else torch.float16)
    return torch.autocast(cfg.device, dtype=torch.bfloat16) if cfg.compute_dtype == "bf16" else nullcontext()


def plain_peft_model(stack: str, base: Any, cfg: RunConfig) -> Any:
    """What a hand-written HF script (or Trainer with bf16=True) does: the QLoRA recipe as documented by peft."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    base.config.use_cache = False
    if stack == "lora16":
        base.requires_grad_(False)
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=True,
                                               gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules="all-linear", bias="none", task_type="CAUSAL_LM")
    return get_peft_model(base, lora)


# ----------------------------------------------------------------------------- one measured process
def run_worker(stack: str, workload: str, model_config: dict[str, Any], cfg: RunConfig, steps: int, warmup: int,
               lengths: list[int], profile: bool = False, gpu_memory_gib: float = 0.0, batch_scale: int = 1,
               ranks: Any = None) -> dict[str, Any]:
    """One stack on one workload in this process; with several `ranks` (torchrun) this is one rank of the engine's
    data-parallel run over `batch_scale` x the workload's rows per step, and tokens/s counts every rank's rows."""
    import torch

    from qlora_engine.bench import models
    from qlora_engine.training import distributed, sharding

    ranks = ranks or distributed.Ranks()
    device = cfg.device
    max_seq_length = max([cfg.max_length, *lengths]) if workload == "long" else (
        VARIABLE_MAX_TOKENS if workload == "variable" else cfg.max_length)
    base = build_base(stack, model_config, cfg, device, max_seq_length,
                      shardable=sharding.sharded_run(cfg.parallel, ranks))
    gc.collect()
    if device == "cuda" and gpu_memory_gib:  # after the base is built: the bench builds it 16-bit, then quantizes
        torch.cuda.empty_cache()
        _cap_gpu_memory(gpu_memory_gib)
    nvml = models.NvmlPeak(index=ranks.local_rank) if device == "cuda" else None
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        nvml.reset()
    model, optimizer, step = setup_stack(stack, base, cfg, max_seq_length, ranks)
    checksum = lora_checksum(model)
    step_rows = workload_rows(workload, steps, cfg.max_length, lengths, batch_scale)
    losses, step_s, tokens, oom, peaks, grad_norms, skipped = [], [], [], None, [], [], []
    for index, rows in enumerate(step_rows):
        if device == "cuda" and workload == "long":
            torch.cuda.reset_peak_memory_stats()
            nvml.reset()
        started = time.perf_counter()
        try:
            loss, grad_norm, was_skipped = step(rows)
            losses.append(round(loss, 5))
            grad_norms.append(round(grad_norm, 5))
            skipped.append(bool(was_skipped))
        except torch.cuda.OutOfMemoryError as exc:
            if ranks.several:  # the other ranks wait in a collective: end this rank, torchrun ends theirs
                raise
            oom = {"step": index, "length": sum(len(r.input_ids) for r in rows), "message": str(exc).split("\n")[0]}
            break
        if device == "cuda":
            torch.cuda.synchronize()
        step_s.append(time.perf_counter() - started)
        tokens.append(sum(len(r.input_ids) for r in rows))
        if workload == "long":
            peaks.append(_peaks(device, nvml) | {"length": tokens[-1], "step_s": round(step_s[-1], 3)})
    measured = slice(warmup, None) if len(step_s) > warmup else slice(0, None)
    result = {"stack": stack, "workload": workload, "gpu_memory_gib": gpu_memory_gib or None,
              "compute_dtype": cfg.compute_dtype, "losses": losses, "grad_norms": grad_norms,
              "nonfinite_losses": sum(not math.isfinite(x) for x in losses),
              "nonfinite_grad_norms": sum(not math.isfinite(x) for x in grad_norms),
              "skipped_steps": [i + 1 for i, s in enumerate(skipped) if s], "lora_init": checksum,
              "versions": _versions(stack), "step_s": [round(s, 4) for s in step_s],
              "tokens_per_s": round(sum(tokens[measured]) / sum(step_s[measured]), 1) if step_s else None,
              "oom": oom, "per_length": peaks, **_peaks(device, nvml),
              "nproc": ranks.world, "batch_scale": batch_scale, "rows_per_step": len(step_rows[0])}
    if ranks.several:
        result |= _rank_figures(ranks, model, result, device)
    if profile and not oom:
        result["profile"] = _profile(step, step_rows[-1])
    if nvml is not None:
        nvml.close()
    del model, optimizer
    return result


def _rank_figures(ranks: Any, model: Any, result: dict[str, Any], device: str) -> dict[str, Any]:
    """Every rank's memory, and whether every rank started from the same weights (base embedding and LoRA init)."""
    from qlora_engine.training import distributed

    memory = {k: result[k] for k in ("max_allocated_bytes", "nvml_peak_used_bytes") if k in result}
    starts = ranks.gather([round(float(model.get_input_embeddings().weight.double().sum()), 4),
                           result["lora_init"]["sums"]])
    return {"rank_memory": ranks.gather(memory | distributed.rank_memory(device)),
            "ranks_started_alike": all(start == starts[0] for start in starts)}


def _versions(stack: str) -> dict[str, str]:
    import importlib.metadata

    names = ["torch", "transformers", "peft", "bitsandbytes"] + (["unsloth", "unsloth_zoo", "trl"]
                                                                if stack == "unsloth" else [])
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def _cap_gpu_memory(gpu_memory_gib: float) -> None:
    """Run as on a card of `gpu_memory_gib`: torch's allocator may hold that much minus what is used outside it (the
    CUDA context); past it, an allocation frees torch's cached blocks and retries, then raises out-of-memory. Set
    once the 4-bit model is built: the bench builds it in 16 bits first (the engine's loader quantizes as it loads)."""
    import torch

    torch.cuda.init()
    free_bytes, total_bytes = torch.cuda.mem_get_info()
    allowed_bytes = gpu_memory_gib * GIB - (total_bytes - free_bytes - torch.cuda.memory_reserved())
    torch.cuda.set_per_process_memory_fraction(max(0.0, allowed_bytes) / total_bytes)


def _peaks(device: str, nvml: Any) -> dict[str, Any]:
    if device != "cuda":
        return {}
    import torch

    time.sleep(0.05)  # let the sampler see the end of the step
    return {"max_allocated_bytes": torch.cuda.max_memory_allocated(), "nvml_peak_used_bytes": nvml.peak_bytes,
            "gpu": torch.cuda.get_device_name()}


def _profile(step: Any, rows: list[Any]) -> str:
    """The top GPU kernels of two steps: where the time of a step goes."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step(rows)
        torch.cuda.synchronize()
    if os.environ.get("QLORA_BENCH_TRACE"):  # a Chrome trace of the two steps, to see where the GPU waits
        prof.export_chrome_trace(os.environ["QLORA_BENCH_TRACE"])
    averages = prof.key_averages()
    return "\n".join(averages.table(sort_by=key, row_limit=25, max_name_column_width=60)
                     for key in ("cuda_time_total", "self_cpu_time_total"))


# ----------------------------------------------------------------------------- the command
def speed_main(args: argparse.Namespace) -> int:
    from qlora_engine.bench import ddp

    config_path = _model_config_path(args.model)
    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else []
    _check_nproc(args.nproc, args.device)
    results = []
    for workload in args.workloads.split(","):
        for stack in args.stacks.split(","):
            if stack not in STACKS and engine_switches(stack) is None:
                raise EngineError("bad_config", f"unknown stack {stack!r}",
                                  f"Choose from {', '.join(STACKS)}, or engine@OPTION=VALUE.")
            if workload == "long" and engine_switches(stack) is None and stack not in LONG_STACKS \
                    and not args.long_all_stacks:
                continue
            for nproc, batch_scale in ddp.runs_of(args.nproc, workload, engine_switches(stack) is not None):
                results.append(_spawn(stack, workload, config_path, args, lengths, nproc, batch_scale))
                _write_out(args, results)  # after every run: what finished survives a bench cut short
    print(speed_report.format_table([r for r in results if r["workload"] != "long"], args.model))
    print(speed_report.format_lengths(results))
    print(speed_report.format_stability(results))
    print(ddp.format_comparisons(ddp.comparisons(results), STACKS))
    _write_out(args, results)
    return 0 if all(r.get("error") is None for r in results) else 1


def _check_nproc(nproc: int, device: str) -> None:
    if nproc < 1:
        raise EngineError("bad_config", f"--nproc {nproc}: give 1 or more processes", "Use --nproc 1 or more.")
    if nproc > 1 and device == "cuda":
        import torch

        if torch.cuda.device_count() < nproc:
            raise EngineError("bad_config", f"--nproc {nproc} needs {nproc} GPUs (one per process); this machine "
                              f"has {torch.cuda.device_count()}", "Lower --nproc, or use --device cpu (gloo).")


def _write_out(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    from qlora_engine.bench import ddp

    if args.out:
        summary = {"model": args.model, "max_length": args.max_length, "compute_dtype": args.compute_dtype or None,
                   "nproc": args.nproc, "results": results}
        if args.nproc > 1:
            summary["ddp"] = ddp.comparisons(results)
        Path(args.out).write_text(json.dumps(summary, indent=1))


def _spawn(stack: str, workload: str, config_path: Path, args: argparse.Namespace, lengths: list[int],
           nproc: int = 1, batch_scale: int = 1) -> dict:
    """One run in a process of its own; several processes (nproc > 1) through torchrun, rank 0 reporting."""
    from qlora_engine.training.launch import torchrun_prefix

    job = {"stack": stack, "workload": workload, "config": str(config_path), "max_length": args.max_length,
           "steps": args.steps, "warmup": args.warmup, "lengths": lengths, "device": args.device,
           "lora_dropout": args.lora_dropout, "gpu_memory_gib": args.gpu_memory_gib,
           "compute_dtype": args.compute_dtype, "batch_scale": batch_scale,
           "parallel": "fsdp" if getattr(args, "fsdp", False) else "ddp",
           "profile": bool(args.profile and stack in args.profile.split(","))}
    start = torchrun_prefix(nproc) if nproc > 1 else [sys.executable]
    command = [*start, "-m", "qlora_engine", "bench", "--speed-worker", json.dumps(job)]
    print(f"--- {stack} / {workload}" + (f" / {nproc} processes" if nproc > 1 else "")
          + (f" / {batch_scale}x rows per step" if batch_scale > 1 else ""), flush=True)
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    marker = "SPEED_RESULT "
    lines = [line for line in done.stdout.splitlines() if line.startswith(marker)]
    if not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-60:]
        print("\n".join(tail[-8:]), flush=True)
        return {"stack": stack, "workload": workload, "nproc": nproc, "batch_scale": batch_scale,
                "error": _error_line(tail) or f"exit {done.returncode}",
                "returncode": done.returncode, "stderr_tail": tail, "stdout_tail": done.stdout.splitlines()[-20:]}
    result = json.loads(lines[-1][len(marker):])
    if result.get("profile"):
        print(result.pop("profile"), flush=True)
    print(json.dumps({k: v for k, v in result.items() if k not in ("losses", "grad_norms")}), flush=True)
    return result


def _error_line(tail: list[str]) -> str:
    """A failed run's error: the last exception line of a rank's traceback (torchrun's own summary, which follows
    it, names no cause), else the last line."""
    raised = [line for line in tail if re.match(r"[A-Za-z_][\w.]*(Error|Exception|Exit)\b", line)
              and "ChildFailedError" not in line]
    return (raised or tail or [""])[-1]


def speed_worker(job_json: str) -> int:
    """One run; inside torchrun, one rank of it (rank 0 prints the result)."""
    job = json.loads(job_json)
    if job["stack"] == "unsloth":
        import unsloth  # noqa: F401  (before transformers and peft, as Unsloth asks)
    from qlora_engine.training import distributed

    model_config = json.loads(Path(job["config"]).read_text())
    cfg = bench_config(job["device"], job["max_length"], job["lora_dropout"], job.get("compute_dtype") or "",
                       job.get("parallel", "ddp"))
    ranks = distributed.setup(job["device"])
    try:
        result = run_worker(job["stack"], job["workload"], model_config, cfg, job["steps"], job["warmup"],
                            job["lengths"], job["profile"], job.get("gpu_memory_gib", 0.0),
                            job.get("batch_scale", 1), ranks)
    finally:
        distributed.teardown()
    if ranks.is_main:
        print("SPEED_RESULT " + json.dumps(result), flush=True)
    return 0


def bench_config(device: str, max_length: int, lora_dropout: float = 0.0, compute_dtype: str = "",
                 parallel: str = "ddp") -> RunConfig:
    """The issue's settings: r 16 on all linear layers, NF4 + double quant, bf16, checkpointing, paged AdamW 8-bit
    (the plain recipe's and Unsloth's; the engine's stacks take the engine's own optimizer default, setup_stack).
    LoRA dropout 0 by default, so that every stack computes the same function and the loss curves can be held
    against each other (each stack draws its dropout masks its own way)."""
    return RunConfig(device=device, max_length=max_length, micro_batch_size=1, grad_accum=1, lora_r=16,
                     lora_alpha=32, lora_dropout=lora_dropout, learning_rate=2e-4,
                     compute_dtype=compute_dtype or ("bf16" if device == "cuda" else "fp32"),
                     gradient_checkpointing=True, parallel=parallel,
                     optimizer="paged_adamw_8bit").validate()


def _model_config_path(name: str) -> Path:
    from qlora_engine.bench.models import MODEL_CONFIGS

    path = Path(name).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return path
    known = MODEL_CONFIGS / f"{name}.json"
    if not known.is_file():
        raise EngineError("model_not_found", f"{name}: not a model folder, config.json or known architecture",
                          f"Pick one of {', '.join(sorted(p.stem for p in MODEL_CONFIGS.glob('*.json')))}, or a "
                          "folder with config.json.")
    return known


def add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--speed", action="store_true", help="tokens/s and memory: the engine vs the plain HF stack")
    parser.add_argument("--model", default="llama-3.1-8b",
                        help="architecture from the grid, a model folder or a config.json (random-init weights)")
    parser.add_argument("--workloads", default="fixed", help="comma list of: fixed, variable, long")
    parser.add_argument("--stacks", default="plain,engine", help=f"comma list of: {', '.join(STACKS)}")
    parser.add_argument("--max-length", type=int, default=2048, help="row length of the fixed workload")
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps per stack (fixed, variable)")
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of tokens/s")
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384", help="row lengths of the long workload")
    parser.add_argument("--gpu-memory-gib", type=float, default=0.0,
                        help="run as on a card with this much memory (torch's allocator capped; 0 = the whole GPU)")
    parser.add_argument("--long-all-stacks", action="store_true", help="run the long workload on every stack")
    parser.add_argument("--lora-dropout", type=float, default=0.0,
                        help="LoRA dropout of every stack (0: the same function, loss curves comparable)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu only to try the bench out")
    parser.add_argument("--compute-dtype", default="", choices=("", "bf16", "fp16", "fp32"),
                        help="compute dtype of every stack (default bf16 on CUDA, fp32 on the CPU); fp16: every stack "
                             "with dynamic loss scaling (torch's GradScaler; the engine's own, as in a run)")
    parser.add_argument("--profile", default="", help="comma list of stacks to profile (top GPU kernels)")
    parser.add_argument("--nproc", type=int, default=1,
                        help="N > 1: each engine stack also in N processes (torchrun, one GPU each; gloo on the CPU) "
                             "at N x the rows per step, and in one process at N x the rows (the loss reference): "
                             "tokens/s speed-up and loss curves compared (bench/ddp.py)")
    parser.add_argument("--fsdp", action="store_true",
                        help="with --nproc N: the N processes shard each decoder layer's 4-bit weights and adapter "
                             "over them (the run option parallel: fsdp) instead of each holding the model (ddp)")
    parser.add_argument("--speed-worker", help=argparse.SUPPRESS)
