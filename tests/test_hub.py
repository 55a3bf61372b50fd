"""Hub models by id, through the real huggingface_hub client against a local server in the Hub's URL layout
(tests/hub_server.py): only what training needs is fetched into a standard HF cache, a lost connection resumes
with a byte range, gated / missing / wrong revision / full disk are errors with advice, the cache is listed as
huggingface_hub wrote it, and a model by id loads offline from it."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hub_server import FakeHub, start
from safetensors import safe_open

from qlora_engine.model import hub, loading
from qlora_engine.model.local_models import local_models
from qlora_engine.protocol import events as ev
from qlora_engine.protocol.errors import EngineError
from qlora_engine.protocol.model_ref import HubRef, parse_hub_ref

ROOT = Path(__file__).resolve().parent.parent
REPO = "tiny-org/tiny-llama"
TOKEN = "hf_secret_token_for_the_test"
TRAINING_NAMES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json", "chat_template.jinja"}


@pytest.fixture(scope="module")
def fake_hub(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hub-repo") / "tiny-llama"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "pytorch_model.bin").write_bytes(b"a pickle that must never be fetched")
    (folder / "README.md").write_text("# tiny\n")
    (folder / "original").mkdir()
    (folder / "original" / "consolidated.safetensors").write_bytes(b"not for training")
    hub_, server = start(FakeHub())
    hub_.add(REPO, folder)
    hub_.add("gated-org/tiny-gated", folder, gated=True, token=TOKEN)
    yield hub_
    server.shutdown()


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "hf-home" / "hub"


def pull(fake_hub: FakeHub, cache: Path, spec: str = REPO, **kwargs) -> tuple[ev.Downloaded, list[ev.Event]]:
    seen: list[ev.Event] = []
    done = hub.pull(parse_hub_ref(spec), cache_dir=cache, endpoint=fake_hub.url, on_progress=seen.append, **kwargs)
    return done, seen


def engine(*args: str, env: dict, stdin: str | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    return subprocess.run([sys.executable, "-m", "qlora_engine", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, env={**base, **env}, input=stdin)


def test_hub_ids_are_told_from_paths_and_the_default(tmp_path, monkeypatch):
    assert parse_hub_ref("Qwen/Qwen2.5-0.5B-Instruct") == HubRef("Qwen/Qwen2.5-0.5B-Instruct")
    assert parse_hub_ref("meta-llama/Llama-3.2-1B@v1.0") == HubRef("meta-llama/Llama-3.2-1B", "v1.0")
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    for not_an_id in ("default", "./a/b", "/abs/path", "~/m", "org/name", "models/x.gguf", "a/b/c", "cfg/config.json"):
        assert parse_hub_ref(not_an_id) is None, not_an_id


def test_pull_fetches_only_what_training_needs_into_the_standard_cache(fake_hub, cache):
    done, seen = pull(fake_hub, cache)
    folder = Path(done.path)
    assert folder.parent.parent == cache / "models--tiny-org--tiny-llama" / "snapshots" or folder.parent.name
    assert {p.name for p in folder.iterdir()} == TRAINING_NAMES == set(done.files)
    assert (cache / "models--tiny-org--tiny-llama" / "refs" / "main").read_text() == done.commit
    assert done.downloaded_bytes == sum((folder / n).stat().st_size for n in TRAINING_NAMES - {"config.json"})
    progress = [e for e in seen if isinstance(e, ev.DownloadProgress)]
    assert {e.file for e in progress} == TRAINING_NAMES - {"config.json"}
    assert progress[-1].bytes == progress[-1].total_bytes == done.downloaded_bytes
    assert not fake_hub.gets_of("pytorch_model.bin") and not fake_hub.gets_of("README.md")

    fake_hub.requests.clear()
    again, _ = pull(fake_hub, cache)
    assert again.downloaded_bytes == 0 and again.path == done.path
    assert not fake_hub.gets_of("model.safetensors")


def test_a_dropped_connection_resumes_the_file_with_a_byte_range(fake_hub, cache, tiny_model_dir, monkeypatch):
    from huggingface_hub import constants

    # huggingface_hub resumes from the last whole chunk it wrote (10 MB each); smaller chunks for a small file.
    chunk = 16 * 2**10
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", chunk)
    size = (tiny_model_dir / "model.safetensors").stat().st_size
    cut = size // 2 // chunk * chunk
    fake_hub.requests.clear()
    fake_hub.drop_after["model.safetensors"] = cut
    done, _ = pull(fake_hub, cache)
    gets = fake_hub.gets_of("model.safetensors")
    assert [r[2] for r in gets] == ["", f"bytes={cut}-"]
    assert (Path(done.path) / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()


def test_a_gated_model_without_a_token_names_its_page_and_how_to_give_one(fake_hub, cache):
    with pytest.raises(EngineError) as caught:
        pull(fake_hub, cache, "gated-org/tiny-gated", token=False)
    assert caught.value.code == "gated_model"
    assert "https://huggingface.co/gated-org/tiny-gated" in caught.value.message
    assert "HF_TOKEN" in caught.value.advice and "hf auth login" in caught.value.advice
    assert not (cache / "models--gated-org--tiny-gated" / "snapshots").exists() or not any(
        (cache / "models--gated-org--tiny-gated" / "snapshots").rglob("*.safetensors"))


def test_a_gated_model_downloads_with_the_users_token_which_never_reaches_the_output(fake_hub, tmp_path):
    result = engine("pull", "gated-org/tiny-gated", "--events", "jsonl",
                    env={"HF_ENDPOINT": fake_hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_TOKEN": TOKEN})
    assert result.returncode == 0, result.stdout + result.stderr
    events = [ev.parse_line(line) for line in result.stdout.splitlines()]
    assert isinstance(events[-1], ev.Downloaded) and events[-1].repo_id == "gated-org/tiny-gated"
    assert any(isinstance(e, ev.DownloadProgress) for e in events)
    assert TOKEN not in result.stdout + result.stderr


def test_a_missing_model_and_a_wrong_revision_are_told_apart(fake_hub, cache):
    with pytest.raises(EngineError) as missing:
        pull(fake_hub, cache, "tiny-org/no-such-model", token=False)
    assert missing.value.code == "model_not_found" and "tiny-org/no-such-model" in missing.value.message
    with pytest.raises(EngineError) as revision:
        pull(fake_hub, cache, f"{REPO}@no-such-branch")
    assert revision.value.code == "revision_not_found" and "no-such-branch" in revision.value.message


def test_too_little_disk_space_stops_before_any_weight_is_fetched(fake_hub, cache, monkeypatch):
    monkeypatch.setattr(hub, "_free_bytes", lambda folder: 100 * 2**20)
    fake_hub.requests.clear()
    with pytest.raises(EngineError) as caught:
        pull(fake_hub, cache)
    assert caught.value.code == "disk_full" and "HF_HUB_CACHE" in caught.value.advice
    assert not fake_hub.gets_of("model.safetensors")


def test_disk_full_during_a_download_is_a_disk_full_error_and_leaves_no_partial_file(fake_hub, cache, monkeypatch):
    import huggingface_hub.file_download as file_download

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(file_download, "_chmod_and_move", full_disk)
    with pytest.raises(EngineError) as caught:
        pull(fake_hub, cache)
    assert caught.value.code == "disk_full" and "files already complete are kept" in caught.value.advice
    assert hub.cached_snapshot(HubRef(REPO), cache) is None
    assert not list(cache.rglob("*.incomplete"))


def test_the_cache_huggingface_hub_wrote_is_listed_with_size_and_architecture(fake_hub, cache, monkeypatch, tmp_path):
    done, _ = pull(fake_hub, cache)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "no-ollama"))
    listed = {m.name: m for m in local_models(cache).models}
    model = listed[REPO]
    assert model.source == "hf_cache" and model.model == REPO and model.path == done.path
    assert model.architecture == "LlamaForCausalLM" and model.complete and model.commit == done.commit
    assert model.size_bytes == sum(p.stat().st_size for p in Path(done.path).iterdir())


def test_gguf_files_of_ollama_and_lm_studio_are_listed(tmp_path, monkeypatch):
    import gguf

    def write_gguf(path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = gguf.GGUFWriter(str(path), "llama")
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path

    ollama = tmp_path / "ollama"
    blob = write_gguf(ollama / "blobs" / "sha256-abc123")
    manifest = ollama / "manifests" / "registry.ollama.ai" / "library" / "llama3.2" / "3b"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"layers": [{"mediaType": "application/vnd.ollama.image.model",
                                                "digest": "sha256:abc123"}]}))
    write_gguf(tmp_path / "home" / ".lmstudio" / "models" / "lmstudio-community" / "m-GGUF" / "m-Q4_K_M.gguf")
    monkeypatch.setenv("OLLAMA_MODELS", str(ollama))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    listed = {m.name: m for m in local_models(tmp_path / "empty-cache").models}
    assert listed["llama3.2:3b"].model == str(blob) and listed["llama3.2:3b"].architecture == "llama"
    assert listed["lmstudio-community/m-GGUF/m-Q4_K_M.gguf"].source == "lm_studio"


def test_a_model_by_id_loads_offline_from_the_cache(fake_hub, tmp_path):
    env = {"HF_ENDPOINT": fake_hub.url, "HF_HOME": str(tmp_path / "hf")}
    assert engine("pull", REPO, "--events", "jsonl", env=env).returncode == 0
    offline = {**env, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    result = engine("model-info", REPO, "--json", env=offline)
    info = json.loads(result.stdout.splitlines()[-1])
    assert info["kind"] == "model_info" and info["source"] == "hub" and info["architecture"] == "LlamaForCausalLM"
    assert info["path"].startswith(str(tmp_path / "hf" / "hub" / "models--tiny-org--tiny-llama" / "snapshots"))
    listed = json.loads(engine("models", "--json", env=offline).stdout)
    assert [m["model"] for m in listed["models"] if m["source"] == "hf_cache"] == [REPO]


def test_offline_a_model_not_in_the_cache_says_how_to_get_it(tmp_path):
    result = engine("model-info", REPO, "--json", env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    failure = json.loads(result.stdout.splitlines()[-1])
    assert result.returncode == 1 and failure["code"] == "offline"
    assert f"qlora-studio pull {REPO}" in failure["advice"]


def test_resolve_model_by_id_uses_the_downloaded_snapshot(fake_hub, cache, monkeypatch):
    from huggingface_hub import constants

    done, _ = pull(fake_hub, cache)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    seen: list[ev.Event] = []
    source = loading.resolve_model(REPO, on_download=seen.append)
    assert source.source == "hub" and str(source.path) == done.path and source.original == REPO
    assert isinstance(seen[-1], ev.Downloaded) and seen[-1].downloaded_bytes == 0


def test_hub_search_lists_matching_models(fake_hub, tmp_path):
    result = engine("models", "--search", "tiny", "--json", env={"HF_ENDPOINT": fake_hub.url,
                                                                    "HF_HOME": str(tmp_path / "hf")})
    answer = json.loads(result.stdout)
    assert answer["kind"] == "hub_search"
    assert {r["repo_id"] for r in answer["results"]} == {REPO, "gated-org/tiny-gated"}
    assert all(r["supported"] and r["license"] == "apache-2.0" for r in answer["results"])
    with safe_open(fake_hub.repos[REPO].folder / "model.safetensors", "np") as weights:
        params = sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())
    assert [r["params"] for r in answer["results"]] == [params, params]


def test_model_info_of_a_hub_id_reads_its_config_before_any_weight_is_downloaded(fake_hub, tmp_path):
    env = {"HF_ENDPOINT": fake_hub.url, "HF_HOME": str(tmp_path / "hf")}
    fake_hub.requests.clear()
    result = engine("model-info", REPO, "--json", env=env)
    info = json.loads(result.stdout.splitlines()[-1])
    assert info["kind"] == "model_info", result.stdout + result.stderr
    assert info["architecture"] == "LlamaForCausalLM" and info["params"] and info["has_chat_template"]
    fetched = {r[1].rsplit("/", 1)[-1] for r in fake_hub.requests if "/resolve/" in r[1]}
    assert fetched == {"config.json", "tokenizer_config.json", "chat_template.jinja"}
    assert not fake_hub.gets_of("model.safetensors") and not fake_hub.gets_of("tokenizer.json")
    sizes = {name: (fake_hub.repos[REPO].folder / name).stat().st_size for name in TRAINING_NAMES}
    assert info["downloaded"] is False and info["download_bytes"] == sum(sizes.values())

    assert engine("pull", REPO, "--events", "jsonl", env=env).returncode == 0
    after = json.loads(engine("model-info", REPO, "--json", env=env).stdout.splitlines()[-1])
    assert after["downloaded"] is True and after["download_bytes"] == 0


def test_a_token_is_checked_then_stored_where_huggingface_hub_keeps_it_and_never_printed(fake_hub, tmp_path):
    env = {"HF_ENDPOINT": fake_hub.url, "HF_HOME": str(tmp_path / "hf")}
    before = json.loads(engine("hub-token", "--json", env=env).stdout)
    assert before == {"v": 1, "kind": "hub_token", "present": False, "source": "", "user": None}
    saved = engine("hub-token", "--save", "--json", env=env, stdin=TOKEN + "\n")
    answer = json.loads(saved.stdout)
    assert answer["present"] and answer["user"] == "tiny-user", saved.stdout + saved.stderr
    assert answer["source"] == str(tmp_path / "hf" / "token")
    assert (tmp_path / "hf" / "token").read_text().strip() == TOKEN
    assert TOKEN not in saved.stdout + saved.stderr
    assert json.loads(engine("hub-token", "--json", env=env).stdout)["present"]
    # The stored token is the one huggingface_hub sends: the gated model downloads without HF_TOKEN.
    pulled = engine("pull", "gated-org/tiny-gated", "--events", "jsonl", env=env)
    assert pulled.returncode == 0 and TOKEN not in pulled.stdout + pulled.stderr


def test_a_token_the_hub_refuses_is_not_stored(fake_hub, tmp_path):
    env = {"HF_ENDPOINT": fake_hub.url, "HF_HOME": str(tmp_path / "hf")}
    result = engine("hub-token", "--save", "--json", env=env, stdin="hf_not_a_real_token\n")
    failure = json.loads(result.stdout)
    assert result.returncode == 1 and failure["code"] == "bad_token" and "not stored" in failure["message"]
    assert "huggingface.co/settings/tokens" in failure["advice"]
    assert not (tmp_path / "hf" / "token").exists() and "hf_not_a_real_token" not in result.stdout + result.stderr


@pytest.fixture
def silent_hub():
    """A 'Hub' that takes every connection and never answers (a captive portal, a stuck proxy)."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for connection in held:
        connection.close()
    server.close()


