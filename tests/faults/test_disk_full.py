"""A full disk or an unwritable folder during a checkpoint or an export: the last good files stay, the user is told.

A full disk is real where the test can mount a small private tmpfs (unshare): the kernel's "No space left on
device" reaches safetensors and torch.save, which report it in their own exception types. Elsewhere, and for
unwritable folders (tests run as root, where chmod does not stop writes), the failures are injected by wrapping
the write calls.
"""
from __future__ import annotations

import errno
import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from engine_process import (
    PAGE_BYTES,
    disk_bytes,
    on_a_small_disk,
    resume_args,
    small_disk_problem,
    step_losses,
    train_args,
)
from test_train import run, tiny_config

from qlora_engine import cli
from qlora_engine.products import export
from qlora_engine.protocol import events as ev
from qlora_engine.protocol.errors import EngineError
from qlora_engine.protocol.events import EventWriter, read_events
from qlora_engine.training import checkpoints

FLAGS = ["--max-steps", "6", "--save-steps", "2", "--micro-batch-size", "4", "--max-length", "64",
         "--learning-rate", "1e-2", "--warmup-steps", "1", "--lora-r", "8", "--eval-steps", "0", "--events", "jsonl"]


def no_space(path) -> OSError:
    return OSError(errno.ENOSPC, "No space left on device", str(path))


def assert_checkpoint_intact(path: Path, step: int) -> None:
    assert json.loads((path / checkpoints.STATE_FILE).read_text())["step"] == step
    assert torch.load(path / "optimizer.pt", weights_only=True)["state"]
    assert (path / "adapter" / "adapter_model.safetensors").stat().st_size > 0


# ----------------------------------------------------------------------------- a real full disk
needs_small_disk = pytest.mark.skipif(bool(small_disk_problem()), reason=f"{small_disk_problem()}")


def assert_disk_full_error_without_traceback(engine_run, what: str) -> dict:
    error = engine_run.events[-1]
    assert engine_run.code == 1 and error.kind == "error" and error.code == "disk_full"
    assert what in error.message and "Free some disk space" in error.advice
    assert "Traceback" not in engine_run.stderr
    return error


@needs_small_disk
@pytest.mark.parametrize("room_bytes", [40_000, 130_000], ids=["in-the-adapter-safetensors", "in-the-optimizer-state"])
def test_a_disk_that_fills_during_a_checkpoint_keeps_the_last_one_and_resume_ends_on_the_same_curve(
        tiny_model_dir, faults_data_file, uninterrupted, tmp_path, room_bytes):
    """The disk holds the config, the events, the lock and one checkpoint, plus `room_bytes`: the second checkpoint
    (step 4) runs out of space in its adapter file (40 kB: safetensors' error) or in optimizer.pt (130 kB: torch's)."""
    checkpoint_bytes = disk_bytes(uninterrupted.run_dir / "checkpoints" / "step-8")
    disk, run_dir, after_failure = tmp_path / "disk", tmp_path / "disk" / "run", tmp_path / "after-failure" / "run"
    failed, resumed = on_a_small_disk(disk, f"size={checkpoint_bytes + 4 * PAGE_BYTES + room_bytes}", [
        train_args(tiny_model_dir, faults_data_file, run_dir),
        ["snapshot", str(after_failure.parent)],
        ["remount", "size=64m"],  # the user frees some space
        resume_args(run_dir),
    ], keep=tmp_path / "kept")

    error = assert_disk_full_error_without_traceback(failed, "checkpoint step-4")
    assert "--resume" in error.advice
    assert [p.name for p in checkpoints.complete_checkpoints(after_failure)] == ["step-2"]
    assert_checkpoint_intact(after_failure / "checkpoints" / "step-2", 2)
    assert not list((after_failure / "checkpoints").glob(".tmp-*")), "the half-written checkpoint is removed"
    assert not (after_failure / ".lock").exists()

    assert resumed.code == 0 and resumed.events[-1].kind == "finished"
    assert step_losses(resumed.events) == pytest.approx({step: uninterrupted.losses[step] for step in range(3, 9)},
                                                        rel=1e-4)


