"""The Monitor shows the first step's fit check (measured peak, estimate, verdict) and the fp16 steps the loss scaler
skipped (issue 16)."""
from __future__ import annotations

from qlora_engine.protocol import events as ev

GIB = 2**30


def test_the_monitor_shows_the_fit_check_of_the_first_step(window, qtbot, screenshot):
    with qtbot.waitSignal(window.session.training.exited, timeout=20_000):
        window.start_action.trigger()
    page = window.pages["monitor"]
    page.redraw()
    assert page.fit_label.isVisible()
    text = page.fit_label.text()
    assert "largest batch (1,360 tokens)" in text and "measured peak 1.90 GiB" in text and "estimate 3.00 GiB" in text
    assert "no later step needs more" in text
    assert page.measured_line.isVisible() and abs(page.measured_line.value() - 1.9) < 1e-6
    screenshot(window, "monitor-fit-check")


def test_the_monitor_counts_skipped_fp16_steps_and_says_when_memory_is_not_measured(window, screenshot):
    window.show_page("monitor")
    page = window.pages["monitor"]
    for event in (ev.Started(run_dir="/runs/t4-run", compute_dtype="float16", device="cpu"),
                  ev.DataReady(train_rows=90, val_rows=10, total_steps=30),
                  ev.Step(step=1, total_steps=30, loss=3.3, lr=1e-4, skipped_steps=1),
                  ev.FitCheck(step=1, tokens=612, verdict="not measured"),
                  ev.Step(step=2, total_steps=30, loss=3.1, lr=2e-4, skipped_steps=2)):
        page.state.apply(event)
    page.redraw()
    assert page.stat_values["step"].text() == "2 / 30 (2 skipped)"
    assert "loss scaler" in page.stat_values["step"].toolTip()
    assert "measured on a CUDA GPU only" in page.fit_label.text() and not page.measured_line.isVisible()
    screenshot(window, "monitor-fp16-skipped")
