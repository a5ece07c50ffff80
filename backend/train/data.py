"""The tokenizer, training samples and evaluation samples a config trains on:
one place, used by the launcher's preflight (which also fills the datasets
cache) and by every rank.

Evaluation data is one of ``data.eval_path`` (another dataset),
``data.eval_split`` (a named split of ``data.path``) or ``data.eval_fraction``
(rows of ``data.path`` held out before encoding, chosen with
``training.seed``: the training samples are built from the other rows only).
"""

from __future__ import annotations

from ..config import Config, eval_source


def training_tokenizer(cfg: Config):
    """The tokenizer a config trains with; with ``model.add_template_tokens`` it also
    holds the template's markers it lacked (the model's embeddings grow to match)."""
    from ..data import add_template_tokens, load_tokenizer
    from ..demo import resolve_model

    tokenizer = load_tokenizer(cfg.model.tokenizer or resolve_model(cfg.model.name_or_path),
                               trust_remote_code=cfg.model.trust_remote_code)
    if cfg.model.add_template_tokens:
        add_template_tokens(tokenizer, cfg.data.template)
    return tokenizer


def _build(cfg: Config, source, tokenizer, *, pack: bool, map_fn: str, where: str | None = None, **load_kw):
    from ..data import build_dataset

    return build_dataset(
        source, tokenizer=tokenizer, template=cfg.data.template, map_fn=map_fn, max_length=cfg.data.max_length,
        pack=pack, num_proc=cfg.data.num_proc, seed=cfg.training.seed, where=where, **load_kw,
    )


def _split_rows(cfg: Config):
    """(training rows, held-out rows) of data.path under data.eval_fraction."""
    from ..data import load
    from ..data.pipeline import hold_out
    from ..demo import resolve_data

    d = cfg.data
    raw = load(resolve_data(d.path), name=d.name, split=d.split, data_files=d.data_files)
    if d.max_rows is not None:
        raw = raw.select(range(min(d.max_rows, len(raw))))
    return hold_out(raw, d.eval_fraction, seed=cfg.training.seed)


def training_data(cfg: Config, tokenizer, *, pack: bool):
    """(samples, DataReport) for ``cfg``; packing is seeded by training.seed.
    Under data.eval_fraction only the rows not held out are encoded."""
    from ..demo import resolve_data

    d = cfg.data
    if d.eval_fraction:
        rows, _ = _split_rows(cfg)
        return _build(cfg, rows, tokenizer, pack=pack, map_fn=d.map_fn, where=d.path)
    return _build(cfg, resolve_data(d.path), tokenizer, pack=pack, map_fn=d.map_fn, split=d.split, name=d.name,
                  data_files=d.data_files, max_rows=d.max_rows)


def eval_rows(cfg: Config):
    """(raw evaluation rows, where they come from in words, their map_fn), or None without eval data."""
    from ..data import load
    from ..demo import resolve_data

    d, source = cfg.data, eval_source(cfg)
    if source is None:
        return None
    if source == "data.eval_fraction":
        rows, where, map_fn = _split_rows(cfg)[1], f"{d.path} (rows held out by data.eval_fraction)", d.map_fn
    elif source == "data.eval_split":
        rows = load(resolve_data(d.path), name=d.name, split=d.eval_split, data_files=d.data_files)
        where, map_fn = f"{d.path} (split {d.eval_split})", d.map_fn
    else:
        rows = load(resolve_data(d.eval_path), name=d.eval_path_name, split=d.eval_path_split)
        where, map_fn = d.eval_path, d.eval_map_fn or d.map_fn
    if d.eval_max_rows is not None:
        rows = rows.select(range(min(d.eval_max_rows, len(rows))))
    return rows, where, map_fn


def eval_data(cfg: Config, tokenizer, *, pack: bool):
    """(samples, DataReport, raw rows) of the evaluation data, encoded (and packed)
    exactly as the training samples are; None when the config has none."""
    found = eval_rows(cfg)
    if found is None:
        return None
    rows, where, map_fn = found
    samples, report = _build(cfg, rows, tokenizer, pack=pack, map_fn=map_fn, where=where)
    return samples, report, rows
