"""Conversation + template + tokenizer -> ``input_ids`` and ``labels``.

Labels are built here and nowhere else. The rules are XTuner 0.2's
``template_map_fn`` + ``encode_fn``:

- each turn renders as [SYSTEM] INSTRUCTION (prompt, no loss), then
  output + SUFFIX (trained), then EOS (trained) unless the template's SUFFIX
  already ends the turn (SUFFIX_AS_EOS), then SEP (no loss);
- prompt and answer are tokenized separately, without special tokens;
- BOS opens the sample and every turn that follows an EOS. "BOS" is whatever
  the tokenizer itself puts in front of text (so none for Qwen, whose
  tokenizer adds nothing, as XTuner special-cases; ``<s>`` for Llama; ChatGLM's
  two prefix ids) -- a tokenizer that declares a bos_token but never adds it
  (ChatML tokenizers whose bos is ``<|im_start|>``) gets none, which avoids
  a doubled ``<|im_start|>``;
- ``output_with_loss: False`` masks that answer (and its EOS);
- samples are cut at ``max_length``; a sample left with no trained token is
  reported as dropped, never trained on.

``hf_chat_template`` instead renders the whole conversation with the
tokenizer's ``chat_template``, finds the text each assistant message adds
(by rendering the prefix with ``add_generation_prompt``), and tokenizes the
prompt and answer parts apart, so no token straddles a border.

For speed the batch path tokenizes every prompt and answer of a batch in one
call into the Rust tokenizer, which is where almost all the time goes.
"""

from __future__ import annotations

import functools
from itertools import chain, islice
from typing import Sequence

import numpy as np
import pyarrow as pa

from .errors import DataError
from .map_fns import RowError
from .templates import Template, get_template

IGNORE_INDEX = -100

# why a sample was dropped (the ``dropped`` column of the encoded dataset)
KEPT, DROP_EMPTY, DROP_NO_LOSS = 0, 1, 2


def validate_conversation(conversation) -> list[dict]:
    """Check the map_fn's output once, where it enters. Raises RowError."""
    if not isinstance(conversation, list):
        raise RowError(
            f"the map_fn returned 'conversation' of type {type(conversation).__name__}; "
            "it must be a list of turns {'input': str, 'output': str}",
            "conversation",
        )
    for i, turn in enumerate(conversation):
        if not isinstance(turn, dict):
            raise RowError(f"conversation[{i}] is {type(turn).__name__}, not a dict", "conversation")
        for key in ("input", "system"):
            value = turn.get(key)
            if value is not None and not isinstance(value, str):
                raise RowError(
                    f"conversation[{i}].{key} should be text, got {type(value).__name__} {value!r:.60}",
                    "conversation",
                )
        output = turn.get("output")
        if not isinstance(output, str):
            raise RowError(
                f"conversation[{i}].output should be text, got "
                f"{'nothing' if output is None else type(output).__name__}",
                "conversation",
            )
        for flag in ("output_with_loss", "need_eos_token"):
            if flag in turn and turn[flag] is not None and not isinstance(turn[flag], bool):
                raise RowError(f"conversation[{i}].{flag} should be true/false, got {turn[flag]!r}", "conversation")
    return conversation


