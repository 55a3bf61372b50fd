"""kill -9 of the engine at any moment loses at most the steps since the last complete checkpoint.

After a kill: the run folder still loads, no half-written checkpoint is picked, the stale lock does not block
`--resume`, and the resumed run's losses equal an uninterrupted run's step for step. Tolerance: relative 1e-4 (the
same as the in-process resume test; on CPU the curves are in fact equal to the 5 decimals the events carry).
"""
from __future__ import annotations

import json
import random
import shutil
import signal
from pathlib import Path

import pytest
from engine_process import (
    export_args,
    kill_at_random_after,
    kill_engine_when,
    resume_args,
    run_engine,
    run_self_killing_engine,
    step_losses,
    train_args,
)

from qlora_engine.products import export
from qlora_engine.protocol.config import RunConfig
from qlora_engine.protocol.events import read_events
from qlora_engine.protocol.run_lock import LOCK_NAME
from qlora_engine.training import checkpoints

LOSS_TOLERANCE = 1e-4
KILLED = -signal.SIGKILL


def assert_killed_run_folder_is_sound(run_dir):
    """What the GUI and --resume read after a kill: config, events, checkpoints, all still usable."""
    RunConfig.load(run_dir / "config.yaml")
    assert [e.kind for e in read_events(run_dir / "events.jsonl")][0] == "started"
    assert (run_dir / LOCK_NAME).is_file(), "a kill -9 cannot remove the lock: resume must take it over"
    latest = checkpoints.latest_checkpoint(run_dir)
    if latest is not None:
        assert not latest.name.startswith(".tmp")
        assert json.loads((latest / checkpoints.STATE_FILE).read_text())["step"] == int(latest.name.split("-")[1])
    return latest


def resume_and_compare(run_dir, uninterrupted, resumed_from_step):
    code, events = run_engine(resume_args(run_dir))
    assert code == 0, events[-1:]
    assert events[-1].kind == "finished"
    assert [e.step for e in events if e.kind == "step"] == list(range(resumed_from_step + 1, 9))
    assert not (run_dir / LOCK_NAME).exists()
    assert not list((run_dir / "checkpoints").glob(".tmp-*")), "leftover temp folders are cleaned up"
    everything = list(read_events(run_dir / "events.jsonl"))
    for event in (e for e in everything if e.kind == "step"):  # also the steps redone after the kill
        assert event.loss == pytest.approx(uninterrupted.losses[event.step], rel=LOSS_TOLERANCE)
    assert step_losses(everything) == pytest.approx(uninterrupted.losses, rel=LOSS_TOLERANCE)


