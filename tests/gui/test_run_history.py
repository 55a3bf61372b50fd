"""What the Monitor and Runs pages read from events: plotted series and a run's status."""
from __future__ import annotations

from app.run_metrics import RunMetrics, Series
from app.runs import list_runs, new_run_dir, summarize_run
from qlora_engine.config import RunConfig
from qlora_engine.events import EventWriter


def step(n: int, loss: float = 1.0) -> dict:
    return {"kind": "step", "step": n, "total_steps": 10, "loss": loss, "lr": 1e-4, "grad_norm": 0.5,
            "tokens_per_s": 100.0, "vram": {"reserved": 2**30, "gpu_used": 2 * 2**30, "gpu_total": 8 * 2**30}}


def test_series_grow_past_their_first_buffer():
    series = Series()
    for n in range(1000):
        series.append(n, n * 2)
    assert series.count == 1000 and series.y[-1] == 1998


def test_resuming_from_an_earlier_checkpoint_replaces_the_replayed_steps():
    metrics = RunMetrics()
    for n in range(1, 8):
        metrics.add_event(step(n, loss=5.0))
    for n in range(5, 9):  # crashed after step 7, resumed from the step-4 checkpoint
        metrics.add_event(step(n, loss=1.0))
    loss = metrics.series["loss"]
    assert list(loss.x) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert list(loss.y[4:]) == [1.0, 1.0, 1.0, 1.0]


def test_vram_is_plotted_and_the_totals_kept():
    metrics = RunMetrics()
    metrics.add_event({"kind": "started", "total_steps": 10, "estimate_peak_bytes": 3 * 2**30})
    metrics.add_event(step(1))
    assert metrics.series["vram_gpu"].count == 1 and metrics.gpu_total_bytes == 8 * 2**30
    assert metrics.estimate_peak_bytes == 3 * 2**30 and metrics.progress == 0.1


def test_an_out_of_memory_error_sets_the_peak_vram_to_what_was_measured_when_it_struck():
    metrics = RunMetrics()
    metrics.add_event(step(1) | {"vram": {"max_allocated": 5 * 2**30, "gpu_total": 8 * 2**30}})
    metrics.add_event({"kind": "error", "code": "cuda_oom", "message": "the GPU ran out of memory during step 2",
                       "advice": "Lower max_length", "peak_bytes": 7 * 2**30, "gpu_total_bytes": 8 * 2**30,
                       "estimate_peak_bytes": 9 * 2**30})
    assert metrics.status == "failed" and metrics.error["code"] == "cuda_oom"
    assert metrics.peak_process_bytes == 7 * 2**30 and metrics.estimate_peak_bytes == 9 * 2**30


def write_run(runs, name: str, kinds: list[tuple[str, dict]]):
    run_dir = runs / name
    RunConfig().save(run_dir / "config.yaml")
    events = EventWriter(run_dir / "events.jsonl", stream=None)
    for kind, fields in kinds:
        events.emit(kind, **fields)
    events.close()
    return run_dir


def test_run_status_comes_from_its_last_events(tmp_path):
    finished = write_run(tmp_path, "a", [("started", {"total_steps": 4}), ("finished", {"step": 4, "final_loss": 1.2,
                                                                                        "duration_s": 9.0})])
    stopped = write_run(tmp_path, "b", [("started", {}), ("stopped", {"step": 2, "checkpoint": "c"})])
    (stopped / "checkpoints" / "step-2").mkdir(parents=True)
    cut_short = write_run(tmp_path, "c", [("started", {})])
    assert summarize_run(finished).status == "finished" and summarize_run(finished).final_loss == 1.2
    assert summarize_run(stopped).status == "stopped" and summarize_run(stopped).can_resume
    assert summarize_run(cut_short).status == "interrupted" and not summarize_run(cut_short).can_resume
    assert {run.name for run in list_runs(tmp_path)} == {"a", "b", "c"}


def test_new_run_folders_never_collide(tmp_path):
    first = new_run_dir(tmp_path, "default")
    first.mkdir()
    assert new_run_dir(tmp_path, "default") != first
    assert "my-model" in new_run_dir(tmp_path, "/models/My_Model").name
