"""`qlora-studio bench`: --memory (the engine's peak memory against the estimate, bench/memory.py), --speed (tokens/s
and memory against other stacks, bench/speed.py), --adapters (adapter starts and precision budgets, adapters.py) or
--drift-grid (what a recipe teaches against how far it moves the model from the base, drift_grid.py)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from qlora_engine.bench import adapters, drift_grid, memory, memory_grid, speed
from qlora_engine.bench.models import MODEL_CONFIGS
from qlora_engine.protocol.errors import EngineError


def bench_main(argv: list[str]) -> int:
    try:
        return _bench(argv)
    except EngineError as exc:  # bad input: said, with what to do, never a traceback
        print(f"error ({exc.code}): {exc.message}\n{exc.advice}", file=sys.stderr)
        return 2


def _bench(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="qlora-studio bench", description=__doc__)
    parser.add_argument("--memory", action="store_true", help="measure peak memory vs the estimate (CUDA only)")
    parser.add_argument("--adapters", action="store_true", help="adapter starts, variants and precision budgets on "
                        "the bundled model and sample data (CPU; bench/adapters.py), JSON lines to --out")
    parser.add_argument("--drift-grid", action="store_true", help="held-out accuracy against drift from the base "
                        "over learning rate, rank, steps and dropout on the bundled model and sample data (CPU; "
                        "bench/drift_grid.py), JSON lines to --out, then the table")
    parser.add_argument("--only", help="--drift-grid: comma list of the grid's row indices to (re)run")
    parser.add_argument("--models", help="comma list of architectures from the grid (default: all)")
    parser.add_argument("--per-model", type=int, default=0, help="only the first N configurations of each model")
    parser.add_argument("--grid", default="h100", choices=("h100", *memory_grid.GRIDS),
                        help="--memory: the H100 calibration grid (one process per architecture), the consumer-card "
                             "grid (one process per configuration, allocator capped at 8-24 GiB), the probe and "
                             "dora-check grids (DoRA and the 12B / 14B shapes, mostly uncapped), or today's "
                             "(precision budgets, DoRA under caps, fused AdamW on the largest shapes)")
    parser.add_argument("--parallel", type=int, default=1,
                        help="--memory --grid consumer: configurations measured at once on the one GPU")
    parser.add_argument("--out", help="--memory: JSON lines, one configuration each (default bench-memory.jsonl); "
                        "--speed: one JSON file of every result")
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG_JSON", "RUNS_JSON"), help=argparse.SUPPRESS)
    speed.add_speed_arguments(parser)
    args = parser.parse_args(argv)
    if args.speed_worker:
        return speed.speed_worker(args.speed_worker)
    if args.speed:
        return speed.speed_main(args)
    if args.drift_grid:
        out = Path(args.out or "bench-drift.jsonl")
        failed = drift_grid.run_grid(out, [int(i) for i in args.only.split(",")] if args.only else None)
        print(drift_grid.markdown_table([json.loads(line) for line in out.read_text().splitlines()]), end="")
        return failed
    if args.adapters:
        return adapters.adapters_main(Path(args.out or "bench-adapters.jsonl"))
    args.out = args.out or "bench-memory.jsonl"
    if args.worker:
        return memory.memory_worker(Path(args.worker[0]), json.loads(args.worker[1]), Path(args.out))
    if not args.memory:
        parser.error("choose what to measure: --memory or --speed")
    only = set(args.models.split(",")) if args.models else None
    if args.grid != "h100":
        return memory_grid.run_grid(memory_grid.consumer_runs(only, args.grid), Path(args.out), args.parallel)
    failures = 0
    for name, runs in memory.grid_runs(only, args.per_model).items():
        command = [sys.executable, "-m", "qlora_engine", "bench", "--out", args.out, "--worker",
                   str(MODEL_CONFIGS / f"{name}.json"), json.dumps(runs)]
        failures += subprocess.run(command, env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode != 0
    return 1 if failures else 0
