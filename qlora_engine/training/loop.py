"""The QLoRA training run: set up model, data and optimizer; loop; evaluate; checkpoint; stop or finish.

Readable top to bottom in `run_training`. Events go through an EventWriter; nothing here knows about Qt.
"""
from __future__ import annotations

import gc
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qlora_engine.model import adapter_init, layer_compile, lm_loss, loading, lora_nf4, packing, residual, run_base
from qlora_engine.model.generation import inference_mode
from qlora_engine.planning import advice
from qlora_engine.protocol import events as ev
from qlora_engine.protocol.config import DEFAULT_DATA, RunConfig
from qlora_engine.protocol.errors import EngineError
from qlora_engine.protocol.events import EventWriter
from qlora_engine.resources import resources_dir
from qlora_engine.training import checkpoints, compare, data, distributed, drift, resume_rules, sharding
from qlora_engine.training.batch_order import Batcher
from qlora_engine.training.best_checkpoint import BestTracker

ADAPTER_TMP_PREFIX, ADAPTER_OLD_PREFIX = ".tmp-adapter-", ".old-adapter-"

SAMPLE_TRAIN = resources_dir() / "sample" / "train.jsonl"


def data_path(spec: str) -> Path:
    return SAMPLE_TRAIN if spec == DEFAULT_DATA else Path(spec).expanduser()


# ----------------------------------------------------------------------------- stopping
class StopRequest:
    """Set by SIGINT or a `stop` line on stdin; the loop checks it after each step."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def install(self) -> None:
        signal.signal(signal.SIGINT, self._on_sigint)
        threading.Thread(target=self._watch_stdin, daemon=True).start()

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.event.is_set():  # a second Ctrl+C: stop now, without the checkpoint
            raise KeyboardInterrupt
        self.event.set()

    def _watch_stdin(self) -> None:
        try:
            for line in sys.stdin:
                if line.strip() == "stop":
                    self.event.set()
                    return
        except (OSError, ValueError):  # no usable stdin (closed, captured): SIGINT still works
            return

    @property
    def requested(self) -> bool:
        return self.event.is_set()


# ----------------------------------------------------------------------------- batches
def collate(rows: list[data.Tokenized], pad_id: int, device: str) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask, and labels that are -100 wherever no loss is computed."""
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), packing.IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        ids[i, :n] = torch.tensor(row.input_ids)
        attention[i, :n] = 1
        trained = torch.tensor(row.trained_token_mask)
        labels[i, :n] = torch.where(trained, ids[i, :n], packing.IGNORE_INDEX)
    return {"input_ids": ids.to(device), "attention_mask": attention.to(device), "labels": labels.to(device)}


def trained_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != packing.IGNORE_INDEX).sum())


def micro_batch(rows: list[data.Tokenized], cfg: RunConfig, pad_id: int, device: str) -> dict[str, Any]:
    return packing.collate_packed(rows, device) if cfg.packing else collate(rows, pad_id, device)


# ----------------------------------------------------------------------------- model setup
def build_model(cfg: RunConfig, model_path: Path, device: str, compute_dtype: Any, run_dir: Path | None = None,
                sharded: bool = False, keeps_files: bool = True) -> Any:
    """The base (uniform 4-bit, or the precision plan in run_dir) with LoRA; the plan's and the init's files go into
    run_dir, unless not `keeps_files` (a rank other than 0 starting a run: it computes the same plan and start, rank 0
    alone writes the files, which the other ranks must not read half-written)."""
    files = run_dir if keeps_files else None
    model = run_base.load_base(cfg, model_path, device, compute_dtype, files, sharded=sharded)
    return attach_lora(model, cfg, init_file=files / adapter_init.INIT_FILE if files is not None else None,
                       sharded=sharded)


