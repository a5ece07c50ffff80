"""Load a dataset the way XTuner's guide does: through ``datasets.load_dataset``.

``load(path)`` takes a Hub id (``timdettmers/openassistant-guanaco``), a local
file (.json .jsonl .csv .parquet .arrow .txt), a local directory of such
files, or a directory written by ``Dataset.save_to_disk``. Every failure names
the path and says what was expected.
"""

from __future__ import annotations

import json
import os
import re

import datasets

from .errors import DataError

# file extension -> datasets builder
BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".txt": "text",
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _looks_local(path: str) -> bool:
    return (
        path.startswith(("/", "./", "../", "~"))
        or os.path.splitext(path)[1].lower() in BUILDERS
        or os.sep in path.rstrip(os.sep).split("/", 1)[-1]
        or path.count("/") > 1
    )


def _pick_split(dsd: datasets.DatasetDict, split: str | None, where: str) -> datasets.Dataset:
    if split is None:
        if len(dsd) == 1:
            return next(iter(dsd.values()))
        return datasets.concatenate_datasets(list(dsd.values()))
    if split not in dsd:
        raise DataError(f"{where}: no split {split!r}; it has {', '.join(dsd) or 'none'}. Pass split=<one of those>.")
    return dsd[split]


def _builder_for(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in BUILDERS:
        raise DataError(
            f"{path}: unknown file type {ext or '(no extension)'!r}; expected one of "
            f"{', '.join(sorted(BUILDERS))}"
        )
    return BUILDERS[ext]


def load(
    path: str,
    *,
    name: str | None = None,
    split: str | None = "train",
    data_files=None,
    **kwargs,
) -> datasets.Dataset:
    """One split of a dataset as a ``datasets.Dataset``.

    ``split=None`` concatenates all splits. Extra keyword arguments go to
    ``datasets.load_dataset`` (for example ``revision`` or ``streaming=False``).
    """
    path = os.fspath(path)
    where = path
    expanded = os.path.expanduser(path)
    try:
        if os.path.isfile(expanded):
            builder = _builder_for(expanded)
            ds = datasets.load_dataset(builder, data_files=expanded, **kwargs)
            ds = _pick_split(ds, split, where) if split is not None else ds["train"]
        elif os.path.isdir(expanded):
            if os.path.exists(os.path.join(expanded, "state.json")) or os.path.exists(
                os.path.join(expanded, "dataset_dict.json")
            ):
                ds = datasets.load_from_disk(expanded)
            else:
                ds = datasets.load_dataset(expanded, name=name, data_files=data_files, **kwargs)
            if isinstance(ds, datasets.DatasetDict):
                ds = _pick_split(ds, split, where)
        elif _looks_local(path) or not _HUB_ID.match(path):
            raise DataError(
                f"{path}: no such file or directory. Give a local .json/.jsonl/.csv/.parquet/"
                ".arrow/.txt file, a folder of them, a save_to_disk folder, or a Hub id like "
                "'timdettmers/openassistant-guanaco'."
            )
        else:
            ds = datasets.load_dataset(path, name=name, data_files=data_files, **kwargs)
            if isinstance(ds, datasets.DatasetDict):
                ds = _pick_split(ds, split, where)
    except DataError:
        raise
    except FileNotFoundError as exc:
        raise DataError(f"{where}: not found ({exc})") from exc
    except Exception as exc:  # datasets' own errors rarely name the line or file: look for them ourselves
        found = explain_bad_files(expanded)
        if found:
            raise DataError(f"{where}: {found}") from None
        _reraise_as_data_error(exc, where, expanded, split)
    if isinstance(ds, datasets.DatasetDict):  # load_from_disk of a single split dir
        ds = _pick_split(ds, split, where)
    if len(ds) == 0:
        raise DataError(f"{where}: the dataset is empty (0 rows{'' if split is None else f' in split {split!r}'})")
    return ds


def _reraise_as_data_error(exc: Exception, where: str, expanded: str, split):
    try:
        raise exc
    except ValueError as exc:
        text = str(exc)
        m = re.search(r"Unknown split \"?'?([^\"']+)", text)
        if m:
            raise DataError(f"{where}: no split {split!r} ({text})") from exc
        raise DataError(f"{where}: cannot be read as a dataset: {text}") from exc
    except Exception as exc:  # pyarrow / json parse errors, connection errors for Hub ids
        kind = type(exc).__name__
        hint = ""
        if not os.path.exists(expanded):
            hint = " If this is a Hub id, check the name and your network (or HF_ENDPOINT / a local copy)."
        raise DataError(f"{where}: cannot be loaded ({kind}: {exc}).{hint}") from exc


def _json_problem(path: str) -> str | None:
    """The first line of a .json/.jsonl file that is not valid JSON, in words."""
    try:
        with open(path, encoding="utf-8") as f:
            if path.endswith(".jsonl"):
                for number, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            json.loads(line.rstrip("\r\n"))
                        except json.JSONDecodeError as exc:
                            return f"line {number}, column {exc.colno}: not valid JSON ({exc.msg})"
                return None
            json.load(f)
    except UnicodeDecodeError as exc:
        return f"not UTF-8 text ({exc.reason} at byte {exc.start})"
    except json.JSONDecodeError as exc:
        return f"line {exc.lineno}, column {exc.colno}: not valid JSON ({exc.msg})"
    except OSError:
        return None
    return None


def _columns(path: str) -> tuple[str, ...] | None:
    """The column names of one local data file, from its first record/header."""
    import pyarrow.parquet as pq

    try:
        if path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                first = next((line for line in f if line.strip()), "{}")
            return tuple(sorted(json.loads(first)))
        if path.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            return tuple(sorted(data[0] if isinstance(data, list) and data else data))
        if path.endswith(".parquet"):
            return tuple(sorted(pq.read_schema(path).names))
        if path.endswith((".csv", ".tsv")):
            with open(path, encoding="utf-8") as f:
                return tuple(sorted(f.readline().strip().split("," if path.endswith(".csv") else "\t")))
    except (OSError, ValueError, TypeError, AttributeError, StopIteration):
        return None
    return None


def explain_bad_files(path: str) -> str | None:
    """Why a local file or folder fails to load, naming the file and line:
    a JSON syntax error, or files in one folder whose columns differ.
    (datasets reports these without the line, or without the file.)"""
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(root, name) for root, _, names in os.walk(path) for name in names
        if os.path.splitext(name)[1].lower() in BUILDERS) if os.path.isdir(path) else []
    for file in files:
        if file.endswith((".json", ".jsonl")):
            problem = _json_problem(file)
            if problem:
                return problem if file == path else f"{os.path.relpath(file, path)}, {problem}"
    shapes = {f: _columns(f) for f in files}
    kinds = {cols for cols in shapes.values() if cols is not None}
    if len(kinds) > 1:
        described = "; ".join(f"{os.path.relpath(f, path)} has {', '.join(c)}" for f, c in shapes.items() if c)
        return (f"its files do not share the same columns ({described}). Keep one format per folder, "
                "or pick the files with --data-files / data.data_files")
    return None
