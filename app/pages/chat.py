"""Chat page: one prompt, answered by the base model and the tuned one side by side, streamed.

Runs `qlora_engine chat <run> --serve`: prompts go in as JSON lines on stdin, tokens come back as events.
"""
from __future__ import annotations

import html

from PySide6.QtWidgets import QGridLayout, QHBoxLayout, QLabel, QLineEdit, QPushButton, QSpinBox, QTextBrowser, QWidget

from app import theme
from app.engine_process import EngineProcess
from app.session import Session
from app.widgets.banner import Banner
from app.widgets.checkpoint_picker import CheckpointPicker
from app.widgets.page import Page, primary_button
from qlora_engine.protocol import events as ev
from qlora_engine.protocol.run_folders import FINAL_ADAPTER
from qlora_engine.protocol.run_state import summarize_run

MODELS = (("base", "Base model (before training)"), ("tuned", "Tuned model (with this run's adapter)"))


class ChatPage(Page):
    title = "Chat"
    intro = ("Ask both models the same question and compare. Answers are greedy (no sampling), so a "
             "difference comes from the training, not from chance.")

    def __init__(self, session: Session, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.engine = EngineProcess(session.engine_command, self)
        self.engine.chat_ready.connect(self._on_ready)
        self.engine.chat_token.connect(self._on_token)
        self.engine.chat_done.connect(self._on_done)
        self.engine.error.connect(self._on_error)
        self.engine.exited.connect(lambda _code: self._show_state())
        self.ready = self.has_adapter = False
        self.loaded_run = None
        self.loaded_checkpoint = ""  # the adapter the engine loaded: final or step-N (its chat_ready)
        self.answers = {"base": "", "tuned": ""}
        self.transcripts: dict[str, list[tuple[str, str]]] = {"base": [], "tuned": []}

        top = QHBoxLayout()
        self.run_label = QLabel(objectName="muted", wordWrap=True)
        self.load_button = QPushButton("Load models")
        self.load_button.clicked.connect(self.load)
        self.checkpoint_picker = CheckpointPicker("Tuned with")
        self.checkpoint_picker.changed.connect(self._show_state)
        top.addWidget(self.run_label, 1)
        top.addWidget(self.checkpoint_picker)
        top.addWidget(self.load_button)
        self.body.addLayout(top)
        self.banner = Banner()
        self.body.addWidget(self.banner)
        self.body.addLayout(self._build_panes(), 1)
        self.body.addLayout(self._build_prompt_row())
        session.run_changed.connect(self._show_state)
        session.training_changed.connect(lambda _running: self._show_state())  # an adapter may exist now
        self._show_state()

    def _build_panes(self) -> QGridLayout:
        grid = QGridLayout()
        self.panes: dict[str, QTextBrowser] = {}
        self.pane_titles: dict[str, QLabel] = {}
        for column, (key, label) in enumerate(MODELS):
            self.pane_titles[key] = QLabel(f"<b>{label}</b>")
            grid.addWidget(self.pane_titles[key], 0, column)
            self.panes[key] = QTextBrowser(placeholderText="Answers appear here.")
            grid.addWidget(self.panes[key], 1, column)
        return grid

    def _build_prompt_row(self) -> QHBoxLayout:
        row = QHBoxLayout()
        self.prompt = QLineEdit(placeholderText="Ask something the training data covers, then press Enter")
        self.prompt.returnPressed.connect(self.send)
        self.max_tokens = QSpinBox(minimum=8, maximum=4096, value=128, singleStep=32, suffix=" tokens")
        self.max_tokens.setToolTip("Longest answer, in tokens.")
        self.send_button = primary_button("Send")
        self.send_button.clicked.connect(self.send)
        row.addWidget(self.prompt, 1)
        row.addWidget(QLabel("Up to"))
        row.addWidget(self.max_tokens)
        row.addWidget(self.send_button)
        return row

    # ------------------------------------------------------------------ actions
    def load(self) -> None:
        run_dir = self.session.run_dir
        if run_dir is None:
            return
        if self.engine.is_running():  # another run's models: replace the server
            self.engine.kill()
            self.engine.wait_for_exit(3000)
        self.ready, self.loaded_run, self.loaded_checkpoint = False, run_dir, ""
        self.banner.show_message("info", "Loading both models…", "The base model is loaded in 4-bit and the "
                                 "adapter put on top. This takes a few seconds to a minute.")
        self.engine.start(["chat", str(run_dir), "--serve", "--events", "jsonl",
                           *self.checkpoint_picker.engine_args()])
        self._show_state()

    def send(self) -> None:
        text = self.prompt.text().strip()
        if not text or not self.ready:
            return
        self.answers = {"base": "", "tuned": ""}
        for key in self.transcripts:
            self.transcripts[key].append((text, ""))
        self.engine.send_json({"prompt": text, "max_new_tokens": self.max_tokens.value()})
        self.prompt.clear()
        self.ready = False
        self._render()
        self._show_state()

    # ------------------------------------------------------------------ events
    def _on_ready(self, event: ev.ChatReady) -> None:
        self.ready, self.has_adapter, self.loaded_checkpoint = True, event.has_adapter, event.checkpoint
        self.banner.clear()
        self._show_state()
        self.prompt.setFocus()

    def _on_token(self, event: ev.ChatToken) -> None:
        self.answers[event.model] = self.answers.get(event.model, "") + event.text
        self._set_last_answer(event.model, self.answers[event.model])

    def _on_done(self, event: ev.ChatDone) -> None:
        which = event.model
        self._set_last_answer(which, event.text)
        if which == "tuned" or not self.has_adapter:
            self.ready = True
            self._show_state()
            self.prompt.setFocus()

    def _on_error(self, event: ev.Error) -> None:
        self.ready = False
        self.banner.show_error(event, "Chat stopped" + (f" ({event.code})" if event.code else ""))
        self._show_state()

    def _set_last_answer(self, which: str, text: str) -> None:
        transcript = self.transcripts.setdefault(which, [])
        if transcript:
            transcript[-1] = (transcript[-1][0], text)
        self._render()

    # ------------------------------------------------------------------ showing
    def _render(self) -> None:
        muted, accent = theme.color("muted"), theme.color("accent")
        for which, pane in self.panes.items():
            parts = [f"<p style='color:{accent}; margin:10px 0 2px 0'><b>You:</b> {html.escape(q)}</p>"
                     f"<p style='white-space:pre-wrap; margin:0'>{html.escape(a) or f'<i style=color:{muted}>…</i>'}"
                     f"</p>" for q, a in self.transcripts[which]]
            pane.setHtml("".join(parts))
            pane.verticalScrollBar().setValue(pane.verticalScrollBar().maximum())

    def _show_state(self) -> None:
        run_dir = self.session.run_dir
        running = self.engine.is_running()
        summary = summarize_run(run_dir) if run_dir is not None else None
        self.checkpoint_picker.show_run(summary)
        if run_dir is None:
            self.run_label.setText("No run chosen. Train one, or pick a finished run on the Runs page.")
        else:
            loaded = running and self.loaded_run == run_dir
            note = self._loaded_note() if loaded and self.ready else "loading…" if loaded else \
                "press Load models" if self.checkpoint_picker.choice() else "no adapter yet: let the run finish first"
            self.run_label.setText(f"Run <b>{html.escape(run_dir.name)}</b>: {note}")
        step = self._loaded_step()
        self.pane_titles["tuned"].setText(f"<b>Tuned model (with the checkpoint of {step})</b>" if step else
                                          f"<b>{dict(MODELS)['tuned']}</b>")
        can_load = bool(self.checkpoint_picker.choice())
        self.load_button.setEnabled(can_load)
        self.load_button.setText("Reload models" if running else "Load models")
        chatting = running and self.ready
        for widget in (self.prompt, self.send_button):
            widget.setEnabled(chatting)

    def _loaded_step(self) -> str:
        """'step 20' when the engine loaded a checkpoint's adapter, '' for the final adapter."""
        return self.loaded_checkpoint.replace("-", " ") if self.loaded_checkpoint not in ("", FINAL_ADAPTER) else ""

    def _loaded_note(self) -> str:
        note = f"loaded, the checkpoint of {self._loaded_step()}" if self._loaded_step() else "loaded"
        if self.checkpoint_picker.choice() not in ("", self.loaded_checkpoint or FINAL_ADAPTER):
            note += " (press Reload models for the adapter picked)"
        return note

    def showEvent(self, event: object) -> None:  # noqa: N802 (Qt override)
        self._show_state()
        super().showEvent(event)

    def shutdown(self) -> None:
        self.engine.kill()
