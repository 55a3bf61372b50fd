"""Helpers of the fault-injection tests: the engine as a subprocess, killed where a test says."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qlora_engine.protocol.events import Event, parse_line

ROOT = Path(__file__).resolve().parents[2]

# 8 optimizer steps of 4 rows on the tiny Llama, a checkpoint every 2 steps, dropout on (so RNG state matters).
RUN_FLAGS = ["--max-steps", "8", "--save-steps", "2", "--micro-batch-size", "4", "--max-length", "64",
             "--learning-rate", "1e-2", "--warmup-steps", "1", "--lora-r", "8", "--lora-dropout", "0.1",
             "--eval-steps", "0", "--events", "jsonl"]

# Runs the real CLI in a child process after wrapping one engine function so that the child SIGKILLs itself at
# that point: a deterministic "kill -9 during a checkpoint write" (or an export) without any hook in the engine.
SELF_KILL = r"""
import os, signal, sys
from pathlib import Path
import peft.peft_model
import torch
from qlora_engine.training import checkpoints
from qlora_engine import cli
from qlora_engine.products import export

point, step = sys.argv[1], int(sys.argv[2])
ours = f".tmp-step-{step}-"
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
real_save, real_fsync, real_prune = torch.save, checkpoints._fsync_tree, checkpoints._prune
real_safe_save, real_replace_folder, real_replace = peft.peft_model.safe_save_file, export.replace_folder, os.replace

def save(obj, path, *args, **kwargs):
    if point == "torn_file" and Path(path).parent.name.startswith(ours) and Path(path).name == "rng.pt":
        Path(path).write_bytes(b"\x80\x02half a pickle")
        die()
    return real_save(obj, path, *args, **kwargs)

def fsync(folder):
    real_fsync(folder)
    if point == "before_rename" and folder.name.startswith(ours):
        die()

def prune(run_dir, *args, **kwargs):
    if point == "after_rename" and (checkpoints.checkpoint_root(run_dir) / f"step-{step}").is_dir():
        die()
    real_prune(run_dir, *args, **kwargs)

def safe_save(tensors, filename, *args, **kwargs):
    if point == "export_mid_write" and Path(filename).parent.name.startswith(".tmp-adapter-"):
        Path(filename).write_bytes(b"half a safetensors file")
        die()
    return real_safe_save(tensors, filename, *args, **kwargs)

def replace_folder(tmp, final, old):
    real_replace_folder(tmp, final, old)
    if point == "export_moved_not_recorded":
        die()

def replace(src, dst):
    real_replace(src, dst)
    if point == "export_between_renames" and Path(dst).name.startswith(".old-adapter-"):
        die()

