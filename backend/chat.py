"""Chat with a model: one generator that yields text pieces as they are
generated, used by ``ftstudio chat`` and the studio's chat tab alike.

The prompt is built by ``backend.data.generation_prompt``, i.e. exactly the
format the model was trained on, history included. Generation stops at EOS
and at the template's STOP_WORDS; text that could still turn out to be the
start of a stop word is held back, so a stop word never leaks into the reply.

On a GPU box: a model loads straight onto one card, or is dispatched over
all of them when it is too big for one (``models.placement``); the base side
of side by side is the same PeftModel with its adapter off, not a second copy;
and ``ModelCache`` bounds the loaded models by bytes and can unload them, so
chat can give its memory back to a training run.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from typing import Iterator

from .core.artifacts import ArtifactError, check_weights, has_tokenizer, is_adapter, read_meta
from .core.guard import Guard


@dataclass
class GenerationSettings:
    max_new_tokens: int = 512
    temperature: float = 0.1
    top_k: int = 40
    top_p: float = 0.75
    repetition_penalty: float = 1.0
    seed: int | None = None
    min_new_tokens: int = 0

    def checked(self) -> "GenerationSettings":
        """Raise ValueError naming the first setting out of range."""
        import math

        rules = [("max_new_tokens", 1 <= self.max_new_tokens <= 1 << 20, "at least 1"),
                 ("temperature", math.isfinite(self.temperature) and self.temperature >= 0, "a number >= 0"),
                 ("top_p", 0 < self.top_p <= 1, "in (0, 1]"), ("top_k", self.top_k >= 0, "at least 0"),
                 ("repetition_penalty", math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
                  "a number > 0"), ("min_new_tokens", self.min_new_tokens >= 0, "at least 0")]
        for name, ok, wanted in rules:
            if not ok:
                raise ValueError(f"{name} is {getattr(self, name)}; it must be {wanted}")
        return self

    def kwargs(self) -> dict:
        sample = self.temperature > 0
        out = {"max_new_tokens": self.max_new_tokens, "do_sample": sample,
               "repetition_penalty": self.repetition_penalty}
        if self.min_new_tokens:
            out["min_new_tokens"] = self.min_new_tokens
        if sample:
            out.update(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        return out


@dataclass
class ChatModel:
    model: object
    tokenizer: object
    template: str
    system: str = ""
    stop_words: list = field(default_factory=list)
    source: dict = field(default_factory=dict)
    base: str | None = None  # the base model's folder, when ``model`` is that base + a LoRA adapter
    adapter_off: bool = False  # answer as the base: each forward step runs under model.disable_adapter()


def load_chat_model(llm: str, adapter: str | None = None, template: str | None = None, system: str | None = None,
                    bits: int | None = None, device: str = "auto", trust_remote_code: bool = False,
                    guard: Guard | None = None) -> ChatModel:
    """Base model (+ adapter), with template and system defaulting to what the
    adapter (or a converted/merged model) recorded in its artifact record. The
    base an adapter names passes ``guard`` like a typed one; ``trust_remote_code``
    is the operator's permission, never the record's. ``device``: auto, cpu or
    cuda, placed by ``models.placement``."""
    from .data import get_template, load_tokenizer, stop_words
    from .models import base_location

    guard = guard or Guard.cli()
    llm_path = base_location(llm, guard, "model")
    if adapter is not None and not is_adapter(adapter):
        raise ArtifactError(f"adapter {adapter}: not an adapter folder (convert an iter_<N>.pth with "
                            "`ftstudio convert pth_to_hf` first)")
    meta = read_meta(adapter) if adapter else read_meta(llm_path)
    template_name = template or meta.get("template")
    if template_name is None:
        raise ArtifactError(f"no prompt template recorded with {adapter or llm}; give --prompt-template "
                            "(ftstudio list-template)")
    tpl = get_template(template_name)  # raises, listing the known names, if unknown
    model = _load_placed(llm_path, bits, device, trust_remote_code)
    tok_source = adapter if adapter and has_tokenizer(adapter) else llm_path
    tokenizer = load_tokenizer(str(tok_source), trust_remote_code=trust_remote_code)
    if adapter:
        model = _with_adapter(model, adapter, len(tokenizer), llm)
    model.eval()
    return ChatModel(model, tokenizer, tpl.name, meta.get("system", "") if system is None else system,
                     stop_words(tokenizer, tpl), meta, base=llm_path if adapter else None)


def load_adapters(llm: str, adapters: dict[str, str], *, template: str | None = None, system: str | None = None,
                  device: str = "auto", trust_remote_code: bool = False,
                  guard: Guard | None = None) -> tuple[ChatModel, dict[str, ChatModel]]:
    """One base with several LoRA adapters on it, as peft's named adapters on one PeftModel (one copy of
    the base): (the base's own answers, adapters off; {adapter name: its ChatModel}). All of them share
    ``.model``; a caller activates one with ``model.set_adapter(name)`` before its steps (``backend.serve``
    does, per step, under the model's lock). Names must be valid module names (no '.'). Templates and
    system texts default to what each adapter recorded; the base's to its own record, else the first
    adapter's (it answers in its adapters' format, as the Chat tab's side by side does)."""
    from peft import PeftModel

    from .data import get_template, load_tokenizer, stop_words
    from .models import base_location, fit_embeddings

    guard = guard or Guard.cli()
    llm_path = base_location(llm, guard, "model")
    metas = {}
    for name, path in adapters.items():
        if not is_adapter(path):
            raise ArtifactError(f"adapter {path}: not an adapter folder (convert an iter_<N>.pth with "
                                "`ftstudio convert pth_to_hf` first)")
        metas[name] = read_meta(path)
        if not (template or metas[name].get("template")):
            raise ArtifactError(f"no prompt template recorded with {path}; give --prompt-template "
                                "(ftstudio list-template)")
    model = _load_placed(llm_path, None, device, trust_remote_code)
    base_tok = load_tokenizer(llm_path, trust_remote_code=trust_remote_code)
    out = {}
    for name, path in adapters.items():
        tok = load_tokenizer(path, trust_remote_code=trust_remote_code) if has_tokenizer(path) else base_tok
        fit_embeddings(model, len(tok))
        try:
            check_weights(path)
            if isinstance(model, PeftModel):
                model.load_adapter(path, adapter_name=name)
            else:
                model = PeftModel.from_pretrained(model, path, adapter_name=name)
        except (RuntimeError, ValueError, KeyError, OSError) as exc:
            raise ArtifactError(f"adapter {path} does not fit {llm}: {str(exc).splitlines()[0][:300]}") from None
        tpl = get_template(template or metas[name]["template"])
        own_system = metas[name].get("system", "") if system is None else system
        out[name] = ChatModel(model, tok, tpl.name, own_system, stop_words(tok, tpl), metas[name], base=llm_path)
    model.eval()
    base_meta = read_meta(llm_path)
    first = next(iter(out.values()), None)
    base_tpl = get_template(template or base_meta.get("template") or (first.template if first else None) or "")
    base_system = base_meta.get("system", "") if system is None else system
    base = ChatModel(model, base_tok, base_tpl.name, base_system, stop_words(base_tok, base_tpl), {},
                     base=llm_path, adapter_off=bool(out))
    for chat in out.values():
        chat.model = model  # the PeftModel, for adapters loaded before it wrapped the base
    return base, out


def _load_placed(llm_path: str, bits: int | None, device: str, trust_remote_code: bool):
    """The model loaded straight onto its device(s): no CPU copy first, no ``.to()`` afterwards."""
    from .models import cuda_free_bytes, load_causal_lm, placement, weights_bytes

    free = [] if device == "cpu" else cuda_free_bytes()
    where = placement(device, free, weights_bytes(llm_path), bits)
    return load_causal_lm(llm_path, trust_remote_code=trust_remote_code, what="model", **where, **_quantized(bits))


def _with_adapter(model, adapter: str, vocab_size: int, llm: str):
    from peft import PeftModel

    from .models import fit_embeddings

    fit_embeddings(model, vocab_size)
    try:
        check_weights(adapter)
        return PeftModel.from_pretrained(model, adapter)
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        raise ArtifactError(f"adapter {adapter} does not fit {llm}: {str(exc).splitlines()[0][:300]}") from None


def _quantized(bits: int | None) -> dict:
    """bitsandbytes' config for ``--bits`` (where the model goes is ``models.placement``'s part)."""
    if not bits:
        return {}
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except Exception as exc:  # noqa: BLE001 - ImportError or a broken native library
        raise ArtifactError(f"--bits {bits} needs bitsandbytes ({exc}); pip install bitsandbytes") from None
    return {"quantization_config": BitsAndBytesConfig(load_in_4bit=bits == 4, load_in_8bit=bits == 8,
                                                      bnb_4bit_quant_type="nf4")}


def without_adapter(chat: ChatModel, tokenizer=None) -> ChatModel:
    """The base model's answers out of a base + adapter model, with no second copy of the base: the same
    PeftModel, its adapter disabled for each of the base answer's forward steps. Per step, not per answer:
    the studio streams both answers in turns. ``tokenizer``: the base's own (an export's may add tokens)."""
    from .data import get_template, stop_words

    if chat.base is None:
        raise ValueError("without_adapter: this model has no adapter to switch off")
    tok = tokenizer or chat.tokenizer
    return dataclasses.replace(chat, tokenizer=tok, stop_words=stop_words(tok, get_template(chat.template)),
                               source={}, adapter_off=True)


def label(key: tuple) -> str:
    """A cache key in words: 'llm' or 'llm + adapter'."""
    return f"{key[0]}{' + ' + str(key[1]) if key[1] else ''}"


class ModelCache:
    """The loaded chat models, so the chat tab does not reload one per message (loading is the slow part).

    Bounded by count and by bytes (parameters + buffers): before a model loads, the least recently used
    ones are unloaded until it fits, so two big models never meet on a card next to a training run; once
    loaded, its real size is checked again. ``unload``/``unload_all`` free for real (references dropped,
    garbage collected, CUDA's cached blocks released). Side by side for base + adapter is a view on the
    same model (``without_adapter``): one copy of the base.

    Thread-safe: the studio's ``/v1`` API asks for models from its own threads while the Chat tab does
    from Gradio's. One re-entrant lock covers every lookup, load and unload (a second caller of a model
    being loaded waits for that load instead of loading it twice). A model unloaded while a reply is
    streaming stays alive until that reply ends: the reply holds its own reference."""

    def __init__(self, size: int = 2, max_bytes: int | None = None, loader=None):
        self.size = size
        self.max_bytes = max_bytes  # None: memory_budget()
        self._load = loader or load_chat_model
        self._models: dict[tuple, ChatModel] = {}
        self._bytes: dict[tuple, int] = {}
        self._views: dict[tuple, ChatModel] = {}  # key of a base + adapter model -> its base view
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._models)

    def resident_bytes(self) -> int:
        with self._lock:
            return sum(self._bytes.values())

    def loaded(self) -> list[tuple[str, int]]:
        """(what, bytes) of each loaded model, least recently used first."""
        with self._lock:
            return [(label(k), self._bytes[k]) for k in self._models]

    def get(self, llm: str, adapter: str | None = None, template: str | None = None, bits: int | None = None,
            *, guard: Guard | None = None, trust_remote_code: bool = False, keep: ChatModel | None = None):
        """The model, loaded on first use. ``keep``: a model in use that must not be evicted for this one."""
        from .models import model_bytes, weights_bytes

        key = (llm, adapter, template, bits, trust_remote_code)
        with self._lock:
            if key in self._models:
                self._models[key] = self._models.pop(key)  # most recently used last
                return self._models[key]
            keep_key = self._key_of(keep)
            self._evict_for((weights_bytes(llm) or 0) * (bits / 16 if bits else 1), 1, keep_key)
            chat = self._load(llm, adapter, template=template, bits=bits, guard=guard,
                              trust_remote_code=trust_remote_code)
            self._models[key], self._bytes[key] = chat, model_bytes(chat.model)
            self._evict_for(0, 0, keep_key, key)
            return chat

    def base_for(self, tuned: ChatModel, base: str, *, guard: Guard | None = None,
                 trust_remote_code: bool = False) -> ChatModel:
        """The base side of side by side: ``tuned`` with its adapter off when it has one, else the base loaded."""
        with self._lock:
            key = self._key_of(tuned)
            if tuned.base is None or key is None or key[0] != base:  # no adapter (merged, full): load the base
                return self.get(base, None, template=tuned.template, guard=guard,
                                trust_remote_code=trust_remote_code, keep=tuned)
            if key not in self._views:
                from .data import load_tokenizer

                own = has_tokenizer(key[1])  # the adapter brought a tokenizer (maybe with added tokens)
                tok = load_tokenizer(tuned.base, trust_remote_code=trust_remote_code) if own else None
                self._views[key] = without_adapter(tuned, tok)
            return self._views[key]

    def unload(self, chat: ChatModel) -> int:
        """Unload one model (and its base view); the bytes it held, 0 if it was not loaded."""
        with self._lock:
            key = self._key_of(chat)
            if key is None:
                return 0
            freed = self._drop(key)
            _free_memory()
            return freed

    def unload_all(self) -> list[tuple[str, int]]:
        """Unload every model; (what, bytes) of each."""
        with self._lock:
            gone = self.loaded()
            for key in list(self._models):
                self._drop(key)
            _free_memory()
            return gone

    def budget(self) -> int:
        return self.max_bytes if self.max_bytes is not None else memory_budget()

    def _key_of(self, chat: ChatModel | None):
        return next((k for k, c in self._models.items() if chat is not None and c.model is chat.model), None)

    def _drop(self, key: tuple) -> int:
        self._models.pop(key, None)
        self._views.pop(key, None)
        return self._bytes.pop(key, 0)

    def _evict_for(self, incoming: float, slots: int, *keep) -> None:
        """Unload least recently used models until ``slots`` more models and ``incoming`` more bytes fit."""
        budget, dropped = self.budget(), False
        for key in list(self._models):
            if len(self._models) + slots <= self.size and self.resident_bytes() + incoming <= budget:
                break
            if key not in keep:
                self._drop(key)
                dropped = True
        if dropped:
            _free_memory()


def memory_budget() -> int:
    """Default byte bound of the model cache: 80% of all CUDA cards' memory, else half the machine's RAM."""
    import os

    import torch

    if torch.cuda.is_available():
        return int(0.8 * sum(torch.cuda.get_device_properties(i).total_memory
                             for i in range(torch.cuda.device_count())))
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def _free_memory() -> None:
    """After dropping models: collect them now (accelerate's hooks hold cycles) and give CUDA's cache back."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of ``text`` could begin a stop word."""
    keep = 0
    for word in stops:
        for n in range(min(len(word) - 1, len(text)), 0, -1):
            if text.endswith(word[:n]):
                keep = max(keep, n)
                break
    return keep


def _logits_processors(settings: GenerationSettings):
    from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                              TopKLogitsWarper, TopPLogitsWarper)

    procs = LogitsProcessorList()
    if settings.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty))
    if settings.temperature > 0:
        procs.append(TemperatureLogitsWarper(settings.temperature))
        if settings.top_k:
            procs.append(TopKLogitsWarper(settings.top_k))
        if settings.top_p < 1.0:
            procs.append(TopPLogitsWarper(settings.top_p))
    return procs


