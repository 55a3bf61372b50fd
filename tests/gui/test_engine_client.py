"""The engine client: a request runs off the GUI thread, and its typed result, EngineError or progress comes back
on the GUI thread; a newer request of the same kind replaces one still running; an engine query's typed answer or
failure becomes the result or an EngineError."""
from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from typing import ClassVar

import pytest
import shiboken6
from PySide6.QtCore import QObject

from app.engine_client import Call, EngineClient, EngineQuery, Request
from app.engine_requests import DetectGpus, ReadModelInfo, ScanData
from qlora_engine.planning import hardware
from qlora_engine.protocol import queries
from qlora_engine.protocol.errors import EngineError


def script_engine(tmp_path, body: str) -> list[str]:
    """An engine command that runs `body` as a Python script (whatever arguments it gets)."""
    script = tmp_path / "engine.py"
    script.write_text(body, encoding="utf-8")
    return [sys.executable, str(script)]


@dataclass(frozen=True)
class Echo(EngineQuery[queries.ModelInfo]):
    """`model-info <word> --json` of a script engine."""

    key: ClassVar[str] = "echo"
    answer_type: ClassVar[type[queries.Answer]] = queries.ModelInfo
    word: str

    def args(self) -> list[str]:
        return ["model-info", self.word, "--json"]


# A script engine's answers, as the real one prints them.
ANSWER = ('import json, sys\n'
          'def answer(path): print(json.dumps({"v": 1, "kind": "model_info", "path": path, "source": "folder", '
          '"original": path, "architecture": "LlamaForCausalLM"}))\n'
          'def failure(code, message, advice): print(json.dumps({"v": 1, "kind": "error", "code": code, '
          '"message": message, "advice": advice}))\n')


@dataclass(frozen=True)
class Where(Request[str]):
    """Says which thread it ran on, after two progress reports; fails when asked to."""

    fail: bool = False

    def run(self, call: Call) -> str:
        call.report("halfway")
        call.report("almost")
        if self.fail:
            raise EngineError("bad_config", "max_length must be at least 16", "Raise max_length.")
        return threading.current_thread().name


def answer_of(qtbot, client: EngineClient, request, **callbacks) -> Call:
    with qtbot.waitSignal(client.answered, timeout=10_000,
                          check_params_cb=lambda call: call.request == request) as answered:
        client.run(request, **callbacks)
    return answered.args[0]


def test_a_request_runs_off_the_gui_thread_and_answers_on_it(qtbot):
    client = EngineClient(["unused"])
    answers, progress = [], []
    call = answer_of(qtbot, client, Where(), done=lambda name: answers.append((name, threading.current_thread())),
                     progress=progress.append)
    ran_on, answered_on = answers[0]
    assert ran_on != threading.main_thread().name and answered_on is threading.main_thread()
    assert call.result == ran_on and call.error is None and not call.is_running()
    assert progress == ["halfway", "almost"]


def test_an_engine_error_comes_back_as_the_error_with_its_advice(qtbot):
    client = EngineClient(["unused"])
    failures = []
    call = answer_of(qtbot, client, Where(fail=True), done=pytest.fail, failed=failures.append)
    assert failures == [call.error] and call.error.code == "bad_config" and call.error.advice == "Raise max_length."


def test_a_bug_in_a_request_is_an_internal_error_not_a_crash(qtbot, capsys):
    @dataclass(frozen=True)
    class Broken(Request[int]):
        def run(self, call: Call) -> int:
            return 1 // 0

    call = answer_of(qtbot, EngineClient(["unused"]), Broken())
    assert call.error.code == "internal" and "ZeroDivisionError" in call.error.message
    assert "Traceback" in capsys.readouterr().err


