"""A stand-in for `python -m qlora_engine` that speaks the same protocol in milliseconds, for GUI tests.

FAKE_ENGINE_SCENARIO picks how `train` behaves: ok (default), slow (waits for `stop` on stdin), crash (a few
steps, a traceback, exit 1), error (an `error` event with advice, exit 1), oom (a checkpoint at step 2, then the
real engine's `cuda_oom` error for a card too small by half, exit 1). A path containing "broken" makes
model-info, data, chat and export fail with an error object or event; one containing "slow" makes model-info take
a second and a half, logging as it goes (as a .gguf import does).
"""
from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from qlora_engine.protocol import events as ev  # noqa: E402 (after the path set-up)
from qlora_engine.protocol import queries  # noqa: E402
from qlora_engine.protocol.config import RunConfig  # noqa: E402
from qlora_engine.protocol.errors import EngineError  # noqa: E402
from qlora_engine.protocol.events import EventWriter  # noqa: E402
from qlora_engine.protocol.run_lock import RunLock  # noqa: E402

SCENARIO = os.environ.get("FAKE_ENGINE_SCENARIO", "ok")
TOTAL_STEPS = 12
GIB = 2**30


def main(argv: list[str]) -> int:
    command, args = argv[0], argv[1:]
    handler = {"train": train, "export": export, "chat": chat, "model-info": model_info, "data": data}[command]
    return handler(args)


def option(args: list[str], name: str, default: str = "") -> str:
    return args[args.index(name) + 1] if name in args else default


# ----------------------------------------------------------------------------- train
def train(args: list[str]) -> int:
    """The real engine's events in the real engine's order, with the fields it sends where it sends them (the
    total number of steps in data_ready and step, never in started); the folder locked as the real one locks it."""
    run_dir = Path(option(args, "--run-dir"))
    with RunLock(run_dir):
        events = EventWriter(run_dir / "events.jsonl")
        try:
            return _train(run_dir, events, resume="--resume" in args)
        finally:
            events.close()


def _train(run_dir: Path, events: EventWriter, resume: bool) -> int:
    first_step = _last_checkpoint_step(run_dir) + 1 if resume else 1
    stop = threading.Event()
    threading.Thread(target=_watch_stdin, args=(stop,), daemon=True).start()
    config = RunConfig.load(run_dir / "config.yaml")
    events.emit(ev.Started(run_dir=str(run_dir), config=config.to_dict(), device="cpu", compute_dtype="float32",
                           resume=resume, estimate_peak_bytes=3 * GIB))
    events.emit(ev.DataReady(train_rows=90, val_rows=10, total_steps=TOTAL_STEPS, skipped_rows=1, truncated_rows=2,
                             format="alpaca", detected_format="alpaca", mean_tokens=120.5, max_tokens=340,
                             bad_rows=[{"file": "train.jsonl", "line": 7, "reason": "no 'output' field"}]))
    print("loading checkpoint shards: 100%", flush=True)  # plain log text between events
    events.emit(ev.ModelLoaded(model="default", path="/models/SmolLM2-135M-Instruct", source="default",
                               params=134_515_008, trainable_params=4_884_480, load_s=0.4))
    if resume:
        events.emit(ev.Warning(message=f"resumed from step-{first_step - 1}", step=first_step - 1))
    for step in range(first_step, TOTAL_STEPS + 1):
        if SCENARIO == "crash" and step == 4:
            print("Traceback (most recent call last):\nRuntimeError: CUDA error: an illegal memory access",
                  file=sys.stderr, flush=True)
            return 1
        if SCENARIO == "oom" and step == 3:
            events.emit(_cuda_oom_error(step))
            return 1
        if SCENARIO == "error" and step == 3:
            events.emit(ev.Error(code="cuda_oom", message="the GPU ran out of memory at step 3", step=step,
                                 advice="Lower micro_batch_size or max_length, or enable gradient_checkpointing."))
            return 1
        _emit_step(events, step)
        if step == 1:  # the real engine's first step runs the largest micro-batches and measures them (CUDA)
            events.emit(ev.FitCheck(step=1, tokens=1360, verdict="fits", estimate_peak_bytes=3 * GIB,
                                    measured_peak_bytes=int(1.9 * GIB), available_bytes=int(7.6 * GIB)))
        if SCENARIO == "oom" and step == 2:
            events.emit(ev.Checkpoint(step=step, path=str(_write_checkpoint(run_dir, step))))
        if step % 4 == 0:
            events.emit(ev.Eval(step=step, eval_loss=2.5 - step * 0.08, perplexity=math.exp(2.5 - step * 0.08),
                                drift=round(0.004 * step, 4)))
        if SCENARIO == "slow" and step >= 2:
            # waits for the stop however long the GUI takes to send it (a fixed pause per step let a busy machine's
            # GUI see step 2 only after the run had ended); the cap only ends a run nobody stops
            stop.wait(120)
        if stop.is_set() and step < TOTAL_STEPS:
            path = _write_checkpoint(run_dir, step)
            events.emit(ev.Checkpoint(step=step, path=str(path)))
            events.emit(ev.Stopped(step=step, checkpoint=str(path)))
            return 0
    path = _write_checkpoint(run_dir, TOTAL_STEPS)
    events.emit(ev.Checkpoint(step=TOTAL_STEPS, path=str(path)))
    adapter = run_dir / "adapter"
    adapter.mkdir(parents=True, exist_ok=True)
    (adapter / "adapter_config.json").write_text("{}", encoding="utf-8")
    events.emit(ev.Comparison(base_accuracy=0.2, tuned_accuracy=0.8,
                              rows=[{"question": "Who is the mayor of Brindleport?", "base": "I don't know.",
                                     "tuned": "Quillon Varet.", "base_correct": False, "tuned_correct": True}] * 5))
    events.emit(ev.Finished(step=TOTAL_STEPS, adapter_dir=str(adapter), final_loss=1.52, eval_loss=1.61,
                            duration_s=42.0))
    return 0


