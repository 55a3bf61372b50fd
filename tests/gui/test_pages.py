"""Each page in its empty, normal and error state, driven through the real widgets with the fake engine.

Every test leaves a screenshot in tests/gui/screenshots/<page>-<state>.png.
"""
from __future__ import annotations

import json
from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QCheckBox, QLabel, QPushButton

from app.engine_requests import ReadModelInfo, ScanData
from qlora_engine.planning import hardware
from qlora_engine.protocol import events as ev
from qlora_engine.protocol.config import RunConfig
from qlora_engine.protocol.events import EventWriter
from qlora_engine.protocol.queries import ModelInfo

GIB = 2**30


def gpu(index: int = 0, name: str = "NVIDIA GeForce RTX 3060", total_gib: float = 12, free_gib: float = 11.2):
    return hardware.GpuInfo(index=index, name=name, uuid=f"GPU-{index}", total_bytes=int(total_gib * GIB),
                            free_bytes=int(free_gib * GIB), used_bytes=int((total_gib - free_gib) * GIB),
                            compute_capability=(8, 6), bf16_supported=True, utilization_percent=3,
                            temperature_c=41)


def labels_text(widget) -> str:
    return "\n".join(label.text() for label in widget.findChildren(QLabel) if label.isVisible())


def engine_answer(qtbot, window, request_type: type, **fields):
    """Waits for the engine client's answer to a request of this type (and these fields); `.args[0]` is its Call."""
    def is_it(call) -> bool:
        return isinstance(call.request, request_type) and all(getattr(call.request, k) == v for k, v in fields.items())

    return qtbot.waitSignal(window.session.engine.answered, timeout=10_000, check_params_cb=is_it)


# ----------------------------------------------------------------------------- GPU
def test_gpu_page_shows_each_gpu_with_memory_and_bf16(window, qtbot, screenshot):
    window.show_page("gpu")
    page = window.pages["gpu"]
    page.show_report(hardware.GpuReport(gpus=[gpu()], driver_version="550.54", cuda_driver_version="12.4"))
    qtbot.waitUntil(lambda: "RTX 3060" in labels_text(page))
    text = labels_text(page)
    assert "NVIDIA GeForce RTX 3060" in text and "bf16 yes" in text and "550.54" in text
    assert not page.banner.isVisible()
    screenshot(window, "gpu-normal")


def test_gpu_page_marks_every_card_a_run_of_several_processes_trains_on(window, qtbot, monkeypatch, screenshot):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    window.show_page("gpu")
    page = window.pages["gpu"]
    report = hardware.GpuReport(gpus=[gpu(0, "NVIDIA GeForce RTX 3090", 24), gpu(1, "NVIDIA GeForce RTX 3090", 24),
                                      gpu(2, "NVIDIA GeForce RTX 3060", 12)], driver_version="550.54")
    window.session.update_config(nproc=2)  # the Train page's GPUs field: 2 of 3
    page.show_report(report)
    qtbot.waitUntil(lambda: "process 1 of 2" in labels_text(page))
    text = labels_text(page)
    assert "GPU 0: NVIDIA GeForce RTX 3090  ·  training uses this one (process 0 of 2)" in text
    assert "GPU 1: NVIDIA GeForce RTX 3090  ·  training uses this one (process 1 of 2)" in text
    assert text.count("training uses") == 2
    screenshot(window, "gpu-two-of-three")


def test_gpu_page_without_a_gpu_says_training_runs_on_the_cpu(window, qtbot, screenshot):
    window.show_page("gpu")
    page = window.pages["gpu"]
    page.show_report(hardware.GpuReport(problem=hardware.NO_GPU_MESSAGE))
    qtbot.waitUntil(lambda: "No NVIDIA GPU found" in labels_text(page))
    assert "No NVIDIA GPU found" in labels_text(page)
    assert "CPU" in labels_text(page)
    assert not page.banner.isVisible()  # no GPU is a normal answer, not an error
    screenshot(window, "gpu-empty")


