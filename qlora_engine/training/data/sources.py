"""Where rows come from: data files (.jsonl, .json, .csv, .parquet, .txt, .arrow), a folder written by
`Dataset.save_to_disk`, or a Hub dataset `ORG/NAME[:split]` through `datasets.load_dataset` (cached in the HF cache).

Each gives (line number, record) pairs plus the rows that could not be read at all; reading is line-exact so that
every bad row is reported by its line (a binary file or a dataset numbers its rows from 1).
"""
from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qlora_engine.protocol.errors import EngineError
from qlora_engine.training.data.report import BadRow

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt", ".arrow")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w./-]+)?$")  # ORG/NAME or ORG/NAME:split
Records = tuple[list[tuple[int, Any]], list[BadRow]]


def read_records(path: Path | str) -> Records:
    """(line number, parsed record) for every row, plus the rows that could not be read at all."""
    path = Path(path)
    if path.is_dir():
        return _read_saved_dataset(path)
    if not path.is_file():
        if HUB_ID.match(str(path).replace("\\", "/")) and not str(path).startswith((".", "/", "~")):
            return read_hub_dataset(path.as_posix())
        raise EngineError("bad_dataset", f"data file {path} does not exist",
                          "Check the path of the data file; a Hub dataset is written ORG/NAME or ORG/NAME:split.")
    if path.suffix.lower() not in SUFFIXES:
        raise EngineError("bad_dataset", f"{path}: unsupported file type '{path.suffix}'",
                          f"Use one of {', '.join(SUFFIXES)}, a folder written by save_to_disk, or a Hub dataset.")
    if path.stat().st_size == 0:
        raise EngineError("bad_dataset", f"{path} is empty", "Put at least a few rows of training data in it.")
    suffix = path.suffix.lower()
    if suffix == ".jsonl" or (suffix == ".json" and _looks_like_json_lines(path)):
        return _read_json_lines(path)
    readers = {".json": _read_json_array, ".txt": _read_text_lines, ".csv": _read_csv, ".parquet": _read_parquet,
               ".arrow": _read_arrow}
    return readers[suffix](path)


def _looks_like_json_lines(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(4096).lstrip()
    return head.startswith(b"{")


def _read_json_lines(path: Path) -> Records:
    records, bad = [], []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                bad.append(BadRow(path.name, number, f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                                                      f"{exc.start + 1})"))
                continue
            try:
                records.append((number, json.loads(text)))
            except (ValueError, RecursionError) as exc:
                bad.append(BadRow(path.name, number, f"not valid JSON ({_json_problem(exc)})"))
    return records, bad


def _json_problem(exc: ValueError | RecursionError) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at column {exc.colno}"
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc).split(":")[0]  # "Exceeds the limit (4300 digits) for integer string conversion"


def _read_json_array(path: Path) -> Records:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise EngineError("bad_dataset", f"{path}: not UTF-8 text (byte offset {exc.start})",
                          "Save the file as UTF-8.") from exc
    except json.JSONDecodeError as exc:
        raise EngineError("bad_dataset", f"{path} line {exc.lineno}: not valid JSON ({exc.msg})",
                          "Fix the JSON at that line, or save the data as .jsonl (one row per line).") from exc
    except (ValueError, RecursionError) as exc:
        raise EngineError("bad_dataset", f"{path}: not valid JSON ({_json_problem(exc)})",
                          "Fix the JSON, or save the data as .jsonl (one row per line) to see the line.") from exc
    if not isinstance(data, list):
        raise EngineError("bad_dataset", f"{path}: expected a JSON list of rows, got {type(data).__name__}",
                          "Put the rows in a top-level list [ {...}, {...} ].")
    # A JSON array has no per-row line numbers that survive reformatting; report the row's position.
    return [(index, item) for index, item in enumerate(data, start=1)], []


def _read_text_lines(path: Path) -> Records:
    records, bad = [], []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                bad.append(BadRow(path.name, number, f"not UTF-8 text (byte 0x{raw[exc.start]:02x})"))
                continue
            if text.strip():
                records.append((number, {"text": text}))
    return records, bad


def _read_csv(path: Path) -> Records:
    """CSV rows by the line they start on (a quoted field may span lines); a row with broken quoting, the wrong
    number of fields or bytes that are not UTF-8 is a bad row. An empty cell counts as a missing field."""
    undecodable: dict[int, str] = {}

    def decoded_lines() -> Iterator[str]:
        for number, raw in enumerate(path.read_bytes().splitlines(keepends=True), start=1):
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                undecodable[number] = f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"
                yield raw.decode("utf-8", errors="replace")

    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # a row may be megabytes long: it is truncated later
    reader = csv.reader(decoded_lines(), strict=True)  # strict: a stray quote is an error, not a silent merge
    header = [name.lstrip("\ufeff").strip() for name in next(reader, [])]
    records, bad = [], []
    while True:
        first_line = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            runs_on = f" (the row runs on to line {reader.line_num})" if reader.line_num > first_line else ""
            bad.append(BadRow(path.name, first_line, f"broken CSV quoting: {exc}{runs_on}"))
            continue
        lines = range(first_line, reader.line_num + 1)
        problem = next((undecodable[n] for n in lines if n in undecodable), None)
        if problem is None and len(fields) != len(header) and any(field.strip() for field in fields):
            problem = f"{len(fields)} field(s), but the header has {len(header)}"
        if problem:
            bad.append(BadRow(path.name, first_line, problem))
        elif any(field.strip() for field in fields):  # blank lines are skipped
            records.append((first_line, {name: value or None for name, value in zip(header, fields)}))
    return records, bad


