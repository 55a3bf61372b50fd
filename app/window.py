"""The main window: a sidebar of pages, Start/Stop shortcuts, the theme menu, window state, and what
happens when it is closed during a run.
"""
from __future__ import annotations

from enum import Enum
from pathlib import Path

from PySide6.QtCore import QByteArray, QSize, Qt
from PySide6.QtGui import QAction, QActionGroup, QCloseEvent, QKeySequence
from PySide6.QtWidgets import (
    QApplication,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QMainWindow,
    QMessageBox,
    QStackedWidget,
    QVBoxLayout,
    QWidget,
)

from app import settings, theme
from app.pages.chat import ChatPage
from app.pages.data import DataPage
from app.pages.export import ExportPage
from app.pages.fit import FitPage
from app.pages.gpu import GpuPage
from app.pages.model import ModelPage
from app.pages.monitor import MonitorPage
from app.pages.runs import RunsPage
from app.pages.train import TrainPage
from app.session import Session
from qlora_engine.protocol import events as ev
from qlora_engine.protocol.errors import EngineError

PAGES = (("gpu", "GPU", GpuPage), ("model", "Model", ModelPage), ("data", "Data", DataPage),
         ("fit", "Fit", FitPage), ("train", "Train", TrainPage), ("monitor", "Monitor", MonitorPage),
         ("chat", "Chat", ChatPage), ("export", "Export", ExportPage), ("runs", "Runs", RunsPage))


class CloseChoice(Enum):
    STOP = "stop"  # stop with a checkpoint, then close
    DETACH = "detach"  # close the window, leave the engine running
    CANCEL = "cancel"