def test_query_returns_the_typed_answer_or_its_failure(qtbot, tmp_path):
    client = EngineClient(script_engine(tmp_path, ANSWER + 'print("loading…")\n'
                                        'print("a warning", file=sys.stderr)\n'
                                        'failure("model_not_found", "m", "a") if "bad" in sys.argv else '
                                        'answer(sys.argv[-2])\n'))
    progress = []
    info = answer_of(qtbot, client, Echo("/models/good"), progress=progress.append).result
    assert isinstance(info, queries.ModelInfo) and info.path == "/models/good"
    assert progress == ["a warning"], "the engine's log lines are its progress"
    error = answer_of(qtbot, client, Echo("bad")).error
    assert (error.code, error.message, error.advice) == ("model_not_found", "m", "a")


def test_a_query_whose_engine_crashes_before_answering_says_so_with_its_last_line(qtbot, tmp_path):
    client = EngineClient(script_engine(tmp_path, 'import sys\nprint("Killed: out of memory", file=sys.stderr)\n'
                                        'sys.exit(3)\n'))
    error = answer_of(qtbot, client, Echo("x")).error
    assert error.code == "engine_crashed" and "exit code 3" in error.message and "out of memory" in error.message


def test_a_query_whose_engine_cannot_start_says_so(qtbot, tmp_path):
    error = answer_of(qtbot, EngineClient([str(tmp_path / "no-such-python")]), Echo("x")).error
    assert error.code == "engine_not_started" and error.advice


def test_a_query_that_ends_well_without_its_answer_is_an_error_not_a_result(qtbot, tmp_path):
    client = EngineClient(script_engine(tmp_path, 'print("model-info: done")\n'))
    error = answer_of(qtbot, client, Echo("x")).error
    assert error.code == "bad_answer" and "model_info" in error.message

def test_a_newer_query_replaces_one_still_running(qtbot, tmp_path):
    client = EngineClient(script_engine(tmp_path, ANSWER + 'import time\nif "slow" in sys.argv: time.sleep(5)\n'
                                        'answer(sys.argv[-2])\n'))
    answers = []
    slow = client.run(Echo("slow"), done=answers.append)
    answer_of(qtbot, client, Echo("fast"), done=answers.append)
    qtbot.wait(200)
    assert [info.path for info in answers] == ["fast"]
    assert slow.cancelled and not slow.is_running()
    # its engine (if it had started) is killed, not left sleeping its 5 s
    qtbot.waitUntil(lambda: slow._process is None or slow._process.poll() is not None, timeout=20_000)


def test_engine_commands_still_running_never_hold_up_an_in_process_request(qtbot, tmp_path):
    @dataclass(frozen=True)
    class Slow(Echo):
        key: ClassVar[str] = ""  # none replaces another

    # the engines answer only once released: however slow this machine, they are still running when Where answers
    release = tmp_path / "release"
    wait_for_release = f"import os, time\nwhile not os.path.exists({str(release)!r}): time.sleep(0.05)\n"
    client = EngineClient(script_engine(tmp_path, ANSWER + wait_for_release + "answer(sys.argv[-2])\n"))
    slow = [client.run(Slow(f"/models/{n}")) for n in range(4)]  # more than this machine has cores
    try:
        with qtbot.waitSignal(client.answered, timeout=20_000, check_params_cb=lambda call: call.request == Where()):
            client.run(Where())
        assert all(call.is_running() for call in slow)
    finally:
        release.write_text("go")
        client.shutdown()

def test_no_answer_reaches_a_page_that_is_gone(qtbot):
    client = EngineClient(["unused"])
    owner = QObject()
    answers = []
    client.run(Where(), owner=owner, done=answers.append)
    shiboken6.delete(owner)
    qtbot.wait(300)
    assert answers == []


def test_the_pages_requests_say_the_engine_command_they_run():
    assert ReadModelInfo("/models/x", allow_pickle=True).args() == ["model-info", "/models/x", "--json",
                                                                    "--allow-pickle"]
    assert ScanData("a.jsonl", "default", "auto", 512, train_on_prompt=True).args() == [
        "data", "a.jsonl", "--model", "default", "--format", "auto", "--max-length", "512", "--json",
        "--train-on-prompt"]


def test_gpu_detection_is_a_request_with_the_engines_report(qtbot):
    call = answer_of(qtbot, EngineClient(["unused"]), DetectGpus())
    assert isinstance(call.result, hardware.GpuReport)