torch.save, checkpoints._fsync_tree, checkpoints._prune = save, fsync, prune
peft.peft_model.safe_save_file, export.replace_folder, os.replace = safe_save, replace_folder, replace
sys.exit(cli.main(sys.argv[3:]))
"""


def engine_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "qlora_engine", *args]


def train_args(model_dir: Path, data_file: Path, run_dir: Path) -> list[str]:
    return ["train", "--model", str(model_dir), "--data", str(data_file), "--run-dir", str(run_dir), *RUN_FLAGS]


def resume_args(run_dir: Path) -> list[str]:
    return ["train", "--resume", "--run-dir", str(run_dir), "--events", "jsonl"]


def export_args(run_dir: Path) -> list[str]:
    return ["export", str(run_dir), "--adapter", "--events", "jsonl"]


def run_engine(args: list[str], timeout: float = 120) -> tuple[int, list[dict]]:
    result = subprocess.run(engine_command(*args), capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    return result.returncode, parse_events(result.stdout)


def run_self_killing_engine(point: str, step: int, args: list[str]) -> tuple[int, list[dict]]:
    command = [sys.executable, "-c", SELF_KILL, point, str(step), *args]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)
    return result.returncode, parse_events(result.stdout)


def kill_engine_when(args: list[str], should_kill: Callable[[dict], bool]) -> tuple[int, list[dict]]:
    """Start the engine, SIGKILL it as soon as `should_kill(event)` says so; its exit code and the events seen."""
    process = subprocess.Popen(engine_command(*args), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               cwd=ROOT)
    seen = []
    try:
        for line in process.stdout:
            event = parse_events(line)
            seen += event
            if event and should_kill(event[0]):
                os.kill(process.pid, signal.SIGKILL)
                break
    finally:
        code = process.wait(timeout=120)
        process.stdout.close()
    return code, seen


def kill_at_random_after(args: list[str], trigger_kind: str, delay_s: float) -> tuple[int, list[str]]:
    """Start the engine, SIGKILL it `delay_s` after its first `trigger_kind` event; its exit code and event kinds."""
    process = subprocess.Popen(engine_command(*args), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               cwd=ROOT)
    timer, kinds = None, []
    for line in process.stdout:
        event = parse_events(line)
        kinds += [e.kind for e in event]
        if timer is None and event and event[0].kind == trigger_kind:
            timer = threading.Timer(delay_s, process.send_signal, args=(signal.SIGKILL,))
            timer.start()
    code = process.wait(timeout=120)
    if timer is not None:
        timer.cancel()
    process.stdout.close()
    return code, kinds


def parse_events(text: str) -> list[Event]:
    """The typed events in the engine's stdout, through the protocol's own reader (what the GUI uses)."""
    return [event for event in map(parse_line, text.splitlines()) if event is not None]


def step_losses(events: list[Event]) -> dict[int, float]:
    """Step -> loss; a step done twice (before a kill and again after resuming) keeps its last value."""
    return {e.step: e.loss for e in events if e.kind == "step"}


# ----------------------------------------------------------------------------- a small disk
# Runs engine commands in a private mount namespace (unshare: no root needed where user namespaces are allowed) in
# which `disk` is a tmpfs of the given size: a real "No space left on device" from the kernel, whoever writes.
# A step is engine arguments, ["remount", options] (e.g. more room) or ["snapshot", folder] (a copy of the disk
# as it is then). The disk's files are copied to `keep` at the end, since the tmpfs goes away with the namespace.
SMALL_DISK = r"""
import json, shutil, subprocess, sys
spec = json.loads(sys.argv[1])
subprocess.run(["mount", "-t", "tmpfs", "-o", spec["options"], "tmpfs", spec["disk"]], check=True)
results = []
for step in spec["steps"]:
    if step[0] == "remount":
        subprocess.run(["mount", "-o", "remount," + step[1], spec["disk"]], check=True)
        continue
    if step[0] == "snapshot":
        shutil.copytree(spec["disk"], step[1], symlinks=True)
        continue
    done = subprocess.run([sys.executable, "-m", "qlora_engine", *step], capture_output=True, text=True)
    results.append({"code": done.returncode, "stdout": done.stdout, "stderr": done.stderr})
shutil.copytree(spec["disk"], spec["keep"], symlinks=True)
with open(spec["results"], "w") as handle:
    json.dump(results, handle)
"""
UNSHARE = ["unshare", "--user", "--map-root-user", "--mount"]
PAGE_BYTES = 4096


def small_disk_problem() -> str | None:
    """Why a private tmpfs can't be mounted here (no unshare, user namespaces off), or None when it can."""
    if shutil.which("unshare") is None:
        return "no unshare command"
    probe = subprocess.run([*UNSHARE, "sh", "-c", 'mount -t tmpfs -o size=64k tmpfs "$(mktemp -d)"'],
                           capture_output=True, text=True)
    return None if probe.returncode == 0 else f"cannot mount a private tmpfs: {probe.stderr.strip()}"


@dataclass
class EngineRun:
    code: int
    events: list[dict]
    stderr: str


def on_a_small_disk(disk: Path, options: str, steps: list[list[str]], keep: Path) -> list[EngineRun]:
    disk.mkdir(parents=True, exist_ok=True)
    results = keep.with_name(keep.name + "-results.json")
    spec = {"disk": str(disk), "options": options, "steps": steps, "keep": str(keep), "results": str(results)}
    subprocess.run([*UNSHARE, sys.executable, "-c", SMALL_DISK, json.dumps(spec)], cwd=ROOT, check=True, timeout=300)
    return [EngineRun(r["code"], parse_events(r["stdout"]), r["stderr"]) for r in json.loads(results.read_text())]


def disk_bytes(folder: Path) -> int:
    """What the files under `folder` take on a tmpfs: whole pages."""
    return sum(-(-p.stat().st_size // PAGE_BYTES) * PAGE_BYTES for p in folder.rglob("*") if p.is_file())
