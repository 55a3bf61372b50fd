"""The child-process wrapper: events become signals carrying typed events, log text stays text, an event this
version can't read is logged, and a crash becomes an error event."""
from __future__ import annotations

import sys

from app.engine_process import EngineProcess
from qlora_engine.protocol import events as ev


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
    engine = EngineProcess(script_engine(tmp_path, EMIT + 'emit("started", run_dir="r")\nprint("plain text")\n'
                                         'emit("step", step=1, total_steps=2, loss=2.0, lr=1e-4)\n'
                                         'print("to stderr", file=sys.stderr)\n'))
    seen = collect(engine)
    with qtbot.waitSignal(engine.exited, timeout=10_000) as exited:
        engine.start(["train"])
    assert exited.args == [0]
    assert [type(e) for e in seen["events"]] == [ev.Started, ev.Step]
    assert seen["steps"][0].loss == 2.0 and seen["steps"][0].total_steps == 2
    assert "plain text" in seen["log"] and "to stderr" in seen["log"]
    assert seen["errors"] == []


def test_engine_that_crashes_without_an_error_event_surfaces_one_with_its_last_log_line(qtbot, tmp_path):
    engine = EngineProcess(script_engine(tmp_path, EMIT + 'emit("started", run_dir="r")\n'
                                         'print("RuntimeError: CUDA error: illegal memory access", file=sys.stderr)\n'
                                         'sys.exit(1)\n'))
    seen = collect(engine)
    with qtbot.waitSignal(engine.exited, timeout=10_000):
        engine.start(["train"])
    assert len(seen["errors"]) == 1
    error = seen["errors"][0]
    assert isinstance(error, ev.Error) and error.code == "engine_crashed"
    assert "exit code 1" in error.message and "illegal memory access" in error.message
    assert error.advice
    assert seen["events"][-1] is error, "the crash's error is an event like the engine's own"


def test_engine_killed_by_a_signal_is_reported_as_killed_with_memory_advice(qtbot, tmp_path):
    engine = EngineProcess(script_engine(tmp_path, "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n"))
    seen = collect(engine)
    with qtbot.waitSignal(engine.exited, timeout=10_000):
        engine.start(["train"])
    assert seen["errors"][0].code == "engine_killed"
    assert "memory" in seen["errors"][0].advice


def test_an_error_event_is_not_doubled_by_the_nonzero_exit(qtbot, tmp_path):
    engine = EngineProcess(script_engine(tmp_path, EMIT + 'emit("error", code="cuda_oom", message="out of memory", '
                                         'advice="Lower the batch.")\nsys.exit(1)\n'))
    seen = collect(engine)
    with qtbot.waitSignal(engine.exited, timeout=10_000):
        engine.start(["train"])
    assert [e.code for e in seen["errors"]] == ["cuda_oom"]


def test_an_engine_that_cannot_start_says_so(qtbot, tmp_path):
    engine = EngineProcess([str(tmp_path / "no-such-python")])
    seen = collect(engine)
    with qtbot.waitSignal(engine.exited, timeout=10_000):
        engine.start(["train"])
    assert seen["errors"][0].code == "engine_not_started"


def test_stop_is_sent_as_a_line_on_stdin(qtbot, tmp_path):
    engine = EngineProcess(script_engine(tmp_path, EMIT + 'emit("started", run_dir="r")\nline = sys.stdin.readline()\n'
                                         'emit("stopped", step=3, checkpoint="ckpt") if line.strip() == "stop" '
                                         'else sys.exit(2)\n'))
    stopped = []
    engine.stopped.connect(stopped.append)
    with qtbot.waitSignal(engine.started, timeout=10_000):
        engine.start(["train"])
    with qtbot.waitSignal(engine.exited, timeout=10_000) as exited:
        engine.stop()
    assert exited.args == [0]
    assert stopped[0].checkpoint == "ckpt"


def test_an_event_this_version_cannot_read_is_logged_and_reaches_only_the_generic_signal(qtbot, tmp_path):
    engine = EngineProcess(script_engine(tmp_path, EMIT + 'emit("brand_new", x=1)\nemit("step", step=1)\n'
                                         'print(json.dumps({"v": 1, "kind": "step", "step": 2, "total_steps": 2, '
                                         '"loss": 1.0, "lr": 0.1}))\n'))
    seen = collect(engine)
    with qtbot.waitSignal(engine.exited, timeout=10_000) as exited:
        engine.start(["train"])
    assert exited.args == [0], "never a crash"
    unknown = [e for e in seen["events"] if isinstance(e, ev.UnknownEvent)]
    assert [e.raw_kind for e in unknown] == ["brand_new", "step"]  # a new kind, and a step without its fields
    assert [e.step for e in seen["steps"]] == [2]
    assert any("brand_new" in line for line in seen["log"]) and any("step without" in line for line in seen["log"])
