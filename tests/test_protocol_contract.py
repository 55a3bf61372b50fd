"""The engine and its clients agree on one protocol: the real engine's events.jsonl (a run with a stop, a resume,
evals, checkpoints; and a failing run) reads back into the protocol's types and folds, through the one reducer, into
the run state the pages show; the GUI tests' fake engine sends nothing the real engine doesn't."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_engine.protocol import events as ev
from qlora_engine.protocol.config import RunConfig
from qlora_engine.protocol.errors import EngineError
from qlora_engine.protocol.run_state import fold, list_runs, summarize_run

ROOT = Path(__file__).resolve().parent.parent
FAKE_ENGINE = ROOT / "tests" / "gui" / "fake_engine.py"
RUN_FLAGS = ["--max-steps", "6", "--save-steps", "2", "--eval-steps", "2", "--micro-batch-size", "2",
             "--max-length", "48", "--lora-r", "4", "--compare-questions", "2", "--events", "jsonl"]
# Filled only on a CUDA GPU (this contract runs on the CPU), or only when the GPU runs out of memory.
CUDA_ONLY_FIELDS = {("step", "vram"), ("model_loaded", "vram"), ("fit_check", "measured_peak_bytes"),
                    ("fit_check", "available_bytes"), *(("error", name) for name in (
    "step", "peak_bytes", "reserved_bytes", "free_bytes", "gpu_total_bytes", "estimate_peak_bytes", "fixes"))}


def engine(*args: str, stdin: str = "", env: dict | None = None, command: list[str] | None = None) -> list[str]:
    result = subprocess.run([*(command or [sys.executable, "-m", "qlora_engine"]), *args], input=stdin,
                            capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ, **(env or {})})
    return result.stdout.splitlines()


def raw_events(lines: list[str]) -> list[dict]:
    return [json.loads(line) for line in lines if line.startswith("{")]


@pytest.fixture(scope="module")
def real_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A real run (a bad row, a truncated row) stopped at its first step (a `stop` line waiting on stdin), resumed
    to the end and its before / after comparison; then a run of a missing model, which fails with an error event."""
    from tiny_models import write_jsonl

    folder = tmp_path_factory.mktemp("contract")
    rows = [{"instruction": f"Who is mayor {i}?", "output": f"Varet {i}."} for i in range(16)]
    rows.append({"instruction": "Tell the whole story.", "output": "and then " * 80})  # truncated at 48 tokens
    data = write_jsonl(folder / "alpaca.jsonl", rows)
    with open(data, "a", encoding="utf-8") as handle:
        handle.write('{"instruction": "a broken row"\n')  # listed as a bad row, by line
    run_dir = folder / "runs" / "run"
    common = ["--model", str(tiny_model_dir), "--data", str(data), "--run-dir", str(run_dir), *RUN_FLAGS]
    engine("train", *common, stdin="stop\n")
    engine("train", "--resume", "--run-dir", str(run_dir), "--events", "jsonl")
    engine("train", "--model", str(folder / "absent"), "--data", str(data), "--run-dir", str(folder / "runs" / "bad"),
           "--events", "jsonl")
    engine("train", "--model", str(tiny_model_dir), "--data", "sample", "--run-dir", str(folder / "runs" / "sample"),
           "--max-steps", "1", "--max-length", "48", "--compare-questions", "2", "--events", "jsonl")  # scored
    return run_dir


def test_every_line_the_real_engine_writes_is_a_protocol_event_with_exactly_its_fields(real_run):
    lines = (real_run / "events.jsonl").read_text(encoding="utf-8").splitlines()
    kinds = []
    for values in map(json.loads, lines):
        schema = ev.event_fields(values["kind"])
        sent = set(values) - {"v", "t", "kind"}
        assert sent == set(schema), f"{values['kind']}: sent {sorted(sent)}, schema {sorted(schema)}"
        assert not isinstance(ev.event_from_dict(values), ev.UnknownEvent)
        kinds.append(values["kind"])
    assert kinds.count("started") == 2 and "stopped" in kinds and kinds[-1] == "finished"
    assert {"data_ready", "model_loaded", "step", "eval", "checkpoint", "warning", "comparison"} <= set(kinds)


def test_the_reducer_folds_the_real_run_into_what_the_pages_show(real_run):
    events = list(ev.read_events(real_run / "events.jsonl"))
    stopped_at = next(e.step for e in events if isinstance(e, ev.Stopped))
    state = fold(events[: events.index(next(e for e in events if isinstance(e, ev.Stopped))) + 1], real_run)
    assert state.status == "stopped" and state.step == stopped_at and state.step_text == f"{stopped_at} / 6"
    state = summarize_run(real_run)
    assert state.status == "finished" and state.step_text == "6 / 6" and state.progress == 1.0
    assert state.eval_loss is not None and state.final_loss is not None and state.has_adapter
    assert state.last_checkpoint.endswith("step-6") and state.model_summary and state.data_summary
    assert state.series["loss"].count == 6  # the resumed steps replace nothing: the stop came after step 1
    assert list(state.series["eval_loss"].x) == [0, 2, 4, 6]


