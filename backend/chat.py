"""Chat with a model: one generator that yields text pieces as they are
generated, used by ``ftstudio chat`` and the studio's chat tab alike.

The prompt is built by ``backend.data.generation_prompt``, i.e. exactly the
format the model was trained on, history included. Generation stops at EOS
and at the template's STOP_WORDS; text that could still turn out to be the
start of a stop word is held back, so a stop word never leaks into the reply.
"""

from __future__ import annotations

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


def load_chat_model(llm: str, adapter: str | None = None, template: str | None = None, system: str | None = None,
                    bits: int | None = None, device: str = "auto", trust_remote_code: bool = False,
                    guard: Guard | None = None) -> ChatModel:
    """Base model (+ adapter), with template and system defaulting to what the
    adapter (or a converted/merged model) recorded in its artifact record. The
    base an adapter names passes ``guard`` like a typed one; ``trust_remote_code``
    is the operator's permission, never the record's."""
    import torch

    from .data import get_template, load_tokenizer, stop_words
    from .models import base_location, fit_embeddings, load_causal_lm

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
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    model = load_causal_lm(llm_path, trust_remote_code=trust_remote_code, what="model", dtype="auto",
                           **_quantized(bits, dev))
    tok_source = adapter if adapter and has_tokenizer(adapter) else llm_path
    tokenizer = load_tokenizer(str(tok_source), trust_remote_code=trust_remote_code)
    if not bits:
        model = model.to(dev)
    if adapter:
        fit_embeddings(model, len(tokenizer))
        from peft import PeftModel

        try:
            check_weights(adapter)
            model = PeftModel.from_pretrained(model, adapter)
        except (RuntimeError, ValueError, KeyError, OSError) as exc:
            raise ArtifactError(f"adapter {adapter} does not fit {llm}: {str(exc).splitlines()[0][:300]}") from None
    model.eval()
    return ChatModel(model, tokenizer, tpl.name, meta.get("system", "") if system is None else system,
                     stop_words(tokenizer, tpl), meta)


def _quantized(bits: int | None, dev: str) -> dict:
    if not bits:
        return {}
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except Exception as exc:  # noqa: BLE001 - ImportError or a broken native library
        raise ArtifactError(f"--bits {bits} needs bitsandbytes ({exc}); pip install bitsandbytes") from None
    return {"quantization_config": BitsAndBytesConfig(load_in_4bit=bits == 4, load_in_8bit=bits == 8,
                                                      bnb_4bit_quant_type="nf4"),
            "device_map": {"": 0 if dev == "cuda" else "cpu"}}


class ModelCache:
    """The last few loaded chat models, so the chat tab does not reload a
    model on every message (loading is the slow part on a big model)."""

    def __init__(self, size: int = 2):
        self.size = size
        self._models: dict[tuple, ChatModel] = {}

    def get(self, llm: str, adapter: str | None = None, template: str | None = None, bits: int | None = None,
            *, guard: Guard | None = None, trust_remote_code: bool = False):
        key = (llm, adapter, template, bits, trust_remote_code)
        if key in self._models:
            self._models[key] = self._models.pop(key)  # most recently used last
        else:
            while len(self._models) >= self.size:
                self._models.pop(next(iter(self._models)))
            self._models[key] = load_chat_model(llm, adapter, template=template, bits=bits, guard=guard,
                                                trust_remote_code=trust_remote_code)
        return self._models[key]


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


def generate_tokens(model, input_ids, eos_ids: set, settings: GenerationSettings) -> Iterator[int]:
    """Yield new token ids one by one: the model's forward with its KV cache,
    transformers' logits processors for penalty/temperature/top-k/top-p.

    Why not ``model.generate`` with a streamer: streaming from ``generate``
    needs it in a second thread, and on CPU PyTorch runs ~1.6x slower off the
    main thread (measured: bench/bench_chat.py). This loop yields from the
    caller's own thread, at plain-generate speed.
    """
    import torch
    from transformers import DynamicCache

    procs = _logits_processors(settings)
    cache = DynamicCache()
    seen = input_ids
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), past_key_values=cache,
                    use_cache=True)
        for step in range(settings.max_new_tokens):
            scores = procs(seen, out.logits[:, -1, :].float())
            if step < settings.min_new_tokens and eos_ids:
                scores[:, list(eos_ids)] = -float("inf")
            if settings.temperature > 0:
                token = torch.multinomial(torch.softmax(scores, dim=-1), 1)
            else:
                token = scores.argmax(dim=-1, keepdim=True)
            tok = int(token)
            yield tok
            if tok in eos_ids:
                return
            seen = torch.cat([seen, token], dim=-1)
            out = model(input_ids=token, attention_mask=torch.ones_like(seen), past_key_values=cache,
                        use_cache=True)


def stream_reply(chat: ChatModel, history: list[dict], message: str,
                 settings: GenerationSettings | None = None) -> Iterator[str]:
    """Yield the reply to ``message`` piece by piece. ``history`` is a list of
    finished turns ``{"input", "output"}``; the system text goes on the first turn."""
    import torch

    from .data import generation_prompt

    settings = settings or GenerationSettings()
    turns = [dict(t) for t in history] + [{"input": message}]
    if chat.system:
        turns[0] = {**turns[0], "system": chat.system}
    ids = torch.tensor([generation_prompt(turns, chat.tokenizer, chat.template)], device=chat.model.device)
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    eos = chat.tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    tokens: list[int] = []
    text, sent = "", 0
    for tok in generate_tokens(chat.model, ids, eos_ids, settings):
        if tok in eos_ids:
            break
        tokens.append(tok)
        text = chat.tokenizer.decode(tokens, skip_special_tokens=False)
        if text.endswith("\ufffd"):
            continue  # half of a multi-byte character: wait for the rest
        cut = min((text.find(w) for w in chat.stop_words if w in text), default=-1)
        if cut >= 0:
            if cut > sent:
                yield text[sent:cut]
            return
        safe = len(text) - _held_back(text, chat.stop_words)
        if safe > sent:
            yield text[sent:safe]
            sent = safe
    if len(text) > sent:
        yield text[sent:]


def reply(chat: ChatModel, history: list[dict], message: str, settings: GenerationSettings | None = None) -> str:
    return "".join(stream_reply(chat, history, message, settings))
