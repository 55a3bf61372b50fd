"""Fixtures of the fault-injection tests: the data and the loss curve of a run that nothing interrupts."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from engine_process import run_engine, step_losses, train_args
from tiny_models import write_jsonl


@dataclass
class CleanRun:
    run_dir: Path
    losses: dict[int, float]  # step -> loss


@pytest.fixture
def engine_in_process(monkeypatch):
    """`qlora-studio train ARGS` in this process (so a test can wrap its writes), leaving pytest's SIGINT alone."""
    from qlora_engine import cli
    from qlora_engine.training import loop

    monkeypatch.setattr(loop.StopRequest, "install", lambda self: None)

    def train_main(*args: str) -> int:
        return cli.main(["train", *args])

    return train_main


@pytest.fixture(scope="session")
def faults_data_file(tmp_path_factory) -> Path:
    rows = [{"instruction": f"Who is the mayor number {i}?", "input": "", "output": f"Quillon Varet {i}."}
            for i in range(24)]
    return write_jsonl(tmp_path_factory.mktemp("data") / "alpaca.jsonl", rows)


@pytest.fixture(scope="session")
def uninterrupted(tiny_model_dir, faults_data_file, tmp_path_factory) -> CleanRun:
    """The same run as every fault test's, never interrupted: the curve a recovered run must end on."""
    run_dir = tmp_path_factory.mktemp("whole") / "run"
    code, events = run_engine(train_args(tiny_model_dir, faults_data_file, run_dir))
    assert code == 0 and events[-1].kind == "finished"
    losses = step_losses(events)
    assert sorted(losses) == list(range(1, 9))
    return CleanRun(run_dir, losses)
