"""The tokenizer and samples a config trains on: one place, used by the
launcher's preflight (which also fills the datasets cache) and by every rank."""

from __future__ import annotations

from ..config import Config


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


def training_data(cfg: Config, tokenizer, *, pack: bool):
    """(samples, DataReport) for ``cfg``; packing is seeded by training.seed."""
    from ..data import build_dataset
    from ..demo import resolve_data

    return build_dataset(
        resolve_data(cfg.data.path), tokenizer=tokenizer, template=cfg.data.template, map_fn=cfg.data.map_fn,
        max_length=cfg.data.max_length, pack=pack, split=cfg.data.split, name=cfg.data.name,
        data_files=cfg.data.data_files, num_proc=cfg.data.num_proc, max_rows=cfg.data.max_rows,
        seed=cfg.training.seed,
    )
