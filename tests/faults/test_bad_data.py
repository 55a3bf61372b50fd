"""Broken training data is reported by file and line, and skipped or stops the run as configured.

Property tests (hypothesis): any JSON-like row either normalizes or raises our RowError (which becomes a bad-row
report), and what normalizes always renders and tokenizes with any template; any file's bytes either prepare, with
bad rows named by file and line, or raise our `bad_dataset` error; nothing else ever comes out.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_train import run, tiny_config
from tiny_models import build_tokenizer, write_jsonl

from qlora_engine import cli
from qlora_engine.protocol.errors import EngineError
from qlora_engine.protocol.events import read_events
from qlora_engine.training import data

GOOD = {"instruction": "Who is the mayor?", "input": "", "output": "Quillon Varet."}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def prepare(path, tokenizer, **options):
    values = {"data_format": "auto", "max_length": 64, "train_on_prompt": False, "bad_rows": "skip"}
    values.update(options)
    return data.prepare_file(path, tokenizer, **values)


def bad_lines(prepared):
    return {bad.line: bad.reason for bad in prepared.report.bad_rows}


@pytest.fixture
def broken_jsonl(tmp_path):
    """A mostly good alpaca file with one broken row of each kind; the comment says which line is which."""
    path = tmp_path / "broken.jsonl"
    rows = [json.dumps(GOOD).encode(),                                    # 1 good
            b'{"instruction": "unterminated", "output": "x"',              # 2 malformed JSON
            json.dumps({"instruction": 5, "output": "x"}).encode(),        # 3 wrong type
            json.dumps({"instruction": "no answer"}).encode(),             # 4 missing field
            json.dumps({"instruction": "q", "output": "  "}).encode(),     # 5 empty response
            b'{"instruction": "caf\xe9", "output": "latin-1"}',            # 6 not UTF-8
            json.dumps(["a", "list"]).encode(),                            # 7 not an object
            json.dumps(GOOD).encode()]                                     # 8 good
    path.write_bytes(b"\n".join(rows) + b"\n")
    return path


def test_every_kind_of_broken_row_is_reported_with_its_line_and_the_good_rows_are_kept(broken_jsonl, tokenizer):
    prepared = prepare(broken_jsonl, tokenizer)
    assert [e.line for e in prepared.examples] == [1, 8]
    reasons = bad_lines(prepared)
    assert sorted(reasons) == [2, 3, 4, 5, 6, 7]
    assert "not valid JSON" in reasons[2]
    assert "field 'instruction' must be text, got int" in reasons[3]
    assert "missing field 'output'" in reasons[4]
    assert "empty response 'output'" in reasons[5]
    assert "not UTF-8 text (byte 0xe9" in reasons[6]
    assert "expected an object" in reasons[7]
    assert all(bad.file == "broken.jsonl" for bad in prepared.report.bad_rows)


def test_json_that_python_or_a_tokenizer_cannot_take_is_a_bad_row_with_its_line(tmp_path, tokenizer):
    path = tmp_path / "odd.jsonl"
    path.write_text("\n".join([json.dumps(GOOD),
                               '{"instruction": "How many?", "output": ' + "9" * 5000 + "}",  # 2: too many digits
                               "[" * 100_000 + "]" * 100_000,  # 3: nested too deeply
                               '{"instruction": "caf\\ud800", "output": "x"}',  # 4: a lone surrogate escape
                               json.dumps(GOOD)]) + "\n")
    prepared = prepare(path, tokenizer)
    assert [e.line for e in prepared.examples] == [1, 5]
    assert bad_lines(prepared) == {
        2: "not valid JSON (Exceeds the limit (4300 digits) for integer string conversion)",
        3: "not valid JSON (nested too deeply)",
        4: "field 'instruction' holds an invalid character (a lone surrogate \\ud800 at character 4)"}


def test_a_json_array_nested_too_deeply_is_a_clear_error(tmp_path, tokenizer):
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(EngineError, match="deep.json: not valid JSON \\(nested too deeply\\)") as caught:
        prepare(tmp_path / "deep.json", tokenizer)
    assert caught.value.code == "bad_dataset" and ".jsonl" in caught.value.advice


def test_bad_rows_stop_the_run_when_configured_naming_file_and_lines(broken_jsonl, tokenizer):
    with pytest.raises(EngineError) as caught:
        prepare(broken_jsonl, tokenizer, bad_rows="stop")
    assert caught.value.code == "bad_dataset"
    assert "6 bad row(s): broken.jsonl line 2:" in caught.value.message
    assert "broken.jsonl line 3:" in caught.value.message
    assert "bad_rows: skip" in caught.value.advice


def test_a_run_skips_bad_rows_and_lists_them_in_data_ready(tiny_model_dir, broken_jsonl, tmp_path):
    good_rows = write_jsonl(tmp_path / "more.jsonl", [GOOD] * 8)
    broken_jsonl.write_bytes(broken_jsonl.read_bytes() + good_rows.read_bytes())
    _, events = run(tiny_config(tiny_model_dir, broken_jsonl, tmp_path / "run", max_steps=1))
    ready = next(e for e in events if e.kind == "data_ready")
    assert ready.skipped_rows == 6
    assert [(b["file"], b["line"]) for b in ready.bad_rows] == [("broken.jsonl", n) for n in range(2, 8)]
    assert events[-1].kind == "finished"


def test_the_data_command_reports_bad_rows_by_line_as_json(tiny_model_dir, broken_jsonl, capsys):
    assert cli.main(["data", str(broken_jsonl), "--model", str(tiny_model_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert report["valid_rows"] == 2 and [b["line"] for b in report["bad_rows"]] == [2, 3, 4, 5, 6, 7]


def test_a_10_mb_single_line_is_truncated_quickly_not_choked_on(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "huge.jsonl", [GOOD, {"instruction": "Say a lot.", "output": "word " * 2_000_000}])
    assert path.stat().st_size > 10_000_000
    started = time.perf_counter()
    prepared = prepare(path, tokenizer)
    assert time.perf_counter() - started < 5  # tokenizing the whole line takes ~20 s on this machine
    assert prepared.report.truncated_rows == 1 and len(prepared.examples[1].input_ids) == 64


def test_cutting_a_long_row_before_tokenizing_keeps_exactly_the_tokens_training_sees(tokenizer):
    example = data.normalize({"instruction": "Say a lot.", "output": "Quillon Varet, mayor. " * 400}, "alpaca", 1)
    text, _ = data.render(example, tokenizer)
    assert len(text) > 64 * data.CHARS_PER_TOKEN_BOUND
    tokenized = data.tokenize(example, tokenizer, max_length=64, train_on_prompt=False)
    assert tokenized.truncated
    assert tokenized.input_ids == tokenizer(text, add_special_tokens=False)["input_ids"][:64]


def test_an_empty_file_is_a_clear_error(tmp_path, tokenizer):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(EngineError, match="empty.jsonl is empty") as caught:
        prepare(tmp_path / "empty.jsonl", tokenizer)
    assert caught.value.code == "bad_dataset" and caught.value.advice


def test_a_file_of_blank_lines_has_no_usable_rows(tmp_path, tokenizer):
    (tmp_path / "blank.jsonl").write_text("\n\n  \n")
    with pytest.raises(EngineError, match="could not detect the row format"):
        prepare(tmp_path / "blank.jsonl", tokenizer)


def test_a_csv_with_stray_quotes_reports_each_broken_row_by_the_line_it_starts_on(tmp_path, tokenizer):
    path = tmp_path / "quotes.csv"
    path.write_bytes(b'instruction,output\n"Who is mayor?","Varet."\n"stray,"quote\n"Who else?,Nobody.\n'
                     b'"Third","row"\n"caf\xe9","latin-1"\n"a","b","c"\n"Who?","Me, with a comma."\n')
    prepared = prepare(path, tokenizer)
    assert [e.line for e in prepared.examples] == [2, 8]
    assert [bad.describe() for bad in prepared.report.bad_rows] == [
        "quotes.csv line 3: broken CSV quoting: ',' expected after '\"'",
        "quotes.csv line 4: broken CSV quoting: ',' expected after '\"' (the row runs on to line 5)",
        "quotes.csv line 6: not UTF-8 text (byte 0xe9 at column 5)",
        "quotes.csv line 7: 3 field(s), but the header has 2"]


def test_csv_line_numbers_stay_right_after_a_quoted_field_that_spans_lines(tmp_path, tokenizer):
    path = tmp_path / "multiline.csv"
    path.write_text('instruction,output\n"Write two lines.","First line,\nsecond line."\n"Who?",\n')
    prepared = prepare(path, tokenizer)
    assert [e.line for e in prepared.examples] == [2]
    assert [bad.describe() for bad in prepared.report.bad_rows] == ["multiline.csv line 4: missing field 'output'"]


def test_a_json_array_that_does_not_parse_names_its_line(tmp_path, tokenizer):
    path = tmp_path / "rows.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c", "output": }\n]\n')
    with pytest.raises(EngineError, match="rows.json line 3: not valid JSON"):
        prepare(path, tokenizer)


def test_a_wrong_format_override_names_the_file_the_line_and_the_format(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "alpaca.jsonl", [GOOD] * 3)
    with pytest.raises(EngineError) as caught:
        prepare(path, tokenizer, data_format="chat")
    assert "no usable rows out of 3" in caught.value.message
    assert "alpaca.jsonl line 1: missing field 'messages'" in caught.value.message
    assert "(chat)" in caught.value.advice


# ----------------------------------------------------------------------------- through the CLI, as a user meets it
TRAIN_FLAGS = ["--max-steps", "1", "--max-length", "64", "--events", "jsonl"]


@pytest.mark.parametrize("name, content, options, expected", [
    ("empty.jsonl", b"", [], "empty.jsonl is empty"),
    ("quotes.csv", b'instruction,output\n"Who is mayor?","Varet."\n"Who else?,Nobody.\n', ["--bad-rows", "stop"],
     "1 bad row(s): quotes.csv line 3: broken CSV quoting"),
    ("alpaca.jsonl", (json.dumps(GOOD) + "\n").encode() * 3, ["--data-format", "chat"],
     "alpaca.jsonl line 1: missing field 'messages'"),
], ids=["an-empty-file", "a-csv-with-a-stray-quote", "a-wrong-format-override"])
def test_bad_data_stops_the_train_command_with_an_error_event_naming_file_and_line(
        engine_in_process, tiny_model_dir, tmp_path, capfd, name, content, options, expected):
    (tmp_path / name).write_bytes(content)
    code = engine_in_process("--model", str(tiny_model_dir), "--data", str(tmp_path / name),
                             "--run-dir", str(tmp_path / "run"), *TRAIN_FLAGS, *options)
    error = list(read_events(tmp_path / "run" / "events.jsonl"))[-1]
    assert code == 1 and error.kind == "error" and error.code == "bad_dataset"
    assert expected in error.message and error.advice
    assert "Traceback" not in capfd.readouterr().err


def test_the_data_command_lists_a_csvs_broken_rows_by_line_for_the_data_page(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "quotes.csv"
    path.write_bytes(b'instruction,output\n"Who is mayor?","Varet."\n"stray,"quote\n"Who?","Me."\n')
    assert cli.main(["data", str(path), "--model", str(tiny_model_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert report["valid_rows"] == 2
    assert report["bad_rows"] == [{"line": 3, "reason": "broken CSV quoting: ',' expected after '\"'"}]


# ----------------------------------------------------------------------------- property tests
# Text as JSON can carry it: any character, and now and then lone UTF-16 surrogates ("\\ud800" escapes).
TEXT = st.text(max_size=20) | st.text(max_size=20) | st.text(
    alphabet=st.characters() | st.integers(0xD800, 0xDFFF).map(chr), max_size=20)
KEYS = st.sampled_from(["instruction", "input", "output", "system", "prompt", "completion", "text", "messages",
                        "conversations", "role", "content", "from", "value", "other"])
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | TEXT,
                    lambda children: st.lists(children, max_size=4) | st.dictionaries(KEYS, children, max_size=4),
                    max_leaves=12)
FIELD = TEXT | TEXT | JSON  # mostly text, sometimes anything
ROLE = st.sampled_from(["user", "assistant", "system", "human", "gpt", "model", "x"]) | JSON
TURN = (st.fixed_dictionaries({"role": ROLE, "content": FIELD}) | st.fixed_dictionaries({"from": ROLE, "value": FIELD})
        | st.fixed_dictionaries({}, optional={"role": ROLE, "content": FIELD, "from": JSON, "value": JSON}))
# Rows shaped like each format (so that many normalize), and shapeless ones.
RECORD = (st.fixed_dictionaries({"instruction": FIELD, "output": FIELD}, optional={"input": FIELD, "system": FIELD})
          | st.fixed_dictionaries({"prompt": FIELD, "completion": FIELD}) | st.fixed_dictionaries({"text": FIELD})
          | st.fixed_dictionaries({"messages": st.lists(TURN | JSON, max_size=4)})
          | st.fixed_dictionaries({"conversations": st.lists(TURN, max_size=4)})
          | st.dictionaries(KEYS, FIELD, max_size=6) | JSON)
# A file's bytes: JSON rows, text, or anything at all, one per line.
LINE = RECORD.map(lambda record: json.dumps(record).encode()) | TEXT.map(
    lambda text: text.encode("utf-8", "surrogatepass")) | st.binary(max_size=30)
# Chat templates: ChatML, none (the plain fallback), and one that renders earlier turns differently once more
# follow (so the answer's span is found by searching for its text).
REWRITING_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}{% if loop.last %} (last){% endif %}: {{ m['content'] }}\n"
                      "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")


@pytest.fixture(scope="module")
def tokenizers():
    return [build_tokenizer(), build_tokenizer(chat_template=None), build_tokenizer(REWRITING_TEMPLATE)]


@given(records=st.lists(RECORD, max_size=5))
def test_format_detection_never_raises_and_names_a_known_format(records):
    assert all(data.detect_format(record) in (*data.FORMATS, None) for record in records)
    assert data.detect_majority_format(list(enumerate(records, start=1))) in (*data.FORMATS, None)


@settings(max_examples=300, deadline=None)
@given(record=RECORD, data_format=st.sampled_from(("detected",) * 4 + data.FORMATS))  # mostly the row's own format
def test_any_row_either_normalizes_or_raises_our_row_error_and_then_templates_and_tokenizes(tokenizers, record,
                                                                                            data_format):
    if data_format == "detected":
        data_format = data.detect_format(record) or "text"
    try:
        example = data.normalize(record, data_format, line=7)
    except data.RowError as exc:
        assert str(exc)  # the reason shown next to the line number
        return
    for tokenizer in tokenizers:
        tokenized = data.tokenize(example, tokenizer, max_length=32, train_on_prompt=False)
        assert len(tokenized.input_ids) == len(tokenized.trained_token_mask) <= 32 and tokenized.line == 7


@settings(max_examples=150, deadline=None)
@given(lines=st.lists(LINE, max_size=6), suffix=st.sampled_from([".jsonl", ".json", ".txt"]),
       data_format=st.sampled_from(("auto", *data.FORMATS)))
def test_any_file_either_prepares_with_bad_rows_by_line_or_raises_our_bad_dataset_error(tokenizer, lines, suffix,
                                                                                       data_format):
    assert_prepares_or_says_why(b"\n".join(lines), suffix, data_format, tokenizer)


@settings(max_examples=25, deadline=None)
@given(lines=st.lists(LINE | st.lists(TEXT, max_size=3).map(lambda cells: ",".join(cells).encode(
    "utf-8", "surrogatepass")), max_size=5), data_format=st.sampled_from(("auto", "alpaca")))
def test_any_csv_either_prepares_with_bad_rows_by_line_or_raises_our_bad_dataset_error(tokenizer, lines, data_format):
    assert_prepares_or_says_why(b"\n".join([b"instruction,output", *lines]), ".csv", data_format, tokenizer)


def assert_prepares_or_says_why(content: bytes, suffix: str, data_format: str, tokenizer) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"rows{suffix}"
        path.write_bytes(content)
        try:
            prepared = prepare(path, tokenizer, data_format=data_format)
        except EngineError as exc:
            assert exc.code == "bad_dataset" and path.name in exc.message and exc.advice
            return
    assert prepared.examples
    lines = max(len(content.splitlines()), 1)  # \r ends a line too, as in the readers' universal newlines
    assert all(bad.file == path.name and 1 <= bad.line <= lines and bad.reason
               for bad in prepared.report.bad_rows)
