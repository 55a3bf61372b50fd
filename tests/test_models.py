import json
import os
import pickle
import shutil

import pytest

from qlora_engine.model import loading
from qlora_engine.protocol.errors import EngineError


class WritesMarker:
    """Unpickling this object would create a marker file: proof that pickle code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def pickle_only_model(tmp_path, tiny_model_dir):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, folder)
    os.remove(folder / "model.safetensors")
    marker = tmp_path / "marker-pickle-ran"
    with open(folder / "pytorch_model.bin", "wb") as handle:
        pickle.dump(WritesMarker(str(marker)), handle)
    return folder, marker


def test_pickle_weights_are_refused_by_default_and_never_unpickled(pickle_only_model):
    folder, marker = pickle_only_model
    with pytest.raises(EngineError, match="only pickle weights") as caught:
        loading.resolve_model(str(folder))
    assert caught.value.code == "pickle_refused"
    assert "allow_pickle: true" in caught.value.advice
    assert not marker.exists()


def test_pickle_folder_passes_the_check_when_allowed(pickle_only_model):
    folder, marker = pickle_only_model
    assert loading.resolve_model(str(folder), allow_pickle=True).source == "folder"
    assert not marker.exists()


def test_missing_model_path_names_the_path(tmp_path):
    with pytest.raises(EngineError, match=f"model path {tmp_path / 'nope'} does not exist") as caught:
        loading.resolve_model(str(tmp_path / "nope"))
    assert caught.value.code == "model_not_found"


def test_folder_without_config_is_unsupported(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(EngineError, match="has no config.json"):
        loading.resolve_model(str(tmp_path / "m"))


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"x")
    with pytest.raises(EngineError, match="is a file but not a .gguf"):
        loading.resolve_model(str(tmp_path / "weights.safetensors"))


def test_custom_code_in_model_folder_is_not_executed(tmp_path, tiny_model_dir):
    folder = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, folder)
    marker = tmp_path / "marker-remote-code-ran"
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    config["model_type"] = "evil-unknown"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(EngineError) as caught:
        loading.load_plain_model(folder, dtype=None)
    assert caught.value.code in ("remote_code_refused", "unsupported_model")
    assert not marker.exists()


def test_model_info_reads_facts_without_loading_weights(tiny_model_dir):
    info = loading.model_info(str(tiny_model_dir))
    assert info.architecture == "LlamaForCausalLM"
    assert info.num_layers == 2 and info.hidden_size == 64
    assert info.has_chat_template is True
    assert info.params > 0