def test_a_hub_that_never_answers_is_an_offline_error_not_a_hang(silent_hub, cache, monkeypatch):
    from huggingface_hub.utils import _http

    monkeypatch.setattr(hub, "HUB_TIMEOUT_S", 0.5)
    monkeypatch.setattr(_http.time, "sleep", lambda seconds: None)  # the search's retries, without their pauses
    with pytest.raises(EngineError) as raised:
        hub.pull(parse_hub_ref(REPO), cache_dir=cache, endpoint=silent_hub)
    assert raised.value.code == "offline" and "can't be reached" in raised.value.message
    with pytest.raises(EngineError) as searched:
        hub.search("tiny", endpoint=silent_hub)
    assert searched.value.code == "offline"


def test_a_cached_model_is_used_when_the_hub_never_answers(fake_hub, silent_hub, cache, monkeypatch):
    """A run's start by id (resolve_model pulls first) goes on with the complete cached snapshot."""
    done, _ = pull(fake_hub, cache)
    monkeypatch.setattr(hub, "HUB_TIMEOUT_S", 0.5)
    again = hub.pull(parse_hub_ref(REPO), cache_dir=cache, endpoint=silent_hub)
    assert again.path == done.path and again.downloaded_bytes == 0


def test_a_token_the_hub_no_longer_accepts_says_so_not_no_such_model(fake_hub, cache):
    with pytest.raises(EngineError) as caught:
        pull(fake_hub, cache, REPO, token="hf_expired_token")
    assert caught.value.code == "bad_token" and "invalid, expired or revoked" in caught.value.message
    said = caught.value.message + caught.value.advice
    assert "settings/tokens" in caught.value.advice and "hf_expired_token" not in said


def test_a_killed_downloads_partial_file_is_removed_at_the_next_pull_and_a_running_ones_kept(fake_hub, cache):
    done, _ = pull(fake_hub, cache)
    blobs = cache / "models--tiny-org--tiny-llama" / "blobs"
    stale, running = blobs / "0123abcd.1a2b3c4d.incomplete", blobs / "0123abcd.5e6f7a8b.incomplete"
    for path in (stale, running):
        path.write_bytes(b"half a safetensors file")
    an_hour_ago = time.time() - 3600
    os.utime(stale, (an_hour_ago, an_hour_ago))
    again, _ = pull(fake_hub, cache)
    assert not stale.exists() and running.exists() and again.path == done.path