def attach_lora(model: Any, cfg: RunConfig, init_file: Path | None = None, sharded: bool = False) -> Any:
    """Freeze the 4-bit base, set up checkpointing, and wrap it with trainable LoRA adapters (cfg.init_lora's start;
    a base it rewrote is recorded in, or when present rebuilt from, `init_file`). A model to be `sharded` (FSDP)
    runs without the fused LoRA path and the compiled layers: both read a layer's whole 4-bit weight once, here,
    where FSDP gathers it anew for each forward."""
    from peft import LoraConfig, get_peft_model

    model.requires_grad_(False)
    model.config.use_cache = False
    if cfg.gradient_checkpointing:  # activation_* is the name from transformers 5.24 on, gradient_* before
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    targets = cfg.target_modules if cfg.target_modules == "all-linear" else [
        name.strip() for name in cfg.target_modules.split(",") if name.strip()]
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM", use_dora=cfg.use_dora,
                      use_rslora=cfg.use_rslora)
    try:
        peft_model = get_peft_model(model, lora)
    except ValueError as exc:
        raise EngineError("bad_config", f"target_modules: {exc}",
                          "Use 'all-linear' or names of linear layers in this model, e.g. q_proj,v_proj.") from exc
    init_note = adapter_init.initialize(peft_model, cfg, init_file)  # before the fused path reads the 4-bit tensors
    if init_note:
        print(init_note, file=sys.stderr, flush=True)
    if cfg.fp32_residual:
        residual.keep_residual_fp32(peft_model.get_base_model())
    if cfg.packing:
        packing.use_packed_attention(peft_model, cfg.max_length)
    if sharded and (cfg.fused_lora or cfg.compile_layers):
        print("parallel fsdp: the fused LoRA path and the compiled layers are off (they hold each layer's whole "
              "4-bit weight; FSDP gathers it for each forward instead)", file=sys.stderr, flush=True)
    if cfg.fused_lora and not sharded:
        lora_nf4.use_fused_lora(peft_model)
        fallback = lora_nf4.peft_path_note(peft_model)
        if fallback:
            print(fallback, file=sys.stderr, flush=True)
    if cfg.compile_layers and cfg.use_dora and cfg.gradient_checkpointing and not sharded:
        # measured (H200, 0.6B-8B): peft's DoRA layers break the compiled graph, and the compiler's recomputation
        # then keeps every layer's activations; transformers' checkpoint, uncompiled, keeps only each layer's input
        print("compiled layers are off with DoRA: peft's DoRA layers break the compiled graph and it would keep "
              "every layer's activations; the layers run uncompiled, checkpointed", file=sys.stderr, flush=True)
    elif cfg.compile_layers and cfg.gradient_checkpointing and not sharded and _has_int8_layers(peft_model):
        # measured (H200, Qwen2.5-1.5B at 6 bits): the plan's int8 layers break the compiled graph as DoRA's do, and
        # the step held 1.6 GiB more than the estimate of the checkpointed path
        print("compiled layers are off with the precision plan's int8 layers: they break the compiled graph; the "
              "layers run uncompiled, checkpointed", file=sys.stderr, flush=True)
    elif (cfg.compile_layers and not sharded
          and layer_compile.compile_supported(next(peft_model.parameters()).device) is None):
        layer_compile.compile_layers(peft_model, activation_memory_budget=cfg.activation_memory_budget)
        print("compiling the model's layers for this GPU (torch.compile): the first step takes a minute or two "
              "longer", file=sys.stderr, flush=True)
    return peft_model


def _has_int8_layers(model: Any) -> bool:
    import bitsandbytes as bnb

    return any(isinstance(module, bnb.nn.Linear8bitLt) for module in model.modules())


def freeze_heap() -> None:
    """Move every object alive now (the model's modules and parameters: hundreds of thousands) out of the cyclic
    garbage collector's sight: its full collections then scan only what a step creates, not the whole model."""
    gc.collect()
    gc.freeze()