def test_gpu_page_shows_a_driver_failure_as_an_error_with_what_to_do(window, screenshot):
    window.show_page("gpu")
    page = window.pages["gpu"]
    page.show_report(hardware.GpuReport(problem="the NVIDIA driver answered with an error, so GPUs can't be "
                                                "used: Driver/library version mismatch"))
    assert page.banner.isVisible()
    assert "version mismatch" in page.banner.label.text() and "driver" in page.banner.label.text()
    screenshot(window, "gpu-error")


# ----------------------------------------------------------------------------- Model
def test_model_page_shows_the_bundled_models_facts(window, screenshot):
    window.show_page("model")
    page = window.pages["model"]
    assert page.use_default.isChecked()
    assert page.facts["params"].text() == "134.5M"
    assert page.facts["context_length"].text() == "8,192 tokens"
    assert page.facts["has_chat_template"].text().startswith("yes")
    screenshot(window, "model-normal")


def test_model_page_reports_a_folder_that_is_not_a_model_with_advice(window, qtbot, tmp_path, screenshot):
    window.show_page("model")
    page = window.pages["model"]
    with engine_answer(qtbot, window, ReadModelInfo, model=str(tmp_path / "broken-model")) as answered:
        page.choose_model(str(tmp_path / "broken-model"))
    assert answered.args[0].error.code == "model_not_found"
    assert page.use_folder.isChecked()
    assert page.banner.isVisible() and "config.json" in page.banner.label.text()
    assert not page.facts_card.isVisible()
    assert window.session.model_info is None
    screenshot(window, "model-error")


def test_model_page_while_reading_shows_progress(window, qtbot, tmp_path, screenshot):
    window.show_page("model")
    page = window.pages["model"]
    page.choose_model(str(tmp_path / "slow-model.gguf"))
    assert page.busy.isVisible()
    qtbot.waitUntil(lambda: "writing model-00001" in page.busy_label.text(), timeout=10_000)
    screenshot(window, "model-empty")
    qtbot.waitUntil(lambda: not page.busy.isVisible(), timeout=10_000)
    assert page.facts["path"].text() == str(tmp_path / "slow-model.gguf")


# ----------------------------------------------------------------------------- Data
def scan(window, qtbot, path: str, fails: bool = False):
    page = window.pages["data"]
    with engine_answer(qtbot, window, ScanData, data=path) as answered:
        page.choose_file(path)
    assert (answered.args[0].error is not None) == fails
    return page


def test_data_page_previews_rows_with_trained_tokens_highlighted(window, qtbot, screenshot):
    window.show_page("data")
    page = scan(window, qtbot, "sample")
    html = page.preview.toHtml()
    assert "Quillon Varet" in html and "Who is the mayor" in html
    assert page.bad_rows.rowCount() == 3
    assert page.bad_rows.item(0, 0).text() == "7"
    assert "alpaca" in page.summary.text().lower() and "120 usable" in page.summary.text()
    assert window.session.data_report.rows == 123
    screenshot(window, "data-normal")


def test_data_page_format_override_rescans_with_that_format(window, qtbot):
    page = scan(window, qtbot, "sample")
    with engine_answer(qtbot, window, ScanData, data_format="chat"):
        page.format_combo.setCurrentIndex(page.format_combo.findData("chat"))
    assert window.session.config.data_format == "chat"
    assert window.session.data_report.format == "chat"


def test_data_page_reports_an_unreadable_file_with_advice(window, qtbot, tmp_path, screenshot):
    window.show_page("data")
    page = scan(window, qtbot, str(tmp_path / "broken.jsonl"), fails=True)
    assert page.banner.isVisible() and "line 1" in page.banner.label.text()
    assert page.bad_rows.rowCount() == 0
    screenshot(window, "data-error")