@needs_small_disk
def test_a_disk_that_fills_during_an_export_keeps_the_previous_export_and_reports_disk_full(uninterrupted, tmp_path):
    """The disk has room for one adapter export and a half: the second export runs out of space."""
    run_dir = shutil.copytree(uninterrupted.run_dir, tmp_path / "run")
    assert export.export_run(run_dir, "adapter").ok
    export_bytes = disk_bytes(run_dir / "exports" / "adapter")
    disk, before, after = tmp_path / "disk", tmp_path / "before", tmp_path / "after"
    export_there = ["export", str(run_dir), "--adapter", "--out", str(disk / "adapter"), "--events", "jsonl"]
    first, second = on_a_small_disk(disk, f"size={export_bytes * 3 // 2}",
                                    [export_there, ["snapshot", str(before)], export_there], keep=after)

    assert first.code == 0 and first.events[-1].kind == "exported"
    assert_disk_full_error_without_traceback(second, "the adapter export")
    assert [p.name for p in after.iterdir()] == ["adapter"], "no partial export is left behind"
    assert {p.name: p.read_bytes() for p in (after / "adapter").iterdir()} == {
        p.name: p.read_bytes() for p in (before / "adapter").iterdir()}


# ----------------------------------------------------------------------------- injected write failures
def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one_and_reports_disk_full(
        engine_in_process, tiny_model_dir, alpaca_file, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    real_save = torch.save

    def save_until_the_disk_fills(obj, path, *args, **kwargs):
        if Path(path).parent.name.startswith(".tmp-step-4-") and Path(path).name == "scheduler.pt":
            raise no_space(path)
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_fills)
    code = engine_in_process("--model", str(tiny_model_dir), "--data", str(alpaca_file), "--run-dir", str(run_dir),
                             *FLAGS)
    error = list(read_events(run_dir / "events.jsonl"))[-1]
    assert code == 1
    assert error.kind == "error" and error.code == "disk_full"
    assert "step-4" in error.message and "scheduler.pt" in error.message
    assert "Free some disk space" in error.advice and "--resume" in error.advice
    assert [p.name for p in checkpoints.complete_checkpoints(run_dir)] == ["step-2"]
    assert_checkpoint_intact(run_dir / "checkpoints" / "step-2", 2)
    assert not list((run_dir / "checkpoints").glob(".tmp-*")), "the half-written checkpoint is removed"
    assert not (run_dir / ".lock").exists()

    monkeypatch.setattr(torch, "save", real_save)  # space freed: the run resumes and finishes
    assert engine_in_process("--resume", "--run-dir", str(run_dir), "--events", "jsonl") == 0
    assert list(read_events(run_dir / "events.jsonl"))[-1].kind == "finished"