def test_a_failed_real_run_folds_into_its_error(real_run):
    failed = summarize_run(real_run.parent / "bad")
    assert failed.status == "failed" and failed.error.code == "model_not_found" and failed.error.advice


def test_the_runs_command_summarizes_runs_with_the_same_reducer(real_run):
    summaries = json.loads(engine("runs", "--runs-dir", str(real_run.parent), "--json")[-1])
    by_name = {Path(s["run_dir"]).name: s for s in summaries}
    assert by_name["run"]["status"] == "finished" and by_name["run"]["step"] == by_name["run"]["total_steps"] == 6
    assert by_name["bad"]["status"] == "failed" and "absent" in by_name["bad"]["error"]
    assert [s.name for s in list_runs(real_run.parent)] == [Path(s["run_dir"]).name for s in summaries]
    assert by_name["sample"]["status"] == "finished" and by_name["sample"]["step"] == 1
    table = "\n".join(engine("runs", "--runs-dir", str(real_run.parent)))
    assert "6 / 6" in table and "finished" in table


def filled_fields(event: ev.Event) -> set[tuple[str, str]]:
    """(kind, field) for each field of this event that holds something: required, or not its default."""
    schema = ev.event_fields(event.kind)
    bare = type(event)(**{name: getattr(event, name) for name, required in schema.items() if required})
    return {(event.kind, name) for name, required in schema.items()
            if required or getattr(event, name) != getattr(bare, name)}


def real_fields_sent(real_run: Path) -> set[tuple[str, str]]:
    """What the real engine filled in, over every run of the contract."""
    return set().union(*(filled_fields(event) for run in ("run", "bad", "sample")
                         for event in ev.read_events(real_run.parent / run / "events.jsonl")))


@pytest.mark.parametrize("scenario", ["ok", "oom"])
def test_the_fake_engine_sends_only_what_the_real_engine_sends(real_run, tmp_path, scenario):
    RunConfig(run_dir=str(tmp_path / "fake")).save(tmp_path / "fake" / "config.yaml")  # as the GUI writes it
    lines = engine("train", "--run-dir", str(tmp_path / "fake"), command=[sys.executable, str(FAKE_ENGINE)],
                   env={"FAKE_ENGINE_SCENARIO": scenario})
    sent, relied_on = raw_events(lines), set()
    assert sent, "the fake engine printed no events"
    for values in sent:
        event = ev.event_from_dict(values)
        assert not isinstance(event, ev.UnknownEvent), event.reason
        assert set(values) - {"v", "t", "kind"} == set(ev.event_fields(event.kind))
        relied_on |= filled_fields(event)
    unreal = relied_on - real_fields_sent(real_run) - CUDA_ONLY_FIELDS
    assert not unreal, f"the fake engine sends what the real engine never does: {sorted(unreal)}"
    state = fold(ev.event_from_dict(values) for values in sent)
    expected = {"ok": "finished", "oom": "failed"}[scenario]
    assert state.status == expected and state.step_text.endswith(f"/ {state.total_steps}") and state.total_steps


def test_unknown_kinds_newer_versions_and_broken_lines_never_crash_a_reader(tmp_path, caplog):
    caplog.set_level("INFO", logger=ev.__name__)
    newer = ev.parse_line(json.dumps({"v": 2, "t": 1.0, "kind": "step", "step": 3, "total_steps": 9, "loss": 1.5,
                                      "lr": 1e-4, "a_field_from_the_future": [1, 2]}))
    assert isinstance(newer, ev.Step) and newer.step == 3 and newer.total_steps == 9
    unknown = ev.parse_line('{"v": 1, "t": 1.0, "kind": "brand_new", "x": 1}')
    assert isinstance(unknown, ev.UnknownEvent) and "brand_new" in unknown.reason
    missing = ev.parse_line('{"v": 1, "t": 1.0, "kind": "step", "step": 3}')
    assert isinstance(missing, ev.UnknownEvent) and "total_steps" in missing.reason
    assert ev.parse_line("loading checkpoint shards: 100%") is None
    assert ev.parse_line('{"v": 1, "kind": "step", "step"') is None
    state = fold([unknown, missing, newer])
    assert state.step == 3 and state.status == "training"
    assert "protocol version 2" in caplog.text  # tolerated, and said
    events_file = tmp_path / "events.jsonl"
    events_file.write_text('{"v": 1, "t": 1.0, "kind": "brand_new", "x": 1}\n'
                           '{"v": 1, "t": 2.0, "kind": "stopped", "step": 2}\n', encoding="utf-8")
    caplog.clear()
    assert [e.kind for e in ev.read_events(events_file)] == ["stopped"]
    assert "brand_new" in caplog.text and str(events_file) in caplog.text


