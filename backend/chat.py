"""Chat with a model: one generator that yields text pieces as they are
generated, used by ``ftstudio chat`` and the studio's chat tab alike.

The prompt is built by ``backend.data.generation_prompt``, i.e. exactly the
format the model was trained on, history included. Generation stops at EOS
and at the template's STOP_WORDS; text that could still turn out to be the
start of a stop word is held back, so a stop word never leaks into the reply.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator


@dataclass
class GenerationSettings:
    max_new_tokens: int = 512
    temperature: float = 0.1
    top_k: int = 40
    top_p: float = 0.75
    repetition_penalty: float = 1.0
    seed: int | None = None

    def kwargs(self) -> dict:
        sample = self.temperature > 0
        out = {"max_new_tokens": self.max_new_tokens, "do_sample": sample,
               "repetition_penalty": self.repetition_penalty}
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
                    bits: int | None = None, device: str = "auto") -> ChatModel:
    """Base model (+ adapter), with template and system defaulting to what the
    adapter (or a converted/merged model) recorded in ftstudio.json."""
    import torch
    from transformers import AutoModelForCausalLM

    from .data import get_template, load_tokenizer, stop_words
    from .export import ExportError, check_llm, read_meta

    llm_path = check_llm(llm)
    if adapter is not None and not (Path(adapter) / "adapter_config.json").exists():
        raise ExportError(f"adapter {adapter}: no adapter_config.json there (convert an iter_<N>.pth with "
                          "`ftstudio convert pth_to_hf` first)")
    meta = read_meta(adapter) if adapter else read_meta(llm_path)
    template_name = template or meta.get("template")
    if template_name is None:
        raise ExportError(f"no prompt template recorded with {adapter or llm}; give --prompt-template "
                          "(ftstudio list-template)")
    tpl = get_template(template_name)  # raises, listing the known names, if unknown
    kwargs = {}
    if bits:
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except Exception as exc:
            raise ExportError(f"--bits {bits} needs bitsandbytes ({exc}); pip install bitsandbytes") from None
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=bits == 4, load_in_8bit=bits == 8,
                                                           bnb_4bit_quant_type="nf4")
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if bits:
        kwargs["device_map"] = {"": 0 if dev == "cuda" else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(llm_path, dtype="auto", **kwargs)
    if not bits:
        model = model.to(dev)
    if adapter:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, adapter)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ExportError(f"adapter {adapter} does not fit {llm}: {str(exc).splitlines()[0][:300]}") from None
    model.eval()
    tok_source = adapter if adapter and (Path(adapter) / "tokenizer_config.json").exists() else llm_path
    tokenizer = load_tokenizer(str(tok_source))
    return ChatModel(model, tokenizer, tpl.name, meta.get("system", "") if system is None else system,
                     stop_words(tokenizer, tpl), meta)


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of ``text`` could begin a stop word."""
    keep = 0
    for word in stops:
        for n in range(min(len(word) - 1, len(text)), 0, -1):
            if text.endswith(word[:n]):
                keep = max(keep, n)
                break
    return keep


def stream_reply(chat: ChatModel, history: list[dict], message: str,
                 settings: GenerationSettings | None = None) -> Iterator[str]:
    """Yield the reply to ``message`` piece by piece. ``history`` is a list of
    finished turns ``{"input", "output"}``; the system text goes on the first turn."""
    import torch
    from transformers import TextIteratorStreamer

    from .data import generation_prompt

    settings = settings or GenerationSettings()
    turns = [dict(t) for t in history] + [{"input": message}]
    if chat.system:
        turns[0] = {**turns[0], "system": chat.system}
    ids = torch.tensor([generation_prompt(turns, chat.tokenizer, chat.template)], device=chat.model.device)
    streamer = TextIteratorStreamer(chat.tokenizer, skip_prompt=True, skip_special_tokens=False)
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                  pad_token_id=chat.tokenizer.pad_token_id or chat.tokenizer.eos_token_id,
                  eos_token_id=chat.tokenizer.eos_token_id, stop_strings=chat.stop_words or None,
                  tokenizer=chat.tokenizer, **settings.kwargs())
    errors = []

    def run():
        try:
            with torch.no_grad():
                chat.model.generate(**kwargs)
        except Exception as exc:  # noqa: BLE001 - re-raised in the consumer
            errors.append(exc)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    text, sent = "", 0
    stopped = False
    for piece in streamer:
        if stopped:
            continue  # drain, so generate() can finish
        text += piece
        cut = min((text.find(w) for w in chat.stop_words if w in text), default=-1)
        if cut >= 0:
            if cut > sent:
                yield text[sent:cut]
            sent = cut
            stopped = True
            continue
        safe = len(text) - _held_back(text, chat.stop_words)
        if safe > sent:
            yield text[sent:safe]
            sent = safe
    thread.join()
    if errors:
        raise errors[0]
    if not stopped and len(text) > sent:
        yield text[sent:]


def reply(chat: ChatModel, history: list[dict], message: str, settings: GenerationSettings | None = None) -> str:
    return "".join(stream_reply(chat, history, message, settings))