def special_ids(tokenizer) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(BOS ids the tokenizer puts in front of text, EOS ids). Recomputed each
    call (two tiny encodes), so a tokenizer changed after use is read afresh."""
    probe = "a"
    plain = tokenizer.encode(probe, add_special_tokens=False)
    full = tokenizer.encode(probe, add_special_tokens=True)
    bos: tuple[int, ...] = ()
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            bos = tuple(full[:start])
            break
    eos = tokenizer.eos_token_id
    if isinstance(eos, int):
        eos_ids: tuple[int, ...] = (eos,)
    elif eos is None:
        eos_ids = ()
    else:
        eos_ids = tuple(eos)
    return bos, eos_ids


def _tokenize_many(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # Straight into the Rust tokenizer: identical ids, less Python per text.
        fast = getattr(backend, "encode_batch_fast", backend.encode_batch)
        return [enc.ids for enc in fast(list(texts), add_special_tokens=False)]
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def _render_turns(conversation: list[dict], template: Template):
    """Yield (prompt_text, answer_text, with_loss, need_eos, sep) per turn."""
    for i, turn in enumerate(conversation):
        prompt = template.format_input(turn.get("input"), turn.get("system"), i + 1)
        answer = turn["output"]
        if template.raw:
            need_eos = turn.get("need_eos_token", True) is not False
            sep = turn.get("sep", "") or ""
        else:
            answer = answer + template.SUFFIX
            need_eos = not template.SUFFIX_AS_EOS
            sep = template.SEP
        with_loss = turn.get("output_with_loss", True) is not False
        yield prompt, answer, with_loss, need_eos, sep


def encode_batch(conversations: Sequence[list[dict]], tokenizer, template, max_length: int | None = None,
                 *, as_arrow: bool = False):
    """Encode many conversations. Returns columns ``input_ids``, ``labels``,
    ``length``, ``truncated`` and ``dropped`` (0 kept, 1 empty conversation,
    2 nothing left to train on): a dict of lists, or a ``pyarrow.Table``."""
    template = get_template(template)
    if template.uses_tokenizer_chat_template:
        flat = _encode_chat_batch(conversations, tokenizer, max_length)
    else:
        flat = _encode_flat(conversations, tokenizer, template, max_length)
    return flat.to_arrow() if as_arrow else flat.to_columns()


class _Flat:
    """A batch of samples as flat token arrays plus per-sample lengths."""

    def __init__(self, ids, labels, lengths, truncated, dropped):
        self.ids, self.labels, self.lengths = ids, labels, lengths
        self.truncated, self.dropped = truncated, dropped

    def offsets(self):
        return np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int32)

    def to_arrow(self):
        # Built from flat buffers: handing ``datasets`` nested Python lists
        # makes it walk every token to infer types.
        offsets = pa.array(self.offsets())
        return pa.table(
            {
                "input_ids": pa.ListArray.from_arrays(offsets, pa.array(self.ids, pa.int32())),
                "labels": pa.ListArray.from_arrays(offsets, pa.array(self.labels, pa.int32())),
                "length": pa.array(self.lengths.astype(np.int32)),
                "truncated": pa.array(self.truncated),
                "dropped": pa.array(self.dropped),
            }
        )

    def to_columns(self):
        cuts = self.offsets()[1:-1]
        return {
            "input_ids": [a.tolist() for a in np.split(self.ids, cuts)] if len(self.lengths) else [],
            "labels": [a.tolist() for a in np.split(self.labels, cuts)] if len(self.lengths) else [],
            "length": self.lengths.tolist(),
            "truncated": self.truncated.tolist(),
            "dropped": self.dropped.tolist(),
        }


def _encode_flat(conversations, tokenizer, template: Template, max_length) -> _Flat:
    """XTuner's encode rules, for a whole batch at once.

    Python only lines up references to token lists ("pieces") in sample order
    with a trained flag each; concatenation, label masking, truncation and the
    per-sample counts are numpy operations over the flat token stream.
    """
    bos, eos = map(list, special_ids(tokenizer))
    texts: list[str] = []
    plan = []
    sep_cache: dict[str, int] = {}
    for conversation in conversations:
        turns = []
        for prompt, answer, with_loss, need_eos, sep in _render_turns(conversation, template):
            if need_eos and not eos:
                raise DataError(
                    "the tokenizer has no eos_token, but the template ends turns with EOS; "
                    "set tokenizer.eos_token or use a template with SUFFIX_AS_EOS"
                )
            if sep and sep not in sep_cache:
                sep_cache[sep] = len(texts)
                texts.append(sep)
            turns.append((len(texts), with_loss, need_eos, sep_cache.get(sep) if sep else None))
            texts.append(prompt)
            texts.append(answer)
        plan.append(turns)
    ids = _tokenize_many(tokenizer, texts) if texts else []

    pieces: list[list[int]] = []
    trained: list[bool] = []
    owner: list[int] = []
    for n, turns in enumerate(plan):
        next_bos = True
        for at, with_loss, need_eos, sep_at in turns:
            if next_bos and bos:
                pieces.append(bos)
                trained.append(False)
            pieces.append(ids[at])
            pieces.append(ids[at + 1])
            trained += (False, with_loss)
            if need_eos:
                pieces.append(eos)
                trained.append(with_loss)
            next_bos = need_eos
            if sep_at is not None:
                pieces.append(ids[sep_at])
                trained.append(False)
            owner.extend([n] * (len(pieces) - len(owner)))
    empty = np.fromiter((not t for t in plan), dtype=bool, count=len(plan))
    return _assemble(pieces, trained, owner, empty, max_length)


def _assemble(pieces, trained, owner, empty, max_length) -> _Flat:
    """Token pieces in sample order (``owner``: each piece's sample, ``trained``: its loss flag) ->
    flat ids and labels, cut at ``max_length``, each sample counted and classified (``empty``:
    samples with no turn at all). numpy over the flat token stream, no per-token Python."""
    n_samples = len(empty)
    piece_len = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
    total = int(piece_len.sum())
    flat_ids = np.fromiter(chain.from_iterable(pieces), dtype=np.int32, count=total)
    token_owner = np.repeat(np.asarray(owner, dtype=np.int64), piece_len)
    flat_labels = np.where(np.repeat(np.asarray(trained, dtype=bool), piece_len), flat_ids, IGNORE_INDEX)
    full_len = np.bincount(token_owner, minlength=n_samples).astype(np.int64)
    lengths = full_len
    truncated = np.zeros(n_samples, dtype=bool)
    if max_length is not None and total and full_len.max() > max_length:
        starts = np.concatenate([[0], np.cumsum(full_len)[:-1]])
        keep = (np.arange(total) - starts[token_owner]) < max_length
        flat_ids, flat_labels, token_owner = flat_ids[keep], flat_labels[keep], token_owner[keep]
        truncated = full_len > max_length
        lengths = np.minimum(full_len, max_length)
    trained_count = np.bincount(token_owner[flat_labels != IGNORE_INDEX], minlength=n_samples)
    dropped = np.full(n_samples, KEPT, dtype=np.int8)
    dropped[trained_count == 0] = DROP_NO_LOSS
    dropped[empty] = DROP_EMPTY
    return _Flat(flat_ids, flat_labels.astype(np.int32), lengths, truncated, dropped)


def to_messages(conversation: list[dict]) -> list[dict]:
    """XTuner turns -> chat messages (role/content), for chat templates. The contents are exact ``str``
    (a subclass of it could carry methods into the template's sandbox)."""
    messages = []
    for turn in conversation:
        if turn.get("system"):
            messages.append({"role": "system", "content": _plain_str(turn["system"])})
        messages.append({"role": "user", "content": _plain_str(turn.get("input") or "")})
        if turn.get("output") is not None:
            messages.append({"role": "assistant", "content": _plain_str(turn["output"])})
    return messages


def _plain_str(text: str) -> str:
    return text if type(text) is str else str.__str__(text)


def encode_chat_template(conversation: list[dict], tokenizer, max_length: int | None = None):
    """Render with the tokenizer's chat_template; train only what assistant turns add.
    One conversation -> (input_ids, labels, truncated, dropped); ``_encode_chat_batch`` does a batch."""
    flat = _encode_chat_batch([conversation], tokenizer, max_length)
    return flat.ids.tolist(), flat.labels.tolist(), bool(flat.truncated[0]), int(flat.dropped[0])


class _ChatRenderer:
    """Conversations through the chat template: the compiled template straight (``_template_renderer``)
    once it has rendered a conversation exactly as ``apply_chat_template`` does (checked once per batch,
    with and without the generation prompt), else ``apply_chat_template``."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.direct = _template_renderer(tokenizer)
        self.checked: dict[bool, bool] = {}  # add_generation_prompt -> the direct render is exact

    def __call__(self, chats: list[list[dict]], add_generation_prompt: bool) -> list[str]:
        if not chats:
            return []
        if self.direct is not None and add_generation_prompt not in self.checked:
            reference = _apply_chat_template(self.tokenizer, chats[:1], add_generation_prompt)[0]
            self.checked[add_generation_prompt] = self.direct(chats[0], add_generation_prompt) == reference
        if self.checked.get(add_generation_prompt):
            return [self.direct(chat, add_generation_prompt) for chat in chats]
        return _apply_chat_template(self.tokenizer, chats, add_generation_prompt)


def _apply_chat_template(tokenizer, chats: list[list[dict]], add_generation_prompt: bool) -> list[str]:
    return list(tokenizer.apply_chat_template(chats, tokenize=False, add_generation_prompt=add_generation_prompt))


def _template_renderer(tokenizer):
    """``(messages, add_generation_prompt) -> text`` through the tokenizer's chat template compiled in
    an overlay of transformers' own sandboxed environment (``_fast_template``), or None where that is
    not at hand. Why by hand: ``apply_chat_template`` re-validates and deep-copies each conversation into
    plain JSON data (for caller objects, media and tools), which the messages ``to_messages`` builds
    already are (dicts of ``str``); the template's variables (the special tokens, ``tools`` and
    ``documents`` None) are the same. ``_ChatRenderer`` checks a first render of each batch against
    ``apply_chat_template``'s."""
    try:
        compiled = _fast_template(tokenizer.get_chat_template())
    except (ImportError, AttributeError, ValueError, TypeError):
        return None
    variables = dict(tokenizer.special_tokens_map)

    def render_chat_template(messages: list[dict], add_generation_prompt: bool) -> str:
        return compiled.render(messages=messages, tools=None, documents=None,
                               add_generation_prompt=add_generation_prompt, **variables)

    return render_chat_template


_DICT_ATTRIBUTES = frozenset(dir(dict))
# str attributes the sandbox hands out unchanged: public (no "_"), not the format methods it wraps
_STR_PLAIN_ATTRIBUTES = frozenset(n for n in dir(str) if not n.startswith("_")) - {"format", "format_map"}
_BUILTIN_METHOD = type("".startswith)


@functools.lru_cache(maxsize=8)
def _fast_template(source: str):
    """``source`` compiled in an overlay of the environment transformers compiles chat templates in (the
    same sandbox, extensions, filters and globals) with shortcuts for what a chat template does per
    message, each giving what the sandbox gives (tested against it):

    - ``getattr`` reads a plain dict's key first when the name is no attribute of dict (the sandbox
      does too, but only after ``getattr(dict, name)`` has raised AttributeError);
    - a public method of an exact ``str`` other than ``format``/``format_map`` (``content.startswith``)
      is returned as is: the sandbox's checks (private, internal, mutable, format) all pass for it;
    - a public attribute of a loop (``loop.first``) or of a ``namespace()`` is read directly, the
      sandbox's ``format`` wrapping kept: its private, internal and mutable checks pass for these types
      (and its ``isinstance`` chain is slow on a namespace, whose every attribute read is Python);
    - calling a method of an exact ``str`` calls it: the sandbox's safe-callable and pass-context
      checks do nothing for it.

    Together they were half of a render's time (``bench/bench_render.py`` measures it)."""
    from jinja2.runtime import LoopContext
    from jinja2.utils import Namespace
    from transformers.utils.chat_template_utils import _compile_jinja_template

    env = _compile_jinja_template(source).environment.overlay()
    sandboxed_getattr, sandboxed_call = type(env).getattr, type(env).call
    namespace = env.globals.get("namespace")
    checked_kinds = {LoopContext} | ({namespace} if isinstance(namespace, type) and issubclass(namespace, Namespace) else set())

    def getattr_plain_first(obj, attribute):
        kind = type(obj)
        if kind is dict and attribute not in _DICT_ATTRIBUTES:
            try:
                return obj[attribute]
            except KeyError:
                return env.undefined(obj=obj, name=attribute)
        if kind is str and attribute in _STR_PLAIN_ATTRIBUTES:
            return getattr(obj, attribute)
        if kind in checked_kinds and not attribute.startswith("_"):
            try:
                value = getattr(obj, attribute)
            except AttributeError:
                return sandboxed_getattr(env, obj, attribute)
            wrapped = env.wrap_str_format(value)
            return value if wrapped is None else wrapped
        return sandboxed_getattr(env, obj, attribute)

    def call_str_method_directly(__context, __obj, *args, **kwargs):
        if type(__obj) is _BUILTIN_METHOD and type(__obj.__self__) is str:
            kwargs.pop("_loop_vars", None)
            kwargs.pop("_block_vars", None)
            return __obj(*args, **kwargs)
        return sandboxed_call(env, __context, __obj, *args, **kwargs)

    env.getattr, env.call = getattr_plain_first, call_str_method_directly
    compiled = env.from_string(source)
    # a snapshot of the globals as a plain dict: each render copies them into its context, and a copy
    # of the ChainMap jinja keeps reads every key through both maps (nothing adds globals later)
    compiled.globals = dict(compiled.globals)
    return compiled


def _chat_spans(conversation: list[dict], messages: list[dict], text: str, prompts, uptos):
    """(start, end, trained) of each assistant part of ``text``: what its message adds to the
    prompt rendered before it with ``add_generation_prompt``."""
    spans = []
    turns = iter(conversation)
    for msg in messages:
        if msg["role"] != "assistant":
            continue
        prompt, upto = next(prompts), next(uptos)
        if not (upto.startswith(prompt) and text.startswith(upto)):
            raise DataError(
                "this tokenizer's chat_template does not render conversations prefix by prefix "
                "(an earlier turn changes when a later one is added), so the assistant's part "
                "cannot be located; use a named template instead"
            )
        spans.append((len(prompt), len(upto.rstrip()), next(turns).get("output_with_loss", True) is not False))
    return spans


def _encode_chat_batch(conversations: Sequence[list[dict]], tokenizer, max_length) -> _Flat:
    """``hf_chat_template`` for a batch: the prompt and answer parts of every conversation
    (``_chat_texts``), tokenized in one call into the Rust tokenizer. Rendering (jinja's sandbox) and
    tokenizing are about all the time this takes. (Rendering chunk k+1 on a thread while the
    tokenizer ran on chunk k gained nothing measurable: the tokenizer already keeps both cores busy.)"""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "template 'hf_chat_template' needs a tokenizer with a chat_template; this one has none. "
            "Pick a named template (ftstudio list-template)."
        )
    messages = [to_messages(c) if c else [] for c in conversations]
    trained, owner = [], []
    parts = _chat_texts(conversations, messages, _ChatRenderer(tokenizer), trained, owner)
    pieces = _tokenize_many(tokenizer, parts) if parts else []
    empty = np.fromiter((not m for m in messages), dtype=bool, count=len(messages))
    return _assemble(pieces, trained, owner, empty, max_length)