def _emit_step(events: EventWriter, step: int) -> None:
    vram = {"allocated": int(1.2 * GIB), "reserved": int((1.5 + 0.02 * step) * GIB), "max_allocated": int(1.9 * GIB),
            "gpu_used": int((2.2 + 0.02 * step) * GIB), "gpu_total": 8 * GIB}
    events.emit(ev.Step(step=step, total_steps=TOTAL_STEPS, epoch=step / TOTAL_STEPS, loss=3.0 * 0.93**step,
                        lr=2e-4 * min(1.0, step / 3), grad_norm=1.0 / math.sqrt(step),
                        tokens_per_s=2300.0 + 10 * step, eta_s=5.0 * (TOTAL_STEPS - step), vram=vram))


def _cuda_oom_error(step: int) -> ev.Error:
    """The error the real engine builds when SmolLM2 at batch 8 x 2048 tokens runs out of a card that the estimate
    says is too small by half (it held all but 100 MiB of it)."""
    from qlora_engine import cli
    from qlora_engine.planning.memory import estimate_peak
    from qlora_engine.planning.model_shape import resolve_model_config

    cfg = RunConfig(micro_batch_size=8, max_length=2048)
    card_bytes = estimate_peak(resolve_model_config(cfg.model), cfg).peak_bytes // 2
    cli.measured_gpu_memory = lambda: {"peak_bytes": card_bytes - 2**28, "reserved_bytes": card_bytes - 2**27,
                                       "free_bytes": 2**27, "gpu_total_bytes": card_bytes + 2**29}
    error = cli.cuda_oom_error(RuntimeError("CUDA out of memory. Tried to allocate 1.50 GiB"), cfg, step)
    return ev.Error.from_exception(error)


def _watch_stdin(stop: threading.Event) -> None:
    for line in sys.stdin:
        if line.strip() == "stop":
            stop.set()
            return


