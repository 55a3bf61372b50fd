"""The `qlora-studio` terminal command: `qlora-studio gui` opens the desktop app, every other command is the
engine's CLI (qlora_engine/cli.py). It lives in the app so that the engine never imports the app."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "gui":  # the desktop app, same as qlora-studio-gui
        from app.main import main as gui_main

        return gui_main(["qlora-studio-gui", *argv[1:]])
    from qlora_engine.cli import main as engine_main

    return engine_main(argv)


if __name__ == "__main__":
    sys.exit(main())