def build_optimizer(cfg: RunConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        # fused on CUDA: one kernel updates every LoRA tensor, where a per-tensor optimizer launches hundreds
        return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                 fused=bool(params) and params[0].is_cuda)
    import bitsandbytes as bnb

    optimizer_class = {"paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
                       "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[cfg.optimizer]
    return optimizer_class(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def build_scheduler(cfg: RunConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup"}.get(cfg.lr_scheduler, cfg.lr_scheduler)
    return get_scheduler(name, optimizer, num_warmup_steps=min(cfg.warmup_steps, total_steps),
                         num_training_steps=total_steps)


def evaluate(model: Any, examples: list[data.Tokenized], cfg: RunConfig, pad_id: int, device: str) -> float:
    """Mean loss per trained token over the validation examples."""
    loss_sum, token_count = 0.0, 0
    with inference_mode(model):
        for start in range(0, len(examples), cfg.micro_batch_size):
            batch = micro_batch(examples[start:start + cfg.micro_batch_size], cfg, pad_id, device)
            count = trained_tokens(batch)
            loss_sum += float(lm_loss.causal_lm_loss(model, batch, 1, chunked=cfg.chunked_loss))
            token_count += count
    return loss_sum / max(token_count, 1)


def vram_figures(device: str) -> dict[str, int]:
    if device != "cuda":
        return {}
    free_bytes, total_bytes = torch.cuda.mem_get_info()
    return {"allocated": torch.cuda.memory_allocated(), "reserved": torch.cuda.memory_reserved(),
            "max_allocated": torch.cuda.max_memory_allocated(), "max_reserved": torch.cuda.max_memory_reserved(),
            "gpu_used": total_bytes - free_bytes, "gpu_total": total_bytes}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def training_step(model: Any, micro_batches: list[dict[str, torch.Tensor]], trainable: list[torch.nn.Parameter],
                  optimizer: torch.optim.Optimizer, max_grad_norm: float, chunked_loss: bool = True,
                  scaler: torch.amp.GradScaler | None = None,
                  ranks: distributed.Ranks | None = None, sharded: bool = False) -> tuple[float, float]:
    """One optimizer step over the micro-batches; the loss is the mean over every trained token of the step.

    A non-finite loss skips the update (the caller decides what to do), so the weights stay the last good ones.
    With a `scaler` (fp16) the loss is scaled before backward so small gradients don't underflow; a step whose
    gradients overflowed is skipped and the scale lowered (the caller sees it as a lower `scaler.get_scale()`).
    With several `ranks` each holds its share of the step's micro-batches: the loss is divided by the trained tokens
    of all ranks, and the adapter's gradients and the loss are summed over ranks before clipping and the update
    (`sharded`: FSDP has summed the sharded ones in the backward already).
    """
    ranks = ranks or distributed.Ranks()
    items = ranks.sum_int(sum(trained_tokens(b) for b in micro_batches))
    step_loss = 0.0
    for batch in micro_batches:
        loss = lm_loss.causal_lm_loss(model, batch, items, chunked=chunked_loss)
        (loss if scaler is None else scaler.scale(loss)).backward()
        step_loss += float(loss.detach())
    ranks.sum_gradients([p for p in trainable if not sharding.is_sharded(p)] if sharded else trainable)
    step_loss = ranks.sum_float(step_loss)
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip and report the true gradient norm
    if sharded:
        grad_norm = sharding.clip_grad_norm(trainable, max_grad_norm)
    else:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm or float("inf")))
    if math.isfinite(step_loss):
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)  # skipped when a gradient is inf/NaN
            scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return step_loss, grad_norm


def loss_scaler(compute_dtype: Any, device: str) -> torch.amp.GradScaler | None:
    """Dynamic loss scaling for fp16 (its 5 exponent bits underflow small gradients); bf16 and fp32 need none."""
    return torch.amp.GradScaler(device) if compute_dtype == torch.float16 else None


def keep_trainable_fp32(trainable: list[torch.nn.Parameter]) -> None:
    """The LoRA weights (and so the optimizer's states and updates) in fp32 whatever the compute dtype: an fp16 or
    bf16 weight would round away most of each small update."""
    for param in trainable:
        if param.dtype != torch.float32:
            param.data = param.data.float()


# ----------------------------------------------------------------------------- the run
@dataclass
class PreparedRun:
    train_examples: list[data.Tokenized]
    val_examples: list[data.Tokenized]
    reports: list[data.DataReport]
    drift_samples: list[drift.Sample] = field(default_factory=list)  # the base's own text (training.drift)


