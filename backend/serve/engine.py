"""The serving engine behind the OpenAI-style API: which models a server
has, how a request's prompt is built, and a fair queue that runs generations
off the event loop.

- **Models.** A ``ServedModel`` is a loaded ``backend.chat.ChatModel`` under
  the id clients send as ``model``. Several ids may share one model object:
  adapters on one base are peft's named adapters on one PeftModel, and the
  base itself is the same object with the adapter disabled. Every forward
  step takes that object's lock and activates the request's adapter first,
  so requests on different adapters interleave step by step and never see
  each other's adapter.
- **Prompts** are built exactly as chat builds them (``chat.prompt_ids``:
  the training format, the system text on the first turn); a request's
  system message replaces the recorded system text.
- **Scheduler.** ``slots`` long-lived worker threads take requests first in,
  first out; at most ``slots + max_queue`` are in the server at once (running
  or waiting), past that ``QueueFull`` (HTTP 429).
  Each request carries a cancel event checked at every token, so a client
  that goes away frees its slot after at most one more forward step, and a
  waiting one leaves the queue at once.

Threads and speed, measured for the server (torch 2.13 with GNU OpenMP, 2
cores shared with other work, the 30M-parameter model of bench/bench_chat.py,
greedy, medians of interleaved runs). ``backend.chat`` once found PyTorch
1.6x slower "off the main thread"; the thread itself is not the cause: a new
thread runs with the same intra-op thread count, and at load 1-2 the main
thread, a fresh thread, a long-lived worker and a worker feeding a consumer
through a queue all ran 45-51 tokens/s. What matters is OpenMP's helper
threads: each thread that runs torch code gets its own team of them, and
libgomp's wait code lets them spin between parallel regions at full length
only while it manages no more threads than there are CPUs (else they sleep
and are woken per region). That fits the old 1.6x (model loaded on the main
thread, generation in another: two teams), not re-measured idle here. On
busy cores spinning collapses instead: at load 5, 1.5-7.6 tokens/s in one
team, 32-49 with ``OMP_WAIT_POLICY=PASSIVE``, which on free cores costs
(50-55 against 80-112).

Through the API (openai client streaming 60 tokens from ``ftstudio serve``
on the same 2 cores): free cores 89-98 tokens/s against 110-112 in-process
(the client's and the event loop's work per token share the cores with the
helpers); both passive 55 against 54 (the API adds nothing of its own); at
load 5, 4.0 against 2.6-5.3, and 40 with a passive server. So the server
keeps plain ``generate``'s default policy (``OMP_WAIT_POLICY=PASSIVE`` in the
environment is the remedy on a CPU shared with busy work, for ``generate``
as much), and with one slot (the default) runs every torch operation on its
one worker thread, models loaded there too (``Scheduler.call``): one team,
as plain ``generate`` has. The event loop and the tokenizer (Rust) run no
torch code.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator, Callable, Iterator, Protocol

from backend.chat import ChatModel, GenerationSettings, ReplyStats, prompt_ids, stream_text

if TYPE_CHECKING:
    from .credentials import Scope

log = logging.getLogger(__name__)


class UnknownModel(LookupError):
    """No served model has this id (HTTP 404)."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class QueueFull(Exception):
    """Every slot is busy and the queue is full (HTTP 429)."""


class RequestError(ValueError):
    """A request the server cannot run as sent (HTTP 400); ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = "invalid_value"):
        super().__init__(message)
        self.param, self.code = param, code


def context_length_of(model, tokenizer) -> int | None:
    """How many tokens the model attends to: its config's position limit, else the tokenizer's; None unknown."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and 0 < value < 10**7 else None


@dataclass
class ServedModel:
    name: str  # the id clients send as "model"
    chat: ChatModel  # model, tokenizer, template, system, stop words; chat.adapter_off: the base of a PeftModel
    adapter: str | None = None  # peft adapter to activate for this model's steps; None: the model as it is
    lock: threading.Lock = field(default_factory=threading.Lock)  # one per model object, shared by its ids
    context_length: int | None = None  # default: from the model's config / tokenizer

    def __post_init__(self):
        if self.context_length is None:
            self.context_length = context_length_of(self.chat.model, self.chat.tokenizer)

    @contextlib.contextmanager
    def step(self):
        """Entered around each forward step: the model's lock, this id's adapter active."""
        with self.lock:
            model = self.chat.model
            if self.adapter is not None and getattr(model, "active_adapter", None) != self.adapter:
                model.set_adapter(self.adapter)
            yield


class ModelSource(Protocol):
    def names(self, scope: "Scope") -> list[str]:
        """The ids this credential may see (``scope.model`` None: all)."""

    def get(self, name: str) -> ServedModel:
        """The model with this id; raises ``UnknownModel``."""