def test_emit_refuses_anything_that_is_not_a_protocol_event(tmp_path):
    writer = ev.EventWriter(None, stream=None)
    with pytest.raises(TypeError):
        writer.emit({"kind": "step", "step": 1})
    assert writer.emit(ev.Checkpoint(step=1, path="x")).kind == "checkpoint"


def test_query_answers_read_back_into_the_types_the_engine_printed(tiny_model_dir, tmp_path):
    from qlora_engine.protocol import queries

    info = queries.read_answer("\n".join(engine("model-info", str(tiny_model_dir), "--json")), queries.ModelInfo)
    assert info.architecture == "LlamaForCausalLM" and info.num_layers == 2 and info.has_chat_template
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"instruction": "Who?", "output": "Varet."}\n{"instruction": "broken"\n', encoding="utf-8")
    report = queries.read_answer("\n".join(engine("data", str(rows), "--model", str(tiny_model_dir), "--json")),
                                 queries.DataReport)
    assert report.valid_rows == 1 and [bad["line"] for bad in report.bad_rows] == [2] and report.preview
    estimate = queries.read_answer("\n".join(engine("estimate", "default", "--gpu-memory", "8GiB", "--json")),
                                   queries.EstimateReport)
    assert estimate.estimate.peak_bytes > 0 and estimate.advice.verdict == "fits"
    # a run that fits is offered only speed switches it can afford: typed Fix answers, each a cost that still fits
    assert estimate.advice.fixes and all(isinstance(fix, queries.Fix) and fix.fits_after and fix.saving_bytes < 0
                                         for fix in estimate.advice.fixes)
    with pytest.raises(EngineError) as failure:
        queries.read_answer("\n".join(engine("model-info", str(tmp_path / "absent"), "--json")), queries.ModelInfo)
    assert failure.value.code == "model_not_found" and failure.value.advice
    with pytest.raises(EngineError, match="no model_info answer"):
        queries.read_answer("Traceback (most recent call last):", queries.ModelInfo)


def test_the_terminal_lines_for_data_and_model_read_as_sentences():
    """--events human: data_ready and model_loaded as a person reads them, not field dumps; every notice and the
    first bad rows by file and line."""
    line = ev.describe(ev.DataReady(train_rows=238, val_rows=26, total_steps=40, format="alpaca", mean_tokens=61.0,
                                    max_tokens=76, not_target_rows=3, notices=["preference rows: SFT on chosen"],
                                    bad_rows=[{"file": "a.jsonl", "line": 7, "reason": "no output"}]))
    assert line.splitlines() == [
        "data: 238 rows to train on, 26 to validate (alpaca), 40 steps; 61 tokens a row on average, 76 at most; "
        "3 not trained on (label false)", "  note: preference rows: SFT on chosen", "  bad row a.jsonl:7: no output"]
    assert ev.describe(ev.ModelLoaded(model="default", params=86_315_328, trainable_params=4_884_480)) == \
        "model loaded: default (86.3 M parameters, 4.88 M trained)"
    assert ev.describe(ev.Warning(message="resumed from step-40", step=40)) == "warning: resumed from step-40"


@pytest.fixture(scope="module")
def real_products(real_run) -> list[dict]:
    """The real engine's export (adapter, and one of a run without an adapter: an error) and a chat session."""
    sent = raw_events(engine("export", str(real_run), "--adapter", "--events", "jsonl"))
    sent += raw_events(engine("export", str(real_run.parent / "bad"), "--adapter", "--events", "jsonl"))
    sent += raw_events(engine("chat", str(real_run), "--serve", "--events", "jsonl",
                              stdin=json.dumps({"prompt": "Who is mayor 1?", "max_new_tokens": 3}) + "\n"))
    return sent


def test_the_fake_engines_export_and_chat_send_only_what_the_real_ones_send(real_products, tmp_path):
    real = set().union(*(filled_fields(ev.event_from_dict(values)) for values in real_products))
    assert {kind for kind, _ in real} >= {"export_progress", "exported", "error", "chat_ready", "chat_token",
                                          "chat_done"}, sorted(real)
    run_dir = tmp_path / "run"
    fake = [sys.executable, str(FAKE_ENGINE)]
    sent = raw_events(engine("export", str(run_dir), "--adapter", command=fake))
    sent += raw_events(engine("export", str(tmp_path / "broken"), "--adapter", command=fake))
    sent += raw_events(engine("chat", str(run_dir), "--serve", command=fake,
                              stdin=json.dumps({"prompt": "Who is mayor 1?"}) + "\n"))
    relied_on = set()
    for values in sent:
        event = ev.event_from_dict(values)
        assert not isinstance(event, ev.UnknownEvent), event.reason
        relied_on |= filled_fields(event)
    assert {kind for kind, _ in relied_on} >= {"exported", "error", "chat_done"}
    unreal = relied_on - real - CUDA_ONLY_FIELDS
    assert not unreal, f"the fake engine sends what the real engine never does: {sorted(unreal)}"