def prepare_data(cfg: RunConfig, tokenizer: Any) -> PreparedRun:
    options = {"data_format": cfg.data_format, "max_length": cfg.max_length,
               "train_on_prompt": cfg.train_on_prompt, "bad_rows": cfg.bad_rows, "columns": cfg.columns}
    train_data = data.prepare_mix(data_sources(cfg), tokenizer, seed=cfg.seed, **options)
    if cfg.val_data:
        val_data = data.prepare_file(Path(cfg.val_data).expanduser(), tokenizer, **options)
        return PreparedRun(train_data.examples, val_data.examples, [*train_data.reports, val_data.report])
    train, val = data.split_validation(train_data.examples, cfg.val_fraction, cfg.seed)
    return PreparedRun(train, val, train_data.reports)


def data_sources(cfg: RunConfig) -> list[tuple[Path, float]]:
    """data and the data_mix sources, each with its share of the training rows."""
    ratios = data.mix_ratios(list(cfg.data_mix.values()))
    return list(zip([data_path(cfg.data), *map(data_path, cfg.data_mix)], ratios))


def total_steps_for(cfg: RunConfig, batches_per_epoch: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * batches_per_epoch / cfg.grad_accum))


def run_training(cfg: RunConfig, run_dir: Path, events: EventWriter, *, resume: bool = False,
                 stop: StopRequest | None = None, ranks: distributed.Ranks | None = None) -> dict[str, Any]:
    """The run; with several `ranks` (inside torchrun) each trains its share of every micro-batch, and only rank 0
    writes events, checkpoints and the adapter (the caller gives the other ranks an EventWriter to nowhere). Under
    ddp rank 0 alone evaluates; sharded (fsdp) every rank runs every forward, evaluations and samples included,
    since each layer's forward gathers its weights from all ranks."""
    stop = stop or StopRequest()
    ranks = ranks or distributed.Ranks()
    sharded = sharding.sharded_run(cfg.parallel, ranks)
    works = ranks.is_main or sharded  # the ranks that evaluate, sample and take part in writing
    started_s = time.time()
    device = loading.resolve_device(cfg.device)
    compute_dtype = loading.resolve_compute_dtype(cfg.compute_dtype, device)
    dtype_name = str(compute_dtype).replace("torch.", "")
    estimate_bytes = _estimate_peak_bytes(cfg)
    events.emit(ev.Started(run_dir=str(run_dir), config=cfg.to_dict(), device=device, compute_dtype=dtype_name,
                resume=resume, estimate_peak_bytes=estimate_bytes))
    seed_everything(cfg.seed)

    source = loading.resolve_model(cfg.model, cfg.allow_pickle, on_download=events.emit)
    tokenizer = loading.load_tokenizer(source.path, cfg.trust_remote_code)
    prepared = prepare_data(cfg, tokenizer)
    batcher = Batcher(prepared.train_examples, cfg.micro_batch_size * ranks.world, cfg.seed, tokenizer.pad_token_id,
                      first_step_batches=cfg.grad_accum, packed=cfg.packing)
    total_steps = total_steps_for(cfg, batcher.batches_per_epoch)
    _emit_data_ready(events, prepared, total_steps)

    load_started_s = time.time()
    # sharded, the base is loaded on the CPU and each layer moved to this rank's card as it is cut (shard_layers)
    model = build_model(cfg, source.path, "cpu" if sharded else device, compute_dtype, run_dir, sharded=sharded,
                        keeps_files=ranks.is_main or resume)  # a resume: every rank reads rank 0's files
    trainable = [p for p in model.parameters() if p.requires_grad]
    keep_trainable_fp32(trainable)
    ranks.broadcast_parameters(trainable)
    if sharded:
        layers = sharding.shard_layers(model, ranks, device)
        trainable = [p for p in model.parameters() if p.requires_grad]  # the sharded ones, now
        print(f"parallel fsdp: {layers} decoder layers sharded over {ranks.world} ranks", file=sys.stderr, flush=True)
    events.emit(ev.ModelLoaded(model=source.original, path=str(source.path), source=source.source,
                params=sum(p.numel() for p in model.parameters()), trainable_params=sum(p.numel() for p in trainable),
                load_s=round(time.time() - load_started_s, 2), vram=vram_figures(device)))
    optimizer = build_optimizer(cfg, trainable)
    scheduler = build_scheduler(cfg, optimizer, total_steps)
    scaler = loss_scaler(compute_dtype, device)
    freeze_heap()

    state = checkpoints.TrainerState(step=0, micro_index=0, total_steps=total_steps, seed=cfg.seed)
    if resume:
        state = resume_from_checkpoint(cfg, run_dir, model, optimizer, scheduler, scaler, events, sharded)
    best = BestTracker(cfg, events)  # the best checkpoint and early stopping, kept in `state`

    def save(step_state: checkpoints.TrainerState) -> Path | None:
        if not works:  # one copy of each checkpoint, from rank 0 (sharded: every rank gathers the state for it)
            return None
        whole = checkpoints.Whole(sharding.gathered_adapter_state(model),
                                  sharding.gathered_optimizer_state(optimizer)) if sharded else None
        if not ranks.is_main:
            return None
        path = checkpoints.save_checkpoint(run_dir, model, optimizer, scheduler, step_state, cfg.to_dict(), scaler,
                                           whole)
        events.emit(ev.Checkpoint(step=step_state.step, path=str(path), best_step=step_state.best_step or None,
                                  best_eval_loss=step_state.best_eval_loss))
        return path

    model.train()
    if works and prepared.val_examples and cfg.drift_samples:  # the base's own text, once per run
        prepared.drift_samples = drift.load_or_sample(run_dir, model, tokenizer, cfg, device, keep=ranks.is_main)
    if works and prepared.val_examples and state.step == 0:  # the base model's loss: where the curve starts
        _emit_eval(events, model, prepared, cfg, batcher.pad_id, device, 0)
    step_times_s: list[float] = []
    last_loss = float("nan")
    eval_loss = moved = None
    while state.step < total_steps:
        step_started_s = time.time()
        ranks.dropout_seed(cfg.seed, state.step)
        shares = [sharding.share(ranks, batcher.batch(state.micro_index + k), sharded) for k in range(cfg.grad_accum)]
        micro_batches = [micro_batch(rows, cfg, batcher.pad_id, device) for rows in shares if rows]
        scale_before = scaler.get_scale() if scaler is not None else 0.0
        step_loss, grad_norm = training_step(model, micro_batches, trainable, optimizer, cfg.max_grad_norm,
                                             cfg.chunked_loss, scaler=scaler, ranks=ranks, sharded=sharded)
        if not math.isfinite(step_loss):
            raise EngineError("nan_loss", f"loss became {step_loss} at step {state.step + 1}",
                              advice.non_finite_loss_advice(dtype_name, loading.bf16_native(device)))
        if scaler is not None and scaler.get_scale() < scale_before:  # overflowed: skipped, not applied
            state.skipped_steps += 1
            check_loss_scale(scaler, state.step + 1, dtype_name, device)
        else:
            scheduler.step()
        state.step += 1
        state.micro_index += cfg.grad_accum
        last_loss = step_loss
        step_times_s.append(time.time() - step_started_s)
        tokens = ranks.sum_int(sum(packing.real_tokens(b) for b in micro_batches))
        rank_vram = ranks.gather(distributed.rank_memory(device)) if ranks.several else []
        events.emit(ev.Step(step=state.step, total_steps=total_steps,
                    epoch=round(state.micro_index / batcher.batches_per_epoch, 4), loss=round(step_loss, 5),
                    lr=scheduler.get_last_lr()[0], grad_norm=round(grad_norm, 5),
                    tokens_per_s=round(tokens / step_times_s[-1], 1),
                    eta_s=round(_mean_recent(step_times_s) * (total_steps - state.step), 1),
                    vram=vram_figures(device), skipped_steps=state.skipped_steps, rank_vram=rank_vram))
        if state.step == 1:  # the run's largest micro-batches just ran: the peak the rest of the run stays under
            events.emit(fit_check(micro_batches, estimate_bytes, device))
        evaluate_now = cfg.eval_steps and state.step % cfg.eval_steps == 0 and state.step < total_steps
        if works and prepared.val_examples and evaluate_now:
            eval_loss, moved = _emit_eval(events, model, prepared, cfg, batcher.pad_id, device, state.step)
            best.observe(state, eval_loss)
        if cfg.save_steps and state.step % cfg.save_steps == 0 and state.step < total_steps:
            save(state)
        new_best = best.needs_checkpoint(state, run_dir)
        if sharded:  # saving is collective: rank 0's look at its files decides for every rank
            new_best = ranks.any(ranks.is_main and new_best)
        if new_best:
            save(state)
        if best.stop_now(state, ranks, bool(evaluate_now and prepared.val_examples)):
            break  # finishes as a run that reached its last step does
        if stop.requested and state.step < total_steps:
            path = save(state)
            events.emit(ev.Stopped(step=state.step, checkpoint=str(path)))
            return {"status": "stopped", "step": state.step}

    if not works:
        return {"status": "finished", "step": state.step, "eval_loss": None, "comparison": None}
    if prepared.val_examples and not best.stopped_early:  # an early stop evaluated this step already
        eval_loss, moved = _emit_eval(events, model, prepared, cfg, batcher.pad_id, device, state.step)
        best.observe(state, eval_loss)
    save(state)
    adapter_state = sharding.gathered_adapter_state(model) if sharded else None
    adapter_dir = save_adapter(model, tokenizer, run_dir, adapter_state) if ranks.is_main else run_dir / "adapter"
    comparison = None
    if cfg.compare_questions:
        comparison = compare.compare_answers(cfg, model, tokenizer, prepared, device)
        events.emit(ev.Comparison(**comparison, drift=moved))
    if not ranks.is_main:
        return {"status": "finished", "step": state.step, "eval_loss": None, "comparison": None}
    events.emit(ev.Finished(step=state.step, adapter_dir=str(adapter_dir), final_loss=round(last_loss, 5),
                eval_loss=eval_loss, duration_s=round(time.time() - started_s, 1), drift=moved))
    return {"status": "finished", "step": state.step, "eval_loss": eval_loss, "comparison": comparison}


