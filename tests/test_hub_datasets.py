"""Hub datasets by id, through the real huggingface_hub and datasets against a local server in the Hub's URL layout
(tests/hub_server.py): the rows read like the same file on disk, the files land in the HF cache and read from there
offline (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE) without a request, a split and a revision are picked from the id,
and missing / wrong revision / gated / offline-and-not-cached are our errors with advice."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hub_server import FakeHub, start
from tiny_models import write_jsonl

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "resources" / "sample" / "train.jsonl"
FACTS, SPLITS, GATED = "tiny-org/harbour-facts", "tiny-org/harbour-splits", "gated-org/harbour-gated"
PARQUET = "tiny-org/harbour-parquet"  # as most Hub datasets are stored: data/<split>-00000-of-00001.parquet
TOKEN = "hf_secret_token_for_the_dataset_test"
HF_SETTINGS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_ENDPOINT", "HF_HOME",
               "HF_HUB_CACHE", "HF_DATASETS_CACHE")


def chat_row(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


@pytest.fixture(scope="module")
def fake_hub(tmp_path_factory):
    repos = tmp_path_factory.mktemp("hub-datasets")
    facts = repos / "harbour-facts"
    facts.mkdir()
    shutil.copy(SAMPLE, facts / "train.jsonl")
    (facts / "README.md").write_text("# Harbour facts\n\nInvented facts about an island town.\n")
    splits = repos / "harbour-splits"
    (splits / "data").mkdir(parents=True)
    write_jsonl(splits / "data" / "train.jsonl", [chat_row(f"Who is mayor {i}?", f"Varet {i}.") for i in range(6)])
    write_jsonl(splits / "data" / "test.jsonl", [chat_row(f"Who keeps lamp {i}?", f"Orla {i}.") for i in range(2)])
    parquet = repos / "harbour-parquet"
    (parquet / "data").mkdir(parents=True)
    write_parquet(parquet / "data" / "train-00000-of-00001.parquet",
                  [chat_row(f"Who rows boat {i}?", f"Brann {i}.") for i in range(5)])
    write_parquet(parquet / "data" / "test-00000-of-00001.parquet", [chat_row("Who rows the last boat?", "Brann.")])
    hub_, server = start(FakeHub())
    hub_.add(PARQUET, parquet, repo_type="dataset")
    hub_.add(FACTS, facts, repo_type="dataset")
    hub_.add(SPLITS, splits, repo_type="dataset")
    hub_.add(GATED, facts, gated=True, token=TOKEN, repo_type="dataset")
    yield hub_
    server.shutdown()


def write_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)


def engine_env(fake_hub: FakeHub, hf_home: Path, **settings: str) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in HF_SETTINGS}
    return {**base, "HF_ENDPOINT": fake_hub.url, "HF_HOME": str(hf_home), **settings}


def data_answer(spec: str, model: Path, env: dict) -> tuple[dict, str]:
    """`qlora-studio data SPEC --json` as a user runs it: its answer and its log (stderr)."""
    result = subprocess.run([sys.executable, "-m", "qlora_engine", "data", spec, "--model", str(model), "--json"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert "Traceback" not in result.stderr, result.stderr
    return json.loads(result.stdout.splitlines()[-1]), result.stderr


READ = """
import json, sys
from qlora_engine.protocol.errors import EngineError
from qlora_engine.training.data.sources import read_records
for spec in sys.argv[1:]:
    try:
        records, _ = read_records(spec)
        print(json.dumps({"spec": spec, "rows": [row for _, row in records]}))
    except EngineError as exc:
        print(json.dumps({"spec": spec, "code": exc.code, "message": exc.message, "advice": exc.advice}))
