"""QLoRA Studio's desktop window (PySide6 + pyqtgraph).

A client of the engine: it imports only qlora_engine's light layers (protocol, planning) and reaches the engine
one way for requests (engine_client, off the GUI thread) and one for long runs (engine_process, a child process).
"""