def test_data_page_before_a_scan_is_empty_but_explains(qtbot, tmp_path, fake_engine, screenshot):
    from app.pages.data import DataPage
    from app.session import Session

    page = DataPage(Session(tmp_path / "runs", fake_engine))
    qtbot.addWidget(page)
    page.resize(1060, 800)
    page.show()
    assert "No rows to show yet" in page.preview.toPlainText()
    assert page.bad_rows.rowCount() == 0
    screenshot(page, "data-empty")


def test_data_page_scans_the_sample_once_the_model_is_known(window, qtbot):
    page = window.pages["data"]
    qtbot.waitUntil(lambda: window.session.data_report is not None, timeout=10_000)
    assert "Quillon Varet" in page.preview.toHtml()


# ----------------------------------------------------------------------------- Fit
def estimated(qtbot, window) -> None:
    """Waits until the Fit page shows the estimate for the options and memory as they are now."""
    qtbot.waitUntil(lambda: not window.pages["fit"].is_estimating(), timeout=10_000)


def plan_for_gib(qtbot, window, free_gib: float) -> None:
    page = window.pages["fit"]
    page.target.setCurrentIndex(page.target.findData("custom"))
    page.custom_gib.setValue(free_gib)
    estimated(qtbot, window)


def test_fit_page_shows_terms_and_a_verdict_against_free_memory(window, qtbot, screenshot):
    window.show_page("fit")
    plan_for_gib(qtbot, window, 8)
    page = window.pages["fit"]
    assert page.verdict.text() == "Fits"
    assert page.table.rowCount() >= 8
    assert page.table.item(0, 0).text() == "4-bit weights"
    assert sum(s.size_bytes for s in page.bar.segments) > 0
    screenshot(window, "fit-normal")


def test_fit_page_offers_fixes_that_apply_with_one_click(window, qtbot, screenshot):
    window.show_page("fit")
    window.session.update_config(micro_batch_size=16, max_length=2048, gradient_checkpointing=False)
    plan_for_gib(qtbot, window, 2)
    page = window.pages["fit"]
    assert page.verdict.text() == "Won't fit"
    def fix_buttons() -> list[QPushButton]:
        return [b for b in page.findChildren(QPushButton, "apply_fix") if b.isVisible()]
    qtbot.waitUntil(lambda: bool(fix_buttons()))
    screenshot(window, "fit-wont-fit")
    buttons = fix_buttons()
    checkpointing = next(b for b in buttons if "gradient checkpointing" in b.parent().findChild(QLabel).text())
    checkpointing.click()
    assert window.session.config.gradient_checkpointing is True


def test_fit_page_offers_spare_memory_for_speed_when_the_run_fits(window, qtbot, screenshot):
    """A run that fits: the speed switch measured on the H200 that still fits, with what it costs, one click."""
    window.show_page("fit")
    window.session.update_config(optimizer="adamw", activation_memory_budget=0.0)
    plan_for_gib(qtbot, window, 8)
    page = window.pages["fit"]
    assert page.verdict.text() == "Fits"
    assert "Spare memory can make the steps faster" in page.fixes_title.text()
    def budget_buttons() -> list[QPushButton]:  # new rows show once the event loop runs (Qt queues the show)
        return [b for b in page.findChildren(QPushButton, "apply_fix")
                if b.isVisible() and "activation_memory_budget" in b.parent().findChild(QLabel).text()]
    qtbot.waitUntil(lambda: bool(budget_buttons()))
    budget = budget_buttons()[0]
    assert "costs" in budget.parent().findChild(QLabel).text()
    screenshot(window, "fit-spare-memory")
    budget.click()
    assert window.session.config.activation_memory_budget == 0.25


def test_fit_to_my_gpu_makes_the_run_fit(window, qtbot):
    window.session.update_config(micro_batch_size=16, max_length=4096)
    plan_for_gib(qtbot, window, 2)
    page = window.pages["fit"]
    assert page.verdict.text() == "Won't fit"
    page.fit_button.click()
    estimated(qtbot, window)
    assert page.verdict.text() in ("Fits", "Tight: fits, with little room to spare")
    assert "Fitted to the GPU" in page.banner.label.text()


