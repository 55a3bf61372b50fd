"""The Model page with the real engine: the catalog against a chosen memory, Hub search and download (progress per
file, cancel, a gated model and the token that opens it, offline), models on disk, and a Hub model's facts before its
download. The Hub is tests/hub_server.py, reached by the engine's real huggingface_hub client through HF_ENDPOINT.

Every state leaves a screenshot in tests/gui/screenshots/model-*.png.
"""
from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
from hub_server import FakeHub, start
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QLabel

from app.formatting import gib
from app.main import create_window
from qlora_engine.planning.catalog import build_catalog

REPO = "tiny-org/tiny-llama"
GATED = "gated-org/tiny-gated"
CATALOG_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # served by the test Hub with the tiny model's files
TOKEN = "hf_secret_token_for_the_gui_test"
GIB = 2**30
WAIT_MS = 180_000  # each answer is an engine process; a busy 2-core machine starts one in seconds, not millis


@pytest.fixture(scope="module")
def fake_hub(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hub-repo") / "tiny-llama"
    shutil.copytree(tiny_model_dir, folder)
    hub, server = start(FakeHub())
    hub.add(REPO, folder)
    hub.add(GATED, folder, gated=True, token=TOKEN)
    hub.add(CATALOG_ID, folder)
    yield hub
    server.shutdown()


@pytest.fixture
def home(tmp_path, monkeypatch, fake_hub) -> Path:
    """The engine's Hub is the test Hub; its HF cache, token file, Ollama and LM Studio folders are under tmp."""
    monkeypatch.delenv("QLORA_STUDIO_ENGINE", raising=False)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "no-ollama"))
    monkeypatch.setenv("QLORA_STUDIO_TOOLS", str(tmp_path / "tools"))
    fake_hub.requests.clear()
    return tmp_path


@pytest.fixture
def page(qtbot, qapp, home, tiny_model_dir):
    window = create_window(qapp)  # the real `python -m qlora_engine`
    window.resize(1280, 840)
    qtbot.addWidget(window)
    window.show()
    window.show_page("model")
    page = window.pages["model"]
    page.choose_model(str(tiny_model_dir))  # not the bundled default: its first import takes a minute
    qtbot.waitUntil(lambda: window.session.model_info is not None, timeout=WAIT_MS)
    page.window_ = window
    yield page
    for each in window.pages.values():
        if hasattr(each, "shutdown"):
            each.shutdown()
    window.session.engine.shutdown()


def column(table, index: int) -> list[str]:
    return [table.item(row, index).text() for row in range(table.rowCount())]


def select(table, text: str) -> None:
    row = column(table, 0).index(text)
    table.selectRow(row)


def snapshot_files(home: Path, repo_id: str) -> set[str]:
    snapshots = home / "hf" / "hub" / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return {p.name for p in snapshots.rglob("*") if p.is_file() or p.is_symlink()} if snapshots.is_dir() else set()


# ----------------------------------------------------------------------------- what fits this GPU
def test_the_catalog_shows_what_fits_a_chosen_memory_what_fits_first(page, qtbot, screenshot):
    catalog = page.catalog
    page.tabs.setCurrentWidget(catalog)
    catalog.target.setCurrentIndex(catalog.target.findData("custom"))
    catalog.custom_gib.setValue(12)
    qtbot.waitUntil(lambda: catalog.catalog is not None and catalog.catalog.free_bytes == 12 * GIB, timeout=WAIT_MS)
    expected = build_catalog(page.session.config, 12 * GIB, "")
    assert catalog.table.rowCount() == len(expected.entries) == 30
    assert column(catalog.table, 3) == [gib(row.peak_bytes) for row in expected.entries]
    assert column(catalog.table, 4)[0] == f"{expected.entries[0].max_length_batch1:,} tokens"
    order = {"Fits": 0, "Tight": 1, "Won't fit": 2}
    verdicts = [order[text] for text in column(catalog.table, 6)]
    assert verdicts == sorted(verdicts) and verdicts[0] == 0 and verdicts[-1] == 2
    assert "12 GiB free" in catalog.settings_note.text() and "Nothing is downloaded" in catalog.settings_note.text()
    screenshot(page.window_, "model-catalog")

    before = catalog.catalog.entries[0]
    page.session.update_config(max_length=4096)
    qtbot.waitUntil(lambda: catalog.catalog.settings["max_length"] == 4096, timeout=WAIT_MS)
    after = next(row for row in catalog.catalog.entries if row.hub_id == before.hub_id)
    assert after.peak_bytes > before.peak_bytes, "the catalog follows the Train page's settings"


