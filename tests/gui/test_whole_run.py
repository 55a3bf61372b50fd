"""The whole path a user clicks through, with the real engine on a tiny random Llama: model, data, fit,
train, stop, resume, chat, export. Slow-ish (a minute or two on a CPU); the other GUI tests use the fake.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from app import formatting
from app.main import create_window
from app.pages.runs import COLUMNS

STEP_S = 300_000  # ms; CPU steps of the first seconds are slow on a busy 2-core machine


@pytest.fixture
def real_window(qtbot, qapp, monkeypatch, tmp_path):
    monkeypatch.delenv("QLORA_STUDIO_ENGINE", raising=False)
    window = create_window(qapp)  # the real `python -m qlora_engine`
    window.resize(1280, 840)
    qtbot.addWidget(window)
    window.show()
    yield window
    window.session.training.kill()
    window.session.training.wait_for_exit(5000)
    for page in window.pages.values():
        if hasattr(page, "shutdown"):
            page.shutdown()


def test_from_model_choice_to_export_with_stop_and_resume(real_window, qtbot, tiny_model_dir, alpaca_file,
                                                         screenshot):
    window, session = real_window, real_window.session

    model_page = window.pages["model"]
    model_page.choose_model(str(tiny_model_dir))
    qtbot.waitUntil(lambda: session.model_info is not None and session.model_info.path == str(tiny_model_dir),
                    timeout=STEP_S)
    assert model_page.facts["architecture"].text() == "LlamaForCausalLM"

    data_page = window.pages["data"]
    data_page.choose_file(str(alpaca_file))
    qtbot.waitUntil(lambda: session.data_report is not None
                    and Path(session.data_report.file).name == alpaca_file.name, timeout=STEP_S)
    assert session.data_report.valid_rows == 24
    assert "Quillon Varet" in data_page.preview.toPlainText()

    fit_page = window.pages["fit"]
    fit_page.target.setCurrentIndex(fit_page.target.findData("custom"))
    fit_page.custom_gib.setValue(8)
    qtbot.waitUntil(lambda: not fit_page.is_estimating(), timeout=STEP_S)
    assert fit_page.verdict.text() == "Fits"

    train_page = window.pages["train"]
    train_page.findChild(object, "preset_quick_test").click()
    train_page.form.editors["max_length"].setValue(64)
    train_page.form.editors["micro_batch_size"].setValue(2)
    train_page.form.editors["learning_rate"].setValue(1e-2)
    window.start_action.trigger()
    monitor = window.pages["monitor"]
    qtbot.waitUntil(lambda: monitor.state.step >= 1, timeout=STEP_S)
    with qtbot.waitSignal(session.training.exited, timeout=STEP_S):
        window.stop_action.trigger()
    monitor.redraw()
    assert monitor.state.status == "stopped" and monitor.state.step < 40
    assert monitor.resume_button.isEnabled()

    with qtbot.waitSignal(session.training.exited, timeout=STEP_S):
        monitor.resume_button.click()
    monitor.redraw()
    assert monitor.state.status == "finished", monitor.log.toPlainText()[-2000:]
    assert list(monitor.state.series["loss"].x) == list(range(1, 41))
    assert monitor.stat_values["step"].text() == "40 / 40", "the real engine's total reaches the Monitor"
    drift_steps = list(monitor.state.series["drift"].x)
    assert drift_steps[0] == 0 and drift_steps[-1] == 40 and monitor.state.drift > 0, "drift at each evaluation"
    assert monitor.stat_values["drift"].text() == formatting.number(monitor.state.drift)
    assert "0 is the base itself" in monitor.banner.label.text()
    screenshot(window, "whole-run-monitor")

    window.show_page("runs")
    runs = window.pages["runs"]
    runs.refresh()
    row = next(r for r in range(runs.table.rowCount()) if runs.table.item(r, 0).text() == session.run_dir.name)
    assert runs.table.item(row, 3).text() == "40 / 40", "the Runs page reads the total the real engine sends"
    assert runs.table.item(row, COLUMNS.index("Drift")).text() == formatting.number(monitor.state.drift)
    screenshot(window, "whole-run-runs")

    window.show_page("chat")
    chat = window.pages["chat"]
    with qtbot.waitSignal(chat.engine.chat_ready, timeout=STEP_S):
        chat.load_button.click()
    chat.max_tokens.setValue(8)
    chat.prompt.setText("Who is the mayor number 3?")
    chat.send_button.click()
    qtbot.waitUntil(lambda: chat.send_button.isEnabled(), timeout=STEP_S)
    assert not chat.banner.isVisible()  # a random tiny model may answer with nothing; no error is the point
    assert [len(chat.transcripts[which]) for which in ("base", "tuned")] == [1, 1]
    screenshot(window, "whole-run-chat")
    chat.shutdown()

    window.show_page("export")
    export_page = window.pages["export"]
    with qtbot.waitSignal(export_page.engine.exited, timeout=STEP_S):
        export_page.export_button.click()
    assert "Exported and verified" in export_page.banner.label.text(), export_page.banner.label.text()
    assert (Path(export_page.result_path) / "adapter_config.json").is_file()
    screenshot(window, "whole-run-export")
