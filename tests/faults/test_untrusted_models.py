"""A downloaded model folder is untrusted: exports never carry along what its symlinks point at.

Exports write fresh files (safetensors from the weights in memory, the tokenizer re-serialized); nothing is copied
from the model folder, so a symlink in it that points outside (at a home folder, at /etc) cannot leak into an export.
Pickle weights and `auto_map` code are covered by tests/test_models.py.
"""
from __future__ import annotations

import os
import shutil

import pytest
from test_train import run, tiny_config
from tiny_models import write_jsonl

from qlora_engine.products import export

SECRET = "the contents of a private file outside the model folder"


@pytest.fixture(scope="module")
def run_on_a_model_with_outside_symlinks(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("untrusted")
    outside = root / "outside"
    (outside / "private").mkdir(parents=True)
    (outside / "secret.txt").write_text(SECRET)
    (outside / "private" / "notes.txt").write_text(SECRET)
    model = shutil.copytree(tiny_model_dir, root / "model")
    os.symlink(outside / "secret.txt", model / "secret.txt")
    os.symlink(outside / "private", model / "private")
    os.symlink(outside / "secret.txt", model / "README.md")  # a name a model card would have
    data_file = write_jsonl(root / "d.jsonl", [{"instruction": f"Q{i}?", "output": f"A {i}."} for i in range(8)])
    config = tiny_config(model, data_file, root / "run", max_steps=2)
    config.save(root / "run" / "config.yaml")
    run(config)
    return root / "run"


@pytest.mark.parametrize("kind", ["adapter", "merged"])
def test_an_export_contains_no_symlink_and_nothing_from_outside_the_model_folder(
        run_on_a_model_with_outside_symlinks, kind):
    run_dir = run_on_a_model_with_outside_symlinks
    assert export.export_run(run_dir, kind).ok
    exported = list((run_dir / "exports" / kind).rglob("*"))
    assert exported and not [p for p in exported if p.is_symlink()]
    assert not {"secret.txt", "private", "notes.txt"} & {p.name for p in exported}  # (PEFT writes its own README)
    assert not [p for p in exported if p.is_file() and SECRET.encode() in p.read_bytes()]


def test_the_run_folder_itself_holds_no_symlink_after_training(run_on_a_model_with_outside_symlinks):
    assert not [p for p in run_on_a_model_with_outside_symlinks.rglob("*") if p.is_symlink()]