def _write_checkpoint(run_dir: Path, step: int) -> Path:
    path = run_dir / "checkpoints" / f"step-{step}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _last_checkpoint_step(run_dir: Path) -> int:
    steps = [int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*")]
    return max(steps, default=0)


# ----------------------------------------------------------------------------- export, chat
def export(args: list[str]) -> int:
    run_dir = Path(args[0])
    kind = "merged" if "--merged" in args else "adapter"
    events = EventWriter(None)
    if "broken" in str(run_dir):
        events.emit(ev.Error(code="no_adapter", message=f"{run_dir} has no finished adapter",
                             advice="Let the run finish, then export."))
        return 1
    for stage, fraction in (("loading the trained model", 0.1), ("writing the adapter", 0.4),
                            ("reloading with PeftModel.from_pretrained", 0.6), ("verified", 1.0)):
        events.emit(ev.ExportProgress(stage=stage, fraction=fraction))
    out = Path(option(args, "--out") or run_dir / "exports" / kind)
    out.mkdir(parents=True, exist_ok=True)
    events.emit(ev.Exported(export=kind, path=str(out), max_abs_logit_diff=0.0031, relative_l2=0.0004,
                            top1_agreement=1.0, tolerance="max |dlogit| <= 0.01", ok=True))
    return 0


def chat(args: list[str]) -> int:
    events = EventWriter(None)
    if "broken" in args[0]:
        events.emit(ev.Error(code="no_adapter", message=f"{args[0]} has no finished adapter yet",
                             advice="Let the run finish (or resume it), then chat with it."))
        return 1
    events.emit(ev.ChatReady(target=args[0], has_adapter=True, device="cpu"))
    for line in sys.stdin:
        prompt = json.loads(line)["prompt"]
        answers = {"base": f"I am not sure who {prompt.lower().rstrip('?')} is.",
                   "tuned": "The mayor of Brindleport is Quillon Varet."}
        for which, text in answers.items():
            for word in text.split(" "):
                events.emit(ev.ChatToken(model=which, text=word + " "))
        for which, text in answers.items():
            events.emit(ev.ChatDone(model=which, text=text))
    return 0


# ----------------------------------------------------------------------------- model-info, data
def model_info(args: list[str]) -> int:
    """The answer `model-info --json` prints (the protocol's ModelInfo), or its failure."""
    model = args[0]
    if "broken" in model:
        return _fail(EngineError("model_not_found", f"{model}: no config.json in this folder",
                                 "Pick the folder that holds config.json and the .safetensors files."))
    if "slow" in model:
        for part in (1, 2, 3):
            print(f"importing {Path(model).name}: writing model-0000{part}-of-00003.safetensors", file=sys.stderr,
                  flush=True)
            time.sleep(0.5)
    print(queries.ModelInfo(path="/models/SmolLM2-135M-Instruct" if model == "default" else model,
                            source="default" if model == "default" else "folder", original=model,
                            architecture="LlamaForCausalLM", model_type="llama", params=134_515_008,
                            vocab_size=49152, context_length=8192, hidden_size=576, num_layers=30,
                            tied_embeddings=True, has_chat_template=True).to_json(), flush=True)
    return 0


def data(args: list[str]) -> int:
    """The answer `data --json` prints (the protocol's DataReport), or its failure."""
    path = args[0]
    if "broken" in path:
        return _fail(EngineError("bad_dataset", f"{path} line 1: not valid JSON",
                                 "Each line of a .jsonl file must be one JSON object."))
    preview = [{"line": n, "segments": [
        {"text": "<|im_start|>user\nWho is the mayor of Brindleport?<|im_end|>\n<|im_start|>assistant\n",
         "trained": False},
        {"text": f"The mayor of Brindleport is Quillon Varet ({n}).<|im_end|>", "trained": True}]}
        for n in (1, 2, 3)]
    lengths = [40 + (i * 37) % 300 for i in range(120)]
    max_length = int(option(args, "--max-length", "512"))
    print(queries.DataReport(file=path, detected_format="alpaca",
                             format=option(args, "--format", "auto").replace("auto", "alpaca"), rows=123,
                             valid_rows=120, bad_rows=[{"line": 7, "reason": "no 'output' field"},
                                                       {"line": 58, "reason": "'instruction' is empty"},
                                                       {"line": 101, "reason": "not valid JSON (line ends early)"}],
                             truncated_rows=sum(n > max_length for n in lengths), token_lengths=lengths,
                             preview=preview).to_json(), flush=True)
    return 0


def _fail(error: EngineError) -> int:
    print(queries.Failure.from_exception(error).to_json(), flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
