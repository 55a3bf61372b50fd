"""The Fit page's offer to spend spare memory on precision: the bits it buys, the error it removes (the real engine's
`precision` command on a tiny model), the budget set with one click and the estimate modelling it."""
from __future__ import annotations

import sys

from PySide6.QtWidgets import QScrollArea
from test_pages import plan_for_gib

from qlora_engine.protocol.queries import ModelInfo, PrecisionPlanReport

GIB = 2**30


def test_spare_memory_is_offered_for_precision_and_one_click_sets_the_budget(window, qtbot, screenshot):
    window.show_page("fit")
    plan_for_gib(qtbot, window, 8)
    offer = window.pages["fit"].precision
    qtbot.waitUntil(lambda: offer.isVisible() and offer.use_button.isEnabled(), timeout=10_000)
    assert "bits per weight" in offer.title.text() and offer.bits > 4.2
    offer.spend_gib.setValue(0.005)  # a small part of the spare: a budget just above plain 4-bit
    qtbot.waitUntil(lambda: offer.use_button.isEnabled() and "0.005 GiB" in offer.use_button.text(), timeout=10_000)
    small_bits = offer.bits
    assert 4.13 < small_bits < 5
    screenshot(window, "fit-precision-offer")
    offer.use_button.click()
    assert window.session.config.precision_budget_bits == round(small_bits, 2)
    page = window.pages["fit"]
    qtbot.waitUntil(lambda: page.table.item(0, 0) is not None
                    and page.table.item(0, 0).text() == "Linear weights (precision budget)", timeout=10_000)
    qtbot.waitUntil(lambda: offer.use_button.text() == "Back to plain 4-bit", timeout=10_000)
    screenshot(window, "fit-precision-set")
    offer.use_button.click()
    assert window.session.config.precision_budget_bits == 0


def test_measuring_shows_the_error_the_budget_removes(window, qtbot, tiny_model_dir, screenshot):
    window.session.engine.engine_command = [sys.executable, "-m", "qlora_engine"]  # the real engine from here on
    window.show_page("fit")
    window.session.update_config(model=str(tiny_model_dir))
    window.session.set_model_info(ModelInfo(path=str(tiny_model_dir), source="folder", original=str(tiny_model_dir),
                                            architecture="LlamaForCausalLM"))
    plan_for_gib(qtbot, window, 8)
    offer = window.pages["fit"].precision
    qtbot.waitUntil(lambda: offer.isVisible() and offer.measure_button.isEnabled(), timeout=10_000)
    offer.spend_gib.setValue(offer.spend_gib.maximum())  # more than the tiny model can use: every matrix 16-bit
    qtbot.waitUntil(lambda: offer.measure_button.isEnabled() and offer.bits == 16.0, timeout=10_000)
    offer.measure_button.click()
    qtbot.waitUntil(lambda: "less" in offer.result.text(), timeout=120_000)
    report = offer.report
    assert isinstance(report, PrecisionPlanReport)
    assert report.relative_error < 0.01 < report.plain_relative_error and report.counts == {"16bit": 14}
    screenshot(window, "fit-precision-measured")


def test_the_adapter_group_offers_the_starts_and_variants_with_one_line_tooltips(window, screenshot):
    window.show_page("train")
    form = window.pages["train"].form
    for name in ("init_lora", "loftq_iters", "use_dora", "use_rslora", "precision_budget_bits"):
        first_line = form.editors[name].toolTip().splitlines()[0]
        assert len(first_line) < 140 and ("cost" in first_line or "free" in first_line or "slower" in first_line
                                          or "load" in first_line)
    start = form.editors["init_lora"]
    assert [start.itemText(i) for i in range(start.count())] == ["default", "loftq", "pissa", "olora"]
    start.setCurrentText("pissa")
    assert window.session.config.init_lora == "pissa"
    window.pages["train"].findChild(QScrollArea).ensureWidgetVisible(form.editors["precision_budget_bits"])
    screenshot(window, "train-adapter-options")