class FixedModels:
    """A ModelSource of models loaded once at start (``ftstudio serve``)."""

    def __init__(self, models: list[ServedModel]):
        self._models = {m.name: m for m in models}

    def names(self, scope: "Scope") -> list[str]:
        if scope.model is None:
            return list(self._models)
        return [scope.model] if scope.model in self._models else []

    def get(self, name: str) -> ServedModel:
        try:
            return self._models[name]
        except KeyError:
            raise UnknownModel(name) from None


def load_fixed(models: list[tuple[str, str]], adapters: list[tuple[str, str]] = (), *, guard,
               template: str | None = None, system: str | None = None, device: str = "auto",
               trust_remote_code: bool = False) -> FixedModels:
    """``ftstudio serve``'s models, loaded now (``plan``: which ids share a base). Every adapter on one
    base is a named adapter of one PeftModel; a base served next to its adapters is that PeftModel with
    its adapter off: the base is in memory once."""
    opts = dict(template=template, system=system, device=device, trust_remote_code=trust_remote_code, guard=guard)
    groups = plan(models, adapters, guard)
    return FixedModels([m for group in groups for m in _load_group(group, **opts)])


def plan(models: list[tuple[str, str]], adapters: list[tuple[str, str]], guard) -> list[dict]:
    """Who runs on which base, loading nothing: ``models`` are (id, spec) pairs resolved through the catalog
    (a checkpoint converts once), ``adapters`` (id, adapter folder) run on the first model's base. One group
    per base: {"llm": base, "plain": [ids of the base itself], "adapters": {id: adapter folder}}."""
    from backend.core.artifacts import ArtifactError, is_adapter, model_source

    from . import catalog

    groups: dict[str, dict] = {}
    first_llm = None
    for name, spec in models:
        llm, adapter = model_source(catalog.resolve(guard, spec))
        group = _group(groups, llm, guard)
        if adapter:
            group["adapters"][name] = adapter
        else:
            group["plain"].append(name)
        first_llm = first_llm or llm
    for name, path in adapters:
        folder = guard.model(path, "adapter")
        if not is_adapter(folder):
            raise ArtifactError(f"--adapter {path}: not an adapter folder (an exported LoRA adapter: RUN/hf/X, "
                                "or `ftstudio convert pth_to_hf` an iter_<N>.pth)")
        _group(groups, first_llm, guard)["adapters"][name] = folder
    return list(groups.values())


def vllm_sources(models: list[tuple[str, str]], adapters: list[tuple[str, str]], guard, *,
                 prompt_template: str | None, out_dir) -> tuple[str, dict[str, str], str, str | None]:
    """``--engine vllm``'s share of ``plan``: (base folder or Hub id, {id: adapter folder}, the base's id,
    the chat template file of the training format or None). vLLM serves one base with LoRA adapters on it.
    The template: ``prompt_template`` exported as Jinja, else the first adapter's exported tokenizer's
    (``pth_to_hf`` writes the training format there), else the base's own."""
    from backend.chat_template import template_to_jinja
    from backend.core.artifacts import ArtifactError, has_tokenizer
    from backend.core.atomic import write_text
    from backend.data import load_tokenizer
    from backend.models import base_location

    from .vllm import CHAT_TEMPLATE_FILE, chat_template_file

    groups = plan(models, adapters, guard)
    if len(groups) != 1 or len(groups[0]["plain"]) > 1:
        bases = ", ".join(g["llm"] for g in groups)
        raise ArtifactError(f"--engine vllm serves one base model (once) and LoRA adapters on it; this asks for "
                            f"{bases} ({', '.join(n for n, _ in models)}): start one server per base")
    group = groups[0]
    base = base_location(group["llm"], guard, "model")
    served_name = group["plain"][0] if group["plain"] else group["llm"]
    tok_dir = next((a for a in group["adapters"].values() if has_tokenizer(a)), base)
    if prompt_template is None:
        return base, group["adapters"], served_name, chat_template_file(tok_dir, out_dir)
    jinja = template_to_jinja(prompt_template, load_tokenizer(tok_dir))
    if jinja is None:
        raise ArtifactError(f"--prompt-template {prompt_template} cannot be written as a chat template for vLLM")
    return base, group["adapters"], served_name, str(write_text(Path(out_dir) / CHAT_TEMPLATE_FILE, jinja))


def _group(groups: dict, llm: str, guard) -> dict:
    """The group of ids served by one base model (keyed by its resolved location)."""
    import os

    from backend.models import base_location

    where = base_location(llm, guard, "model")
    key = os.path.realpath(where) if os.path.exists(where) else where
    return groups.setdefault(key, {"llm": llm, "plain": [], "adapters": {}})


