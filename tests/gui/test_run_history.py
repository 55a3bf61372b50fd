"""What the Monitor and Runs pages read from events, through the engine's one reducer (RunState): plotted series,
a run's status, and step / total as the real engine sends them."""
from __future__ import annotations

from qlora_engine.protocol import events as ev
from qlora_engine.protocol.config import RunConfig
from qlora_engine.protocol.events import EventWriter
from qlora_engine.protocol.run_folders import new_run_dir
from qlora_engine.protocol.run_state import RunState, Series, list_runs, summarize_run


def step(n: int, loss: float = 1.0, **fields) -> ev.Step:
    values = {"step": n, "total_steps": 10, "loss": loss, "lr": 1e-4, "grad_norm": 0.5, "tokens_per_s": 100.0,
              "vram": {"reserved": 2**30, "gpu_used": 2 * 2**30, "gpu_total": 8 * 2**30}}
    return ev.Step(**(values | fields))


def started(**fields) -> ev.Started:
    return ev.Started(run_dir="run", **fields)


def data_ready(total_steps: int) -> ev.DataReady:
    return ev.DataReady(train_rows=90, val_rows=10, total_steps=total_steps)


def test_series_grow_past_their_first_buffer():
    series = Series()
    for n in range(1000):
        series.append(n, n * 2)
    assert series.count == 1000 and series.y[-1] == 1998


def test_resuming_from_an_earlier_checkpoint_replaces_the_replayed_steps():
    state = RunState()
    for n in range(1, 8):
        state.apply(step(n, loss=5.0))
    for n in range(5, 9):  # crashed after step 7, resumed from the step-4 checkpoint
        state.apply(step(n, loss=1.0))
    loss = state.series["loss"]
    assert list(loss.x) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert list(loss.y[4:]) == [1.0, 1.0, 1.0, 1.0]


def test_vram_is_plotted_and_the_totals_kept():
    state = RunState()
    state.apply(started(estimate_peak_bytes=3 * 2**30))
    state.apply(data_ready(total_steps=10))
    state.apply(step(1))
    assert state.series["vram_gpu"].count == 1 and state.gpu_total_bytes == 8 * 2**30
    assert state.estimate_peak_bytes == 3 * 2**30 and state.progress == 0.1


def test_an_out_of_memory_error_sets_the_peak_vram_to_what_was_measured_when_it_struck():
    state = RunState()
    state.apply(step(1, vram={"max_allocated": 5 * 2**30, "gpu_total": 8 * 2**30}))
    state.apply(ev.Error(code="cuda_oom", message="the GPU ran out of memory during step 2", advice="Lower max_length",
                         peak_bytes=7 * 2**30, gpu_total_bytes=8 * 2**30, estimate_peak_bytes=9 * 2**30))
    assert state.status == "failed" and state.error.code == "cuda_oom"
    assert state.peak_process_bytes == 7 * 2**30 and state.estimate_peak_bytes == 9 * 2**30


def write_run(runs, name: str, events: list[ev.Event]):
    run_dir = runs / name
    RunConfig().save(run_dir / "config.yaml")
    writer = EventWriter(run_dir / "events.jsonl", stream=None)
    for event in events:
        writer.emit(event)
    writer.close()
    return run_dir


def test_run_status_comes_from_its_last_events(tmp_path):
    finished = write_run(tmp_path, "a", [started(), data_ready(4),
                                         ev.Finished(step=4, adapter_dir="", final_loss=1.2, duration_s=9.0)])
    stopped = write_run(tmp_path, "b", [started(), ev.Stopped(step=2, checkpoint="c")])
    (stopped / "checkpoints" / "step-2").mkdir(parents=True)
    cut_short = write_run(tmp_path, "c", [started()])
    assert summarize_run(finished).status == "finished" and summarize_run(finished).final_loss == 1.2
    assert summarize_run(stopped).status == "stopped" and summarize_run(stopped).can_resume
    assert summarize_run(cut_short).status == "interrupted" and not summarize_run(cut_short).can_resume
    assert {run.name for run in list_runs(tmp_path)} == {"a", "b", "c"}


def test_step_and_total_come_from_data_ready_and_step_as_the_real_engine_sends_them(tmp_path):
    run_dir = write_run(tmp_path, "real", [started(), data_ready(30), step(1, total_steps=30)])
    assert summarize_run(run_dir).step_text == "1 / 30"
    before_any_step = write_run(tmp_path, "loading", [started(), data_ready(30)])
    assert summarize_run(before_any_step).step_text == "0 / 30"


def test_new_run_folders_never_collide(tmp_path):
    first = new_run_dir(tmp_path, "default")
    first.mkdir()
    assert new_run_dir(tmp_path, "default") != first
    assert "my-model" in new_run_dir(tmp_path, "/models/My_Model").name
