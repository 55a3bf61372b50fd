import json

import pytest
from tiny_models import build_tokenizer, write_jsonl

from qlora_engine.protocol.errors import EngineError
from qlora_engine.training import data


def prepare(path, tokenizer, **overrides):
    options = {"data_format": "auto", "max_length": 256, "train_on_prompt": False, "bad_rows": "skip"}
    options.update(overrides)
    return data.prepare_file(path, tokenizer, **options)


def trained_text(example, tokenizer):
    return tokenizer.decode([t for t, m in zip(example.input_ids, example.trained_token_mask) if m])


@pytest.mark.parametrize("row, expected", [
    ({"instruction": "a", "input": "", "output": "b"}, "alpaca"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "chat"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}, "chat"),
    ({"prompt": "a", "completion": "b"}, "prompt_completion"),
    ({"text": "a b c"}, "text"),
])
def test_each_format_is_detected_from_its_fields(tmp_path, tiny_tokenizer, row, expected):
    prepared = prepare(write_jsonl(tmp_path / "d.jsonl", [row] * 3), tiny_tokenizer)
    assert prepared.report.detected_format == expected
    assert len(prepared.examples) == 3


def test_alpaca_loss_is_on_the_response_only(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Who is the mayor?", "input": "",
                                               "output": "Quillon Varet."}])
    example = prepare(path, tiny_tokenizer).examples[0]
    assert trained_text(example, tiny_tokenizer) == "Quillon Varet.<|im_end|>"
    assert "mayor" in tiny_tokenizer.decode(example.input_ids)


def test_train_on_prompt_trains_every_token(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Who?", "completion": "Varet."}])
    example = prepare(path, tiny_tokenizer, train_on_prompt=True).examples[0]
    assert all(example.trained_token_mask)


def test_multi_turn_chat_trains_every_assistant_turn_and_no_user_turn(tmp_path, tiny_tokenizer):
    row = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who?"},
                        {"role": "assistant", "content": "Varet."}, {"role": "user", "content": "Where?"},
                        {"role": "assistant", "content": "Brindleport."}]}
    example = prepare(write_jsonl(tmp_path / "d.jsonl", [row]), tiny_tokenizer).examples[0]
    trained = trained_text(example, tiny_tokenizer)
    assert "Varet." in trained and "Brindleport." in trained
    assert "Who?" not in trained and "Be brief" not in trained


def test_sharegpt_roles_are_mapped(tmp_path, tiny_tokenizer):
    row = {"conversations": [{"from": "human", "value": "Who?"}, {"from": "gpt", "value": "Varet."}]}
    example = prepare(write_jsonl(tmp_path / "d.jsonl", [row]), tiny_tokenizer).examples[0]
    assert "<|im_start|>user\nWho?" in tiny_tokenizer.decode(example.input_ids)


def test_plain_template_is_used_when_the_tokenizer_has_no_chat_template(tmp_path):
    tokenizer = build_tokenizer(chat_template=None)
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Who?", "input": "", "output": "Varet."}])
    example = prepare(path, tokenizer).examples[0]
    assert tokenizer.decode(example.input_ids).startswith("### Instruction:\nWho?\n\n### Response:\nVaret.")
    assert trained_text(example, tokenizer).startswith("Varet.")


def test_long_rows_are_truncated_and_counted(tmp_path, tiny_tokenizer):
    rows = [{"instruction": "Who?", "input": "", "output": "Varet " * 200}, {"instruction": "a", "output": "b"}]
    prepared = prepare(write_jsonl(tmp_path / "d.jsonl", rows), tiny_tokenizer, max_length=32)
    assert prepared.report.truncated_rows == 1
    assert max(len(e.input_ids) for e in prepared.examples) == 32


def test_bad_rows_are_reported_with_their_line_numbers(tmp_path, tiny_tokenizer):
    path = tmp_path / "d.jsonl"
    good = json.dumps({"instruction": "a", "input": "", "output": "b"})
    lines = [good, '{"instruction": "a", "output": ', json.dumps({"instruction": "a"}),
             json.dumps({"instruction": "a", "output": "  "}), json.dumps({"instruction": 3, "output": "b"}), good]
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"instruction": "\xff\xfe", "output": "b"}\n')
    prepared = prepare(path, tiny_tokenizer)
    reasons = {bad.line: bad.reason for bad in prepared.report.bad_rows}
    assert set(reasons) == {2, 3, 4, 5, 7}
    assert "not valid JSON" in reasons[2]
    assert reasons[3] == "missing field 'output'"
    assert reasons[4] == "empty response 'output'"
    assert reasons[5] == "field 'instruction' must be text, got int"
    assert "not UTF-8" in reasons[7]
    assert len(prepared.examples) == 2


def test_bad_rows_stop_the_run_when_configured(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "a"}])
    with pytest.raises(EngineError, match="d.jsonl line 2: missing field 'output'"):
        prepare(path, tiny_tokenizer, bad_rows="stop")


def test_empty_file_is_a_clear_error(tmp_path, tiny_tokenizer):
    (tmp_path / "d.jsonl").write_text("")
    with pytest.raises(EngineError, match="is empty"):
        prepare(tmp_path / "d.jsonl", tiny_tokenizer)


def test_wrong_format_override_reports_every_row(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}] * 2)
    with pytest.raises(EngineError, match="no usable rows out of 2.*line 1: missing field 'messages'"):
        prepare(path, tiny_tokenizer, data_format="chat")


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".json", ".txt"])
def test_other_file_types_load(tmp_path, tiny_tokenizer, suffix):
    import pandas as pd

    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(5)]
    path = tmp_path / f"d{suffix}"
    if suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    elif suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    elif suffix == ".json":
        path.write_text(json.dumps(rows, indent=2))
    else:
        path.write_text("first line of text\n\nsecond line\n")
    prepared = prepare(path, tiny_tokenizer)
    assert len(prepared.examples) == (2 if suffix == ".txt" else 5)
    assert prepared.report.format == ("text" if suffix == ".txt" else "alpaca")


def test_csv_bad_row_line_counts_the_header(tmp_path, tiny_tokenizer):
    path = tmp_path / "d.csv"
    path.write_text("instruction,input,output\nq1,,a1\nq2,,\n")
    prepared = prepare(path, tiny_tokenizer)
    assert [(b.line, b.reason) for b in prepared.report.bad_rows] == [(3, "missing field 'output'")]


def test_validation_split_is_deterministic_and_disjoint():
    examples = [data.Tokenized([i], [True], i) for i in range(50)]
    train_a, val_a = data.split_validation(examples, 0.1, seed=1)
    train_b, val_b = data.split_validation(examples, 0.1, seed=1)
    assert [e.line for e in val_a] == [e.line for e in val_b] and len(val_a) == 5
    assert not {e.line for e in val_a} & {e.line for e in train_a}


def test_preview_segments_mark_the_trained_text(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Who?", "output": "Varet."}])
    segments = data.preview_segments(prepare(path, tiny_tokenizer).examples[0], tiny_tokenizer)
    assert [s["text"] for s in segments if s["trained"]] == ["Varet.<|im_end|>"]
