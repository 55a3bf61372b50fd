"""Entry point of the frozen bundle (packaging/qlora-studio.spec): one executable, two programs.

`qlora-studio --engine <args>` runs the engine CLI with <args> and never imports Qt; anything else opens the window.
The GUI starts its engine child this way when frozen, since a frozen sys.executable cannot take `-m qlora_engine`.
"""
import multiprocessing
import sys

if __name__ == "__main__":
    # A frozen multiprocessing child (datasets' workers, DataLoader on Windows/macOS) runs its task here and exits.
    multiprocessing.freeze_support()
    if sys.argv[1:2] == ["--engine"]:
        from qlora_engine.cli import main as engine_main

        sys.exit(engine_main(sys.argv[2:]))
    from app.main import main as app_main

    sys.exit(app_main())