class MainWindow(QMainWindow):
    def __init__(self, session: Session, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.detached_processes: list = []  # engines left running on purpose when the window closed
        self._closing_after_stop = False
        self.setWindowTitle("QLoRA Studio")
        self.setWindowIcon(theme.app_icon())
        self.setMinimumSize(QSize(980, 660))
        self.pages = {key: page_class(session) for key, _label, page_class in PAGES}
        self.setCentralWidget(self._build_center())
        self._build_menus()
        self._connect_pages()
        self.statusBar().showMessage("Ready")
        session.training_changed.connect(self._show_training_state)
        session.training.step.connect(self._show_step)
        self._restore_state()

    # ------------------------------------------------------------------ building
    def _build_center(self) -> QWidget:
        center = QWidget()
        layout = QHBoxLayout(center)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(0)
        side = QWidget(objectName="sidebarHolder")
        side.setAttribute(Qt.WidgetAttribute.WA_StyledBackground, True)
        side_layout = QVBoxLayout(side)
        side_layout.setContentsMargins(0, 0, 0, 0)
        side_layout.setSpacing(0)
        self.sidebar = QListWidget(objectName="sidebar")
        self.sidebar.setIconSize(QSize(20, 20))
        for number, (key, label, _cls) in enumerate(PAGES, start=1):
            item = QListWidgetItem(f"{number}   {label}")
            item.setData(Qt.ItemDataRole.UserRole, key)
            self.sidebar.addItem(item)
        title = QLabel("QLoRA Studio", objectName="sidebarTitle")
        title.setContentsMargins(10, 14, 10, 6)
        side_layout.addWidget(title)
        side_layout.addWidget(self.sidebar, 1)
        side.setFixedWidth(max(title.sizeHint().width(), self.sidebar.sizeHintForColumn(0)) + 40)
        self.stack = QStackedWidget()
        for page in self.pages.values():
            self.stack.addWidget(page)
        self.sidebar.currentRowChanged.connect(self.stack.setCurrentIndex)
        self.sidebar.setCurrentRow(0)
        layout.addWidget(side)
        layout.addWidget(self.stack, 1)
        return center

    def _build_menus(self) -> None:
        run_menu = self.menuBar().addMenu("&Run")
        self.start_action = QAction("Start training", self, shortcut=QKeySequence("Ctrl+Return"))
        self.start_action.setShortcutContext(Qt.ShortcutContext.ApplicationShortcut)
        self.start_action.triggered.connect(self.start_training)
        self.stop_action = QAction("Stop (with checkpoint)", self, shortcut=QKeySequence("Ctrl+."), enabled=False)
        self.stop_action.setShortcutContext(Qt.ShortcutContext.ApplicationShortcut)
        self.stop_action.triggered.connect(self.pages["monitor"].stop)
        quit_action = QAction("Quit", self, shortcut=QKeySequence.StandardKey.Quit)
        quit_action.triggered.connect(self.close)
        for action in (self.start_action, self.stop_action):
            run_menu.addAction(action)
        run_menu.addSeparator()
        run_menu.addAction(quit_action)
        view_menu = self.menuBar().addMenu("&View")
        themes = QActionGroup(self)
        for name in theme.THEMES:
            action = QAction(f"{name.capitalize()} theme", self, checkable=True, checked=name == theme.current())
            action.triggered.connect(lambda _checked, n=name: self.set_theme(n))
            themes.addAction(action)
            view_menu.addAction(action)
        go_menu = self.menuBar().addMenu("&Go")
        for number, (key, label, _cls) in enumerate(PAGES, start=1):
            action = QAction(label, self, shortcut=QKeySequence(f"Alt+{number}"))
            action.triggered.connect(lambda _checked=False, k=key: self.show_page(k))
            go_menu.addAction(action)

    def _connect_pages(self) -> None:
        self.pages["train"].start_requested.connect(self.start_training)
        self.pages["monitor"].resume_requested.connect(self.resume_training)
        self.pages["runs"].resume_requested.connect(self.resume_training)
        self.pages["runs"].open_requested.connect(self._open_run)

    # ------------------------------------------------------------------ navigation
    def show_page(self, key: str) -> None:
        self.sidebar.setCurrentRow([k for k, _label, _cls in PAGES].index(key))

    def current_page(self) -> str:
        return PAGES[self.stack.currentIndex()][0]

    def _open_run(self, run_dir: Path, page: str) -> None:
        self.session.select_run(run_dir)
        self.show_page(page)

    def set_theme(self, name: str) -> None:
        theme.apply_theme(QApplication.instance(), name)
        settings.set_theme(name)
        for page in self.pages.values():
            if hasattr(page, "apply_theme"):
                page.apply_theme()

    # ------------------------------------------------------------------ training
    def start_training(self) -> None:
        if self.session.is_training():
            self.statusBar().showMessage("A run is already training; stop it first.", 5000)
            return
        try:
            run_dir = self.session.start_training()
        except EngineError as exc:
            self.show_page("train")
            self.pages["train"].show_config_error(exc.message, exc.advice)
            return
        except OSError as exc:
            self.show_page("train")
            self.pages["train"].show_config_error(f"Could not create the run folder: {exc}",
                                                  "Choose another runs folder on the Runs page.")
            return
        self.statusBar().showMessage(f"Started {run_dir.name}")
        self.show_page("monitor")

    def resume_training(self, run_dir: Path) -> None:
        if self.session.is_training():
            self.statusBar().showMessage("A run is already training; stop it first.", 5000)
            return
        self.session.resume_training(run_dir)
        self.show_page("monitor")

    def _show_training_state(self, running: bool) -> None:
        self.start_action.setEnabled(not running)
        self.stop_action.setEnabled(running)
        if not running:
            self.statusBar().showMessage("Training engine stopped", 5000)
            if self._closing_after_stop:
                self.close()

    def _show_step(self, event: ev.Step) -> None:
        self.statusBar().showMessage(f"Training: step {event.step} of {event.total_steps}, loss {event.loss:.4f}")

    # ------------------------------------------------------------------ closing
    def ask_close_during_run(self) -> CloseChoice:
        box = QMessageBox(QMessageBox.Icon.Question, "A run is training",
                          "A run is still training. What should happen to it?", parent=self)
        box.setInformativeText("Stop: finish the current step, write a checkpoint (you can resume later), then "
                               "close.\nKeep running: close the window; training continues in the background "
                               "and its progress is saved in the run folder.")
        stop = box.addButton("Stop and save a checkpoint", QMessageBox.ButtonRole.AcceptRole)
        detach = box.addButton("Keep running in the background", QMessageBox.ButtonRole.DestructiveRole)
        box.addButton(QMessageBox.StandardButton.Cancel)
        box.setDefaultButton(stop)
        box.exec()
        clicked = box.clickedButton()
        return CloseChoice.STOP if clicked is stop else CloseChoice.DETACH if clicked is detach else CloseChoice.CANCEL

    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802 (Qt override)
        if self.session.is_training() and not self._closing_after_stop:
            choice = self.ask_close_during_run()
            if choice is CloseChoice.CANCEL:
                event.ignore()
                return
            if choice is CloseChoice.STOP:
                self._closing_after_stop = True
                self.session.training.stop()
                self.statusBar().showMessage("Stopping: the window closes once the checkpoint is written…")
                event.ignore()
                return
            self.detached_processes.append(self.session.training.detach())
        elif self.session.is_training():
            event.ignore()  # still waiting for the checkpoint
            return
        self._save_state()
        for page in self.pages.values():
            if hasattr(page, "shutdown"):
                page.shutdown()
        self.session.engine.shutdown()
        event.accept()

    # ------------------------------------------------------------------ window state
    def _save_state(self) -> None:
        store = settings.store()
        store.setValue("window/geometry", self.saveGeometry())
        store.setValue("window/state", self.saveState())
        store.setValue("window/page", self.current_page())

    def _restore_state(self) -> None:
        store = settings.store()
        geometry = store.value("window/geometry")
        if isinstance(geometry, QByteArray) and not geometry.isEmpty():
            self.restoreGeometry(geometry)
        else:
            self.resize(1280, 840)
        state = store.value("window/state")
        if isinstance(state, QByteArray):
            self.restoreState(state)
        page = str(store.value("window/page", "gpu"))
        if page in self.pages:
            self.show_page(page)