def test_an_unwritable_checkpoint_folder_is_a_write_failed_error_not_a_traceback(
        engine_in_process, tiny_model_dir, alpaca_file, tmp_path, monkeypatch, capfd):
    run_dir = tmp_path / "run"
    real_replace = os.replace

    def read_only_rename(src, dst):
        if Path(dst).name == "step-4":
            raise OSError(errno.EROFS, "Read-only file system", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", read_only_rename)
    code = engine_in_process("--model", str(tiny_model_dir), "--data", str(alpaca_file), "--run-dir", str(run_dir),
                             *FLAGS)
    error = list(read_events(run_dir / "events.jsonl"))[-1]
    assert code == 1 and error.code == "write_failed"
    assert "Read-only file system" in error.message and "pick another folder" in error.advice
    assert [p.name for p in checkpoints.complete_checkpoints(run_dir)] == ["step-2"]
    assert "Traceback" not in capfd.readouterr().err


def test_an_os_error_from_a_write_anywhere_is_reported_with_advice():
    emitted = []

    class Recorder:
        def emit(self, event):
            emitted.append(event)

    assert cli.report_failure(Recorder(), no_space("/runs/x/events.jsonl")) == 1
    assert cli.report_failure(Recorder(), PermissionError(errno.EACCES, "Permission denied", "/runs/x")) == 1
    assert [e.code for e in emitted] == ["disk_full", "write_failed"]
    assert "/runs/x/events.jsonl" in emitted[0].message and emitted[0].advice


def test_events_still_reach_the_gui_when_events_jsonl_cannot_be_written(tmp_path):
    stream = io.StringIO()
    writer = EventWriter(tmp_path / "events.jsonl", stream=stream)

    class FullDisk(io.StringIO):
        def flush(self):
            raise no_space(tmp_path / "events.jsonl")

    writer._log = FullDisk()
    writer.emit(ev.Error(code="disk_full", message="the disk is full", advice="Free some disk space."))
    writer.emit(ev.Stopped(step=2))
    writer.close()
    assert [json.loads(line)["kind"] for line in stream.getvalue().splitlines()] == ["error", "stopped"]


def test_a_line_cut_short_by_a_kill_does_not_swallow_the_next_event(tmp_path):
    log = tmp_path / "events.jsonl"
    log.write_text('{"v": 1, "t": 0, "kind": "started", "run_dir": "r"}\n{"v": 1, "t": 0, "kind": "st')  # killed
    writer = EventWriter(log, stream=None)
    writer.emit(ev.Started(run_dir="r", resume=True))
    writer.close()
    assert [e.kind for e in read_events(log)] == ["started", "started"]


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    from tiny_models import write_jsonl

    folder = tmp_path_factory.mktemp("finished")
    data_file = write_jsonl(folder / "d.jsonl", [{"instruction": f"Q{i}?", "output": f"A {i}."} for i in range(8)])
    config = tiny_config(tiny_model_dir, data_file, folder / "run", max_steps=2)
    config.save(folder / "run" / "config.yaml")
    run(config)
    return folder / "run"


def test_a_full_disk_during_export_leaves_the_previous_export_and_no_partial_one(finished_run, monkeypatch):
    import peft.peft_model

    export.export_run(finished_run, "adapter")
    exports = finished_run / "exports"
    before = {p.name: p.read_bytes() for p in (exports / "adapter").iterdir()}

    def full_disk(tensors, filename, *args, **kwargs):
        raise no_space(filename)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", full_disk)
    with pytest.raises(EngineError) as caught:
        export.export_run(finished_run, "adapter")
    assert caught.value.code == "disk_full" and "adapter_model.safetensors" in caught.value.message
    assert "Free some disk space" in caught.value.advice and "export again" in caught.value.advice
    assert {p.name: p.read_bytes() for p in (exports / "adapter").iterdir()} == before
    assert json.loads((exports / "adapter-verification.json").read_text())["ok"]
    assert not [p for p in exports.iterdir() if p.name.startswith((".tmp", ".old"))]


def test_an_unwritable_export_destination_is_an_error_event_and_a_non_zero_exit(finished_run, tmp_path,
                                                                                monkeypatch):
    real_replace = os.replace
    destination = tmp_path / "elsewhere" / "adapter"

    def refuse(src, dst):
        if Path(dst) == destination:
            raise PermissionError(errno.EACCES, "Permission denied", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", refuse)
    code = cli.main(["export", str(finished_run), "--adapter", "--out", str(destination), "--events", "jsonl"])
    error = list(read_events(finished_run / "events.jsonl"))[-1]
    assert code == 1 and error.kind == "error" and error.code == "write_failed"
    assert "Permission denied" in error.message and "pick another folder" in error.advice
    assert not destination.exists() and not list(destination.parent.glob(".tmp-*"))