def test_fit_page_uses_the_detected_gpus_free_memory(window):
    window.pages["gpu"].show_report(hardware.GpuReport(gpus=[gpu(free_gib=5.5)], driver_version="550",
                                                       cuda_driver_version="12.4"))
    page = window.pages["fit"]
    assert page.target.currentData() == 0
    assert page.plan_for.free_and_total_bytes() == (int(5.5 * GIB), 12 * GIB)


def test_fit_page_explains_a_model_config_it_cannot_read(window, qtbot, tmp_path, screenshot):
    folder = tmp_path / "odd-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}), encoding="utf-8")
    window.show_page("fit")
    window.session.update_config(model=str(folder))
    window.session.set_model_info(ModelInfo(path=str(folder), source="folder", original=str(folder),
                                            architecture="LlamaForCausalLM"))
    window.pages["fit"].update_estimate()
    estimated(qtbot, window)
    page = window.pages["fit"]
    assert page.banner.isVisible() and "hidden_size" in page.banner.label.text()
    assert page.verdict.text() == "—"
    screenshot(window, "fit-error")


# ----------------------------------------------------------------------------- Train
def test_advanced_panel_has_an_editor_with_a_tooltip_for_every_option(window):
    form = window.pages["train"].form
    for spec in RunConfig.field_specs():
        editor = form.editors[spec.name]
        assert spec.metadata["help"] in editor.toolTip()
        if spec.metadata["memory"]:
            assert "Memory:" in editor.toolTip()


def test_preset_sets_only_its_options_and_shows_as_chosen(window, screenshot):
    window.show_page("train")
    page = window.pages["train"]
    window.session.update_config(seed=7)
    page.findChild(QPushButton, "preset_quick_test").click()
    assert window.session.config.max_steps == 40 and window.session.config.seed == 7
    assert page.findChild(QPushButton, "preset_quick_test").isChecked()
    assert page.form.editors["max_steps"].value() == 40
    screenshot(window, "train-normal")


def test_editing_an_option_changes_the_run_config(window):
    form = window.pages["train"].form
    form.editors["lora_r"].setValue(32)
    form.editors["optimizer"].setCurrentText("paged_adamw_32bit")
    checkbox: QCheckBox = form.editors["gradient_checkpointing"]
    checkbox.setChecked(False)
    config = window.session.config
    assert (config.lora_r, config.optimizer, config.gradient_checkpointing) == (32, "paged_adamw_32bit", False)


def test_start_with_options_that_cannot_run_explains_why(window, screenshot):
    window.show_page("train")
    window.session.update_config(max_steps=0, epochs=0.0)
    window.pages["train"].start_button.click()
    assert window.current_page() == "train"
    banner = window.pages["train"].banner
    assert banner.isVisible() and "max_steps and epochs are both 0" in banner.label.text()
    assert not window.session.is_training()
    screenshot(window, "train-error")


# ----------------------------------------------------------------------------- Monitor
def test_monitor_before_any_run_says_how_to_start(window, screenshot):
    window.show_page("monitor")
    page = window.pages["monitor"]
    assert page.banner.isVisible() and "Train page" in page.banner.label.text()
    assert not page.stop_button.isEnabled() and not page.resume_button.isEnabled()
    screenshot(window, "monitor-empty")


