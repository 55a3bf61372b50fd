"""The Model page's three places to find a model: the catalog ("what can I fine-tune on this GPU?"), the Hugging
Face Hub (search, and the token gated models need) and the models already on this computer (the HF cache, Ollama's
and LM Studio's GGUFs). Each panel asks through the engine client and says what the user picked by a signal; the
page (model.py) downloads and reads the model.
"""
from __future__ import annotations

from typing import Any

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtGui import QBrush, QColor, QShowEvent
from PySide6.QtWidgets import (
    QAbstractItemView,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from app import formatting
from app.engine_client import Call
from app.engine_requests import BuildCatalog, ListLocalModels, ReadHubToken, SaveHubToken, SearchHub
from app.session import Session
from app.widgets.banner import Banner
from app.widgets.gpu_choice import GpuChoice
from app.widgets.page import primary_button
from qlora_engine.protocol.errors import EngineError
from qlora_engine.protocol.queries import Catalog, CatalogEntry, HubSearch, HubToken, LocalModels

VERDICTS = {"fits": ("Fits", "#2e7d32"), "tight": ("Tight", "#b26a00"), "won't fit": ("Won't fit", "#c62828"),
            "": ("—", "")}
SOURCE_NAMES = {"hf_cache": "HF cache", "ollama": "Ollama", "lm_studio": "LM Studio"}


def make_table(headers: list[str], stretch_column: int = 0) -> QTableWidget:
    table = QTableWidget(0, len(headers))
    table.setHorizontalHeaderLabels(headers)
    table.verticalHeader().hide()
    table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
    table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
    table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
    header = table.horizontalHeader()
    for column in range(len(headers)):
        header.setSectionResizeMode(column, QHeaderView.ResizeMode.Stretch if column == stretch_column
                                    else QHeaderView.ResizeMode.ResizeToContents)
    return table


def fill_table(table: QTableWidget, rows: list[tuple[Any, list[str]]],
               colors: dict[int, dict[str, str]] | None = None) -> None:
    """One row per (value, cells); the value (what picking the row means) is kept on the first cell; `colors`: for a
    column, the text color of each cell text."""
    table.setRowCount(len(rows))
    for row, (value, cells) in enumerate(rows):
        for column, text in enumerate(cells):
            item = QTableWidgetItem(text)
            if column == 0:
                item.setData(Qt.ItemDataRole.UserRole, value)
            if column > 0 and text[:1].isdigit():
                item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            table.setItem(row, column, item)
    for column, color_of in (colors or {}).items():
        for row in range(table.rowCount()):
            color = color_of.get(table.item(row, column).text(), "")
            if color:
                table.item(row, column).setForeground(QBrush(QColor(color)))


def picked(table: QTableWidget) -> Any:
    rows = table.selectionModel().selectedRows()
    return table.item(rows[0].row(), 0).data(Qt.ItemDataRole.UserRole) if rows else None


class LazyPanel(QWidget):
    """A panel that asks the engine only once it is shown (and again when what it shows is out of date)."""

    def __init__(self, session: Session, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.stale = True
        self.call: Call | None = None

    def showEvent(self, event: QShowEvent) -> None:  # noqa: N802 (Qt override)
        super().showEvent(event)
        if self.stale:
            self.refresh()

    def mark_stale(self) -> None:
        self.stale = True
        if self.isVisible():
            self.refresh()

    def refresh(self) -> None:
        raise NotImplementedError

    def shutdown(self) -> None:
        if self.call is not None:
            self.call.cancel()


# ----------------------------------------------------------------------------- what fits this GPU
class CatalogPanel(LazyPanel):
    """About 30 popular models against the detected GPU's free memory (or a chosen one) at the Train page's
    settings, before any download: the estimate's peak, the longest sequence at batch 1 and 4, the verdict."""

    download_requested = Signal(str)  # a Hub id

    def __init__(self, session: Session, parent: QWidget | None = None) -> None:
        super().__init__(session, parent)
        self.catalog: Catalog | None = None
        self.on_disk: set[str] = set()  # Hub ids complete in the HF cache (from the local list)
        layout = QVBoxLayout(self)
        self.plan_for = GpuChoice(session, "A GPU with this much free memory:", "model/catalog_gib", 12.0,
                                  hide_unused_amount=True)
        self.target, self.custom_gib = self.plan_for.target, self.plan_for.custom_gib
        layout.addWidget(self.plan_for)
        self.settings_note = QLabel(objectName="muted", wordWrap=True)
        layout.addWidget(self.settings_note)
        self.banner = Banner()
        layout.addWidget(self.banner)
        self.table = make_table(["Model", "Parameters", "Download", "Peak memory", "Longest sequence, batch 1",
                                 "batch 4", "Verdict", "On disk"])
        self.table.itemSelectionChanged.connect(self._show_selection)
        self.table.itemDoubleClicked.connect(lambda _item: self._download())
        layout.addWidget(self.table, 1)
        buttons = QHBoxLayout()
        self.selection_note = QLabel(objectName="muted", wordWrap=True)
        self.download_button = primary_button("Download and use")
        self.download_button.setEnabled(False)
        self.download_button.clicked.connect(self._download)
        buttons.addWidget(self.selection_note, 1)
        buttons.addWidget(self.download_button)
        layout.addLayout(buttons)
        self.update_timer = QTimer(self, singleShot=True, interval=300)
        self.update_timer.timeout.connect(self.mark_stale)
        session.config_changed.connect(self.update_timer.start)
        self.plan_for.choice_changed.connect(self.mark_stale)
        self.plan_for.custom_changed.connect(self.update_timer.start)
        self.plan_for.show_gpus()

    def refresh(self) -> None:
        self.stale = False
        free, _ = self.plan_for.free_and_total_bytes()
        request = BuildCatalog(self.session.config, free, self.plan_for.description())
        self.call = self.session.engine.run(request, owner=self, done=self.show_catalog, failed=self._show_error)

    def set_on_disk(self, hub_ids: set[str]) -> None:
        self.on_disk = {hub_id.lower() for hub_id in hub_ids}
        if self.catalog is not None:
            self.show_catalog(self.catalog)

    def show_catalog(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.banner.clear()
        config = self.session.config
        self.settings_note.setText(
            f"Estimated for {catalog.memory_source} ({formatting.gib(catalog.free_bytes)} free) at the Train page's "
            f"settings: sequences of {config.max_length} tokens, micro-batch {config.micro_batch_size}, LoRA rank "
            f"{config.lora_r} on {config.target_modules}, gradient checkpointing "
            f"{'on' if config.gradient_checkpointing else 'off'}. Nothing is downloaded to answer this.")
        selected = picked(self.table)
        fill_table(self.table, [(row, self._cells(row)) for row in catalog.entries],
                   {6: {text: color for text, color in VERDICTS.values()}})
        for row, entry in enumerate(catalog.entries):
            if entry.hub_id == getattr(selected, "hub_id", None):
                self.table.selectRow(row)
        self._show_selection()

    def _cells(self, row: CatalogEntry) -> list[str]:
        longest = [f"{n:,} tokens" if n else "none fits" for n in (row.max_length_batch1, row.max_length_batch4)]
        return [row.name + (" (gated)" if row.gated else ""), formatting.count(row.params),
                f"{row.download_bytes / 1e9:.1f} GB", formatting.gib(row.peak_bytes), *longest,
                VERDICTS[row.verdict][0], "yes" if row.on_disk or row.hub_id.lower() in self.on_disk else ""]

    def _show_selection(self) -> None:
        row: CatalogEntry | None = picked(self.table)
        self.download_button.setEnabled(row is not None)
        if row is None:
            self.selection_note.setText("Pick a row to download that model into the HF cache and use it.")
            return
        gated = (f" Gated: accept its license on https://huggingface.co/{row.hub_id} and save a token on the Hub "
                 "tab first." if row.gated else "")
        self.selection_note.setText(f"{row.hub_id}, {row.license} license, context {row.context_length:,} "
                                    f"tokens.{gated}")

    def _download(self) -> None:
        row: CatalogEntry | None = picked(self.table)
        if row is not None:
            self.download_requested.emit(row.hub_id)

    def _show_error(self, error: EngineError) -> None:
        self.banner.show_error(error, "The catalog can't be estimated")


# ----------------------------------------------------------------------------- the Hub
class HubPanel(LazyPanel):
    """Search the Hub by name; use a result (only its config is read) or download it; the token gated and private
    models need, stored where huggingface_hub keeps it (the panel shows whether one is there, never the token)."""

    use_requested = Signal(str)
    download_requested = Signal(str)

    def __init__(self, session: Session, parent: QWidget | None = None) -> None:
        super().__init__(session, parent)
        self.results: HubSearch | None = None
        self.searching: Call | None = None
        layout = QVBoxLayout(self)
        row = QHBoxLayout()
        self.search_edit = QLineEdit(placeholderText="Search the Hub by name, e.g. Qwen2.5 or Llama-3.2")
        self.search_edit.returnPressed.connect(self.search)
        self.search_button = QPushButton("Search")
        self.search_button.clicked.connect(self.search)
        row.addWidget(self.search_edit, 1)
        row.addWidget(self.search_button)
        layout.addLayout(row)
        layout.addLayout(self._build_token_row())
        self.banner = Banner()
        layout.addWidget(self.banner)
        self.state = QLabel("Type part of a model's name and press Search: text-generation models, most "
                            "downloaded first.", objectName="muted", wordWrap=True)
        layout.addWidget(self.state)
        self.table = make_table(["Model", "Parameters", "Downloads", "License", "Gated", "Architecture"])
        self.table.itemSelectionChanged.connect(self._show_selection)
        self.table.itemDoubleClicked.connect(lambda _item: self._use())
        self.table.hide()
        layout.addWidget(self.table, 1)
        buttons = QHBoxLayout()
        buttons.addStretch(1)
        self.use_button = QPushButton("Use this model")
        self.use_button.setToolTip("Read its config.json now; the weights are downloaded when training starts")
        self.use_button.clicked.connect(self._use)
        self.download_button = primary_button("Download")
        self.download_button.clicked.connect(self._download)
        for button in (self.use_button, self.download_button):
            button.setEnabled(False)
            buttons.addWidget(button)
        layout.addLayout(buttons)

    def _build_token_row(self) -> QHBoxLayout:
        row = QHBoxLayout()
        self.token_status = QLabel("Token: checking…", objectName="muted", wordWrap=True)
        self.token_edit = QLineEdit(placeholderText="hf_… token for gated models", echoMode=QLineEdit.EchoMode.Password)
        self.token_edit.setMinimumWidth(260)
        self.token_edit.returnPressed.connect(self.save_token)
        self.token_button = QPushButton("Save token")
        self.token_button.setToolTip("Checked with the Hub, then stored where `hf auth login` stores it")
        self.token_button.clicked.connect(self.save_token)
        row.addWidget(self.token_status, 1)
        row.addWidget(self.token_edit)
        row.addWidget(self.token_button)
        return row

    def refresh(self) -> None:  # what the panel shows on its own: whether there is a token
        self.stale = False
        self.call = self.session.engine.run(ReadHubToken(), owner=self, done=self._show_token,
                                            failed=self._show_token_error)

    def search(self) -> None:
        text = self.search_edit.text().strip()
        if not text:
            return
        self.banner.clear()
        self.state.setText(f"Searching the Hub for '{text}'…")
        self.state.show()
        self.searching = self.session.engine.run(SearchHub(text), owner=self, done=self.show_results,
                                                 failed=self._show_search_error)

    def show_results(self, answer: HubSearch) -> None:
        self.results = answer
        fill_table(self.table, [(r, [r.repo_id, formatting.count(r.params) if r.params else "—", f"{r.downloads:,}",
                                     r.license or "—", "gated" if r.gated else "no",
                                     (r.model_type or "unknown") + ("" if r.supported else " (estimate approximate)")])
                                for r in answer.results])
        self.table.setVisible(bool(answer.results))
        self.state.setVisible(not answer.results)
        self.state.setText(f"Nothing on the Hub matches '{answer.query}' (text-generation models only).")
        self._show_selection()

    def _show_selection(self) -> None:
        chosen = picked(self.table) is not None
        self.use_button.setEnabled(chosen)
        self.download_button.setEnabled(chosen)

    def _use(self) -> None:
        chosen = picked(self.table)
        if chosen is not None:
            self.use_requested.emit(chosen.repo_id)

    def _download(self) -> None:
        chosen = picked(self.table)
        if chosen is not None:
            self.download_requested.emit(chosen.repo_id)

    def _show_search_error(self, error: EngineError) -> None:
        self.table.hide()
        self.state.hide()
        self.banner.show_error(error, "The Hub can't be searched")

    # ------------------------------------------------------------------ the token
    def save_token(self) -> None:
        token = self.token_edit.text().strip()
        if not token:
            return
        self.token_edit.clear()  # the widget keeps no copy once it is on its way
        self.token_status.setText("Token: checking it with the Hub…")
        self.call = self.session.engine.run(SaveHubToken(token), owner=self, done=self._show_token,
                                            failed=self._show_token_error)

    def _show_token(self, answer: HubToken) -> None:
        if not answer.present:
            self.token_status.setText("Token: none. Gated models (Llama, Gemma, Mistral) need one from "
                                      "huggingface.co/settings/tokens.")
            return
        owner = f" of {answer.user}" if answer.user else ""
        self.token_status.setText(f"Token{owner}: there ({answer.source}).")
        self.token_status.setToolTip("Gated models also need their license accepted on their Hub page.")

    def _show_token_error(self, error: EngineError) -> None:
        self.token_status.setText("Token: not saved.")
        self.banner.show_error(error, "The token was not saved")


# ----------------------------------------------------------------------------- on this computer
class LocalPanel(LazyPanel):
    """What is on disk already: the HF cache's models by Hub id, and the .gguf files of Ollama and LM Studio."""

    use_requested = Signal(str)
    listed = Signal(object)  # the LocalModels answer

    def __init__(self, session: Session, parent: QWidget | None = None) -> None:
        super().__init__(session, parent)
        layout = QVBoxLayout(self)
        self.banner = Banner()
        layout.addWidget(self.banner)
        self.state = QLabel("Looking…", objectName="muted", wordWrap=True)
        layout.addWidget(self.state)
        self.table = make_table(["Model", "Where", "Format", "Size", "Architecture"])
        self.table.itemSelectionChanged.connect(lambda: self.use_button.setEnabled(picked(self.table) is not None))
        self.table.itemDoubleClicked.connect(lambda _item: self._use())
        layout.addWidget(self.table, 1)
        buttons = QHBoxLayout()
        self.folders = QLabel(objectName="muted", wordWrap=True)
        refresh = QPushButton("Look again")
        refresh.clicked.connect(self.refresh)
        self.use_button = primary_button("Use this model")
        self.use_button.setEnabled(False)
        self.use_button.clicked.connect(self._use)
        buttons.addWidget(self.folders, 1)
        buttons.addWidget(refresh)
        buttons.addWidget(self.use_button)
        layout.addLayout(buttons)

    def refresh(self) -> None:
        self.stale = False
        self.call = self.session.engine.run(ListLocalModels(), owner=self, done=self.show_models,
                                            failed=self._show_error)

    def show_models(self, answer: LocalModels) -> None:
        self.banner.clear()
        fill_table(self.table, [(m, [m.name, SOURCE_NAMES.get(m.source, m.source), m.format,
                                     formatting.size(m.size_bytes),
                                     (m.architecture or "unknown") + ("" if m.complete else " (incomplete)")])
                                for m in answer.models])
        self.table.setVisible(bool(answer.models))
        self.state.setVisible(not answer.models)
        self.state.setText("No models on disk yet. Download one from the catalog or the Hub; models other tools "
                           "put in the HF cache, Ollama or LM Studio show up here.")
        found = [f"{SOURCE_NAMES.get(f['source'], f['source'])} {f['path']}" for f in answer.folders if f["exists"]]
        missing = [f"{SOURCE_NAMES.get(f['source'], f['source'])} {f['path']}" for f in answer.folders
                   if not f["exists"]]
        self.folders.setText("Looked in: " + ("; ".join(found) or "nowhere that exists")
                             + (f". Not found: {'; '.join(missing)}" if missing else ""))
        self.listed.emit(answer)

    def _use(self) -> None:
        chosen = picked(self.table)
        if chosen is not None:
            self.use_requested.emit(chosen.model)

    def _show_error(self, error: EngineError) -> None:
        self.table.hide()
        self.state.hide()
        self.banner.show_error(error, "The models on disk can't be listed")