def _chat_texts(conversations, messages, render, trained: list, owner: list) -> list[str]:
    """The prompt and answer texts of the conversations (each's loss flag and row appended to ``trained``
    and ``owner``): every conversation, and every prefix of it up to an assistant message (with and
    without the generation prompt; the prefix that is the whole conversation is not rendered twice),
    in three template calls, then cut by ``_chat_parts``."""
    whole, prompts, uptos = [], [], []
    for msgs in messages:
        if msgs:
            whole.append(msgs)
        for k, msg in enumerate(msgs):
            if msg["role"] == "assistant":
                prompts.append(msgs[:k])
                if k + 1 < len(msgs):
                    uptos.append(msgs[: k + 1])
    texts, prompt_texts, upto_texts = iter(render(whole, False)), iter(render(prompts, True)), iter(render(uptos, False))
    parts = []
    for n, msgs in enumerate(messages):
        if not msgs:
            continue
        text = next(texts)
        # the prefix up to the last message is the whole text, rendered once
        ends = chain(islice(upto_texts, _count_assistant(msgs[:-1])), [text] if msgs[-1]["role"] == "assistant" else [])
        for part, loss in _chat_parts(text, _chat_spans(conversations[n], msgs, text, prompt_texts, iter(ends))):
            parts.append(part)
            trained.append(loss)
            owner.append(n)
    return parts


