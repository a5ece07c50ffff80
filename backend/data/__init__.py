"""The data side of fine-tuning: load -> map_fn -> prompt template -> masked tokens.

Public surface (other parts of the product import these):

- ``load(path, **kw)``: a dataset split from a Hub id, local file or folder;
- ``get_map_fn(name_or_spec)``: a map_fn by name or ``file.py:function``;
- ``get_template(name)``: a prompt template (XTuner field names as attributes);
- ``encode(conversation, tokenizer, template, max_length=None)``: input_ids and labels;
- ``build_dataset(...)``: all of it as one cached batched map, with a report;
- ``pack_dataset(ds, max_length)``: padding-free packing with per-sample positions.
"""

from .encode import (
    IGNORE_INDEX, add_template_tokens, check_template_tokens, encode, encode_batch, generation_prompt, special_ids,
    stop_words, to_messages, unspellable_markers, validate_conversation,
)
from .errors import DataError
from .loading import load
from .map_fns import MAP_FNS, RowError, detect_map_fn, get_map_fn, register_map_fn
from .packing import pack_dataset, plan_bins
from .pipeline import DataReport, build_dataset, encode_dataset, load_tokenizer
from .templates import SYSTEM_TEMPLATE, TEMPLATES, Template, get_template, register_template

__all__ = [
    "IGNORE_INDEX", "MAP_FNS", "add_template_tokens", "check_template_tokens", "unspellable_markers", "SYSTEM_TEMPLATE", "TEMPLATES", "DataError", "DataReport", "RowError",
    "Template", "build_dataset", "detect_map_fn", "encode", "encode_batch", "encode_dataset",
    "generation_prompt", "stop_words", "get_map_fn", "get_template", "load", "load_tokenizer", "pack_dataset",
    "plan_bins", "register_map_fn", "register_template", "special_ids", "to_messages",
    "validate_conversation",
]
