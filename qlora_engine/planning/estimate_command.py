"""`qlora-studio estimate`: its flags, the breakdown table and verdict it prints, or the same as --json.

Presentation only: the numbers are memory.py's and advice.py's, the model's config is read by model_shape.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import textwrap
from typing import Any

from qlora_engine.planning import hardware
from qlora_engine.planning.advice import Advice, advise, fit_to_gpu
from qlora_engine.planning.memory import BYTES_PER_GIB, BYTES_PER_MIB, Estimate, estimate_peak, format_gib
from qlora_engine.planning.model_shape import resolve_model_config
from qlora_engine.protocol.config import RunConfig, add_config_flags
from qlora_engine.protocol.errors import EngineError
from qlora_engine.protocol.queries import EstimateReport, Failure

SIZE_UNITS_BYTES = {"": BYTES_PER_GIB, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": BYTES_PER_MIB,
                    "mb": BYTES_PER_MIB, "mib": BYTES_PER_MIB, "g": BYTES_PER_GIB, "gb": BYTES_PER_GIB,
                    "gib": BYTES_PER_GIB, "t": 2**40, "tb": 2**40, "tib": 2**40}


def parse_size_bytes(text: str) -> int:
    """'12GiB', '12GB', '12g', '11500MiB' or a bare '12' (GiB). GB means GiB, as on a graphics card's box."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in SIZE_UNITS_BYTES:
        raise argparse.ArgumentTypeError(f"{text!r} is not a memory size; write it like 12GiB or 11500MiB")
    return int(float(match.group(1)) * SIZE_UNITS_BYTES[unit])


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlora-studio estimate",
                                     description="Estimate a run's peak GPU memory before loading anything.")
    parser.add_argument("model_spec", nargs="?", metavar="model",
                        help="model folder, its config.json, or 'default' (the bundled SmolLM2-135M-Instruct); "
                             "overrides --model")
    parser.add_argument("--gpu-memory", type=parse_size_bytes, metavar="SIZE",
                        help="free GPU memory to check against, e.g. 12GiB [free memory of the training GPU]")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    add_config_flags(parser)
    return parser


def _run_config_from_args(args: argparse.Namespace) -> RunConfig:
    values = {spec.name: getattr(args, spec.name) for spec in dataclasses.fields(RunConfig)
              if hasattr(args, spec.name)}
    if args.model_spec:
        values["model"] = args.model_spec
    return RunConfig.from_dict(values, source="command line")


def free_memory(gpu_memory_bytes: int | None) -> tuple[int | None, str]:
    """Free bytes to check against (--gpu-memory, else the training GPU's free memory), and where it came from."""
    if gpu_memory_bytes is not None:
        return gpu_memory_bytes, "--gpu-memory"
    report = hardware.detect_gpus()
    gpu = hardware.training_gpu(report)
    if gpu is None:
        return None, report.problem or hardware.NO_GPU_MESSAGE
    return gpu.free_bytes, f"GPU {gpu.index}: {gpu.name}"


def _fit_changes(model_config: dict[str, Any], run: RunConfig, free_bytes: int) -> dict[str, Any] | None:
    """fit_to_gpu's changes, or None when nothing fits."""
    try:
        return fit_to_gpu(model_config, run, free_bytes)
    except EngineError:
        return None


NOTE_WIDTH = 88


def format_report(run: RunConfig, estimate: Estimate, advice: Advice | None, memory_source: str) -> str:
    """The breakdown as a table in GiB, then the verdict and the fixes."""
    lines = [f"Peak GPU memory of one training step: {run.model}", "", f"  {'term':<18}{'GiB':>8}  what it holds"]
    for term in estimate.terms:
        note_lines = textwrap.wrap(term.note, width=NOTE_WIDTH) or [""]
        lines.append(f"  {term.name:<18}{term.bytes / BYTES_PER_GIB:>8.2f}  {note_lines[0]}")
        lines += [" " * 30 + line for line in note_lines[1:]]
    lines += [f"  {'peak':<18}{estimate.peak_bytes / BYTES_PER_GIB:>8.2f}", ""]
    lines += [f"approximate: {reason}" for reason in estimate.reasons]
    lines += [f"warning: {warning}" for warning in estimate.warnings]
    if advice is None:
        lines.append(f"{memory_source}. Pass --gpu-memory 12GiB to check a card.")
        return "\n".join(lines)
    lines.append(f"{memory_source}, {format_gib(advice.free_bytes)} free: {advice.verdict.upper()}")
    lines.append(f"  longest max_length that fits with micro-batch {run.micro_batch_size}: "
                 f"{advice.max_length_that_fits or 'none'}")
    lines.append(f"  largest micro-batch that fits with max_length {run.max_length}: "
                 f"{advice.batch_that_fits or 'none'}")
    speed, memory = advice.fixes_of("speed"), advice.fixes_of("memory")
    if speed:  # spare memory: what makes the steps faster and still fits
        lines.append("Faster with the spare memory (estimated cost):")
        lines += [f"  fits  {fix.description}: costs {format_gib(-fix.saving_bytes)}" for fix in speed]
    if memory:
        lines.append("What would help (estimated saving):")
        lines += [f"  {'fits' if fix.fits_after else '    '}  {fix.description}: saves {format_gib(fix.saving_bytes)}"
                  for fix in memory]
    return "\n".join(lines)


def estimate_main(argv: list[str]) -> int:
    """`qlora-studio estimate <model> [run options] [--gpu-memory 12GiB] [--json]`: argv follows `estimate`."""
    args = _build_parser().parse_args(argv)
    try:
        run = _run_config_from_args(args)
        model_config = resolve_model_config(run.model)
        estimate = estimate_peak(model_config, run)
    except EngineError as exc:
        if args.json:
            print(Failure.from_exception(exc).to_json())
        else:
            print(f"error: {exc.message}\n  what to do: {exc.advice}")
        return 2
    free_bytes, memory_source = free_memory(args.gpu_memory)
    advice = None if free_bytes is None else advise(model_config, run, free_bytes)
    if args.json:
        print(EstimateReport(model=run.model, estimate=estimate, memory_source=memory_source, advice=advice,
                             fit_to_gpu=None if free_bytes is None else _fit_changes(model_config, run, free_bytes)
                             ).to_json(indent=2))
    else:
        print(format_report(run, estimate, advice, memory_source))
    return 0
