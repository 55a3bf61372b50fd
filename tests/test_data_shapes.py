"""Datasets as people have them (files in tests/data/shapes, written for these tests): tool use in ShareGPT and
OpenAI form, content parts, per-turn weights, preference pairs, KTO labels, other column names, several sources
mixed by ratio, saved datasets and .arrow files, Hub ids. Each is detected, rendered with SmolLM2's template and
with a template that has tool support (Qwen2.5's), masked, and its bad rows reported by line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_data_templates import family_tokenizer

from qlora_engine import cli
from qlora_engine.protocol.errors import EngineError
from qlora_engine.training import data

SHAPES = Path(__file__).parent / "data" / "shapes"


@pytest.fixture(scope="module", params=["smollm2", "qwen2_5"])
def tokenizer(request):
    return family_tokenizer(request.param)


def prepare(path, tokenizer, **overrides):
    options = {"data_format": "auto", "max_length": 1024, "train_on_prompt": False, "bad_rows": "skip"}
    return data.prepare_file(path, tokenizer, **options | overrides)


def trained(example, tokenizer) -> str:
    return "".join(s["text"] for s in data.preview_segments(example, tokenizer) if s["trained"])


def untrained(example, tokenizer) -> str:
    return "".join(s["text"] for s in data.preview_segments(example, tokenizer) if not s["trained"])


@pytest.mark.parametrize("name, shape, usable, bad", [
    ("sharegpt_tools.jsonl", "chat", [1, 2], {3: "turn 1: unknown role 'narrator'", 4: "turn 2: the tool call is not "
                                                                                       "valid JSON"}),
    ("openai_tools.jsonl", "chat", [1, 2], {3: "the arguments of tool call 'get_weather' are not valid JSON"}),
    ("content_parts.jsonl", "chat", [1, 3], {2: "turn 1: images/audio are not supported (content part 1 is "
                                                "'image_url')"}),
    ("weights.jsonl", "chat", [1, 2], {3: "every assistant turn has weight 0: nothing to learn from",
                                       4: "turn 2: 'weight' must be 0 or 1, got 0.5"}),
    ("preference.jsonl", "preference", [1, 2, 3, 4], {5: "missing field 'rejected'"}),
    ("kto.jsonl", "prompt_completion", [1, 3], {}),
    ("questions.csv", "alpaca", [2, 3], {4: "missing field 'output' (column 'answer')"}),
])
def test_each_shape_is_detected_and_its_bad_rows_reported_by_line(tokenizer, name, shape, usable, bad):
    prepared = prepare(SHAPES / name, tokenizer)
    assert prepared.report.detected_format == shape
    assert [e.line for e in prepared.examples] == usable
    reasons = {b.line: b.reason for b in prepared.report.bad_rows}
    assert set(reasons) == set(bad) and all(bad[line] in reasons[line] for line in bad), reasons
    assert all(b.file == name for b in prepared.report.bad_rows)


def test_sharegpt_tool_calls_are_trained_and_observations_never(tokenizer):
    example = prepare(SHAPES / "sharegpt_tools.jsonl", tokenizer).examples[0]
    assert '{"name": "get_weather", "arguments": {"city": "Brindleport"}}' in trained(example, tokenizer)
    assert "Foggy, 14 degrees." in trained(example, tokenizer)
    assert '"sky": "fog"' in untrained(example, tokenizer) and "fog\"" not in trained(example, tokenizer)
    assert "You are the harbour's assistant." in untrained(example, tokenizer)  # the row's system field
    assert '"description": "The weather in a city."' in untrained(example, tokenizer)  # the tools, as prompt


def test_openai_tool_calls_and_weights_decide_what_is_trained(tokenizer):
    first, second = prepare(SHAPES / "openai_tools.jsonl", tokenizer).examples
    assert '"arguments": {"city": "Paris"}' in trained(first, tokenizer)  # JSON-text arguments became an object
    assert "temp_c" not in trained(first, tokenizer) and "temp_c" in untrained(first, tokenizer)
    assert "Let me guess: cold." in untrained(second, tokenizer)  # weight 0: context, never a target
    assert '"city": "Oslo"' in trained(second, tokenizer) and "Minus 3 and snowing." in trained(second, tokenizer)
    assert "-3 and snowing" not in trained(second, tokenizer)


def test_content_parts_are_joined_in_order(tokenizer):
    example = prepare(SHAPES / "content_parts.jsonl", tokenizer).examples[0]
    assert "Who is the mayor of Brindleport?" in untrained(example, tokenizer)
    assert "Answer in one line." in untrained(example, tokenizer)
    assert trained(example, tokenizer).startswith("Quillon Varet.")


def test_weight_0_turns_stay_in_the_context_but_are_never_trained(tokenizer):
    example = prepare(SHAPES / "weights.jsonl", tokenizer).examples[0]
    assert "Nobody." in untrained(example, tokenizer) and "Nobody." not in trained(example, tokenizer)
    assert trained(example, tokenizer).startswith("Quillon Varet.")


def test_preference_rows_train_the_chosen_answer_and_say_so(tokenizer):
    prepared = prepare(SHAPES / "preference.jsonl", tokenizer)
    texts = [trained(e, tokenizer) for e in prepared.examples]
    assert [t.split("<|im_end|>")[0] for t in texts] == ["Quillon Varet.", "On the north pier.", "The silver eel.",
                                                         "October."]
    everything = "".join(tokenizer.decode(e.input_ids) for e in prepared.examples)
    assert not any(word in everything for word in ("I don't know.", "In the sea.", "Tuna.", "May."))
    assert prepared.report.notice == data.PREFERENCE_NOTICE and "chosen" in prepared.report.notice


def test_a_kto_label_false_row_is_counted_and_never_a_target(tokenizer):
    prepared = prepare(SHAPES / "kto.jsonl", tokenizer)
    assert prepared.report.not_target_rows == 2 and prepared.report.valid_rows == 2
    everything = "".join(tokenizer.decode(e.input_ids) for e in prepared.examples)
    assert "The harbour cat." not in everything and "Underground." not in everything


def test_other_column_names_are_mapped_by_a_suggestion_or_by_the_config(tokenizer):
    prepared = prepare(SHAPES / "questions.csv", tokenizer)
    assert prepared.report.columns == {"instruction": "question", "output": "answer", "input": "context"}
    assert prepared.report.columns_suggested and prepared.report.source_columns == ["question", "context", "answer"]
    assert "The town's records." in untrained(prepared.examples[0], tokenizer)
    given = prepare(SHAPES / "questions.csv", tokenizer, columns={"instruction": "question", "output": "answer"})
    assert not given.report.columns_suggested and "The town's records." not in tokenizer.decode(
        given.examples[0].input_ids)


@pytest.mark.parametrize("names, expected", [
    (["question", "answer"], {"instruction": "question", "output": "answer"}),
    (["prompt", "response"], {"instruction": "prompt", "output": "response"}),
    (["input", "target"], {"instruction": "input", "output": "target"}),
    (["instruction", "context", "response"], {"output": "response", "input": "context"}),  # Dolly
    (["query", "answer", "system_prompt"], {"instruction": "query", "output": "answer", "system": "system_prompt"}),
    (["instruction", "output"], {}), (["id", "label"], {}),
])
def test_columns_are_suggested_from_common_names(names, expected):
    assert data.suggest_columns(names) == expected


def test_several_sources_mix_by_ratio_each_with_its_own_report(tmp_path, tokenizer):
    mine = tmp_path / "mine.jsonl"
    mine.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(30)))
    general = tmp_path / "general.jsonl"
    general.write_text("".join(json.dumps({"prompt": f"p{i}", "completion": f"c{i}"}) + "\n" for i in range(100))
                       + "{broken\n")
    options = {"data_format": "auto", "max_length": 256, "train_on_prompt": False}
    mixed = data.prepare_mix([(mine, 0.75), (general, 0.25)], tokenizer, seed=1, **options)
    first, second = mixed.reports
    assert (first.file, first.used_rows, first.ratio) == ("mine.jsonl", 30, 0.75)
    assert (second.file, second.used_rows, second.format) == ("general.jsonl", 10, "prompt_completion")
    assert [b.line for b in second.bad_rows] == [101] and not first.bad_rows
    assert len(mixed.examples) == 40
    again = data.prepare_mix([(mine, 0.75), (general, 0.25)], tokenizer, seed=1, **options)
    assert [e.input_ids for e in again.examples] == [e.input_ids for e in mixed.examples]
    with pytest.raises(EngineError, match="together below 1"):
        data.mix_ratios([0.6, 0.5])


def test_saved_datasets_and_arrow_files_are_read(tmp_path, tokenizer):
    import datasets

    rows = {"instruction": ["q1", "q2", "q3"], "output": ["a1", "a2", "a3"]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "saved_dict"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    for source in (tmp_path / "saved", tmp_path / "saved_dict", arrow):
        prepared = prepare(source, tokenizer)
        assert [e.line for e in prepared.examples] == [1, 2, 3] and prepared.report.format == "alpaca"
    (tmp_path / "plain").mkdir()
    with pytest.raises(EngineError, match="not one written by Dataset.save_to_disk"):
        prepare(tmp_path / "plain", tokenizer)


def test_a_missing_local_path_is_not_mistaken_for_a_hub_id(tmp_path, tokenizer):
    with pytest.raises(EngineError, match="does not exist"):
        prepare(tmp_path / "nope.jsonl", tokenizer)


def test_the_data_command_maps_columns_and_mixes_with_each_sources_report(tiny_model_dir, tmp_path, capsys):
    csv = tmp_path / "qa.csv"
    csv.write_text("q,a\nWho is the mayor?,Quillon Varet.\nWhere is the pier?,North.\n")
    assert cli.main(["data", str(csv), "--model", str(tiny_model_dir), "--columns", "instruction=q,output=a",
                     "--data-mix", f"{SHAPES / 'kto.jsonl'}=0.5", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert report["columns"] == {"instruction": "q", "output": "a"} and not report["columns_suggested"]
    assert [(s["file"], s["used_rows"]) for s in report["sources"]] == [("qa.csv", 2), ("kto.jsonl", 2)]
    assert report["sources"][1]["not_target_rows"] == 2
    assert {row["file"] for row in report["preview"]} == {"qa.csv", "kto.jsonl"}


def test_a_run_on_preference_pairs_mixed_with_kto_rows_says_what_it_trained_in_data_ready(tiny_model_dir, tmp_path):
    from test_train import run, tiny_config

    config = tiny_config(tiny_model_dir, SHAPES / "preference.jsonl", tmp_path / "run", max_steps=1,
                         data_mix={str(SHAPES / "kto.jsonl"): 1 / 3}, val_fraction=0.0)
    _, events = run(config)
    ready = next(e for e in events if e.kind == "data_ready")
    assert ready.notices == [data.PREFERENCE_NOTICE]
    assert [(s["file"], s["format"], s["used_rows"]) for s in ready.sources] == [
        ("preference.jsonl", "preference", 4), ("kto.jsonl", "prompt_completion", 2)]
    assert ready.not_target_rows == 2 and ready.train_rows == 6
    assert [(b["file"], b["line"]) for b in ready.bad_rows] == [("preference.jsonl", 5)]
    assert events[-1].kind == "finished"




def test_a_hub_dataset_id_offline_and_uncached_is_a_clear_error(tmp_path, tiny_model_dir):
    import os
    import subprocess
    import sys

    environ = os.environ | {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "qlora_engine", "data", "someone/harbour-facts:train", "--model",
                             str(tiny_model_dir), "--json"], capture_output=True, text=True, env=environ, timeout=300)
    answer = json.loads(result.stdout.splitlines()[-1])
    assert answer["kind"] == "error" and answer["code"] == "offline", answer
    assert "someone/harbour-facts" in answer["message"] and "HF_HUB_OFFLINE" in answer["message"]
    assert "Traceback" not in result.stderr