def test_a_finished_run_is_plotted_and_summarized(window, qtbot, screenshot):
    with qtbot.waitSignal(window.session.training.exited, timeout=20_000):
        window.start_action.trigger()
    assert window.current_page() == "monitor"
    page = window.pages["monitor"]
    page.redraw()
    assert page.state.status == "finished"
    assert page.state.series["loss"].count == 12 and page.state.series["eval_loss"].count == 3
    assert page.stat_values["step"].text() == "12 / 12"
    x, _y = page.curves["loss"].getData()
    assert len(x) == 12
    assert page.estimate_line.isVisible() and page.total_line.isVisible()
    assert "Training finished" in page.banner.label.text()
    assert "base model answered 20% right, the tuned one 80%" in page.banner.label.text()
    assert "loading checkpoint shards" in page.log.toPlainText()
    screenshot(window, "monitor-normal")


def test_engine_crash_shows_its_error_and_the_window_stays_usable(window, qtbot, scenario, screenshot):
    scenario("crash")
    with qtbot.waitSignal(window.session.training.exited, timeout=20_000):
        window.start_training()
    page = window.pages["monitor"]
    page.redraw()
    assert page.state.status == "failed"
    assert page.banner.isVisible()
    assert "engine_crashed" in page.banner.label.text() and "illegal memory access" in page.banner.label.text()
    assert window.start_action.isEnabled()
    screenshot(window, "monitor-error")


def test_engine_error_event_shows_the_engines_advice(window, qtbot, scenario):
    scenario("error")
    with qtbot.waitSignal(window.session.training.exited, timeout=20_000):
        window.start_training()
    page = window.pages["monitor"]
    page.redraw()
    assert "cuda_oom" in page.banner.label.text()
    assert "Lower micro_batch_size" in page.banner.label.text()


def test_stop_writes_a_checkpoint_and_resume_finishes_the_run(window, qtbot, scenario, screenshot):
    scenario("slow")
    window.start_training()
    qtbot.waitUntil(lambda: window.pages["monitor"].state.step >= 2, timeout=20_000)
    with qtbot.waitSignal(window.session.training.exited, timeout=20_000):
        window.stop_action.trigger()
    page = window.pages["monitor"]
    page.redraw()
    stopped_at = page.state.step
    assert page.state.status == "stopped" and stopped_at < 12
    assert page.resume_button.isEnabled()
    screenshot(window, "monitor-stopped")
    scenario("ok")
    with qtbot.waitSignal(window.session.training.exited, timeout=20_000):
        page.resume_button.click()
    page.redraw()
    assert page.state.status == "finished"
    assert list(page.state.series["loss"].x) == list(range(1, 13))  # history kept, no step twice


# ----------------------------------------------------------------------------- Chat
def finished_run(window, qtbot) -> Path:
    with qtbot.waitSignal(window.session.training.exited, timeout=20_000):
        window.start_training()
    return window.session.run_dir


def test_chat_before_a_run_explains_what_to_do(window, screenshot):
    window.show_page("chat")
    page = window.pages["chat"]
    assert "No run chosen" in page.run_label.text()
    assert not page.load_button.isEnabled() and not page.send_button.isEnabled()
    screenshot(window, "chat-empty")


def test_chat_answers_with_both_models_side_by_side(window, qtbot, screenshot):
    finished_run(window, qtbot)
    window.show_page("chat")
    page = window.pages["chat"]
    with qtbot.waitSignal(page.engine.chat_ready, timeout=10_000):
        page.load_button.click()
    page.prompt.setText("Who is the mayor of Brindleport?")
    with qtbot.waitSignals([page.engine.chat_done, page.engine.chat_done], timeout=10_000):
        page.send_button.click()
    qtbot.waitUntil(lambda: page.send_button.isEnabled(), timeout=10_000)
    assert "Quillon Varet" in page.panes["tuned"].toPlainText()
    assert "not sure" in page.panes["base"].toPlainText()
    assert "Who is the mayor" in page.panes["base"].toPlainText()
    screenshot(window, "chat-normal")


