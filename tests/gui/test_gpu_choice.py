"""The "Plan for" GPU choice (app/widgets/gpu_choice.py) as the Fit page and the Model page's catalog use it: the
detected card training would use picked first, the typed amount of free memory, kept in the settings."""
from __future__ import annotations

from app import settings
from qlora_engine.planning import hardware

GIB = 2**30


def card(index: int, free_gib: float) -> hardware.GpuInfo:
    return hardware.GpuInfo(index=index, name=f"NVIDIA GeForce RTX 309{index}", uuid=f"GPU-{index}",
                            total_bytes=24 * GIB, free_bytes=int(free_gib * GIB),
                            used_bytes=int((24 - free_gib) * GIB), compute_capability=(8, 6), bf16_supported=True)


def test_both_pages_plan_for_the_card_training_would_use_and_for_a_typed_amount(window, qtbot, screenshot,
                                                                                monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # training's cuda:0 is the second card
    window.session.set_gpu_report(hardware.GpuReport(gpus=[card(0, 20.0), card(1, 10.5)], driver_version="550.54",
                                                     cuda_driver_version="12.4"))
    fit, catalog = window.pages["fit"].plan_for, window.pages["model"].catalog.plan_for
    for choice in (fit, catalog):
        assert [choice.target.itemData(i) for i in range(choice.target.count())] == [0, 1, "custom"]
        assert choice.target.currentData() == 1
        assert choice.target.currentText() == "GPU 1: NVIDIA GeForce RTX 3091 (10.50 GiB free of 24.00 GiB)"
        assert choice.free_and_total_bytes() == (int(10.5 * GIB), 24 * GIB)
        assert choice.description() == "GPU 1: NVIDIA GeForce RTX 3091"
    # while a detected card is picked, the typed amount is greyed out on the Fit page and hidden in the catalog
    assert not fit.custom_gib.isEnabled() and not fit.custom_gib.isHidden()
    assert catalog.custom_gib.isHidden()
    window.show_page("fit")
    qtbot.waitUntil(lambda: "of 10.50 GiB free" in window.pages["fit"].headline.text(), timeout=10_000)
    screenshot(window, "fit-plan-for-gpu")
    window.show_page("model")
    qtbot.waitUntil(lambda: "GPU 1: NVIDIA GeForce RTX 3091 (10.50 GiB free)" in
                    window.pages["model"].catalog.settings_note.text(), timeout=10_000)
    screenshot(window, "model-catalog-plan-for-gpu")

    with qtbot.waitSignal(catalog.choice_changed):
        catalog.target.setCurrentIndex(catalog.target.findData("custom"))
    assert not catalog.custom_gib.isHidden() and catalog.description() == "a GPU with 12 GiB free"
    with qtbot.waitSignal(catalog.custom_changed):
        catalog.custom_gib.setValue(20)
    assert catalog.free_and_total_bytes() == (20 * GIB, None)
    assert float(settings.store().value("model/catalog_gib")) == 20.0
    assert fit.target.currentData() == 1  # each page keeps its own choice
    fit.target.setCurrentIndex(fit.target.findData("custom"))
    assert fit.custom_gib.isEnabled() and fit.free_and_total_bytes() == (8 * GIB, None)  # its own amount


def test_without_a_gpu_both_pages_plan_for_the_typed_amount(window):
    window.session.set_gpu_report(hardware.GpuReport(gpus=[], driver_version="", cuda_driver_version=""))
    fit, catalog = window.pages["fit"].plan_for, window.pages["model"].catalog.plan_for
    assert fit.target.count() == 1 and fit.target.currentText() == "Another GPU, with this much free memory:"
    assert catalog.target.count() == 1 and catalog.target.currentText() == "A GPU with this much free memory:"
    assert fit.custom_gib.isEnabled() and not catalog.custom_gib.isHidden()
    assert fit.chosen_gpu() is None and catalog.free_and_total_bytes() == (12 * GIB, None)
