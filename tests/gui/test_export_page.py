"""The Export page's GGUF side, driven in the real window with the real engine on a tiny random Llama run (SmolLM2's
tokenizer, which llama.cpp's converter recognizes): the quantization picker's sizes and needs before anything starts,
the export and llama.cpp's check per file, Add to LM Studio, the Ollama command, the GGUF LoRA; not enough disk, and
an export the engine refuses. Each GGUF export of the tiny run takes well under a minute on a CPU.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")

from PySide6.QtGui import QGuiApplication  # noqa: E402
from tiny_models import build_gguf_ready_model, run_engine, save_smollm2_tokenizer, train_gguf_ready_run  # noqa: E402

from app.formatting import size  # noqa: E402
from app.main import create_window  # noqa: E402
from qlora_engine.planning import gguf_plan  # noqa: E402
from qlora_engine.planning.model_shape import load_model_config  # noqa: E402
from qlora_engine.products import llama_cpp_tools  # noqa: E402

EXPORT_MS = 600_000  # a GGUF export of the tiny run: merge, the merged model's answers, conversion, checks
PLAN_MS = 30_000


@pytest.fixture(scope="module")
def gguf_run(tmp_path_factory) -> Path:
    llama_cpp_tools.ensure_converter()  # as after a first export: the needs line can say what the converter knows
    folder = tmp_path_factory.mktemp("gguf-page-run")
    tokenizer_dir = save_smollm2_tokenizer(folder / "tokenizer")
    return train_gguf_ready_run(folder, build_gguf_ready_model(folder / "model", tokenizer_dir))


@pytest.fixture
def real_window(qtbot, qapp, monkeypatch):
    monkeypatch.delenv("QLORA_STUDIO_ENGINE", raising=False)
    window = create_window(qapp)  # the real `python -m qlora_engine`
    window.resize(1280, 900)
    qtbot.addWidget(window)
    window.show()
    yield window
    for page in window.pages.values():
        if hasattr(page, "shutdown"):
            page.shutdown()
    window.session.engine.shutdown()


def open_gguf_export(window, qtbot, run_dir: Path | None, kind: str = "gguf"):
    window.session.select_run(run_dir)
    window.show_page("export")
    page = window.pages["export"]
    page.findChild(object, f"kind_{kind}").setChecked(True)
    if run_dir is not None:
        qtbot.waitUntil(lambda: page.needs is not None or page.plan_error is not None, timeout=PLAN_MS)
        assert page.plan_error is None, page.plan_error
    return page


def pick_quants(page, qtbot, quants: list[str]) -> None:
    for quant, box in page.quant_boxes.items():
        box.setChecked(quant in quants)
    qtbot.waitUntil(lambda: page.needs is not None and list(page.needs.plan.file_bytes) == quants, timeout=PLAN_MS)


def table_column(table, column: int) -> list[str]:
    return [table.item(row, column).text() for row in range(table.rowCount())]


def test_without_a_run_nothing_can_be_exported(real_window, screenshot):
    page = open_gguf_export(real_window, None, None)
    assert "No run chosen" in page.run_label.text()
    assert not page.export_button.isEnabled() and page.plan_table.rowCount() == 0
    assert not page.gguf_plan_box.isVisible() and not page.results.isVisible()  # nothing to plan for
    screenshot(real_window, "export-gguf-empty")


def test_sizes_and_needs_before_the_export_then_llama_cpps_check_per_file(real_window, qtbot, gguf_run, tmp_path,
                                                                          monkeypatch, screenshot):
    page = open_gguf_export(real_window, qtbot, gguf_run)
    pick_quants(page, qtbot, ["f16", "q4_k_m"])
    expected = gguf_plan.plan_for_config(load_model_config(gguf_run.parent / "model"), ["f16", "q4_k_m"])
    assert table_column(page.plan_table, 0) == [f"{gguf_run.name}-f16.gguf", f"{gguf_run.name}-q4_k_m.gguf"]
    assert table_column(page.plan_table, 1) == [f"≈ {n / 2**20:.0f} MiB" for n in expected.file_bytes.values()]
    assert "≥ 90% of prompts" in page.plan_table.item(0, 2).text()
    needs = page.needs_label.text()
    assert f"{size(page.needs.plan.disk_bytes)} of disk" in needs and "free on the drive of" in needs
    assert f"{size(page.needs.plan.ram_bytes)} of RAM" in needs
    assert "llama.cpp's converter knows LlamaForCausalLM" in needs
    assert not page.needs_banner.isVisible() and page.export_button.isEnabled()
    screenshot(real_window, "export-gguf-plan")

    with qtbot.waitSignal(page.engine.exited, timeout=EXPORT_MS):
        page.export_button.click()
    results = page.results.shown
    assert [r.quant for r in results] == ["f16", "q4_k_m"] and all(r.ok for r in results), \
        [r.problems for r in results]
    assert all(Path(r.path).is_file() for r in results)
    assert "Exported and verified by llama.cpp: 2 files" in page.banner.label.text()
    assert table_column(page.results.table, 6) == ["kept, verified", "kept, verified"]
    assert table_column(page.results.table, 2)[0] == f"{100 * results[0].greedy_agreement:.0f}% of " \
                                                     f"{results[0].prompts} (needs 90%)"
    assert table_column(page.results.table, 2)[1].endswith("(reported)")
    assert "vs" in table_column(page.results.table, 4)[0]  # the GGUF's perplexity next to the merged model's
    picked = page.results.picked()
    assert picked.quant == "q4_k_m" and page.results.command.text() == picked.ollama_command
    assert page.results.command.text().startswith("ollama create ") and Path(picked.modelfile).is_file()
    assert page.results.ollama_button.isVisible() == bool(gguf_plan.shutil.which("ollama"))
    page.results.copy_button.click()
    assert QGuiApplication.clipboard().text() == picked.ollama_command
    qtbot.waitUntil(lambda: not page.is_planning(), timeout=PLAN_MS)  # the plan after the export (merged is there)
    screenshot(real_window, "export-gguf-done")

    monkeypatch.setenv("QLORA_STUDIO_LMSTUDIO_MODELS", str(tmp_path / "lmstudio"))
    page.results.lm_studio_button.click()
    qtbot.waitUntil(lambda: not page.results.is_adding(), timeout=PLAN_MS)
    placed = tmp_path / "lmstudio" / "qlora-studio" / gguf_run.name / Path(picked.path).name
    assert placed.is_file() and os.path.samefile(placed, picked.path)  # hard-linked: no second copy
    assert "Added to LM Studio" in page.banner.label.text() and str(placed) in page.banner.label.text()

    real_window.session.select_run(None)  # reopened later: the stored check is shown again
    real_window.session.select_run(gguf_run)
    assert [r.quant for r in page.results.shown] == ["f16", "q4_k_m"] and page.results.isVisible()


def test_a_file_that_failed_its_check_shows_why_and_offers_nothing(real_window, qtbot, gguf_run, tmp_path,
                                                                    screenshot):
    """The engine keeps no file that misses its bar and stores why; the page shows the stored record (a real one,
    with its problem as gguf_verify words it) and offers no action on it."""
    record = gguf_run / "exports" / "gguf-verification.json"
    if not record.is_file():
        run_engine("export", str(gguf_run), "--gguf", "--quant", "f16")
    stored = json.loads(record.read_text())
    failed = {**stored[0], "quant": "q8_0", "path": str(tmp_path / "run-q8_0.gguf"), "ok": False, "modelfile": "",
              "ollama_command": "", "greedy_agreement": 0.5,
              "problems": ["greedy answers agree on 50% of prompts (at least 90%)"]}
    record.write_text(json.dumps([*stored, failed]))
    try:
        page = open_gguf_export(real_window, qtbot, gguf_run)
        assert page.results.table.item(len(stored), 6).text() == "not kept"
        page.results.table.selectRow(len(stored))
        assert "q8_0 was not kept:</b> greedy answers agree on 50% of prompts (at least 90%)" in \
            page.results.problems_label.text() and page.results.problems_label.isVisible()
        assert not page.results.lm_studio_button.isEnabled() and not page.results.command.isVisible()
        page.scroll.ensureWidgetVisible(page.results.problems_label)
        screenshot(real_window, "export-gguf-failed-check")
    finally:
        record.write_text(json.dumps(stored))


def test_the_adapter_as_a_gguf_lora_shows_the_llama_cpp_command(real_window, qtbot, gguf_run, screenshot):
    page = open_gguf_export(real_window, qtbot, gguf_run, kind="gguf-lora")
    assert not page.quant_picker.isVisible() and list(page.needs.plan.file_bytes) == ["f16"]
    assert table_column(page.plan_table, 0) == [f"{gguf_run.name}-base-f16.gguf  (+ the LoRA)"]
    with qtbot.waitSignal(page.engine.exited, timeout=EXPORT_MS):
        page.export_button.click()
    result = page.results.shown[-1]
    assert result.ok and Path(result.path).is_file() and Path(result.base_path).is_file(), result.problems
    assert page.results.command.text() == f"llama-cli -m {result.base_path} --lora {result.path}"
    assert not page.results.lm_studio_button.isEnabled()  # a LoRA alone is not a model LM Studio can load
    screenshot(real_window, "export-gguf-lora")


def test_too_little_disk_is_said_before_the_export_with_advice(real_window, qtbot, gguf_run, monkeypatch,
                                                               screenshot):
    monkeypatch.setattr(gguf_plan, "free_disk_bytes", lambda folder: 3 * 2**20)  # the page's plan runs in-process
    page = open_gguf_export(real_window, qtbot, gguf_run)
    pick_quants(page, qtbot, ["f16", "q8_0", "q4_k_m"])
    text = page.needs_banner.label.text()
    assert page.needs_banner.isVisible() and "Not enough room" in text
    assert f"needs about {gguf_plan.size_text(page.needs.plan.disk_bytes)} on the drive" in text
    assert "3 MiB is free" in text and "Free disk space" in text and "fewer quantizations" in text
    assert not page.export_button.isEnabled()
    screenshot(real_window, "export-gguf-disk")


def test_an_export_the_engine_refuses_shows_its_error_and_leaves_no_file(real_window, qtbot, tiny_model_dir,
                                                                        tmp_path_factory, screenshot):
    """The tiny test tokenizer is not one llama.cpp's converter knows: the real engine stops with advice."""
    run_dir = train_gguf_ready_run(tmp_path_factory.mktemp("unreadable-tokenizer"), tiny_model_dir)
    page = open_gguf_export(real_window, qtbot, run_dir)
    with qtbot.waitSignal(page.engine.exited, timeout=EXPORT_MS):
        page.export_button.click()
    text = page.banner.label.text()
    assert page.banner.isVisible() and "gguf_tokenizer_unsupported" in text and "What to do" in text
    assert page.progress.format() == "Failed"
    assert not list((run_dir / "exports" / "gguf").glob("*.gguf"))
    screenshot(real_window, "export-gguf-error")