def _read_parquet(path: Path) -> Records:
    """Parquet rows through `datasets`, numbered from 1 (a binary file has no lines)."""
    import datasets

    return _rows(path, "parquet", lambda: datasets.Dataset.from_parquet(str(path), keep_in_memory=True))


def _read_arrow(path: Path) -> Records:
    """An Arrow file as `datasets` writes it (a shard of a saved or cached dataset)."""
    import datasets

    return _rows(path, "an Arrow file of a dataset", lambda: datasets.Dataset.from_file(str(path), in_memory=True))


def _read_saved_dataset(folder: Path) -> Records:
    """A folder written by `Dataset.save_to_disk` (or a DatasetDict's, whose `train` split is read)."""
    import datasets

    if not ((folder / "dataset_info.json").is_file() or (folder / "dataset_dict.json").is_file()):
        raise EngineError("bad_dataset", f"{folder} is a folder, but not one written by Dataset.save_to_disk",
                          "Pick a data file inside it, or a folder holding dataset_info.json (save_to_disk).")

    def load() -> Any:
        loaded = datasets.load_from_disk(str(folder), keep_in_memory=True)
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise EngineError("bad_dataset", f"{folder} holds the splits {', '.join(loaded)} but no 'train'",
                                  f"Pick the split's own folder, e.g. {folder / next(iter(loaded))}.")
            return loaded["train"]
        return loaded

    return _rows(folder, "a saved dataset", load)


def _rows(where: Path | str, what: str, load: Any) -> Records:
    import datasets

    datasets.disable_progress_bars()
    try:
        table = load()
    except EngineError:
        raise
    except Exception as exc:  # pyarrow's and datasets' many error types: the file is not readable as such
        raise EngineError("bad_dataset", f"{where}: could not be read as {what} ({exc})",
                          "Export the data again, or save it as .jsonl or .csv.") from exc
    return [(index, row) for index, row in enumerate(table, start=1)], []


def read_hub_dataset(spec: str) -> Records:
    """`ORG/NAME[:split]` (split `train` when left out) through datasets.load_dataset, into the HF cache."""
    import datasets

    name, _, split = spec.partition(":")
    datasets.disable_progress_bars()
    try:
        table = datasets.load_dataset(name, split=split or "train")
    except Exception as exc:  # the Hub's, the network's and datasets' own failures, each turned into advice
        raise hub_dataset_error(exc, name, split or "train") from exc
    return [(index, row) for index, row in enumerate(table, start=1)], []


def hub_dataset_error(exc: BaseException, name: str, split: str) -> EngineError:
    """A Hub dataset's failure as the error a person can act on (gated, missing, offline, no such split)."""
    from datasets.exceptions import DataFilesNotFoundError, DatasetNotFoundError
    from huggingface_hub import errors

    page = f"https://huggingface.co/datasets/{name}"
    text = str(exc)
    offline = _is_offline()
    if isinstance(exc, errors.GatedRepoError) or "gated" in text.lower():
        return EngineError("gated_dataset", f"the Hub dataset {name} is gated: its terms must be accepted on {page}",
                           f"Open {page}, accept its terms with your Hugging Face account, then give a token: set "
                           "HF_TOKEN or run `hf auth login`.")
    if offline or isinstance(exc, (ConnectionError, errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError)) \
            or "couldn't reach" in text.lower():
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub can't be reached"
        return EngineError("offline", f"the Hub dataset {name} is not in the HF cache and {why}",
                           "Connect to the internet (or unset HF_HUB_OFFLINE) and read it once; it is cached "
                           "after that. Or point data at a local file.")
    if isinstance(exc, (DatasetNotFoundError, errors.RepositoryNotFoundError, FileNotFoundError,
                        DataFilesNotFoundError)):
        return EngineError("dataset_not_found", f"there is no dataset {name} on the Hub (or it is private)",
                           "Check the id's spelling on https://huggingface.co/datasets; a local file's path must "
                           "exist (a path that does not is read as a Hub id).")
    if isinstance(exc, ValueError) and "split" in text.lower():
        return EngineError("bad_dataset", f"the Hub dataset {name} has no split '{split}' ({text.splitlines()[0]})",
                           f"Name one of its splits: {name}:train, {name}:test, … as listed on {page}.")
    return EngineError("bad_dataset", f"the Hub dataset {name} could not be read ({text.splitlines()[0][:300]})",
                       f"Check {page}; a dataset with several configurations or one that needs its own code can't "
                       "be read directly: save the rows you want as .jsonl.")


def _is_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)