def test_a_kill_during_a_step_resumes_from_the_last_checkpoint_on_the_same_curve(
        tiny_model_dir, faults_data_file, tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    code, seen = kill_engine_when(train_args(tiny_model_dir, faults_data_file, run_dir),
                                  lambda e: e.kind == "step" and e.step == 3)  # step 4 is being computed
    assert code == KILLED and seen[-1].step == 3
    assert assert_killed_run_folder_is_sound(run_dir).name == "step-2"
    resume_and_compare(run_dir, uninterrupted, resumed_from_step=2)


def test_a_kill_right_after_a_checkpoint_event_resumes_from_that_checkpoint(
        tiny_model_dir, faults_data_file, tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    code, _ = kill_engine_when(train_args(tiny_model_dir, faults_data_file, run_dir),
                               lambda e: e.kind == "checkpoint" and e.step == 4)
    assert code == KILLED
    assert assert_killed_run_folder_is_sound(run_dir).name == "step-4"
    resume_and_compare(run_dir, uninterrupted, resumed_from_step=4)


@pytest.mark.parametrize("point, latest_after_kill", [
    ("torn_file", "step-2"),  # rng.pt of step 4 half written
    ("before_rename", "step-2"),  # every file of step 4 written and synced, the folder not yet renamed
    ("after_rename", "step-4"),  # renamed, but killed before the `checkpoint` event went out
])
def test_a_kill_inside_a_checkpoint_write_never_leaves_a_half_checkpoint_that_gets_picked(
        tiny_model_dir, faults_data_file, tmp_path, uninterrupted, point, latest_after_kill):
    run_dir = tmp_path / "run"
    code, events = run_self_killing_engine(point, 4, train_args(tiny_model_dir, faults_data_file, run_dir))
    assert code == KILLED
    assert [e.step for e in events if e.kind == "checkpoint"] == [2]
    if point != "after_rename":
        assert list((run_dir / "checkpoints").glob(".tmp-step-4-*")), "the kill left the temp folder behind"
    assert assert_killed_run_folder_is_sound(run_dir).name == latest_after_kill
    resume_and_compare(run_dir, uninterrupted, resumed_from_step=int(latest_after_kill.split("-")[1]))


def test_kills_at_random_moments_still_end_on_the_uninterrupted_curve(
        tiny_model_dir, faults_data_file, tmp_path, uninterrupted):
    """Three kills at random times (seeded), each run resumed, then a last resume to the end."""
    rng = random.Random(20261123)
    run_dir = tmp_path / "run"
    args = train_args(tiny_model_dir, faults_data_file, run_dir)
    for round_number in range(3):
        # The first kill comes after the first checkpoint (else there is nothing to resume), later ones any time
        # after the model is loaded: mid-step, mid-checkpoint or between the two.
        trigger = "checkpoint" if round_number == 0 else "model_loaded"
        code, kinds = kill_at_random_after(args, trigger, delay_s=rng.uniform(0.0, 0.4))
        if "finished" in kinds:  # the run got to the end before the kill landed
            break
        assert code == KILLED
        assert assert_killed_run_folder_is_sound(run_dir) is not None
        args = resume_args(run_dir)
    latest = checkpoints.latest_checkpoint(run_dir)
    if latest.name != "step-8":
        resume_and_compare(run_dir, uninterrupted, resumed_from_step=int(latest.name.split("-")[1]))
    assert step_losses(list(read_events(run_dir / "events.jsonl"))) == pytest.approx(uninterrupted.losses,
                                                                                     rel=LOSS_TOLERANCE)


# ----------------------------------------------------------------------------- kill -9 during an export
@pytest.fixture
def previous_export(uninterrupted, tmp_path):
    """A copy of the finished run with an earlier adapter export in place, marked so it can be told apart."""
    run_dir = shutil.copytree(uninterrupted.run_dir, tmp_path / "run")
    assert export.export_run(run_dir, "adapter").ok
    out = run_dir / "exports" / "adapter"
    (out / PREVIOUS_MARK).write_text("the export before the killed one")
    return run_dir, out


PREVIOUS_MARK = "previous-export.txt"


def export_state(run_dir: Path, out: Path) -> str:
    """'absent', or which complete export is in place: 'previous' or 'new'. A partial export fails here."""
    if not out.exists():
        return "absent"
    from peft import PeftConfig
    from safetensors.torch import load_file

    assert PeftConfig.from_pretrained(out).r == 8
    exported, trained = (load_file(str(folder / "adapter_model.safetensors")) for folder in (out, run_dir / "adapter"))
    assert exported.keys() == trained.keys() and all(exported[k].equal(trained[k]) for k in trained)
    return "previous" if (out / PREVIOUS_MARK).exists() else "new"


def assert_export_again_succeeds_and_tidies_up(run_dir: Path, out: Path) -> None:
    assert export.export_run(run_dir, "adapter").ok
    assert export_state(run_dir, out) == "new"
    assert json.loads((run_dir / "exports" / "adapter-verification.json").read_text())["ok"]
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith((".tmp", ".old"))]


@pytest.mark.parametrize("point, after_kill", [
    ("export_mid_write", "previous"),  # the new adapter file half written in the temp folder
    ("export_between_renames", "absent"),  # the previous export moved aside, the new one not yet moved in
    ("export_moved_not_recorded", "new"),  # the new, verified export in place; its record not yet written
])
def test_a_kill_during_an_export_leaves_a_complete_export_or_none_and_exporting_again_works(
        previous_export, point, after_kill):
    run_dir, out = previous_export
    code, events = run_self_killing_engine(point, 0, export_args(run_dir))
    assert code == KILLED and "exported" not in [e.kind for e in events]
    assert export_state(run_dir, out) == after_kill
    if after_kill == "absent":  # nothing lost: the next export first puts the previous one back
        export.recover_interrupted_export(out)
        assert export_state(run_dir, out) == "previous"
    assert_export_again_succeeds_and_tidies_up(run_dir, out)


def test_kills_at_random_moments_of_an_export_never_leave_a_partial_export(previous_export):
    """An export of the tiny model takes ~0.2 s from its first progress event: loading, writing, reloading, renaming.
    Three kills land at random (seeded) moments in that span."""
    run_dir, out = previous_export
    rng = random.Random(20261124)
    outcomes = []
    for delay_s in (rng.uniform(0.0, 0.2) for _ in range(3)):
        code, kinds = kill_at_random_after(export_args(run_dir), "export_progress", delay_s)
        outcomes.append(kinds[-1])
        assert code == KILLED or kinds[-1] == "exported"
        assert export_state(run_dir, out) in ("previous", "new", "absent")
    assert outcomes.count("exported") < len(outcomes), "no kill landed inside the export"
    assert_export_again_succeeds_and_tidies_up(run_dir, out)
