"""The Data page on the new shapes, scanned by the real engine (`data --json` on a tiny model whose chat template
has tool support, Qwen2.5's): tool calls highlighted as trained and tool results not, the preference and KTO
notice, columns suggested and edited, several files mixed. Screenshots: tests/gui/screenshots/data-*.png."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
SHAPES = TESTS / "data" / "shapes"
REAL_ENGINE = [sys.executable, "-m", "qlora_engine"]


@pytest.fixture(scope="module")
def qwen_model(tmp_path_factory):
    sys.path.insert(0, str(TESTS))
    from tiny_models import build_tiny_model

    template = (TESTS / "data" / "templates" / "qwen2_5.jinja").read_text()
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen"), chat_template=template)


@pytest.fixture
def page(qtbot, tmp_path, qwen_model):
    from app.pages.data import DataPage
    from app.session import Session

    session = Session(tmp_path / "runs", REAL_ENGINE)
    session.update_config(model=str(qwen_model), max_length=4096)  # the tiny vocabulary spells most words out
    page = DataPage(session)
    qtbot.addWidget(page)
    page.resize(1180, 860)
    page.show()
    yield page
    page.shutdown()


def scanned(qtbot, page, action) -> None:
    """Does `action`, then waits for the real engine's answer to the scan it starts."""
    with qtbot.waitSignal(page.session.engine.answered, timeout=120_000):
        action()
        page.scan_timer.timeout.emit() if page.scan_timer.isActive() else None
    assert page.session.data_report is not None or page.banner.isVisible()


def highlighted(page) -> str:
    """The preview's highlighted (trained) text."""
    from app import theme

    html = page.preview.toHtml()
    color = theme.color("highlight_bg").lower()
    return "".join(part.split(">", 1)[1].split("</span>", 1)[0] for part in html.split("<span")[1:]
                   if color in part.split(">", 1)[0].lower())


def test_tool_calls_are_highlighted_as_trained_and_tool_results_are_not(qtbot, page, screenshot):
    scanned(qtbot, page, lambda: page.choose_file(str(SHAPES / "openai_tools.jsonl")))
    trained = highlighted(page)
    assert "get_weather" in trained and "It is 21 degrees in Paris." in trained
    assert "temp_c" in page.preview.toPlainText() and "temp_c" not in trained
    assert "Let me guess: cold." in page.preview.toPlainText() and "Let me guess" not in trained  # weight 0
    assert page.bad_rows.rowCount() == 1 and page.bad_rows.item(0, 0).text() == "3"
    assert "chat messages" in page.summary.text()
    screenshot(page, "data-tools")


def test_preference_pairs_and_kto_rows_say_what_is_trained(qtbot, page, screenshot):
    scanned(qtbot, page, lambda: page.choose_file(str(SHAPES / "preference.jsonl")))
    assert page.banner.isVisible() and "chosen answers" in page.banner.label.text()
    assert "Quillon Varet." in highlighted(page) and "I don't know" not in page.preview.toPlainText()
    scanned(qtbot, page, lambda: (page.mix_edit.setText(f"{SHAPES / 'kto.jsonl'}=0.3"),
                                  page.mix_edit.editingFinished.emit()))
    assert page.session.config.data_mix == {str(SHAPES / "kto.jsonl"): 0.3}
    assert "kto.jsonl" in page.summary.text() and "30% of the mix" in page.summary.text()
    assert "label: false" in page.banner.label.text() and "never a training target" in page.banner.label.text()
    screenshot(page, "data-preference")


def test_columns_are_suggested_shown_and_editable(qtbot, page, screenshot):
    scanned(qtbot, page, lambda: page.choose_file(str(SHAPES / "questions.csv")))
    assert page.columns_edit.text() == "instruction=question,output=answer,input=context"
    assert "suggested" in page.columns_note.text()
    assert "The town's records." in page.preview.toPlainText()
    screenshot(page, "data-columns")
    scanned(qtbot, page, lambda: (page.columns_edit.setText("instruction=question,output=answer"),
                                  page.columns_edit.editingFinished.emit()))
    assert page.session.config.columns == {"instruction": "question", "output": "answer"}
    assert page.session.data_report.columns == {"instruction": "question", "output": "answer"}
    assert "The town's records." not in page.preview.toPlainText()
    assert "suggested" not in page.columns_note.text()


def test_the_bad_rows_of_every_file_of_a_mix_are_listed_with_their_file(qtbot, page, screenshot):
    scanned(qtbot, page, lambda: page.choose_file(str(SHAPES / "openai_tools.jsonl")))
    assert page.bad_rows.isColumnHidden(2)  # one file: no File column
    scanned(qtbot, page, lambda: (page.mix_edit.setText(f"{SHAPES / 'content_parts.jsonl'}=0.5"),
                                  page.mix_edit.editingFinished.emit()))
    rows = {(page.bad_rows.item(r, 2).text(), page.bad_rows.item(r, 0).text(), page.bad_rows.item(r, 1).text())
            for r in range(page.bad_rows.rowCount())}
    assert ("openai_tools.jsonl", "3") in {(file, line) for file, line, _ in rows}
    assert any(file == "content_parts.jsonl" and line == "2" and "images" in why for file, line, why in rows), rows
    assert not page.bad_rows.isColumnHidden(2)
    screenshot(page, "data-mix-bad-rows")
