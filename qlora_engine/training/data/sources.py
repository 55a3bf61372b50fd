"""Where rows come from: data files (.jsonl, .json, .csv, .parquet, .txt, .arrow), a folder written by
`Dataset.save_to_disk`, or a Hub dataset `ORG/NAME[@revision][:split]` through `datasets.load_dataset` (its files in
the HF cache, its rows in datasets' cache, read from there offline).

Each gives (line number, record) pairs plus the rows that could not be read at all; reading is line-exact so that
every bad row is reported by its line (a binary file or a dataset numbers its rows from 1).
"""
from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qlora_engine.protocol.errors import EngineError
from qlora_engine.protocol.model_ref import HubRef, parse_hub_ref
from qlora_engine.training.data.report import BadRow

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt", ".arrow")
SPLIT = re.compile(r"[\w.-]+")
Records = tuple[list[tuple[int, Any]], list[BadRow]]


def read_records(path: Path | str) -> Records:
    """(line number, parsed record) for every row, plus the rows that could not be read at all."""
    path = Path(path)
    if path.is_dir():
        return _read_saved_dataset(path)
    if not path.is_file():
        if hub_dataset_ref(path.as_posix()) is not None:  # as_posix: on Windows Path("org/name") is org\name
            return read_hub_dataset(path.as_posix())
        raise EngineError("bad_dataset", f"data file {path} does not exist",
                          "Check the path of the data file; a Hub dataset is written ORG/NAME, ORG/NAME:split or "
                          "ORG/NAME@revision:split.")
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


def hub_dataset_ref(spec: str) -> tuple[HubRef, str] | None:
    """(the repo and revision, the split) of `ORG/NAME[@revision][:split]`, or None when `spec` is no Hub id; the id
    and revision follow the models' rule (model_ref), the split is `train` when left out."""
    repo, _, split = spec.partition(":")
    ref = parse_hub_ref(repo)
    if ref is None or (split and not SPLIT.fullmatch(split)):
        return None
    return ref, split or "train"


def read_hub_dataset(spec: str) -> Records:
    """`ORG/NAME[@revision][:split]` through datasets.load_dataset: huggingface_hub fetches its files into the HF
    cache, datasets keeps the rows as Arrow in its own cache and reads them from there when offline."""
    import datasets

    found = hub_dataset_ref(spec)
    if found is None:
        raise EngineError("bad_dataset", f"{spec!r} is not a Hub dataset id",
                          "Write it ORG/NAME, ORG/NAME:split or ORG/NAME@revision:split.")
    ref, split = found
    datasets.disable_progress_bars()
    try:
        if ref.revision and offline_setting() and not _revision_cached(ref):
            from huggingface_hub.errors import OfflineModeIsEnabled

            raise OfflineModeIsEnabled(f"{ref} is not in the HF cache")
        table = datasets.load_dataset(ref.repo_id, split=split, revision=ref.revision)
    except Exception as exc:  # the Hub's, the network's and datasets' own failures, each turned into advice
        raise hub_dataset_error(exc, ref, split) from exc
    return [(index, row) for index, row in enumerate(table, start=1)], []


def _revision_cached(ref: HubRef) -> bool:
    """Whether the HF cache has seen this revision of the dataset: datasets fetches the README (or learns it has
    none) of every revision it reads. Offline, datasets reads the newest cached copy whatever the revision asked,
    so a revision never read here must be refused rather than answered with another one's rows."""
    from huggingface_hub import try_to_load_from_cache

    return try_to_load_from_cache(ref.repo_id, "README.md", revision=ref.revision, repo_type="dataset") is not None


def hub_dataset_error(exc: BaseException, ref: HubRef, split: str) -> EngineError:
    """A Hub dataset's failure as the error a person can act on, with the codes a Hub model's have (hub.py). datasets
    re-raises the Hub's errors as its own, without their cause, so its messages are what tells them apart."""
    from datasets.exceptions import DataFilesNotFoundError, DatasetNotFoundError
    from huggingface_hub import errors

    from qlora_engine.model.hub import TOKEN_ADVICE

    name, page = ref.repo_id, f"https://huggingface.co/datasets/{ref.repo_id}"
    text = str(exc)
    if isinstance(exc, errors.GatedRepoError) or "is a gated dataset" in text:
        why = "your token has not been granted access" if "ask for access" in text else "no token was sent"
        return EngineError("gated_dataset", f"the Hub dataset {name} is gated ({why}): its terms must be accepted "
                           f"on {page} before it can be downloaded",
                           f"Open {page}, accept its terms with your Hugging Face account, then {TOKEN_ADVICE}. "
                           "A fine-grained token needs 'read access to public gated repos'.")
    if isinstance(exc, errors.RevisionNotFoundError) or text.startswith("Revision '"):
        return EngineError("revision_not_found", f"the Hub dataset {name} has no revision '{ref.revision_or_main}'",
                           f"Pick a branch, tag or commit listed on {page}/tree/main (or leave @revision out).")
    if isinstance(exc, (ConnectionError, errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError)):
        setting = offline_setting()
        why = f"{setting} is set" if setting else "the Hub can't be reached"
        return EngineError("offline", f"the Hub dataset {ref} is not in the HF cache and {why}",
                           f"Connect to the internet (or unset {setting or 'HF_HUB_OFFLINE'}) and read it once; it "
                           "is cached after that. Or point data at a local file.")
    if isinstance(exc, (DatasetNotFoundError, errors.RepositoryNotFoundError, FileNotFoundError,
                        DataFilesNotFoundError)):
        return EngineError("dataset_not_found", f"there is no dataset {name} on the Hub (or it is private)",
                           f"Check the id's spelling on https://huggingface.co/datasets; for a private dataset, "
                           f"{TOKEN_ADVICE}. A local file's path must exist (a path that does not is read as a Hub "
                           "id).")
    if isinstance(exc, ValueError) and "split" in text.lower():
        return EngineError("bad_dataset", f"the Hub dataset {name} has no split '{split}' ({text.splitlines()[0]})",
                           f"Name one of its splits: {name}:train, {name}:test, … as listed on {page}.")
    return EngineError("bad_dataset", f"the Hub dataset {name} could not be read ({text.splitlines()[0][:300]})",
                       f"Check {page}; a dataset with several configurations or one that needs its own code can't "
                       "be read directly: save the rows you want as .jsonl.")


def offline_setting() -> str | None:
    """The variable that keeps datasets off the network, as datasets reads it (HF_DATASETS_OFFLINE, else
    HF_HUB_OFFLINE, which huggingface_hub obeys too); None when online."""
    from datasets import config

    from qlora_engine.model.hub import is_offline

    if config.HF_HUB_OFFLINE and os.environ.get("HF_DATASETS_OFFLINE") is not None:
        return "HF_DATASETS_OFFLINE"
    return "HF_HUB_OFFLINE" if is_offline() or config.HF_HUB_OFFLINE else None