def resume_from_checkpoint(cfg: RunConfig, run_dir: Path, model: Any, optimizer: torch.optim.Optimizer,
                           scheduler: Any, scaler: torch.amp.GradScaler | None,
                           events: EventWriter, sharded: bool = False) -> checkpoints.TrainerState:
    """The run's state from its last checkpoint, after checking that this config continues that run (resume_rules);
    the options that may change (learning rate, weight decay, schedule) take effect from here on."""
    latest = checkpoints.latest_checkpoint(run_dir)
    if latest is None:
        raise EngineError("no_checkpoint", f"{run_dir} has no complete checkpoint to resume from",
                          "Start the run again without --resume.")
    stored = checkpoints.stored_config(latest)
    accepted = resume_rules.check_resume(stored, cfg.to_dict(), str(latest)) if stored is not None else []
    state = checkpoints.load_checkpoint(latest, model, optimizer, scheduler, scaler, sharded=sharded)
    for group, lr_lambda in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["weight_decay"], group["initial_lr"] = cfg.weight_decay, cfg.learning_rate
        group["lr"] = cfg.learning_rate * lr_lambda(scheduler.last_epoch)
    scheduler.base_lrs = [cfg.learning_rate] * len(optimizer.param_groups)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    changed = f", with changed options: {', '.join(accepted)}" if accepted else ""
    events.emit(ev.Warning(message=f"resumed from {latest.name}{changed}", step=state.step))
    return state