def test_picking_a_catalog_row_downloads_it_and_makes_it_the_runs_model(page, qtbot, home):
    catalog = page.catalog
    qtbot.waitUntil(lambda: catalog.catalog is not None, timeout=WAIT_MS)
    select(catalog.table, "SmolLM2 135M Instruct")
    catalog.download_button.click()
    qtbot.waitUntil(lambda: page.session.model_info is not None and page.session.model_info.original == CATALOG_ID,
                    timeout=WAIT_MS)
    assert page.session.config.model == CATALOG_ID and page.session.model_info.downloaded
    assert "model.safetensors" in page.files_seen and "tokenizer.json" in page.files_seen
    assert "model.safetensors" in snapshot_files(home, CATALOG_ID)
    row = column(catalog.table, 0).index("SmolLM2 135M Instruct")
    qtbot.waitUntil(lambda: catalog.table.item(column(catalog.table, 0).index("SmolLM2 135M Instruct"), 7).text()
                    == "yes", timeout=WAIT_MS)
    assert row >= 0 and page.banner.isVisible() and "is in the HF cache" in page.banner.label.text()


# ----------------------------------------------------------------------------- the Hub
def test_hub_search_empty_then_results_then_a_download_cancelled_and_resumed(page, qtbot, home, fake_hub,
                                                                            screenshot):
    hub = page.hub
    page.tabs.setCurrentWidget(hub)
    qtbot.waitUntil(lambda: hub.token_status.text().startswith("Token: none"), timeout=WAIT_MS)
    assert hub.state.isVisible() and not hub.table.isVisible()
    screenshot(page.window_, "model-hub-empty")

    hub.search_edit.setText("zzz")
    hub.search()
    qtbot.waitUntil(lambda: "Nothing on the Hub matches 'zzz'" in hub.state.text(), timeout=WAIT_MS)

    hub.search_edit.setText("tiny")
    hub.search()
    qtbot.waitUntil(lambda: hub.table.isVisible(), timeout=WAIT_MS)
    assert sorted(column(hub.table, 0)) == [GATED, REPO]
    row = column(hub.table, 0).index(REPO)
    cells = [hub.table.item(row, i).text() for i in range(6)]
    assert cells[2:] == ["7", "apache-2.0", "no", "llama"] and cells[1] != "—"
    assert hub.table.item(column(hub.table, 0).index(GATED), 4).text() == "gated"

    fake_hub.hold["model.safetensors"] = threading.Event()
    select(hub.table, REPO)
    hub.download_button.click()
    qtbot.waitUntil(lambda: "model.safetensors" in page.download_label.text(), timeout=WAIT_MS)
    assert page.download_card.isVisible() and page.files_seen[:2] == ["chat_template.jinja", "generation_config.json"]
    screenshot(page.window_, "model-hub-downloading")
    page.cancel_button.click()
    qtbot.waitUntil(lambda: not page.pull.is_running(), timeout=WAIT_MS)
    assert "cancelled" in page.download_label.text() and not page.banner.isVisible()
    assert "model.safetensors" not in snapshot_files(home, REPO) and page.session.config.model != REPO
    fake_hub.hold.pop("model.safetensors").set()

    hub.download_button.click()
    qtbot.waitUntil(lambda: page.session.model_info is not None and page.session.model_info.original == REPO,
                    timeout=WAIT_MS)
    assert page.session.model_info.downloaded and page.facts["downloaded"].text().startswith("yes")
    assert len(fake_hub.gets_of("chat_template.jinja")) == 1, "files complete before the cancel are kept"
    screenshot(page.window_, "model-hub-normal")


def test_a_gated_model_says_to_accept_its_license_and_a_saved_token_opens_it(page, qtbot, home, screenshot):
    hub = page.hub
    page.tabs.setCurrentWidget(hub)
    hub.search_edit.setText("gated")
    hub.search()
    qtbot.waitUntil(lambda: hub.table.isVisible() and hub.table.rowCount() == 1, timeout=WAIT_MS)
    select(hub.table, GATED)
    hub.download_button.click()
    qtbot.waitUntil(lambda: page.banner.isVisible() and "gated" in page.banner.label.text(), timeout=WAIT_MS)
    text = page.banner.label.text()
    assert f"https://huggingface.co/{GATED}" in text and "accept the license" in text and "token" in text
    assert not snapshot_files(home, GATED) & {"model.safetensors"}
    screenshot(page.window_, "model-hub-gated")

    hub.token_edit.setText(TOKEN)
    hub.token_button.click()
    assert hub.token_edit.text() == ""
    qtbot.waitUntil(lambda: "tiny-user" in hub.token_status.text(), timeout=WAIT_MS)
    assert str(home / "hf" / "token") in hub.token_status.text()
    assert (home / "hf" / "token").read_text().strip() == TOKEN
    shown = [label.text() for label in page.window_.findChildren(QLabel)]
    assert not any(TOKEN in text for text in shown), "the token is never shown"
    screenshot(page.window_, "model-hub-token")

    hub.download_button.click()
    qtbot.waitUntil(lambda: page.session.model_info is not None and page.session.model_info.original == GATED,
                    timeout=WAIT_MS)
    assert page.session.model_info.downloaded


