"""QLoRA Studio's desktop window (PySide6 + pyqtgraph).

A client of the engine: it imports only qlora_engine's light modules (config, events, hardware,
estimate) and runs everything heavy in a child process (`python -m qlora_engine ...`).
"""