"""


def read_specs(specs: list[str], env: dict) -> dict[str, dict]:
    """Each spec read by the data layer in one engine process: its rows, or its error."""
    result = subprocess.run([sys.executable, "-c", READ, *specs], capture_output=True, text=True, cwd=ROOT,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    return {answer["spec"]: answer for answer in map(json.loads, result.stdout.splitlines())}


def dataset_requests(fake_hub: FakeHub) -> list[tuple[str, str, str]]:
    return [r for r in fake_hub.requests if "datasets/" in r[1]]


def same_but_the_name(hub_answer: dict, local_answer: dict, spec: str, local_name: str) -> None:
    text = json.dumps(hub_answer)
    assert spec in text
    assert json.loads(text.replace(spec, local_name)) == json.loads(json.dumps(local_answer).replace(
        str(SAMPLE), local_name))


def test_hub_dataset_ids_are_told_from_paths_with_the_models_rule():
    from qlora_engine.protocol.model_ref import HubRef
    from qlora_engine.training.data.sources import hub_dataset_ref

    assert hub_dataset_ref("org/name") == (HubRef("org/name"), "train")
    assert hub_dataset_ref("org/name@v1.0:test") == (HubRef("org/name", "v1.0"), "test")
    for not_an_id in ("data/train.jsonl", "./org/name", "/abs/path", "~/org/name", "a/b/c", "org/name:a/b",
                      "org\\name"):
        assert hub_dataset_ref(not_an_id) is None, not_an_id


@pytest.fixture(scope="module")
def downloaded(fake_hub, tiny_model_dir, tmp_path_factory) -> tuple[Path, dict]:
    """harbour-facts read once, online, into a fresh HF_HOME: (that HF_HOME, the data answer)."""
    hf_home = tmp_path_factory.mktemp("hf-home")
    answer, _ = data_answer(FACTS, tiny_model_dir, engine_env(fake_hub, hf_home))
    return hf_home, answer


def test_a_hub_dataset_downloads_through_the_real_client_and_reads_like_the_same_file(downloaded, fake_hub,
                                                                                      tiny_model_dir):
    hf_home, answer = downloaded
    assert answer["kind"] != "error", answer
    assert answer["detected_format"] == "alpaca" and answer["rows"] == len(SAMPLE.read_text().splitlines()) == 264
    local, _ = data_answer(str(SAMPLE), tiny_model_dir, engine_env(fake_hub, hf_home, HF_HUB_OFFLINE="1"))
    same_but_the_name(answer, local, FACTS, "train.jsonl")
    # The file is in the HF cache as huggingface_hub lays it out (refs/main -> a snapshot of the served commit).
    storage = hf_home / "hub" / "datasets--tiny-org--harbour-facts"
    commit = fake_hub.repos[f"datasets/{FACTS}"].commit
    assert (storage / "refs" / "main").read_text() == commit
    assert (storage / "snapshots" / commit / "train.jsonl").read_bytes() == SAMPLE.read_bytes()
    assert [r[0] for r in fake_hub.gets_of("train.jsonl") if FACTS in r[1]] == ["GET"]


@pytest.mark.parametrize("setting", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_a_cached_hub_dataset_reads_offline_without_a_request(downloaded, fake_hub, tiny_model_dir, setting):
    hf_home, online = downloaded
    fake_hub.requests.clear()
    offline, _ = data_answer(FACTS, tiny_model_dir, engine_env(fake_hub, hf_home, **{setting: "1"}))
    assert offline == online
    assert dataset_requests(fake_hub) == []


def test_offline_a_revision_never_read_is_refused_not_answered_with_the_cached_one(downloaded, fake_hub):
    hf_home, _ = downloaded
    commit = fake_hub.repos[f"datasets/{FACTS}"].commit
    fake_hub.requests.clear()
    answers = read_specs([f"{FACTS}@{commit}", f"{FACTS}@v2"], engine_env(fake_hub, hf_home, HF_HUB_OFFLINE="1"))
    assert len(answers[f"{FACTS}@{commit}"]["rows"]) == 264
    refused = answers[f"{FACTS}@v2"]
    assert refused.get("code") == "offline", refused
    assert f"{FACTS}@v2 is not in the HF cache and HF_HUB_OFFLINE is set" in refused["message"]
    assert dataset_requests(fake_hub) == []


@pytest.mark.parametrize("setting", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_offline_a_dataset_not_in_the_cache_is_an_offline_error_without_a_request(fake_hub, tmp_path, setting):
    fake_hub.requests.clear()
    answer = read_specs([SPLITS], engine_env(fake_hub, tmp_path / "hf", **{setting: "1"}))[SPLITS]
    assert answer.get("code") == "offline", answer
    assert answer["message"] == f"the Hub dataset {SPLITS} is not in the HF cache and {setting} is set"
    assert f"unset {setting}" in answer["advice"]
    assert dataset_requests(fake_hub) == []


def test_a_split_and_a_revision_are_picked_from_the_id(fake_hub, tmp_path):
    commit = fake_hub.repos[f"datasets/{SPLITS}"].commit
    answers = read_specs([f"{SPLITS}:test", f"{SPLITS}@{commit}", f"{SPLITS}:validation"],
                         engine_env(fake_hub, tmp_path / "hf"))
    assert answers[f"{SPLITS}:test"]["rows"] == [chat_row(f"Who keeps lamp {i}?", f"Orla {i}.") for i in range(2)]
    assert answers[f"{SPLITS}@{commit}"]["rows"] == [chat_row(f"Who is mayor {i}?", f"Varet {i}.") for i in range(6)]
    no_split = answers[f"{SPLITS}:validation"]
    assert no_split.get("code") == "bad_dataset", no_split
    assert "no split 'validation'" in no_split["message"] and "'train', 'test'" in no_split["message"]


def test_a_missing_dataset_and_a_wrong_revision_are_told_apart(fake_hub, tmp_path):
    answers = read_specs(["tiny-org/no-such-dataset", f"{FACTS}@no-such-branch"], engine_env(fake_hub, tmp_path / "hf"))
    missing = answers["tiny-org/no-such-dataset"]
    assert missing.get("code") == "dataset_not_found", missing
    assert "tiny-org/no-such-dataset" in missing["message"] and "HF_TOKEN" in missing["advice"]
    revision = answers[f"{FACTS}@no-such-branch"]
    assert revision.get("code") == "revision_not_found", revision
    assert revision["message"] == f"the Hub dataset {FACTS} has no revision 'no-such-branch'"
    assert f"https://huggingface.co/datasets/{FACTS}/tree/main" in revision["advice"]


@pytest.mark.parametrize(("token", "why"), [(None, "no token was sent"),
                                            ("hf_someone_elses_token", "your token has not been granted access")])
def test_a_gated_dataset_without_access_names_its_page_and_how_to_give_a_token(fake_hub, tmp_path, token, why):
    env = engine_env(fake_hub, tmp_path / "hf", **({"HF_TOKEN": token} if token else {}))
    answer = read_specs([GATED], env)[GATED]
    assert answer.get("code") == "gated_dataset", answer
    assert f"gated ({why})" in answer["message"]
    assert f"https://huggingface.co/datasets/{GATED}" in answer["message"]
    assert "HF_TOKEN" in answer["advice"] and "hf auth login" in answer["advice"]


def test_a_gated_dataset_reads_with_the_users_token_which_never_reaches_the_output(fake_hub, tiny_model_dir,
                                                                                   tmp_path):
    answer, log = data_answer(GATED, tiny_model_dir, engine_env(fake_hub, tmp_path / "hf", HF_TOKEN=TOKEN))
    assert answer.get("rows") == 264, answer
    assert TOKEN not in json.dumps(answer) + log


def test_a_parquet_hub_dataset_reads_its_splits_with_nested_chat_columns(fake_hub, tmp_path):
    """Parquet shards, the Hub's usual layout: each split's rows, the `messages` lists of structs as chat turns."""
    answers = read_specs([PARQUET, f"{PARQUET}:test"], engine_env(fake_hub, tmp_path / "hf"))
    assert answers[PARQUET]["rows"] == [chat_row(f"Who rows boat {i}?", f"Brann {i}.") for i in range(5)]
    assert answers[f"{PARQUET}:test"]["rows"] == [chat_row("Who rows the last boat?", "Brann.")]