def _count_assistant(messages: list[dict]) -> int:
    return sum(m["role"] == "assistant" for m in messages)


def _chat_parts(text: str, spans: list[tuple[int, int, bool]]) -> list[tuple[str, bool]]:
    """``text`` cut into its prompt and answer parts, each with its loss flag, to be tokenized apart
    (as XTuner does, and as ``generation_prompt`` tokenizes a prompt at inference), so no token
    straddles a border: tokenized whole, BPE merges a prompt's trailing space with the answer's first
    letter (``"Assistant: " + "Do"`` -> ``" D"``, ``"o"``), and that token would be neither the prompt
    the model sees at inference nor a trained answer token."""
    parts, pos = [], 0
    for start, end, loss in spans:
        parts += [(text[pos:start], False), (text[start:end], loss)]
        pos = end
    parts.append((text[pos:], False))
    return [(p, t) for p, t in parts if p]


def encode(conversation: list[dict], tokenizer, template, max_length: int | None = None) -> dict:
    """One conversation -> ``{"input_ids": [...], "labels": [...]}``.

    ``conversation`` is a map_fn's ``conversation`` list; ``template`` a name or
    a Template. Labels are -100 wherever nothing is trained.

    >>> # doctest: +SKIP
    >>> encode([{"input": "Hi", "output": "Hello"}], tok, "qwen_chat")["labels"]
    """
    validate_conversation(conversation)
    cols = encode_batch([conversation], tokenizer, template, max_length)
    return {"input_ids": cols["input_ids"][0], "labels": cols["labels"][0]}