def check_loss_scale(scaler: torch.amp.GradScaler, step: int, dtype_name: str, device: str) -> None:
    """A scale below 1 means even unscaled gradients overflow fp16, step after step: stop instead of skipping on."""
    if scaler.get_scale() < 1:
        raise EngineError("fp16_overflow", f"fp16 gradients overflowed at every step up to step {step}: the loss "
                          f"scale fell to {scaler.get_scale():g} and nothing was applied since",
                          advice.non_finite_loss_advice(dtype_name, loading.bf16_native(device)))


def fit_check(micro_batches: list[dict[str, Any]], estimate_bytes: int | None, device: str) -> ev.FitCheck:
    """The first step's measured peak next to the estimate; the first step holds the run's largest micro-batches."""
    tokens = max(int(batch["input_ids"].numel()) for batch in micro_batches)
    if device != "cuda":
        return ev.FitCheck(step=1, tokens=tokens, verdict="not measured", estimate_peak_bytes=estimate_bytes)
    free_bytes, _ = torch.cuda.mem_get_info()
    peak_bytes, available_bytes = torch.cuda.max_memory_reserved(), torch.cuda.memory_reserved() + free_bytes
    return ev.FitCheck(step=1, tokens=tokens, verdict=advice.peak_verdict(peak_bytes, available_bytes),
                       estimate_peak_bytes=estimate_bytes, measured_peak_bytes=peak_bytes,
                       available_bytes=available_bytes)


