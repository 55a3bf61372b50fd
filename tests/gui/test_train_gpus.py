"""Several GPUs in the GUI: the Train page's GPUs field (nproc) from the detected cards; the Fit page's per-card
estimate and its word on sharding when no single card holds the run."""
from __future__ import annotations

import dataclasses

from PySide6.QtWidgets import QLabel, QPushButton

from qlora_engine.planning import hardware
from qlora_engine.planning.memory import estimate_peak
from qlora_engine.planning.model_shape import resolve_model_config

GIB = 2**30


def card(index: int, free_gib: float) -> hardware.GpuInfo:
    return hardware.GpuInfo(index=index, name="NVIDIA GeForce RTX 3090", uuid=f"GPU-{index}", total_bytes=24 * GIB,
                            free_bytes=int(free_gib * GIB), used_bytes=int((24 - free_gib) * GIB),
                            compute_capability=(8, 6), bf16_supported=True)


def two_cards(window, free_gib: float = 23.0) -> None:
    window.session.set_gpu_report(hardware.GpuReport(gpus=[card(0, free_gib), card(1, free_gib)],
                                                     driver_version="550.54", cuda_driver_version="12.4"))


def test_train_page_gpus_field_lists_the_detected_cards_and_sets_nproc(window, qtbot, screenshot):
    window.show_page("train")
    page = window.pages["train"]
    assert page.gpus.count() == 1 and not page.gpus.isEnabled()  # the test machine: no GPU, one CPU process
    two_cards(window)
    assert [page.gpus.itemData(i) for i in range(page.gpus.count())] == [1, 2] and page.gpus.isEnabled()
    assert "0: NVIDIA GeForce RTX 3090, 1: NVIDIA GeForce RTX 3090" in page.gpus.itemText(1)
    page.gpus.setCurrentIndex(1)
    page.gpus.activated.emit(1)  # what a click on the entry sends
    assert window.session.config.nproc == 2
    qtbot.waitUntil(lambda: "2 processes (ddp)" in page.summary.text(), timeout=5_000)
    assert page.form.editors["nproc"].value() == 2  # the option in the form follows the field
    screenshot(window, "train-gpus")


def test_fit_page_says_sharding_is_needed_when_no_single_card_holds_the_run(window, qtbot, screenshot):
    two_cards(window, free_gib=0.9)
    window.show_page("fit")
    page = window.pages["fit"]
    page.target.setCurrentIndex(page.target.findData(0))
    qtbot.waitUntil(lambda: not page.is_estimating() and page.verdict.text() != "—", timeout=10_000)
    qtbot.waitUntil(lambda: "Sharding is needed" in page.limits.text(), timeout=10_000)
    assert "split over the 2 cards (parallel: fsdp)" in page.limits.text()
    screenshot(window, "fit-sharding")
    window.session.update_config(nproc=2)
    page.update_estimate()
    qtbot.waitUntil(lambda: "per card (2 processes, ddp)" in page.headline.text(), timeout=10_000)


def test_fit_page_offers_sharding_as_one_click_where_the_run_fits_two_cards_and_not_one(window, qtbot, screenshot):
    config = window.session.config
    model = resolve_model_config(config.model)
    whole = estimate_peak(model, config).peak_bytes
    split = estimate_peak(model, dataclasses.replace(config, nproc=2, parallel="fsdp")).peak_bytes
    two_cards(window, free_gib=(whole + split) / 2 / GIB)
    window.show_page("fit")
    page = window.pages["fit"]
    page.target.setCurrentIndex(page.target.findData(0))
    qtbot.waitUntil(lambda: "it fits on 2 cards" in page.limits.text(), timeout=10_000)
    assert page.verdict.text() == "Won't fit"

    def shard_buttons() -> list[QPushButton]:
        return [b for b in page.findChildren(QPushButton, "apply_fix") if b.isVisible()
                and "shard the 4-bit weights over the 2 cards" in b.parent().findChild(QLabel).text()]
    qtbot.waitUntil(lambda: bool(shard_buttons()), timeout=5_000)
    screenshot(window, "fit-sharding-fix")
    shard_buttons()[0].click()
    config = window.session.config
    assert (config.nproc, config.parallel, config.optimizer) == (2, "fsdp", "adamw")
    qtbot.waitUntil(lambda: "per card (2 processes, fsdp)" in page.headline.text(), timeout=10_000)
    assert page.verdict.text() != "Won't fit"