def _load_group(group: dict, **opts) -> list[ServedModel]:
    from backend.chat import load_adapters, load_chat_model

    lock = threading.Lock()
    if not group["adapters"]:
        chat = load_chat_model(group["llm"], **opts)
        return [ServedModel(name, chat, lock=lock) for name in group["plain"]]
    inner = {f"served_{n}": folder for n, folder in enumerate(group["adapters"].values())}  # peft names: no '.'
    base, chats = load_adapters(group["llm"], inner, **opts)
    out = [ServedModel(name, chats[key], adapter=key, lock=lock) for name, key in zip(group["adapters"], inner)]
    return out + [ServedModel(name, base, lock=lock) for name in group["plain"]]


# --- prompts -------------------------------------------------------------------------------------

def chat_prompt(served: ServedModel, messages: list[dict]) -> list[int]:
    """OpenAI-style messages ({"role": system|user|assistant, "content": str}) -> prompt ids in the model's
    training format. System messages replace the recorded system text; consecutive user messages are one
    turn; the last message must be the user's."""
    system, turns, pending = None, [], None
    for n, m in enumerate(messages):
        role, text = m["role"], m["content"]
        if role == "system":
            system = text if system is None else f"{system}\n{text}"
        elif role == "user":
            pending = text if pending is None else f"{pending}\n{text}"
        elif pending is None:
            raise RequestError(f"messages[{n}]: an assistant message must answer a user message", "messages")
        else:
            turns.append({"input": pending, "output": text})
            pending = None
    if pending is None:
        raise RequestError("messages: the last message must be the user's (the model answers it)", "messages")
    chat = served.chat if system is None else dataclasses.replace(served.chat, system=system)
    return prompt_ids(chat, [*turns, {"input": pending}])


def text_prompt(served: ServedModel, prompt: str) -> list[int]:
    """A raw prompt's ids, with what the tokenizer itself puts in front of text (its BOS), nothing else."""
    from backend.data import special_ids

    tok = served.chat.tokenizer
    return [*special_ids(tok)[0], *tok.encode(prompt, add_special_tokens=False)]


def fit_context(served: ServedModel, n_prompt: int, max_tokens: int | None, param: str) -> int:
    """How many tokens the reply may have: ``max_tokens``, or all the context leaves; RequestError
    (context_length_exceeded) when the prompt, or the prompt plus ``max_tokens``, does not fit."""
    limit = served.context_length
    if limit is None:
        return max_tokens or 512
    if n_prompt + (max_tokens or 1) > limit:
        asked = f"{n_prompt} in the prompt" + (f" + {max_tokens} to generate (max_tokens)" if max_tokens else "")
        raise RequestError(f"this model's maximum context length is {limit} tokens; the request asks for "
                           f"{asked}. Shorten the {param} or lower max_tokens", param, "context_length_exceeded")
    return max_tokens or limit - n_prompt


@dataclass
class Generation:
    """One request's work: a prompt for a model, sampling settings and its own extra stop words."""

    model: ServedModel
    prompt: list[int]
    settings: GenerationSettings
    stop: list[str] = field(default_factory=list)
    stats: ReplyStats = field(default_factory=ReplyStats)
    request_id: str = ""

    def pieces(self, cancel: threading.Event) -> Iterator[str]:
        """The reply's text pieces (in a worker thread). A cancelled one is logged: when, and how much of it ran."""
        chat = self.model.chat
        stops = [*chat.stop_words, *(w for w in self.stop if w not in chat.stop_words)]
        yield from stream_text(chat, self.prompt, self.settings, stop_words=stops, stats=self.stats, cancel=cancel,
                               around=self.model.step)
        if self.stats.finish_reason == "cancelled":
            log.info("%s (%s): cancelled, the client left; stopped after %d of at most %d tokens", self.request_id,
                     self.model.name, self.stats.completion_tokens, self.settings.max_new_tokens)


# --- the queue ----------------------------------------------------------------------------------

_PIECE, _DONE, _ERROR = "piece", "done", "error"


