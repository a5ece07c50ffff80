"""The whole data side in one call: load -> map_fn -> template -> encode [-> pack].

map_fn, template and tokenization run in ONE batched ``datasets.map`` (XTuner
runs three separate passes, each writing an Arrow file). Its cache key is
computed here from what the output depends on -- the source dataset's
fingerprint, the map_fn (its source text for custom ones), the template's
fields, the tokenizer's vocabulary and max_length -- so a second run with the
same data and settings is read back from the ``datasets`` cache instead of
recomputed, and any change to those inputs recomputes.
"""

from __future__ import annotations

import glob
import hashlib
import inspect
import json
import os
from dataclasses import asdict, dataclass, field
from functools import partial

import datasets
import numpy as np

from .encode import DROP_EMPTY, DROP_NO_LOSS, KEPT, check_template_tokens, encode_batch, validate_conversation
from .errors import DataError
from .loading import load
from .map_fns import RowError, detect_map_fn, get_map_fn, map_fn_name
from .packing import pack_dataset
from .templates import get_template

PIPELINE_VERSION = "1"  # bump when the encoded output changes for the same inputs


@dataclass
class DataReport:
    """What happened to the rows: shown by check-dataset and the studio."""

    source: str
    map_fn: str
    map_fn_reason: str
    template: str
    max_length: int | None
    rows: int = 0
    kept: int = 0
    dropped_empty: int = 0
    dropped_no_loss: int = 0
    truncated: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    length_percentiles: dict = field(default_factory=dict)
    packed_blocks: int | None = None
    pack_fill: float | None = None
    from_cache: bool = False

    @property
    def dropped(self) -> int:
        return self.dropped_empty + self.dropped_no_loss

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dropped"] = self.dropped
        return d


def load_tokenizer(name_or_path: str, **kwargs):
    """A tokenizer from a local directory or a Hub id."""
    from transformers import AutoTokenizer

    from ..core.artifacts import loading_failure

    kwargs.setdefault("trust_remote_code", False)  # a tokenizer's own code runs only when the caller allows it
    try:
        return AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as exc:
        raise DataError(loading_failure("tokenizer", name_or_path, exc)) from None


def tokenizer_fingerprint(tokenizer) -> str:
    cached = getattr(tokenizer, "_ftstudio_fingerprint", None)
    if cached:
        return cached
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(tokenizer.chat_template or "").encode())
    h.update(repr((tokenizer.bos_token_id, tokenizer.eos_token_id, type(tokenizer).__name__)).encode())
    fp = h.hexdigest()[:16]
    try:
        tokenizer._ftstudio_fingerprint = fp
    except Exception:  # some tokenizers forbid new attributes; then recompute next time
        pass
    return fp


def _map_fn_identity(fn) -> str:
    try:
        src = inspect.getsource(fn)
    except (OSError, TypeError):
        src = ""
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}:{hashlib.sha256(src.encode()).hexdigest()[:16]}"


def map_row(map_fn, map_name: str, row: dict, row_index: int) -> list[dict]:
    """One row through the map_fn -> its validated conversation; errors name the row and column."""
    try:
        out = map_fn(row)
        if not isinstance(out, dict) or "conversation" not in out:
            raise RowError(
                f"the map_fn returned {type(out).__name__}, not a dict with a 'conversation' key",
                "conversation",
            )
        return validate_conversation(out["conversation"])
    except RowError as exc:
        raise DataError(f"row {row_index}, column {exc.column!r}: {exc} (map_fn {map_name})") from None
    except KeyError as exc:
        raise DataError(
            f"row {row_index}: map_fn {map_name} needs column {exc} which this dataset lacks "
            f"(columns: {', '.join(row)})"
        ) from None
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"row {row_index}: map_fn {map_name} failed: {type(exc).__name__}: {exc}") from None


