"""The Export and Chat pages' adapter pickers, driven in the real window with the real engine on a tiny random Llama
run: they list the run's final adapter and checkpoints (the best marked with its eval loss), and the one picked is
what the engine exports and chats with."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_whole_run import real_window  # noqa: F401 (the real window with the real engine)

from qlora_engine.protocol.run_state import summarize_run

ENGINE_MS = 300_000  # a busy 2-core machine loads the engine (torch, peft) slowly
SHOTS = Path(os.environ.get("QLORA_SHOTS", "/tmp/helpers/shots"))


@pytest.fixture(scope="module")
def checkpointed_run(tiny_model_dir, tmp_path_factory) -> Path:
    """8 real steps, checkpointed every 2 (the last two and the best kept), the final adapter written; evaluated every
    2 with eval losses scripted to be lowest at step 4 (a tiny random model's barely move)."""
    from test_best_checkpoint import ScriptedEvalLoss
    from test_train import run, tiny_config
    from tiny_models import write_jsonl

    from qlora_engine.training import loop

    folder = tmp_path_factory.mktemp("picker-run")
    rows = [{"instruction": f"Who is mayor {i}?", "output": f"Quillon Varet {i}."} for i in range(16)]
    config = tiny_config(tiny_model_dir, write_jsonl(folder / "d.jsonl", rows), folder / "run", max_steps=8,
                         eval_steps=2, save_steps=2, learning_rate=5e-2, lr_scheduler="constant", val_fraction=0.25)
    config.save(folder / "run" / "config.yaml")
    original, loop.evaluate = loop.evaluate, ScriptedEvalLoss([5.0, 3.0, 2.0, 2.5, 2.6])
    try:
        run(config)
    finally:
        loop.evaluate = original
    return folder / "run"


def keep_shot(screenshot, window, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(screenshot(window, name), SHOTS / f"{name}.png")


def test_the_export_page_lists_the_runs_checkpoints_and_exports_the_one_picked(
        real_window, qtbot, checkpointed_run, screenshot):  # noqa: F811 (the fixture imported above)
    window, run_dir = real_window, checkpointed_run
    state = summarize_run(run_dir)
    window.session.select_run(run_dir)
    window.show_page("export")
    page = window.pages["export"]
    picker = page.checkpoint_picker
    assert picker.choices() == state.adapter_choices()
    assert picker.choices() == [("final", "final adapter (step 8, eval loss 2.6)"),
                                ("step-8", "step 8 (eval loss 2.6)"), ("step-6", "step 6 (eval loss 2.5)"),
                                ("step-4", "step 4 (best eval loss 2)")]
    assert picker.choice() == "final", "the final adapter is the default"

    picker.pick("step-6")
    assert page.destination.placeholderText() == str(run_dir / "exports" / "step-6" / "adapter")
    keep_shot(screenshot, window, "export-checkpoint-picker")
    with qtbot.waitSignal(page.engine.exited, timeout=ENGINE_MS):
        page.export_button.click()
    assert "Exported and verified" in page.banner.label.text(), page.banner.label.text()
    assert Path(page.result_path) == run_dir / "exports" / "step-6" / "adapter"
    exported = load_file(str(Path(page.result_path) / "adapter_model.safetensors"))
    saved = load_file(str(run_dir / "checkpoints" / "step-6" / "adapter" / "adapter_model.safetensors"))
    assert exported.keys() == saved.keys() and all((exported[k] == saved[k]).all() for k in saved)
    keep_shot(screenshot, window, "export-checkpoint-done")


def test_the_chat_page_loads_the_checkpoint_picked(real_window, qtbot, checkpointed_run, screenshot):  # noqa: F811
    window, run_dir = real_window, checkpointed_run
    best = f"step-{summarize_run(run_dir).best_step}"
    assert best == "step-4"
    window.session.select_run(run_dir)
    window.show_page("chat")
    page = window.pages["chat"]
    assert page.checkpoint_picker.choices() == summarize_run(run_dir).adapter_choices()
    page.checkpoint_picker.pick(best)
    with qtbot.waitSignal(page.engine.chat_ready, timeout=ENGINE_MS) as ready:
        page.load_button.click()
    assert ready.args[0].checkpoint == best
    step = best.replace("-", " ")
    assert f"loaded, the checkpoint of {step}" in page.run_label.text()
    assert page.pane_titles["tuned"].text() == f"<b>Tuned model (with the checkpoint of {step})</b>"
    page.prompt.setText("Who is mayor 3?")
    page.max_tokens.setValue(8)
    with qtbot.waitSignals([page.engine.chat_done, page.engine.chat_done], timeout=ENGINE_MS):
        page.send_button.click()
    qtbot.waitUntil(lambda: page.send_button.isEnabled(), timeout=ENGINE_MS)
    assert "Who is mayor 3?" in page.panes["tuned"].toPlainText()
    keep_shot(screenshot, window, "chat-checkpoint")
    page.checkpoint_picker.pick("final")
    assert "press Reload models for the adapter picked" in page.run_label.text()
