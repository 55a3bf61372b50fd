"""The child-process wrapper: events become signals, log text stays text, and a crash becomes an error."""
from __future__ import annotations

import sys

from app.engine_process import EngineProcess, EngineQuery


def script_engine(tmp_path, body: str) -> list[str]:
    """An engine command that runs `body` as a Python script (whatever arguments it gets)."""
    script = tmp_path / "engine.py"
    script.write_text(body, encoding="utf-8")
    return [sys.executable, str(script)]


EMIT = ('import json, sys, time\n'
        'def emit(kind, **f): print(json.dumps({"v": 1, "t": time.time(), "kind": kind, **f}), flush=True)\n')


def collect(engine: EngineProcess) -> dict[str, list]:
    seen: dict[str, list] = {"events": [], "log": [], "errors": [], "steps": []}
    engine.event.connect(seen["events"].append)
    engine.log_line.connect(seen["log"].append)
    engine.error.connect(seen["errors"].append)
    engine.step.connect(seen["steps"].append)
    return seen


def test_events_arrive_as_signals_and_other_lines_as_log_text(qtbot, tmp_path):
    engine = EngineProcess(script_engine(tmp_path, EMIT + 'emit("started", total_steps=2)\nprint("plain text")\n'
                                         'emit("step", step=1, loss=2.0, lr=1e-4)\n'
                                         'print("to stderr", file=sys.stderr)\n'))
    seen = collect(engine)
    with qtbot.waitSignal(engine.exited, timeout=10_000) as exited:
        engine.start(["train"])
    assert exited.args == [0]
    assert [e["kind"] for e in seen["events"]] == ["started", "step"]
    assert seen["steps"][0]["loss"] == 2.0
    assert "plain text" in seen["log"] and "to stderr" in seen["log"]
    assert seen["errors"] == []


def test_engine_that_crashes_without_an_error_event_surfaces_one_with_its_last_log_line(qtbot, tmp_path):
    engine = EngineProcess(script_engine(tmp_path, EMIT + 'emit("started")\n'
                                         'print("RuntimeError: CUDA error: illegal memory access", file=sys.stderr)\n'
                                         'sys.exit(1)\n'))
    seen = collect(engine)
    with qtbot.waitSignal(engine.exited, timeout=10_000):
        engine.start(["train"])
    assert len(seen["errors"]) == 1
    error = seen["errors"][0]
    assert error["code"] == "engine_crashed"
    assert "exit code 1" in error["message"] and "illegal memory access" in error["message"]
    assert error["advice"]


def test_engine_killed_by_a_signal_is_reported_as_killed_with_memory_advice(qtbot, tmp_path):
    engine = EngineProcess(script_engine(tmp_path, "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n"))
    seen = collect(engine)
    with qtbot.waitSignal(engine.exited, timeout=10_000):
        engine.start(["train"])
    assert seen["errors"][0]["code"] == "engine_killed"
    assert "memory" in seen["errors"][0]["advice"]


def test_an_error_event_is_not_doubled_by_the_nonzero_exit(qtbot, tmp_path):
    engine = EngineProcess(script_engine(tmp_path, EMIT + 'emit("error", code="cuda_oom", message="out of memory", '
                                         'advice="Lower the batch.")\nsys.exit(1)\n'))
    seen = collect(engine)
    with qtbot.waitSignal(engine.exited, timeout=10_000):
        engine.start(["train"])
    assert [e["code"] for e in seen["errors"]] == ["cuda_oom"]


def test_an_engine_that_cannot_start_says_so(qtbot, tmp_path):
    engine = EngineProcess([str(tmp_path / "no-such-python")])
    seen = collect(engine)
    with qtbot.waitSignal(engine.exited, timeout=10_000):
        engine.start(["train"])
    assert seen["errors"][0]["code"] == "engine_not_started"


def test_stop_is_sent_as_a_line_on_stdin(qtbot, tmp_path):
    engine = EngineProcess(script_engine(tmp_path, EMIT + 'emit("started")\nline = sys.stdin.readline()\n'
                                         'emit("stopped", step=3, checkpoint="ckpt") if line.strip() == "stop" '
                                         'else sys.exit(2)\n'))
    stopped = []
    engine.stopped.connect(stopped.append)
    with qtbot.waitSignal(engine.started, timeout=10_000):
        engine.start(["train"])
    with qtbot.waitSignal(engine.exited, timeout=10_000) as exited:
        engine.stop()
    assert exited.args == [0]
    assert stopped[0]["checkpoint"] == "ckpt"


def test_an_event_kind_this_app_does_not_know_still_reaches_the_generic_signal(qtbot, tmp_path, monkeypatch):
    monkeypatch.setattr("qlora_engine.events.KINDS", ("started", "brand_new"))  # parse_line reads it per call
    engine = EngineProcess(script_engine(tmp_path, EMIT + 'emit("brand_new", x=1)\n'))
    seen = collect(engine)
    with qtbot.waitSignal(engine.exited, timeout=10_000):
        engine.start(["train"])
    assert [e["kind"] for e in seen["events"]] == ["brand_new"]


def test_query_returns_the_json_object_or_its_error(qtbot, tmp_path):
    query = EngineQuery(script_engine(tmp_path, 'import json, sys\nprint("loading…")\n'
                                      'print(json.dumps({"error": {"code": "bad_dataset", "message": "m", '
                                      '"advice": "a"}}) if "bad" in sys.argv else json.dumps({"rows": 3}))\n'))
    with qtbot.waitSignal(query.result, timeout=10_000) as result:
        query.run(["data", "good.jsonl"])
    assert result.args == [{"rows": 3}]
    with qtbot.waitSignal(query.failed, timeout=10_000) as failed:
        query.run(["data", "bad"])
    assert failed.args[0]["code"] == "bad_dataset"


def test_a_newer_query_replaces_one_still_running(qtbot, tmp_path):
    query = EngineQuery(script_engine(tmp_path, 'import json, sys, time\nif "slow" in sys.argv: time.sleep(5)\n'
                                      'print(json.dumps({"answer": sys.argv[-1]}))\n'))
    answers = []
    query.result.connect(answers.append)
    query.run(["data", "slow"])
    with qtbot.waitSignal(query.result, timeout=10_000):
        query.run(["data", "fast"])
    qtbot.wait(200)
    assert answers == [{"answer": "fast"}]