def generation_prompt(conversation: list[dict], tokenizer, template) -> list[int]:
    """Token ids that ask the model for the next answer, in the training format.

    ``conversation`` is a list of turns; the last one has an ``input`` and no
    ``output``. Earlier turns are rendered exactly as ``encode`` renders them
    for training, so the model sees at inference what it saw in training.
    """
    template = get_template(template)
    if not conversation or conversation[-1].get("output") is not None:
        raise DataError("generation_prompt needs a conversation whose last turn has an input and no output yet")
    history, last = conversation[:-1], conversation[-1]
    if template.uses_tokenizer_chat_template:
        messages = to_messages(history)
        if last.get("system"):
            messages.append({"role": "system", "content": last["system"]})
        messages.append({"role": "user", "content": last.get("input") or ""})
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)
    ids = encode(history, tokenizer, template)["input_ids"] if history else []
    bos, _ = special_ids(tokenizer)
    if template.raw:
        need_bos = not history or history[-1].get("need_eos_token", True) is not False
    else:
        need_bos = not history or not template.SUFFIX_AS_EOS
    prompt = template.format_input(last.get("input"), last.get("system"), len(conversation))
    return ids + (list(bos) if need_bos else []) + tokenizer.encode(prompt, add_special_tokens=False)


def stop_words(tokenizer, template) -> list[str]:
    """Texts that end an answer: the template's STOP_WORDS and the EOS token."""
    template = get_template(template)
    words = list(template.STOP_WORDS)
    if tokenizer.eos_token and tokenizer.eos_token not in words:
        words.append(tokenizer.eos_token)
    if template.uses_tokenizer_chat_template:
        for tok in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
            if tok in tokenizer.get_vocab() and tok not in words:
                words.append(tok)
    return words


