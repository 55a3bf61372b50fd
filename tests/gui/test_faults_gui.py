"""The window survives the engine's failures: it stays up, says what happened and what to do, and can start again."""
from __future__ import annotations

import html

from qlora_engine.protocol.events import read_events


def test_an_engine_out_of_gpu_memory_shows_the_peak_and_the_fix_and_the_window_stays_usable(window, qtbot, scenario,
                                                                                          screenshot):
    scenario("oom")
    with qtbot.waitSignal(window.session.training.exited, timeout=20_000) as exited:
        window.start_training()
    assert exited.args == [1]
    assert not window.session.training.is_running(), "no engine process is left holding the GPU"
    page = window.pages["monitor"]
    page.redraw()
    assert window.isVisible() and page.state.status == "failed"
    shown = html.unescape(page.banner.label.text())
    error = list(read_events(window.session.run_dir / "events.jsonl"))[-1]
    assert "cuda_oom" in shown and error.message in shown and error.advice in shown
    assert "during step 3" in shown and f"this run used up to {error.peak_bytes / 2**30:.2f} GiB" in shown
    assert f"The estimator's fix for this GPU: {error.fixes[0]['description']}" in shown
    assert page.state.last_checkpoint.endswith("step-2"), "the checkpoint before the error is still offered"
    assert window.start_action.isEnabled()
    screenshot(window, "monitor-cuda-oom")

    scenario("ok")  # the user applies the fix and starts again: the same window runs it to the end
    with qtbot.waitSignal(window.session.training.exited, timeout=20_000) as exited:
        window.start_training()
    assert exited.args == [0]
    page.redraw()
    assert page.state.status == "finished" and "Training finished" in page.banner.label.text()
