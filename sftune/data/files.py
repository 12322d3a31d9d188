"""Reading a dataset the user names: a local file by its extension, a folder saved by `save_to_disk`, or a
`datasets` name; a file that cannot be read is refused naming the line and the fix, before any work starts."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from datasets import DatasetDict, Features, Value, load_dataset, load_from_disk

from ..errors import UsageError

LOCAL_DATA_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}


def load_any_dataset(name: str, config: str | None = None, split: str = "train") -> Any:
    """A local file (by extension), a dataset saved with save_to_disk, or a `datasets` name."""
    path = Path(name).expanduser()
    if path.is_file():
        builder = LOCAL_DATA_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise UsageError(f"{name}: unsupported file type; use one of {sorted(LOCAL_DATA_BUILDERS)}.")
        check_data_file(path)
        # CSV cells are text: a column of numbers is still a completion, not an int column.
        extra = {"features": _all_text_features(path)} if builder == "csv" else {}
        try:
            return load_dataset(builder, data_files=str(path), split="train", **extra)
        except Exception as err:
            if "corresponds to no data" in str(err):
                raise UsageError(f"{name}: the file has no rows.") from err
            raise UsageError(f"{name}: could not read it as {builder}: {root_cause(err)}") from err
    if path.is_dir():
        if any((path / marker).exists() for marker in ("dataset_info.json", "dataset_dict.json")):
            data = load_from_disk(str(path))
            if isinstance(data, DatasetDict):
                if split not in data:
                    raise UsageError(f"{name} has splits {sorted(data)}, not {split!r}; choose one.")
                return data[split]
            return data
    elif path.suffix.lower() in LOCAL_DATA_BUILDERS or name.startswith((".", "/", "~")):
        raise UsageError(f"Dataset file {name} not found.")
    try:
        return load_dataset(name, config, split=split)
    except Exception as err:
        raise UsageError(
            f"Could not load the dataset {name!r}: it is not a local file or dataset folder, and loading it by "
            f"name failed ({root_cause(err)}). Check the path, or give a local .jsonl/.json/.csv/.parquet file."
        ) from err


def check_data_file(path: Path) -> None:
    """Refuse an empty file, bytes that are not UTF-8 and lines that are not JSON, naming the line.

    Reads line by line, so that a large file is checked without holding it in memory."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        if path.stat().st_size == 0:
            raise UsageError(f"{path}: the file is empty.")
        return
    offset, empty = 0, True
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise UsageError(
                    f"{path}: line {number} is not UTF-8 (byte {line[err.start]:#04x} at byte offset "
                    f"{offset + err.start} of the file, {err.start} of the line). Re-save the file as UTF-8."
                ) from err
            offset += len(line)
            empty = empty and not text.strip()
            if suffix == ".jsonl" and text.strip():
                _check_json_line(path, number, text)
    if empty:
        raise UsageError(f"{path}: the file is empty.")
    if suffix == ".json":
        text = path.read_text(encoding="utf-8")
        try:
            json.loads(text)
        except json.JSONDecodeError:  # a .json file may hold one object per line
            for number, json_line in enumerate(text.splitlines(), start=1):
                if json_line.strip():
                    _check_json_line(path, number, json_line)


def _check_json_line(path: Path, number: int, line: str) -> None:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}: line {number} is not valid JSON ({err.msg} at column {err.colno}).") from err
    if not isinstance(value, dict):
        raise UsageError(
            f"{path}: line {number} is a JSON {type(value).__name__}; each line must be an object {{...}}."
        )


def _all_text_features(path: Path) -> Any:
    with path.open(newline="", encoding="utf-8") as handle:
        header = next(csv.reader(handle), [])
    return Features({column: Value("string") for column in header})


def root_cause(err: BaseException) -> str:
    while err.__cause__ is not None:
        err = err.__cause__
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[-1] if lines else ''}"
