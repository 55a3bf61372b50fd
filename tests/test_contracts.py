"""The house's rules as tests: the engine never imports the app or Qt; the app (every page) imports no heavy
library; no module imports another in a cycle; engine layers import only the layers below them."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "datasets")
# Engine layers, lowest first: a module may import its own subpackage and any lower rank, never a higher or equal one.
LAYER_RANKS = {"protocol": 0, "resources": 0, "model": 1, "planning": 1, "training": 2, "products": 3, "bench": 4,
               "cli": 5, "__main__": 6}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Every project module this file imports, at the top or inside a function (`from a import b` counts a.b when
    b is a module, else a)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in known else node.module)
    return {name for name in found if name in known}


def project_modules() -> dict[str, Path]:
    files = [*(ROOT / "qlora_engine").rglob("*.py"), *(ROOT / "app").rglob("*.py")]
    return {module_name(path): path for path in files}


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imported_modules(path, set(modules)) - {name} for name, path in modules.items()}


def test_the_engine_never_imports_the_app_or_qt():
    for path in (ROOT / "qlora_engine").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] not in ("app", "PySide6", "pyqtgraph"), f"{path} imports {name}"


def test_importing_the_whole_app_imports_no_heavy_library():
    # every module of the app, found on disk: a page or widget the window doesn't import is held to it too
    modules = sorted(".".join(path.relative_to(ROOT).with_suffix("").parts) for path in (ROOT / "app").rglob("*.py")
                     if path.name not in ("__init__.py", "__main__.py"))
    assert "app.pages.monitor" in modules and len(modules) > 20
    code = (f"import sys, importlib; [importlib.import_module(m) for m in {modules!r}]; "
            f"heavy = [m for m in {HEAVY!r} if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                            env={"QT_QPA_PLATFORM": "offscreen", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, f"the app imported {result.stdout.strip()} {result.stderr[-400:]}"


def test_no_module_imports_another_in_a_cycle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target] if target in path else [name, target])
            elif target not in state:
                visit(target, [*path, target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_the_cycle_check_finds_a_cycle(tmp_path):
    """The checker itself: a two-module cycle written to disk is found by the same parsing."""
    (tmp_path / "a.py").write_text("from b import thing\n")
    (tmp_path / "b.py").write_text("def f():\n    import a\n")
    assert imported_modules(tmp_path / "a.py", {"a", "b"}) == {"b"}
    assert imported_modules(tmp_path / "b.py", {"a", "b"}) == {"a"}


def layer_of(module: str) -> str:
    return module.split(".")[1] if module.count(".") >= 1 else "__init__"


def test_engine_layers_import_only_the_layers_below_them():
    wrong = []
    for name, targets in import_graph().items():
        if not name.startswith("qlora_engine.") or layer_of(name) not in LAYER_RANKS:
            continue
        for target in targets:
            if not target.startswith("qlora_engine.") or layer_of(target) == layer_of(name):
                continue
            if LAYER_RANKS.get(layer_of(target), 99) >= LAYER_RANKS[layer_of(name)]:
                wrong.append(f"{name} -> {target}")
    assert not wrong, "imports that point up or sideways: " + ", ".join(sorted(wrong))


def test_protocol_and_planning_import_without_torch():
    modules = [module_name(path) for layer in ("protocol", "planning")
               for path in (ROOT / "qlora_engine" / layer).glob("*.py")]
    code = (f"import importlib, sys; [importlib.import_module(m) for m in {modules!r}]; "
            f"heavy = [m for m in {HEAVY!r} if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, f"imported {result.stdout.strip()} {result.stderr[-400:]}"


def test_no_engine_module_is_longer_than_one_sitting():
    long = {name: n for name, path in project_modules().items()
            if name.startswith("qlora_engine") and (n := len(path.read_text(encoding="utf-8").splitlines())) > 600}
    assert not long, f"modules over 600 lines: {long}"


def test_qlora_studio_gui_opens_the_app_and_every_other_command_is_the_engines(monkeypatch):
    import app.main
    import qlora_engine.cli
    from app import entry

    seen = []
    monkeypatch.setattr(app.main, "main", lambda argv: seen.append(("app", argv)) or 0)
    monkeypatch.setattr(qlora_engine.cli, "main", lambda argv: seen.append(("engine", argv)) or 0)
    assert entry.main(["gui", "--runs-dir", "x"]) == 0 and entry.main(["runs", "--json"]) == 0
    assert seen == [("app", ["qlora-studio-gui", "--runs-dir", "x"]), ("engine", ["runs", "--json"])]


def test_the_cli_names_a_new_run_folder_as_the_app_does(tmp_path):
    """One rule (protocol/run_folders.new_run_dir): `2026-12-01_21-54_smollm2-135m-instruct`, not a second scheme."""
    import re

    from qlora_engine.cli import build_parser, resolve_train_config
    from qlora_engine.protocol.run_folders import runs_root

    _, run_dir = resolve_train_config(build_parser().parse_args(["train", "--model", "/models/SmolLM2-135M-Instruct"]))
    assert run_dir.parent == runs_root() == tmp_path / "runs"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d_smollm2-135m-instruct", run_dir.name), run_dir.name