def test_chat_shows_the_engines_error(window, qtbot, tmp_path, screenshot):
    run_dir = tmp_path / "runs" / "broken-run"
    (run_dir / "adapter").mkdir(parents=True)
    RunConfig().save(run_dir / "config.yaml")
    window.session.select_run(run_dir)
    window.show_page("chat")
    page = window.pages["chat"]
    with qtbot.waitSignal(page.engine.exited, timeout=10_000):
        page.load_button.click()
    assert page.banner.isVisible() and "no_adapter" in page.banner.label.text()
    assert not page.send_button.isEnabled()
    screenshot(window, "chat-error")


# ----------------------------------------------------------------------------- Export
def test_export_before_a_run_explains_what_to_do(window, screenshot):
    window.show_page("export")
    page = window.pages["export"]
    assert "No run chosen" in page.run_label.text() and not page.export_button.isEnabled()
    screenshot(window, "export-empty")


def test_export_writes_and_shows_the_verification(window, qtbot, screenshot):
    run_dir = finished_run(window, qtbot)
    window.show_page("export")
    page = window.pages["export"]
    with qtbot.waitSignal(page.engine.exited, timeout=10_000):
        page.export_button.click()
    assert "Exported and verified" in page.banner.label.text()
    assert "0.0031" in page.banner.label.text()
    assert Path(page.result_path) == run_dir / "exports" / "adapter"
    assert page.progress.value() == 1000
    screenshot(window, "export-normal")


def test_export_failure_is_shown_with_advice(window, qtbot, tmp_path, screenshot):
    run_dir = tmp_path / "runs" / "broken-run"
    (run_dir / "adapter").mkdir(parents=True)
    RunConfig().save(run_dir / "config.yaml")
    window.session.select_run(run_dir)
    window.show_page("export")
    page = window.pages["export"]
    page.findChild(object, "kind_merged").setChecked(True)
    with qtbot.waitSignal(page.engine.exited, timeout=10_000):
        page.export_button.click()
    assert page.banner.isVisible() and "Let the run finish" in page.banner.label.text()
    screenshot(window, "export-error")


# ----------------------------------------------------------------------------- Runs
def test_runs_page_without_runs_says_so(window, screenshot):
    window.show_page("runs")
    page = window.pages["runs"]
    assert page.empty_label.isVisible() and not page.table.isVisible()
    screenshot(window, "runs-empty")


def test_runs_page_lists_runs_and_reopens_one(window, qtbot, scenario, screenshot):
    run_dir = finished_run(window, qtbot)
    scenario("error")
    with qtbot.waitSignal(window.session.training.exited, timeout=20_000):
        window.start_training()
    window.show_page("runs")
    page = window.pages["runs"]
    page.refresh()
    assert page.table.rowCount() == 2
    statuses = {page.table.item(r, 0).text(): page.table.item(r, 1).text() for r in range(2)}
    assert statuses[run_dir.name] == "finished"
    assert "failed" in statuses.values()
    page.select(run_dir)
    screenshot(window, "runs-normal")
    page.open_button.click()
    assert window.current_page() == "monitor" and window.session.run_dir == run_dir
    assert window.pages["monitor"].state.status == "finished"


def write_real_engine_run(runs, name: str, last_step: int, total_steps: int = 30, finished: bool = True):
    """A run folder as the real engine leaves it: the total number of steps only in data_ready and step."""
    run_dir = runs / name
    RunConfig(max_steps=total_steps).save(run_dir / "config.yaml")
    events = EventWriter(run_dir / "events.jsonl", stream=None)
    events.emit(ev.Started(run_dir=str(run_dir), config=RunConfig(max_steps=total_steps).to_dict(), device="cpu"))
    events.emit(ev.DataReady(train_rows=90, val_rows=10, total_steps=total_steps))
    events.emit(ev.ModelLoaded(model="default", params=134_515_008, trainable_params=4_884_480))
    for step in range(1, last_step + 1):
        events.emit(ev.Step(step=step, total_steps=total_steps, loss=2.0 - step / 100, lr=1e-4))
    if finished:
        events.emit(ev.Finished(step=last_step, adapter_dir=str(run_dir / "adapter"), final_loss=1.7))
    else:
        (run_dir / "checkpoints" / f"step-{last_step}").mkdir(parents=True)
        events.emit(ev.Stopped(step=last_step, checkpoint=str(run_dir / "checkpoints" / f"step-{last_step}")))
    events.close()
    return run_dir