def hold_out(ds: datasets.Dataset, fraction: float, seed: int = 0) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(rows to train on, rows held out): a seeded random ``fraction`` of the
    rows, at least one, chosen before any encoding or packing, so no held-out
    row can reach a training batch. Both keep the rows' original order; the
    same rows, seed and fraction always give the same split."""
    n = len(ds)
    if n < 2:
        raise DataError(f"data.eval_fraction needs at least 2 rows to hold some out; the data has {n}")
    k = min(max(int(round(n * fraction)), 1), n - 1)
    held = np.sort(np.random.default_rng(seed).permutation(n)[:k])
    keep = np.setdiff1d(np.arange(n), held)
    return ds.select(keep), ds.select(held)


def conversations(ds: datasets.Dataset, map_fn, n: int) -> list[list[dict]]:
    """The first ``n`` rows of ``ds`` through ``map_fn``: their conversations
    (what the held-out samples prompt with, and answer against)."""
    fn, name = get_map_fn(map_fn), map_fn_name(map_fn)
    return [map_row(fn, name, row, i) for i, row in enumerate(ds.select(range(min(n, len(ds)))).to_list())]


def _encode_rows(batch, indices, *, map_fn, map_name, template, tokenizer, max_length):
    columns = list(batch)
    conversations = [map_row(map_fn, map_name, {c: batch[c][j] for c in columns}, row_index)
                     for j, row_index in enumerate(indices)]
    return encode_batch(conversations, tokenizer, template, max_length, as_arrow=True)


def encode_dataset(
    ds: datasets.Dataset,
    *,
    map_fn,
    template,
    tokenizer,
    max_length: int | None,
    num_proc: int | None = None,
    batch_size: int = 1000,
    cache: bool = True,
):
    """map_fn + template + tokenize in one cached batched map. Keeps every row
    (with its ``dropped`` code) so the caller can count before filtering.

    Returns ``(encoded, from_cache)``."""
    fn = get_map_fn(map_fn)
    template = get_template(template)
    key = json.dumps(
        [
            PIPELINE_VERSION,
            ds._fingerprint,
            _map_fn_identity(fn),
            template.to_dict(),
            template.uses_tokenizer_chat_template,
            template.raw,
            tokenizer_fingerprint(tokenizer),
            max_length,
        ],
        sort_keys=True,
    )
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:32]
    work = partial(
        _encode_rows,
        map_fn=fn,
        map_name=map_fn_name(map_fn),
        template=template,
        tokenizer=tokenizer,
        max_length=max_length,
    )
    if num_proc is not None and num_proc > 1:
        num_proc = min(num_proc, max(1, len(ds) // 2))
    from_cache = False
    if cache and ds.cache_files:
        folder = os.path.dirname(ds.cache_files[0]["filename"])
        from_cache = bool(glob.glob(os.path.join(folder, f"cache-{fingerprint}*.arrow")))
    parallelism = os.environ.get("TOKENIZERS_PARALLELISM")
    encoded = ds.map(
        work,
        batched=True,
        batch_size=batch_size,
        with_indices=True,
        remove_columns=ds.column_names,
        new_fingerprint=fingerprint,
        load_from_cache_file=cache,
        num_proc=num_proc if num_proc and num_proc > 1 else None,
        desc="map_fn + template + tokenize",
    )
    # datasets sets TOKENIZERS_PARALLELISM=false for its forked workers and then
    # restores only Python's copy of the environment, so the Rust tokenizer in
    # this process would stay single-threaded from then on. Put it back for real.
    if num_proc and num_proc > 1:
        if parallelism is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)  # also unsets it in the C environment
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = parallelism
    return encoded, from_cache


def build_dataset(
    source,
    *,
    tokenizer,
    template,
    map_fn="auto",
    max_length: int | None = 2048,
    pack: bool = False,
    split: str | None = "train",
    name: str | None = None,
    data_files=None,
    num_proc: int | None = None,
    max_rows: int | None = None,
    seed: int = 0,
    cache: bool = True,
    where: str | None = None,
) -> tuple[datasets.Dataset, DataReport]:
    """Training samples from a dataset path / Hub id (or a ``datasets.Dataset``).

    ``where`` names an in-memory dataset's origin in error messages.
    Returns the samples (``input_ids``, ``labels``, ``length``; plus
    ``position_ids`` and ``seq_lens`` when packed) and a DataReport.
    """
    if isinstance(source, datasets.Dataset):
        raw, where = source, where or "<dataset>"
    else:
        raw, where = load(source, name=name, split=split, data_files=data_files), str(source)
    if max_rows is not None:
        raw = raw.select(range(min(max_rows, len(raw))))
    reason = "given"
    if map_fn in (None, "", "auto"):
        map_fn, reason = detect_map_fn(raw.column_names, raw.select(range(min(5, len(raw)))).to_list())
        if map_fn is None:
            raise DataError(f"{where}: {reason}")
        reason = f"auto-detected from {reason}"
    template_obj = get_template(template)
    check_template_tokens(tokenizer, template_obj)
    if template_obj.uses_tokenizer_chat_template and not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "template 'hf_chat_template' needs a tokenizer with a chat_template; this one has none. "
            "Pick a named template (ftstudio list-template)."
        )
    report = DataReport(
        source=where, map_fn=map_fn_name(map_fn), map_fn_reason=reason,
        template=template_obj.name, max_length=max_length, rows=len(raw),
    )
    try:
        encoded, report.from_cache = encode_dataset(
            raw, map_fn=map_fn, template=template_obj, tokenizer=tokenizer,
            max_length=max_length, num_proc=num_proc, cache=cache,
        )
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from None

    table = encoded.with_format("arrow")[:]  # column stats on Arrow buffers, not row by row
    dropped = table.column("dropped").to_numpy()
    lengths = table.column("length").to_numpy()
    truncated = table.column("truncated").to_numpy(zero_copy_only=False)
    keep = dropped == KEPT
    report.dropped_empty = int((dropped == DROP_EMPTY).sum())
    report.dropped_no_loss = int((dropped == DROP_NO_LOSS).sum())
    report.kept = int(keep.sum())
    report.truncated = int(truncated[keep].sum())
    report.tokens = int(lengths[keep].sum())
    if report.kept == 0:
        raise DataError(
            f"{where}: no trainable sample: {report.rows} rows, {report.dropped_empty} with an empty "
            f"conversation, {report.dropped_no_loss} with no answer token left"
            f"{' after truncation to max_length ' + str(max_length) if max_length else ''}. "
            "Check the map_fn, the template and max_length."
        )
    kept_lengths = lengths[keep]
    report.length_percentiles = {
        p: int(np.percentile(kept_lengths, p)) for p in (0, 50, 90, 95, 99, 100)
    }
    samples = encoded if keep.all() else encoded.select(np.nonzero(keep)[0])
    samples = samples.remove_columns(["dropped", "truncated"])
    label_values = table.column("labels").combine_chunks().flatten().to_numpy()
    label_lengths = np.repeat(keep, lengths)  # token-level mask of kept rows
    report.trained_tokens = int((label_values[label_lengths] != -100).sum())
    if pack:
        if max_length is None:
            raise DataError("packing needs max_length (the block size)")
        samples = pack_dataset(samples, max_length, seed=seed)
        report.packed_blocks = len(samples)
        report.pack_fill = round(report.tokens / (len(samples) * max_length), 4)
    return samples, report