def unspellable_markers(tokenizer, template) -> dict[str, int]:
    """The template's markers (``Template.markers``) that this tokenizer has no
    single token for, with how many tokens it splits each into."""
    out = {}
    for marker in get_template(template).markers():
        n = len(tokenizer.encode(marker, add_special_tokens=False))
        if n != 1:
            out[marker] = n
    return out


def check_template_tokens(tokenizer, template, where: str = "") -> None:
    """Refuse a template whose markers the tokenizer would spell as text fragments:
    training would teach the fragments, and generation could never stop on them."""
    missing = unspellable_markers(tokenizer, template)
    if not missing:
        return
    name = get_template(template).name
    split = ", ".join(f"{m} -> {n} tokens" for m, n in missing.items())
    raise DataError(
        f"{where + ': ' if where else ''}template {name} needs {', '.join(missing)} as single tokens, but this "
        f"tokenizer splits them ({split}): the model would learn fragments of text and never stop where it should. "
        "Pick the template of this model's family (ftstudio list-template; hf_chat_template uses the tokenizer's "
        "own), or add them as new tokens: model.add_template_tokens=true (check-dataset --add-template-tokens) "
        "grows the embeddings and trains their new rows.")


def add_template_tokens(tokenizer, template) -> list[str]:
    """Add the template's missing markers to ``tokenizer`` as special tokens; returns them."""
    missing = list(unspellable_markers(tokenizer, template))
    add_tokens(tokenizer, missing)
    return missing


def add_tokens(tokenizer, tokens: list[str]) -> None:
    """Add special tokens (those a run added, recorded in its checkpoint, say)."""
    if tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(tokens)}, replace_extra_special_tokens=False)
        if hasattr(tokenizer, "_ftstudio_fingerprint"):
            del tokenizer._ftstudio_fingerprint  # the vocabulary changed: the data cache key must too