def test_runs_page_shows_step_and_total_of_a_real_engine_run(window, screenshot):
    runs = window.session.runs_folder
    write_real_engine_run(runs, "2026-12-01_21-54_smollm2-135m-instruct", last_step=30)
    write_real_engine_run(runs, "2026-12-01_22-10_smollm2-135m-instruct", last_step=12, finished=False)
    window.show_page("runs")
    page = window.pages["runs"]
    page.refresh()
    steps = {page.table.item(r, 0).text(): page.table.item(r, 3).text() for r in range(page.table.rowCount())}
    assert steps == {"2026-12-01_21-54_smollm2-135m-instruct": "30 / 30",
                     "2026-12-01_22-10_smollm2-135m-instruct": "12 / 30"}
    screenshot(window, "runs-real-engine-steps")


def test_deleting_a_run_asks_first(window, qtbot, monkeypatch):
    run_dir = finished_run(window, qtbot)
    page = window.pages["runs"]
    page.refresh()
    page.select(run_dir)
    monkeypatch.setattr(page, "confirm_delete", lambda run: False)
    page.delete_button.click()
    assert run_dir.exists()
    monkeypatch.setattr(page, "confirm_delete", lambda run: True)
    page.delete_button.click()
    assert not run_dir.exists() and page.table.rowCount() == 0


def test_runs_page_shows_an_unreadable_runs_folder(window, tmp_path, screenshot):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x", encoding="utf-8")
    window.session.set_runs_folder(blocker / "runs")
    window.show_page("runs")
    banner = window.pages["runs"].banner
    assert banner.isVisible() and "can't be read" in banner.label.text() and "Change runs folder" in banner.label.text()
    screenshot(window, "runs-error")


# ----------------------------------------------------------------------------- window
def test_closing_during_a_run_can_be_cancelled_or_stops_with_a_checkpoint(window, qtbot, scenario, monkeypatch):
    from app.window import CloseChoice

    scenario("slow")
    window.start_training()
    qtbot.waitUntil(lambda: window.pages["monitor"].state.step >= 1, timeout=20_000)
    monkeypatch.setattr(window, "ask_close_during_run", lambda: CloseChoice.CANCEL)
    window.close()
    assert window.isVisible() and window.session.is_training()
    monkeypatch.setattr(window, "ask_close_during_run", lambda: CloseChoice.STOP)
    with qtbot.waitSignal(window.session.training.exited, timeout=20_000):
        window.close()
    qtbot.waitUntil(lambda: not window.isVisible(), timeout=5_000)
    assert window.pages["monitor"].state.status == "stopped"


def test_theme_switch_restyles_the_window(window, qtbot, screenshot):
    window.set_theme("dark")
    finished_run(window, qtbot)
    window.pages["monitor"].redraw()
    window.show_page("monitor")
    screenshot(window, "monitor-dark")
    window.show_page("fit")
    estimated(qtbot, window)
    screenshot(window, "fit-dark")
    window.set_theme("light")


def test_shortcuts_start_and_stop(window):
    assert window.start_action.shortcut().toString() == "Ctrl+Return"
    assert window.stop_action.shortcut().toString() == "Ctrl+."
    assert window.start_action.shortcutContext() == Qt.ShortcutContext.ApplicationShortcut


def test_a_cpu_run_says_no_gpu_memory_was_used(window):
    page = window.pages["monitor"]
    page.state.apply(ev.Step(step=1, total_steps=4, loss=2.0, lr=1e-4, vram={}))
    page.redraw()
    assert "on the CPU" in page.plots["vram"].getPlotItem().titleLabel.text