def _estimate_peak_bytes(cfg: RunConfig) -> int | None:
    """The fit estimate for this run, shown next to the measured peak; None when config.json is unreadable."""
    from qlora_engine.planning.memory import estimate_peak
    from qlora_engine.planning.model_shape import resolve_model_config

    try:
        return estimate_peak(resolve_model_config(cfg.model), cfg).peak_bytes
    except EngineError:
        return None


def _emit_data_ready(events: EventWriter, prepared: PreparedRun, total_steps: int) -> None:
    reports = prepared.reports
    lengths = [len(e.input_ids) for e in prepared.train_examples]
    events.emit(ev.DataReady(train_rows=len(prepared.train_examples), val_rows=len(prepared.val_examples),
                skipped_rows=sum(len(r.bad_rows) + r.no_trained_tokens_rows for r in reports),
                truncated_rows=sum(r.truncated_rows for r in reports), total_steps=total_steps,
                format=reports[0].format, detected_format=reports[0].detected_format,
                mean_tokens=round(sum(lengths) / max(len(lengths), 1), 1), max_tokens=max(lengths, default=0),
                bad_rows=[{"file": b.file, "line": b.line, "reason": b.reason} for r in reports
                          for b in r.bad_rows[:200]],
                not_target_rows=sum(r.not_target_rows for r in reports),
                sources=[r.summary_fields() for r in reports], notices=sorted({r.notice for r in reports} - {""})))


def _emit_eval(events: EventWriter, model: Any, prepared: PreparedRun, cfg: RunConfig, pad_id: int, device: str,
               step: int) -> tuple[float, float | None]:
    """The validation loss and the drift from the base (None when not measured), emitted and returned."""
    eval_loss = evaluate(model, prepared.val_examples, cfg, pad_id, device)
    moved = drift.drift_from_start(model, prepared.drift_samples, pad_id, device) if prepared.drift_samples else None
    moved = None if moved is None else round(moved, 5)
    events.emit(ev.Eval(step=step, eval_loss=round(eval_loss, 5), perplexity=round(math.exp(min(eval_loss, 50)), 3),
                        drift=moved))
    return eval_loss, moved


def _mean_recent(values: list[float], count: int = 10) -> float:
    recent = values[-count:]
    return sum(recent) / len(recent)


def save_adapter(model: Any, tokenizer: Any, run_dir: Path, state_dict: dict[str, Any] | None = None) -> Path:
    """The final adapter (PEFT format) at <run_dir>/adapter, replaced atomically (`state_dict`: the weights gathered
    whole from a sharded model). What a killed save left behind is removed first (the run lock keeps any other
    writer out of this folder)."""
    final = run_dir / "adapter"
    tmp = run_dir / f"{ADAPTER_TMP_PREFIX}{os.getpid()}"
    for leftover in [*run_dir.glob(ADAPTER_TMP_PREFIX + "*"), *run_dir.glob(ADAPTER_OLD_PREFIX + "*")]:
        shutil.rmtree(leftover, ignore_errors=True)
    # a full disk or an unwritable folder: the final checkpoint holds the same adapter
    with checkpoints.writing_folder(tmp, "the final adapter", run_dir, "run the same command with --resume: the run "
                                    "is complete in its last checkpoint and only the adapter is written again"):
        model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        checkpoints.replace_folder(tmp, final, run_dir / f"{ADAPTER_OLD_PREFIX}{os.getpid()}")
    return final
