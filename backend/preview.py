"""What the model will be trained on, shown before training: raw rows, the
same rows after the map_fn, one sample with its trained tokens marked, and
the token lengths against max_length. The studio's Dataset tab and
``ftstudio check-dataset`` both read these; nothing here draws anything.

Every step reuses the training pipeline itself (``map_row``, ``encode``,
``build_dataset``), so the preview cannot drift from what training does.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import datasets
import numpy as np

from .data import DataError, IGNORE_INDEX, build_dataset, check_template_tokens, detect_map_fn, encode, get_map_fn, load
from .data.map_fns import map_fn_name
from .data.pipeline import DataReport, map_row
from .demo import resolve_data

PREVIEW_ROWS = 5000  # the length histogram and counts look at this many rows at most
TRAINED, PROMPT = "trained", None  # HighlightedText-style labels: trained tokens vs context


def load_source(source: str, *, name: str | None = None, split: str | None = "train",
                data_files=None) -> datasets.Dataset:
    """A dataset split; 'demo' is the bundled Q&A file."""
    if not source or not source.strip():
        raise DataError("no dataset given: type a Hub id, a local file or folder, or 'demo'")
    return load(resolve_data(source.strip()), name=name or None, split=split or None, data_files=data_files)


def _cell(value, width: int = 300) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= width else text[: width - 1] + "…"


def rows_page(ds: datasets.Dataset, page: int, page_size: int = 10) -> tuple[list[str], list[list], int, int]:
    """(headers, rows of page ``page`` (1-based, clamped) with their row index first, page, page count)."""
    pages = max(1, math.ceil(len(ds) / page_size))
    page = min(max(1, int(page or 1)), pages)
    start = (page - 1) * page_size
    part = ds.select(range(start, min(start + page_size, len(ds)))).to_list()
    rows = [[start + i] + [_cell(r.get(c)) for c in ds.column_names] for i, r in enumerate(part)]
    return ["row"] + list(ds.column_names), rows, page, pages


def detect(ds: datasets.Dataset) -> tuple[str | None, str]:
    """(suggested map_fn or None, why)."""
    return detect_map_fn(ds.column_names, ds.select(range(min(5, len(ds)))).to_list())


def conversations(ds: datasets.Dataset, map_fn: str, start: int, count: int) -> list[dict]:
    """Rows ``start..start+count`` after the map_fn: ``[{"row": i, "conversation": [...]}]``.
    A bad row raises a DataError naming the row and column."""
    fn, name = get_map_fn(map_fn), map_fn_name(map_fn)
    end = min(len(ds), start + count)
    return [{"row": i, "conversation": map_row(fn, name, ds[i], i)} for i in range(start, end)]


def highlighted(conversation: list[dict], tokenizer, template: str, max_length: int | None):
    """One encoded sample as ``[(text, "trained" | None), ...]`` runs: the
    tokens the loss is computed on vs the prompt/context around them."""
    check_template_tokens(tokenizer, template)
    enc = encode(conversation, tokenizer, template, max_length)
    spans, ids, current = [], [], None
    for tok, label in zip(enc["input_ids"], enc["labels"]):
        kind = TRAINED if label != IGNORE_INDEX else PROMPT
        if ids and kind != current:
            spans.append((tokenizer.decode(ids), current))
            ids = []
        ids.append(tok)
        current = kind
    if ids:
        spans.append((tokenizer.decode(ids), current))
    trained = sum(1 for label in enc["labels"] if label != IGNORE_INDEX)
    return spans, {"tokens": len(enc["input_ids"]), "trained_tokens": trained}


@dataclass
class LengthReport:
    report: DataReport  # counts at the chosen max_length (kept, dropped, truncated)
    lengths: np.ndarray  # untruncated token length of every kept sample
    rows_seen: int
    rows_total: int

    def histogram(self, bins: int = 30) -> tuple[list[float], list[int]]:
        """(left edges, counts) over the untruncated lengths."""
        if len(self.lengths) == 0:
            return [], []
        hi = max(int(self.lengths.max()), (self.report.max_length or 0)) + 1
        counts, edges = np.histogram(self.lengths, bins=bins, range=(0, hi))
        return [float(e) for e in edges[:-1]], [int(c) for c in counts]


def length_report(ds: datasets.Dataset, *, tokenizer, template: str, map_fn: str, max_length: int,
                  max_rows: int = PREVIEW_ROWS, where: str | None = None) -> LengthReport:
    """Token lengths (before truncation) and the kept / dropped / truncated
    counts at ``max_length`` over the first ``max_rows`` rows."""
    part = ds.select(range(min(max_rows, len(ds))))
    full, _ = build_dataset(part, tokenizer=tokenizer, template=template, map_fn=map_fn, max_length=None,
                            where=where)
    _, report = build_dataset(part, tokenizer=tokenizer, template=template, map_fn=map_fn,
                              max_length=max_length, where=where)
    lengths = full.with_format("arrow")[:].column("length").to_numpy()
    return LengthReport(report, lengths, len(part), len(ds))


__all__ = ["PREVIEW_ROWS", "LengthReport", "conversations", "detect", "highlighted", "length_report",
           "load_source", "rows_page"]