def test_offline_the_hub_search_is_an_error_saying_what_to_do(page, qtbot, monkeypatch, screenshot):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    hub = page.hub
    page.tabs.setCurrentWidget(hub)
    hub.search_edit.setText("qwen")
    hub.search()
    qtbot.waitUntil(lambda: hub.banner.isVisible(), timeout=WAIT_MS)
    assert "can't be reached" in hub.banner.label.text() and "On this computer" in hub.banner.label.text()
    assert not hub.table.isVisible()
    screenshot(page.window_, "model-hub-offline")


def test_a_hub_model_shows_its_facts_and_gguf_support_before_its_weights_are_downloaded(page, qtbot, home,
                                                                                       fake_hub, screenshot):
    conversion = home / "tools" / "llama.cpp-0.3.36" / "conversion"
    conversion.mkdir(parents=True)
    (conversion / "llama.py").write_text('@ModelBase.register("LlamaForCausalLM", "MistralForCausalLM")\n')
    hub = page.hub
    page.tabs.setCurrentWidget(hub)
    hub.search_edit.setText("tiny-llama")
    hub.search()
    qtbot.waitUntil(lambda: hub.table.isVisible() and hub.table.rowCount() == 1, timeout=WAIT_MS)
    select(hub.table, REPO)
    hub.use_button.click()
    qtbot.waitUntil(lambda: page.session.model_info is not None and page.session.model_info.original == REPO,
                    timeout=WAIT_MS)
    assert page.use_hub.isChecked() and page.session.config.model == REPO
    assert page.facts["downloaded"].text().startswith("not yet") and not fake_hub.gets_of("model.safetensors")
    qtbot.waitUntil(lambda: page.facts["gguf"].text() != "checking…", timeout=WAIT_MS)
    assert page.facts["gguf"].text() == "yes: llama.cpp's converter knows LlamaForCausalLM"
    screenshot(page.window_, "model-hub-facts")


# ----------------------------------------------------------------------------- on this computer
def test_no_models_on_disk_says_where_it_looked(page, qtbot, home, screenshot):
    local = page.local
    page.tabs.setCurrentWidget(local)
    qtbot.waitUntil(lambda: "Looked in" in local.folders.text(), timeout=WAIT_MS)
    assert local.state.isVisible() and "No models on disk yet" in local.state.text()
    assert "Not found:" in local.folders.text() and str(home / "hf" / "hub") in local.folders.text()
    screenshot(page.window_, "model-local-empty")


def test_models_on_disk_are_listed_and_one_becomes_the_runs_model(page, qtbot, home, fake_hub, screenshot):
    import gguf

    from qlora_engine.model import hub as engine_hub
    from qlora_engine.protocol.model_ref import HubRef

    engine_hub.pull(HubRef(REPO), cache_dir=home / "hf" / "hub", endpoint=fake_hub.url)
    lm_studio = home / "home" / ".lmstudio" / "models" / "lmstudio-community" / "m-GGUF" / "m-Q4_K_M.gguf"
    lm_studio.parent.mkdir(parents=True)
    writer = gguf.GGUFWriter(str(lm_studio), "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    local = page.local
    page.tabs.setCurrentWidget(local)
    local.refresh()
    qtbot.waitUntil(lambda: local.table.isVisible() and local.table.rowCount() == 2, timeout=WAIT_MS)
    rows = {local.table.item(r, 0).text(): [local.table.item(r, c).text() for c in range(5)]
            for r in range(local.table.rowCount())}
    assert rows[REPO][1:3] == ["HF cache", "safetensors"] and rows[REPO][4] == "LlamaForCausalLM"
    assert rows["lmstudio-community/m-GGUF/m-Q4_K_M.gguf"][1:3] == ["LM Studio", "gguf"]
    screenshot(page.window_, "model-local")

    select(local.table, REPO)
    local.use_button.click()
    qtbot.waitUntil(lambda: page.session.model_info is not None and page.session.model_info.original == REPO,
                    timeout=WAIT_MS)
    assert page.session.model_info.downloaded and page.session.config.model == REPO
    assert local.table.item(0, 0).data(Qt.ItemDataRole.UserRole) is not None
