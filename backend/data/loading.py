"""Load a dataset the way XTuner's guide does: through ``datasets.load_dataset``.

``load(path)`` takes a Hub id (``timdettmers/openassistant-guanaco``), a local
file (.json .jsonl .csv .parquet .arrow .txt), a local directory of such
files, or a directory written by ``Dataset.save_to_disk``. Every failure names
the path and says what was expected.
"""

from __future__ import annotations

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
    if isinstance(ds, datasets.DatasetDict):  # load_from_disk of a single split dir
        ds = _pick_split(ds, split, where)
    if len(ds) == 0:
        raise DataError(f"{where}: the dataset is empty (0 rows{'' if split is None else f' in split {split!r}'})")
    return ds
