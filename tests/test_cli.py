"""The engine's command line: process-wide settings it makes before torch touches CUDA."""
from qlora_engine import cli


def test_the_engine_asks_torch_for_expandable_segments_unless_the_user_configured_the_allocator(monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    cli.use_expandable_segments()
    assert cli.os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    cli.use_expandable_segments()
    assert cli.os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "backend:native")
    cli.use_expandable_segments()
    assert "PYTORCH_CUDA_ALLOC_CONF" not in cli.os.environ