def cache_kwarg(model) -> str:
    """The name the model's forward takes its KV cache under: 'cache' (transformers 5.x renamed it; the old
    name warns and goes in 5.40), else 'past_key_values' (earlier 5.x, remote code). A PeftModel forwards
    it to its base model, whose signature decides."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def new_cache(model):
    """An empty ``DynamicCache``, shaped by the model's config where this transformers takes one
    (sliding-window and hybrid layers get their kind of cache layer)."""
    import inspect

    from transformers import DynamicCache

    if "config" in inspect.signature(DynamicCache.__init__).parameters:
        return DynamicCache(config=model.config)
    return DynamicCache()


def _stepper(model, adapter_off: bool, around=None):
    """One forward step with the KV cache: ``step(ids, mask) -> logits``. With ``adapter_off`` each step runs
    under ``disable_adapter()`` and leaves it again, so another answer's steps in between keep the adapter.
    ``around()`` is entered first at each step (see ``generate_tokens``)."""
    import contextlib

    import torch

    name, state = cache_kwarg(model), {"cache": new_cache(model)}
    off = model.disable_adapter if adapter_off else contextlib.nullcontext
    outer = around or contextlib.nullcontext

    def step(ids, mask):
        with outer(), off(), torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, use_cache=True, **{name: state["cache"]})
        # the same cache, grown; a model that builds a new one hands it back (field 'cache' since 5.x renamed it)
        returned = next((out[k] for k in ("cache", "past_key_values") if k in out), None)
        if returned is not None:
            state["cache"] = returned
        return out.logits[:, -1, :].float()

    return step


def generate_tokens(model, input_ids, eos_ids: set, settings: GenerationSettings, adapter_off: bool = False,
                    *, around=None, generator=None) -> Iterator[int]:
    """Yield new token ids one by one: the model's forward with its KV cache,
    transformers' logits processors for penalty/temperature/top-k/top-p.
    ``adapter_off``: answer as the base model of a PeftModel (see ``without_adapter``).
    ``around``: a context manager factory entered for each forward step (a server
    takes the model's lock and activates its adapter there). ``generator``: the
    random source for sampling (a server's requests must not share torch's global one).

    Why not ``model.generate`` with a streamer: streaming from ``generate``
    needs it in a second thread, and on CPU PyTorch ran ~1.6x slower off the
    main thread (measured: bench/bench_chat.py). This loop yields from
    the caller's own thread. (Re-measured for the server: the cause is a second
    OpenMP team, one per thread that runs torch code, not the thread as such;
    see ``backend.serve.engine``.)
    """
    import torch

    procs = _logits_processors(settings)
    step = _stepper(model, adapter_off, around)
    seen = input_ids
    logits = step(input_ids, torch.ones_like(input_ids))
    for n in range(settings.max_new_tokens):
        scores = procs(seen, logits)
        if n < settings.min_new_tokens and eos_ids:
            scores[:, list(eos_ids)] = -float("inf")
        if settings.temperature > 0:
            token = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator)
        else:
            token = scores.argmax(dim=-1, keepdim=True)
        tok = int(token)
        yield tok
        if tok in eos_ids or n + 1 == settings.max_new_tokens:
            return
        seen = torch.cat([seen, token], dim=-1)
        logits = step(token, torch.ones_like(seen))


@dataclass
class ReplyStats:
    """What one reply cost and why it ended, filled in as it streams."""

    prompt_tokens: int = 0
    completion_tokens: int = 0  # every token the model generated, the ones a stop word cut off included
    finish_reason: str | None = None  # 'stop' (EOS or a stop word), 'length' (max_new_tokens), 'cancelled'


def prompt_ids(chat: ChatModel, turns: list[dict]) -> list[int]:
    """The prompt's token ids for ``turns`` (finished {"input", "output"} turns, then {"input"}), in the
    training format; ``chat.system`` goes on the first turn unless a turn brings its own."""
    from .data import generation_prompt

    turns = [dict(t) for t in turns]
    if chat.system and not any(t.get("system") for t in turns):
        turns[0] = {**turns[0], "system": chat.system}
    return list(generation_prompt(turns, chat.tokenizer, chat.template))


def eos_ids(tokenizer) -> set[int]:
    eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


def stream_text(chat: ChatModel, ids: list[int], settings: GenerationSettings, *, stop_words=None,
                stats: ReplyStats | None = None, cancel=None, around=None) -> Iterator[str]:
    """Yield the continuation of the prompt ``ids`` piece by piece, up to EOS or a stop word (``chat``'s,
    or ``stop_words``), which never shows. ``stats`` gets the token counts and the finish reason;
    ``cancel`` (a ``threading.Event``) is checked at every token and ends the reply at once."""
    import torch

    from .models import input_device

    stats = stats if stats is not None else ReplyStats()
    stops = list(chat.stop_words if stop_words is None else stop_words)
    tensor = torch.tensor([ids], device=input_device(chat.model))
    generator = None
    if settings.seed is not None:
        generator = torch.Generator(device=tensor.device).manual_seed(settings.seed)
    ends = eos_ids(chat.tokenizer)
    stats.prompt_tokens, stats.completion_tokens, stats.finish_reason = len(ids), 0, "length"
    tokens: list[int] = []
    text, sent = "", 0
    for tok in generate_tokens(chat.model, tensor, ends, settings, chat.adapter_off, around=around,
                               generator=generator):
        stats.completion_tokens += 1
        if cancel is not None and cancel.is_set():
            stats.finish_reason = "cancelled"
            return
        if tok in ends:
            stats.finish_reason = "stop"
            break
        tokens.append(tok)
        text = chat.tokenizer.decode(tokens, skip_special_tokens=False)
        if text.endswith("\ufffd"):
            continue  # half of a multi-byte character: wait for the rest
        cut = min((text.find(w) for w in stops if w in text), default=-1)
        if cut >= 0:
            stats.finish_reason = "stop"
            if cut > sent:
                yield text[sent:cut]
            return
        safe = len(text) - _held_back(text, stops)
        if safe > sent:
            yield text[sent:safe]
            sent = safe
    if len(text) > sent:
        yield text[sent:]


def stream_reply(chat: ChatModel, history: list[dict], message: str,
                 settings: GenerationSettings | None = None) -> Iterator[str]:
    """Yield the reply to ``message`` piece by piece. ``history`` is a list of
    finished turns ``{"input", "output"}``; the system text goes on the first turn."""
    yield from stream_text(chat, prompt_ids(chat, [*history, {"input": message}]), settings or GenerationSettings())


def reply(chat: ChatModel, history: list[dict], message: str, settings: GenerationSettings | None = None) -> str:
    return "".join(stream_reply(chat, history, message, settings))
