"""The `qlora-studio` command: train, export, chat, data, model-info, pull, models, runs, gpu, estimate, bench (`gui`
is the app's: app/entry.py).

Every RunConfig field is a `--kebab-case` flag of `train`, generated from the config type.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any

from qlora_engine.planning.estimate_command import parse_size_bytes
from qlora_engine.protocol import events as ev
from qlora_engine.protocol import library_log, queries, run_folders, run_state
from qlora_engine.protocol.config import DATA_FORMATS, RunConfig, add_config_flags, mapping_flag
from qlora_engine.protocol.errors import DISK_FULL_ERRNOS, NOT_WRITABLE_ERRNOS, EngineError, config_error, write_failure
from qlora_engine.protocol.events import EventWriter
from qlora_engine.protocol.model_ref import parse_hub_ref
from qlora_engine.protocol.run_lock import RunLock

LIGHT_COMMANDS = {"gpu": ("qlora_engine.planning.hardware", "gpu_main"),
                  "estimate": ("qlora_engine.planning.estimate_command", "estimate_main"),
                  "bench": ("qlora_engine.bench.command", "bench_main")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlora-studio", description="QLoRA fine-tuning on one GPU (or the CPU).")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="run (or resume) a QLoRA fine-tune")
    train.add_argument("config_file", nargs="?", help="run config YAML (flags override its values)")
    train.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    train.add_argument("--torchrun", default="", metavar="OPTIONS",
                       help="with --nproc N > 1: torchrun's own options instead of --standalone, e.g. for two machines "
                            "\"--nnodes 2 --node-rank 0 --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id RUN\"")
    add_events_flag(train)
    add_config_flags(train)

    export = commands.add_parser("export", help="export a finished run's adapter or merged model, verified")
    export.add_argument("run", help="the run folder")
    kind = export.add_mutually_exclusive_group(required=True)
    kind.add_argument("--adapter", action="store_const", const="adapter", dest="kind", help="PEFT adapter")
    kind.add_argument("--merged", action="store_const", const="merged", dest="kind", help="merged 16-bit model")
    kind.add_argument("--gguf", action="store_const", const="gguf", dest="kind",
                      help="GGUF for llama.cpp / Ollama / LM Studio (llama.cpp's converter and quantizer), checked "
                           "by llama.cpp; a Modelfile beside each file")
    kind.add_argument("--gguf-lora", action="store_const", const="gguf-lora", dest="kind",
                      help="the adapter as a GGUF LoRA (with the base model's f16 GGUF), checked by llama.cpp")
    export.add_argument("--quant", default="q4_k_m",
                        help="with --gguf: f16, bf16, q8_0, q6_k, q5_k_m, q4_k_m, comma-separated [q4_k_m]")
    export.add_argument("--lm-studio", action="store_true", help="with --gguf: also add the files to LM Studio")
    export.add_argument("--ollama-create", metavar="NAME",
                        help="with --gguf: also run `ollama create NAME` on the last file's Modelfile")
    export.add_argument("--out", help="destination folder [<run>/exports/<kind>; a checkpoint's: exports/step-N/]")
    add_events_flag(export)

    add_to = commands.add_parser("add-to", help="put an exported GGUF in LM Studio's models folder, or create it "
                                                "in Ollama from the Modelfile beside it")
    add_to.add_argument("app", choices=("lm-studio", "ollama"))
    add_to.add_argument("gguf", help="an exported .gguf file")
    add_to.add_argument("--name", help="the model's name there [the file's name without its quantization]")
    add_to.add_argument("--json", action="store_true")

    chat = commands.add_parser("chat", help="answer a prompt with the base and the tuned model")
    chat.add_argument("target", help="a run folder, a model folder, a .gguf, or 'default'")
    chat.add_argument("--prompt", help="the question (without it: read questions from the terminal)")
    chat.add_argument("--max-new-tokens", type=int, default=128)
    chat.add_argument("--serve", action="store_true", help="JSON lines on stdin, streamed events out (for the GUI)")
    add_events_flag(chat)
    for command in (export, chat):
        command.add_argument("--checkpoint", default=run_folders.FINAL_ADAPTER, help=run_folders.CHECKPOINT_HELP)

    info = commands.add_parser("model-info", help="facts about a model (imports a .gguf on first use)")
    info.add_argument("model")
    info.add_argument("--allow-pickle", action="store_true")
    info.add_argument("--json", action="store_true")

    precision = commands.add_parser("precision", help="what a precision budget buys on a model: each linear "
                                    "weight's format under --bits and the quantization error against plain 4-bit")
    precision.add_argument("model")
    precision.add_argument("--bits", type=float, required=True, help="average bits per linear weight, 4.03 to 16")
    precision.add_argument("--quant-type", default="nf4", choices=("nf4", "fp4"))
    precision.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=True)
    precision.add_argument("--json", action="store_true")

    data = commands.add_parser("data", help="check a data file: format, bad rows, token lengths, preview")
    data.add_argument("file")
    data.add_argument("--model", default="default")
    data.add_argument("--format", default="auto", choices=("auto", *DATA_FORMATS))
    data.add_argument("--columns", type=mapping_flag(str), default={}, metavar="FIELD=COLUMN,…",
                      help="the file's own column names for the format's fields, e.g. instruction=question")
    data.add_argument("--data-mix", type=mapping_flag(float), default={}, metavar="SOURCE=RATIO,…",
                      help="more sources mixed in, each with its share of the rows, e.g. general.jsonl=0.3")
    data.add_argument("--max-length", type=int, default=512)
    data.add_argument("--train-on-prompt", action="store_true")
    data.add_argument("--preview-rows", type=int, default=5)
    data.add_argument("--json", action="store_true")

    pull = commands.add_parser("pull", help="download a Hub model (ORG/NAME[@revision]) into the HF cache: only "
                                            "what training needs, files already there kept")
    pull.add_argument("model", metavar="ORG/NAME[@revision]")
    pull.add_argument("--allow-pickle", action="store_true", help="fetch .bin weights when it has no safetensors")
    add_events_flag(pull)

    models = commands.add_parser("models", help="models on disk (HF cache, Ollama, LM Studio); --catalog: what fits "
                                                "this GPU; --search: the Hub")
    models.add_argument("--catalog", action="store_true", help="the catalog of popular models against free memory")
    models.add_argument("--search", metavar="TEXT", help="search the Hub for text-generation models by name")
    models.add_argument("--gpu-memory", type=parse_size_bytes, metavar="SIZE",
                        help="free GPU memory for --catalog, e.g. 12GiB [free memory of the training GPU]")
    models.add_argument("--json", action="store_true")
    add_config_flags(models)

    token = commands.add_parser("hub-token", help="whether a Hugging Face token is there for gated and private "
                                                  "models; --save: check the token read from stdin and store it")
    token.add_argument("--save", action="store_true",
                       help="read a token from stdin, check it with the Hub, store it where `hf auth login` does")
    token.add_argument("--json", action="store_true")

    runs = commands.add_parser("runs", help="list the runs: status, step / total, losses (what the Runs page shows)")
    runs.add_argument("--runs-dir", help=f"the runs folder [${run_folders.RUNS_ENV} or the user data dir]")
    runs.add_argument("--json", action="store_true")

    for name in LIGHT_COMMANDS:
        commands.add_parser(name, help=f"see `qlora-studio {name} --help`", add_help=False)
    return parser


def add_events_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--events", choices=("human", "jsonl"), default="human",
                        help="stdout as readable lines (human) or one JSON event per line (jsonl, for the GUI)")


def use_expandable_segments() -> None:
    """torch's CUDA allocator grows its segments in place instead of caching fixed blocks: on an H100 (Llama-3.1-8B,
    16,384 tokens) the default left 5.4 GiB reserved but unusable and ran out within 23 GiB; this used 19.5 GiB.
    Set before torch touches CUDA; a user's own PYTORCH_CUDA_ALLOC_CONF / PYTORCH_ALLOC_CONF wins."""
    if not (os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF")):
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    use_expandable_segments()
    if argv and argv[0] in LIGHT_COMMANDS:
        module_name, function = LIGHT_COMMANDS[argv[0]]
        module = __import__(module_name, fromlist=[function])
        return getattr(module, function)(argv[1:])
    args = build_parser().parse_args(argv)
    # Progress bars of downloads and weight loading are noise in the log view and in events.jsonl's client.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if args.command in ("train", "export", "chat", "data", "model-info", "precision"):  # those that load a library
        library_log.capture()  # library warnings to the run's engine.log, not the terminal or the GUI's log view
    handler = {"train": cmd_train, "export": cmd_export, "chat": cmd_chat, "model-info": cmd_model_info,
               "precision": cmd_precision, "data": cmd_data, "runs": cmd_runs, "pull": cmd_pull, "models": cmd_models,
               "hub-token": cmd_hub_token, "add-to": cmd_add_to}[args.command]
    return handler(args)


def report_failure(events: EventWriter, exc: BaseException) -> int:
    """Turn any failure into an `error` event with advice; exit code 1."""
    if isinstance(exc, Exception) and not isinstance(exc, EngineError) and (
            not isinstance(exc, OSError) or exc.errno in DISK_FULL_ERRNOS | NOT_WRITABLE_ERRNOS):
        exc = write_failure(exc, "a file", None, "try again; a run continues from its last complete checkpoint "
                                                 "with --resume", verb="read or write") or exc
    if is_cuda_oom(exc):
        exc = cuda_oom_error(exc)
    if isinstance(exc, EngineError):
        events.emit(ev.Error.from_exception(exc))
        return 1
    if isinstance(exc, KeyboardInterrupt):
        events.emit(ev.Error(code="interrupted", message="stopped at once by a second interrupt, no checkpoint",
                             advice="Resume from the last checkpoint with --resume."))
        return 130
    traceback.print_exc(file=sys.stderr)
    events.emit(ev.Error(code="internal", message=f"{type(exc).__name__}: {exc}",
                         advice="This is a bug in QLoRA Studio; the log above has the details."))
    return 1


# ----------------------------------------------------------------------------- out of GPU memory
def is_cuda_oom(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError"


def measured_gpu_memory() -> dict[str, int]:
    """This process's peak and the GPU's free and total memory, read after an out-of-memory error."""
    import torch

    if not torch.cuda.is_available():
        return {}
    try:
        free_bytes, total_bytes = torch.cuda.mem_get_info()
        return {"peak_bytes": torch.cuda.max_memory_allocated(), "reserved_bytes": torch.cuda.memory_reserved(),
                "free_bytes": free_bytes, "gpu_total_bytes": total_bytes}
    except RuntimeError:  # the CUDA context itself is broken: say what we know without figures
        return {}


def cuda_oom_error(exc: BaseException, cfg: RunConfig | None = None, step: int | None = None) -> EngineError:
    """The out-of-memory error with the measured peak, the estimate, and the estimator's fixes for this GPU."""
    memory = measured_gpu_memory()
    tried = re.search(r"Tried to allocate ([\d.]+ \w+)", str(exc))
    message = "the GPU ran out of memory" + (f" during step {step}" if step else "")
    message += f" (it tried to allocate {tried.group(1)} more)" if tried else ""
    if memory:
        message += f": this run used up to {_gib(memory['peak_bytes'])} of the GPU's {_gib(memory['gpu_total_bytes'])}"
    details: dict[str, Any] = {"step": step, **memory}
    # What the run had to itself: what is free now plus what it held (freed when this process exits).
    plan = _estimator_plan(cfg, memory["free_bytes"] + memory["reserved_bytes"]) if memory else None
    if plan is None:
        return EngineError("cuda_oom", message, OOM_ADVICE, **details)
    plan.fixes = plan.fixes_of("memory")  # a speed fix costs memory: never one for an out-of-memory error
    details.update(estimate_peak_bytes=plan.peak_bytes, fixes=[
        {"description": fix.description, "config_changes": fix.config_changes} for fix in plan.fixes])
    message += f"; the estimate for this configuration is {_gib(plan.peak_bytes)}"
    return EngineError("cuda_oom", message, _oom_advice(plan), **details)


OOM_ADVICE = ("Lower micro_batch_size or max_length, enable gradient_checkpointing, or run `qlora-studio estimate` "
              "to see what fits.")


def _oom_advice(plan: Any) -> str:
    fitting = [fix.description for fix in plan.fixes if fix.fits_after][:2]
    if fitting:
        return (f"The estimator's fix for this GPU: {fitting[0]}" + (f"; or {fitting[1]}" if fitting[1:] else "")
                + ". Start the run again with that change.")
    if plan.verdict == "won't fit":
        return (f"Even the estimator's smallest settings don't fit in the {_gib(plan.free_bytes)} this run had: "
                "pick a smaller model, or close other programs using the GPU.")
    return ("The estimate says this fits, so another program is probably using GPU memory: close it and resume "
            "the run (its last checkpoint is kept). " + OOM_ADVICE)


def _estimator_plan(cfg: RunConfig | None, free_bytes: int) -> Any:
    """advice.advise for this run against the memory it had; None when the model's shape can't be read."""
    from qlora_engine.planning import advice, model_shape

    if cfg is None:
        return None
    try:
        return advice.advise(model_shape.resolve_model_config(cfg.model), cfg, free_bytes)
    except EngineError:
        return None


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


# ----------------------------------------------------------------------------- train
def resolve_train_config(args: argparse.Namespace) -> tuple[RunConfig, Path]:
    overrides = {spec.name: getattr(args, spec.name) for spec in dataclasses.fields(RunConfig)
                 if hasattr(args, spec.name)}
    if args.resume:
        run_dir = Path(overrides.get("run_dir") or (Path(args.config_file).parent if args.config_file else ""))
        if not str(run_dir) or not (run_dir / "config.yaml").is_file():
            raise config_error("--resume needs --run-dir pointing at an existing run folder (with config.yaml)")
        values = RunConfig.load(run_dir / "config.yaml").to_dict()
        from qlora_engine.training.resume_rules import check_resume

        check_resume(values, overrides, str(run_dir))  # before config.yaml is written again
    else:
        values = RunConfig.load(args.config_file).to_dict() if args.config_file else {}
    values.update(overrides)
    cfg = RunConfig.from_dict(values, source=args.config_file or "command line")
    run_dir = (Path(cfg.run_dir).expanduser() if cfg.run_dir
               else run_folders.new_run_dir(run_folders.runs_root(), cfg.model))
    cfg.run_dir = str(run_dir)
    return cfg, run_dir


def cmd_train(args: argparse.Namespace) -> int:
    from qlora_engine.training import distributed, loop

    events = EventWriter(None, human=args.events == "human")
    cfg, run_dir, ranks = None, None, distributed.Ranks()
    try:
        cfg, run_dir = resolve_train_config(args)
        if cfg.nproc > 1 and not distributed.in_torchrun():
            from qlora_engine.training import launch

            return launch.launch_train(cfg, run_dir, args.events, args.resume, args.torchrun)
        ranks = distributed.setup(cfg.device)  # inside torchrun: one of its ranks (the launcher holds the lock)
        run_dir.mkdir(parents=True, exist_ok=True)
        if ranks.is_main:
            library_log.write_to(run_dir / library_log.LOG_FILE)
            cfg.save(run_dir / "config.yaml")
            events = EventWriter(run_dir / "events.jsonl", human=args.events == "human")
        else:
            events = EventWriter(None, stream=None)  # events come from rank 0 only
        stop = loop.StopRequest()
        stop.install()
        with RunLock(run_dir) if not ranks.several else contextlib.nullcontext():
            result = loop.run_training(cfg, run_dir, events, resume=args.resume, ranks=ranks,
                                       stop=distributed.AgreedStop(stop, ranks, run_dir) if ranks.several else stop)
            ranks.end_together()
    except BaseException as exc:  # every failure becomes an error event
        if is_cuda_oom(exc):
            last = events.last_of_kind.get("step")
            exc = cuda_oom_error(exc, cfg, (last.step if isinstance(last, ev.Step) else 0) + 1)
        return distributed.report_rank_failure(events, exc, ranks, run_dir, report_failure)
    finally:
        events.close()
        distributed.teardown()
    return 0 if result["status"] in ("finished", "stopped") else 1


# ----------------------------------------------------------------------------- export, chat
def cmd_export(args: argparse.Namespace) -> int:
    from qlora_engine.products import export

    run_dir = Path(args.run).expanduser()
    events = EventWriter(run_dir / "events.jsonl" if run_dir.is_dir() else None, human=args.events == "human")
    if run_dir.is_dir():
        library_log.write_to(run_dir / library_log.LOG_FILE)
    if args.kind in ("gguf", "gguf-lora"):
        return cmd_export_gguf(args, run_dir, events)
    try:
        progress = lambda stage, fraction: events.emit(ev.ExportProgress(stage=stage, fraction=fraction))  # noqa: E731
        verification = export.export_run(run_dir, args.kind, Path(args.out).expanduser() if args.out else None,
                                         progress, checkpoint=args.checkpoint)
        events.emit(verification)
    except BaseException as exc:
        return report_failure(events, exc)
    finally:
        events.close()
    return 0


def cmd_export_gguf(args: argparse.Namespace, run_dir: Path, events: EventWriter) -> int:
    from qlora_engine.planning.gguf_plan import parse_quants

    try:
        from qlora_engine.products import gguf_export, gguf_lora

        out = Path(args.out).expanduser() if args.out else None
        progress = lambda stage, fraction: events.emit(ev.ExportProgress(stage=stage, fraction=fraction))  # noqa: E731
        results = ([gguf_lora.export_gguf_lora(run_dir, out, progress, args.checkpoint)] if args.kind == "gguf-lora"
                   else gguf_export.export_gguf(run_dir, parse_quants(args.quant), out, progress, args.lm_studio,
                                                args.checkpoint))
        for result in results:
            events.emit(result)
        failure = gguf_export.failures_error(results)
        if failure is not None:
            raise failure
        if args.ollama_create and results[-1].modelfile:
            from qlora_engine.products.modelfile import ollama_create

            ollama_create(args.ollama_create, Path(results[-1].modelfile))
        if args.events == "human":
            print("\n".join(r.path + (f"\n  Ollama: {r.ollama_command}" if r.ollama_command else "") for r in results),
                  flush=True)
    except BaseException as exc:
        return report_failure(events, exc)
    finally:
        events.close()
    return 0


def cmd_add_to(args: argparse.Namespace) -> int:
    from qlora_engine.products import lm_studio, modelfile

    gguf = Path(args.gguf).expanduser()
    name = args.name or gguf.stem.rsplit("-", 1)[0]
    try:
        if not gguf.is_file():
            raise EngineError("not_found", f"{gguf} does not exist", "Export the GGUF first (export RUN --gguf).")
        if args.app == "lm-studio":
            answer = queries.AddedTo(app=args.app, gguf=str(gguf), where=str(lm_studio.add_to_lm_studio(gguf, name)))
        else:
            name = modelfile.ollama_name(name)
            output = modelfile.ollama_create(name, gguf.with_suffix(".Modelfile"))
            answer = queries.AddedTo(app=args.app, gguf=str(gguf), where=name, output=output)
    except EngineError as exc:
        return print_failure(exc, args.json)
    print_answer(answer, args.json, f"{args.app}: {answer.where}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from qlora_engine.products import chat

    events = EventWriter(None, human=args.events == "human")
    if run_folders.is_run_dir(Path(args.target)):  # a run folder: its log file (else held and dropped)
        library_log.write_to(Path(args.target) / library_log.LOG_FILE)
    try:
        if args.serve:
            return chat.serve(args.target, events, args.checkpoint)
        model, tokenizer, device, has_adapter = chat.load_for_chat(args.target, args.checkpoint)
        questions = [args.prompt] if args.prompt else _terminal_questions()
        for question in questions:
            answers = chat.answer_both(model, tokenizer, device, has_adapter, question, args.max_new_tokens)
            for which, text in answers.items():
                print(f"[{which}] {text}", flush=True)
    except BaseException as exc:
        return report_failure(events, exc)
    return 0


def _terminal_questions() -> Any:
    while True:
        try:
            question = input("you> ").strip()
        except EOFError:
            return
        yield from [question] if question else []


# ----------------------------------------------------------------------------- runs
def cmd_runs(args: argparse.Namespace) -> int:
    folder = Path(args.runs_dir).expanduser() if args.runs_dir else run_folders.runs_root()
    states = run_state.list_runs(folder)
    if args.json:
        print(json.dumps([state.to_summary() for state in states]), flush=True)
        return 0
    if not states:
        print(f"no runs in {folder}", flush=True)
    for state in states:
        loss = f"loss {state.final_loss:.4f}" if state.final_loss is not None else ""
        moved = f"  drift {state.drift:.3f}" if state.drift is not None else ""
        print(f"{state.name:44s} {state.status:12s} step {state.step_text:>11s}  {loss}{moved}", flush=True)
    return 0


# ----------------------------------------------------------------------------- model-info, data
def print_answer(answer: queries.Answer, as_json: bool, human: str) -> None:
    print(answer.to_json() if as_json else human, flush=True)


def print_failure(exc: EngineError, as_json: bool) -> int:
    print_answer(queries.Failure.from_exception(exc), as_json, f"error: {exc.message}\n  what to do: {exc.advice}")
    return 1


def cmd_model_info(args: argparse.Namespace) -> int:
    from qlora_engine.model import loading

    try:
        info = loading.model_info(args.model, args.allow_pickle)
    except EngineError as exc:
        return print_failure(exc, args.json)
    facts = {k: v for k, v in info.to_dict().items() if k not in ("v", "kind")}
    print_answer(info, args.json, "\n".join(f"{k}: {v}" for k, v in facts.items()))
    return 0


def cmd_precision(args: argparse.Namespace) -> int:
    from qlora_engine.model import precision_budget

    try:
        cfg = RunConfig(model=args.model, quant_type=args.quant_type, double_quant=args.double_quant,
                        precision_budget_bits=args.bits).validate()
        report = precision_budget.plan_report(cfg)
    except EngineError as exc:
        return print_failure(exc, args.json)
    print_answer(report, args.json, f"{report.bits_per_weight:.3f} bits per weight ({report.counts}): mean relative "
                 f"error {report.plain_relative_error:.4f} in plain 4-bit, {report.relative_error:.4f} planned")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from qlora_engine.model import loading
    from qlora_engine.training import data, loop

    path = loop.data_path(args.file)
    try:
        source = loading.resolve_model(args.model)
        tokenizer = loading.load_tokenizer(source.path)
        sources = list(zip([path, *map(loop.data_path, args.data_mix)], data.mix_ratios(list(args.data_mix.values()))))
        prepared = data.prepare_mix(sources, tokenizer, seed=RunConfig().seed, data_format=args.format,
                                    max_length=args.max_length, train_on_prompt=args.train_on_prompt,
                                    columns=args.columns)
    except EngineError as exc:
        return print_failure(exc, args.json)
    answer = data.report_answer(prepared, tokenizer, str(path), args.preview_rows)
    print_answer(answer, args.json, data.report_text(answer))
    return 0


# ----------------------------------------------------------------------------- pull, models
def cmd_pull(args: argparse.Namespace) -> int:
    from qlora_engine.model import hub

    events = EventWriter(None, human=args.events == "human")
    bar = TerminalProgress() if args.events == "human" else None
    try:
        ref = parse_hub_ref(args.model)
        if ref is None:
            raise EngineError("bad_config", f"{args.model!r} is not a Hub id (ORG/NAME or ORG/NAME@revision)",
                              "Write it as on the model's page, e.g. Qwen/Qwen2.5-0.5B-Instruct.")
        downloaded = hub.pull(ref, allow_pickle=args.allow_pickle, on_progress=bar or events.emit)
        if bar is not None:
            bar.close()
        events.emit(downloaded)
    except BaseException as exc:
        if bar is not None:
            bar.close()
        return report_failure(events, exc)
    return 0


class TerminalProgress:
    """`pull`'s progress bar on stderr: one tqdm bar per file."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.file = ""

    def __call__(self, event: ev.Event) -> None:
        from tqdm import tqdm

        if not isinstance(event, ev.DownloadProgress):
            return
        if event.file != self.file:
            self.close()
            self.file = event.file
            self.bar = tqdm(total=event.file_total_bytes, desc=event.file, unit="B", unit_scale=True, file=sys.stderr)
        self.bar.update(event.file_bytes - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def cmd_models(args: argparse.Namespace) -> int:
    try:
        if args.catalog:
            return _print_catalog(args)
        if args.search is not None:
            return _print_search(args)
        from qlora_engine.model.local_models import local_models

        answer = local_models()
    except EngineError as exc:
        return print_failure(exc, args.json)
    lines = [f"{m.name:<56} {m.source:<9} {m.format:<11} {m.size_bytes / 1e9:7.2f} GB  {m.architecture or '?'}"
             + ("" if m.complete else "  (incomplete)") for m in answer.models]
    lines += [f"  ({folder['source']}: {folder['path']} not found)" for folder in answer.folders
              if not folder["exists"]]
    print_answer(answer, args.json, "\n".join(lines) if answer.models else "no models on disk\n" + "\n".join(lines))
    return 0


def cmd_hub_token(args: argparse.Namespace) -> int:
    """The token is read from stdin (never argv, which other users can see) and never printed."""
    from qlora_engine.model import hub

    try:
        answer = hub.save_token(sys.stdin.readline()) if args.save else hub.token_status()
    except EngineError as exc:
        return print_failure(exc, args.json)
    human = (("saved; " if args.save else "") + f"a token is there ({answer.source})"
             + (f", it belongs to {answer.user}" if answer.user else "")) if answer.present else (
        "no token: set HF_TOKEN, run `hf auth login`, or `qlora-studio hub-token --save` and paste one")
    print_answer(answer, args.json, human)
    return 0


def _print_catalog(args: argparse.Namespace) -> int:
    from qlora_engine.model.local_models import hf_cache_models
    from qlora_engine.planning.catalog import build_catalog, format_catalog
    from qlora_engine.planning.estimate_command import free_memory

    run = RunConfig.from_dict({spec.name: getattr(args, spec.name) for spec in dataclasses.fields(RunConfig)
                               if hasattr(args, spec.name)}, source="command line")
    catalog = build_catalog(run, *free_memory(args.gpu_memory))
    on_disk = {m.model.lower() for m in hf_cache_models() if m.complete}
    for row in catalog.entries:
        row.on_disk = row.hub_id.lower() in on_disk
    print_answer(catalog, args.json, format_catalog(catalog))
    return 0


def _print_search(args: argparse.Namespace) -> int:
    from qlora_engine.model import hub
    from qlora_engine.planning.model_shape import KNOWN_FAMILIES

    answer = queries.HubSearch(query=args.search, results=hub.search(args.search))
    for result in answer.results:
        result.supported = result.model_type in KNOWN_FAMILIES
    lines = [f"{r.repo_id:<56} {r.downloads:>10} downloads  {'gated' if r.gated else '':<6} {r.license:<14}"
             f"{(r.params or 0) / 1e9:6.2f}B  {r.model_type or '?'}{'' if r.supported else ' (estimate approximate)'}"
             for r in answer.results]
    print_answer(answer, args.json, "\n".join(lines) or f"nothing on the Hub matches {args.search!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