class Job:
    """One request from its place in the queue to its last piece. Pieces come out in order through
    ``pieces()`` (async, on the event loop that submitted it) or iteration (without a loop)."""

    def __init__(self, work: Callable[[threading.Event], Iterator[str]], loop: asyncio.AbstractEventLoop | None):
        self.work = work
        self.cancelled = threading.Event()
        self.started = threading.Event()
        self._loop = loop
        self._out: asyncio.Queue | queue.Queue = asyncio.Queue() if loop else queue.Queue()

    def cancel(self) -> None:
        """Stop at the next token (running) or never start (waiting). Safe from any thread, any number of times."""
        self.cancelled.set()

    def _emit(self, kind: str, value=None) -> None:
        if self._loop is None:
            self._out.put((kind, value))
            return
        try:
            self._loop.call_soon_threadsafe(self._out.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancel()

    def run(self) -> None:
        """In a worker thread: the generation, each piece handed to the consumer."""
        self.started.set()
        if self.cancelled.is_set():  # left between the queue and the slot
            self._emit(_DONE)
            return
        try:
            for piece in self.work(self.cancelled):
                self._emit(_PIECE, piece)
        except Exception as exc:  # noqa: BLE001 - a worker never dies of one request: the error goes to its client
            log.exception("a generation failed")
            self._emit(_ERROR, exc)
        else:
            self._emit(_DONE)

    async def pieces(self) -> AsyncIterator[str]:
        while True:
            kind, value = await self._out.get()
            if kind == _ERROR:
                raise value
            if kind == _DONE:
                return
            yield value

    def __iter__(self) -> Iterator[str]:
        while True:
            kind, value = self._out.get()
            if kind == _ERROR:
                raise value
            if kind == _DONE:
                return
            yield value


class Scheduler:
    """First in, first out: ``slots`` generations at once, at most ``max_queue`` waiting beyond them (see the module
    docstring). Slots are per server, not per model, so one CPU or GPU is never oversubscribed."""

    def __init__(self, slots: int = 1, max_queue: int = 16):
        if slots < 1 or max_queue < 0:
            raise ValueError(f"scheduler: slots {slots} must be at least 1, max_queue {max_queue} at least 0")
        self.slots, self.max_queue = slots, max_queue
        self._waiting: deque[Job] = deque()
        self._running: set[Job] = set()
        self._closed = False
        self._cond = threading.Condition()
        self._workers = [threading.Thread(target=self._work, name=f"ftstudio-generate-{n}", daemon=True)
                         for n in range(slots)]
        for t in self._workers:
            t.start()

    def submit(self, work: Callable[[threading.Event], Iterator[str]]) -> Job:
        """Queue ``work`` (called in a worker with the job's cancel event; yields text pieces); QueueFull
        past ``max_queue`` waiting. Called on an event loop, the job reports to that loop."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        job = Job(work, loop)
        with self._cond:
            if self._closed:
                raise QueueFull("the server is shutting down")
            self._purge()
            # Capacity counts running and waiting together: a job handed to a worker that has not woken yet
            # is still "waiting", so testing the queue alone refused requests with a slot free (seen under load).
            if len(self._running) + len(self._waiting) >= self.slots + self.max_queue:
                raise QueueFull(f"the server is busy: {len(self._running)} replies running and "
                                f"{len(self._waiting)} waiting (--max-queue {self.max_queue}); retry shortly")
            self._waiting.append(job)
            self._cond.notify()
        return job

    def call(self, fn: Callable, *args, **kwargs):
        """``fn(*args, **kwargs)`` run in a worker thread; its result, or its exception raised here.
        ``ftstudio serve`` loads its models this way, so with one slot every torch operation of the
        process runs on one thread (see the module docstring: one OpenMP team, as plain generate has)."""
        box: dict = {}

        def work(cancel: threading.Event) -> Iterator[str]:
            try:
                box["value"] = fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - handed back to the caller as it is
                box["error"] = exc
            return iter(())

        for _ in self.submit(work):
            pass
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def load(self) -> tuple[int, int]:
        """(running, waiting) right now."""
        with self._cond:
            self._purge()
            return len(self._running), len(self._waiting)

    def close(self, timeout: float = 10.0) -> None:
        """Cancel everything, stop the workers, wait for them (at most ``timeout`` s in all)."""
        with self._cond:
            self._closed = True
            for job in [*self._waiting, *self._running]:
                job.cancel()
            self._cond.notify_all()
        for t in self._workers:
            t.join(timeout / len(self._workers))

    def _purge(self) -> None:
        """Drop waiting jobs whose client went away (under the condition's lock)."""
        if any(j.cancelled.is_set() for j in self._waiting):
            self._waiting = deque(j for j in self._waiting if not j.cancelled.is_set())

    def _work(self) -> None:
        while True:
            with self._cond:
                self._purge()
                while not self._waiting and not self._closed:
                    self._cond.wait()
                    self._purge()
                if self._closed:
                    return
                job = self._waiting.popleft()
                self._running.add(job)
            try:
                job.run()
            finally:
                with self._cond:
                    self._running.discard(job)
