"""The OpenAI wire format in front of the engine, as a Starlette app that
``ftstudio serve`` and the studio both mount at ``/v1``, so any OpenAI client,
SDK or evaluation harness talks to a tuned model unchanged.

Routes: ``GET /models`` (and ``/models/{id}``), ``POST /chat/completions``
and ``POST /completions``, streamed as server-sent events (``data: {...}``
chunks, then ``data: [DONE]``) or not. Errors always come in OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``: unknown model 404, a bad
parameter 400 naming it, a prompt the context cannot hold 400
(``context_length_exceeded``), a missing or wrong key 401, a full queue or a
link's used-up request limit 429. One extension, as vLLM has it: ``min_tokens``
(no end-of-sequence before that many tokens; benchmarks use it for replies of
a fixed length).

Every request is authorized before anything else is read (``Authorizer``,
the ``Authorization: Bearer`` token); a request counts as a use of its
credential only once it is valid and about to be queued. Model lookup and
tokenization run in a thread (a studio's lookup may load a model), never on
the event loop; generation runs in the scheduler's workers. A client that
disconnects, streaming or not, cancels its request at once.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from backend.chat import GenerationSettings

from .credentials import AuthError, Authorizer, model_not_found
from .engine import (Generation, ModelSource, QueueFull, RequestError, Scheduler, ServedModel, UnknownModel,
                     chat_prompt, fit_context, text_prompt)

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP_WORDS = 16
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "suffix", "tools", "functions", "logit_bias")


class APIError(Exception):
    """An error for the client, in OpenAI's terms."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _api_error(exc: Exception) -> APIError:
    """Any refusal of ours (auth, lookup, request, queue) as the APIError the client sees."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, AuthError):
        return APIError(exc.status, exc.message, exc.type, None, exc.code)
    if isinstance(exc, UnknownModel):
        return _api_error(model_not_found(exc.name))
    if isinstance(exc, RequestError):
        return APIError(400, str(exc), "invalid_request_error", exc.param, exc.code)
    if isinstance(exc, QueueFull):
        return APIError(429, str(exc), "rate_limit_error", None, "rate_limit_exceeded")
    if isinstance(exc, HTTPException):
        return APIError(exc.status_code, str(exc.detail), "invalid_request_error", None, None)
    raise TypeError(f"not an API refusal: {exc!r}")


async def _error_response(request: Request, exc: Exception) -> JSONResponse:
    err = _api_error(exc)
    return JSONResponse(err.body(), status_code=err.status)


def create_api(models: ModelSource, auth: Authorizer, scheduler: Scheduler) -> Starlette:
    """The ``/v1`` app: mount it at ``/v1`` (its routes are ``/models``, ``/chat/completions``, ...)."""
    api = _API(models, auth, scheduler)
    routes = [Route("/models", api.list_models, methods=["GET"]),
              Route("/models/{model:path}", api.get_model, methods=["GET"]),
              Route("/chat/completions", api.chat_completions, methods=["POST"]),
              Route("/completions", api.completions, methods=["POST"])]
    handlers = {cls: _error_response for cls in (APIError, AuthError, UnknownModel, RequestError, QueueFull,
                                                 HTTPException)}
    return Starlette(routes=routes, exception_handlers=handlers)


class _API:
    def __init__(self, models: ModelSource, auth: Authorizer, scheduler: Scheduler):
        self.models, self.auth, self.scheduler = models, auth, scheduler
        self.created = int(time.time())

    # --- models ---------------------------------------------------------------------------

    def _model_card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "ftstudio"}

    async def list_models(self, request: Request) -> JSONResponse:
        scope = self.auth.authorize(_bearer(request), None, use=False)
        names = await run_in_threadpool(self.models.names, scope)
        return JSONResponse({"object": "list", "data": [self._model_card(n) for n in names]})

    async def get_model(self, request: Request) -> JSONResponse:
        name = request.path_params["model"]
        scope = self.auth.authorize(_bearer(request), name, use=False)
        if name not in await run_in_threadpool(self.models.names, scope):
            raise UnknownModel(name)
        return JSONResponse(self._model_card(name))

    # --- completions ----------------------------------------------------------------------

    async def chat_completions(self, request: Request):
        token, body = await self._authorized_body(request)
        params, messages = _params(body), _messages(body)  # every 400 before a model is looked up (or loaded)
        served = await run_in_threadpool(self.models.get, body["model"])
        prompt = await run_in_threadpool(chat_prompt, served, messages)
        return await self._complete(request, token, params, served, prompt, "messages", chat=True)

    async def completions(self, request: Request):
        token, body = await self._authorized_body(request)
        params, text = _params(body), _prompt(body)
        served = await run_in_threadpool(self.models.get, body["model"])
        prompt = await run_in_threadpool(text_prompt, served, text)
        return await self._complete(request, token, params, served, prompt, "prompt", chat=False)

    async def _authorized_body(self, request: Request) -> tuple[str | None, dict]:
        """(token, JSON body) once the token may use the body's model at all (401/404 before any 400)."""
        token = _bearer(request)
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            body = None
        model = body.get("model") if isinstance(body, dict) else None
        self.auth.authorize(token, model if isinstance(model, str) else None, use=False)
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        if not isinstance(model, str) or not model:
            raise APIError(400, "model: give the id of a model (GET /v1/models lists them)", param="model")
        return token, body

    async def _complete(self, request: Request, token, params: "_Params", served: ServedModel, prompt: list[int],
                        what: str, chat: bool):
        settings = params.settings
        settings.max_new_tokens = fit_context(served, len(prompt), params.max_tokens, what)
        if settings.min_new_tokens > settings.max_new_tokens:
            raise _bad("min_tokens", f"{settings.min_new_tokens} is more than the reply may have "
                                     f"({settings.max_new_tokens} tokens)")
        reply = _Reply(served.name, chat)
        gen = Generation(served, prompt, settings, params.stop, request_id=reply.id)
        job = self.scheduler.submit(gen.pieces)  # QueueFull: 429, and no use counted
        try:
            self.auth.authorize(token, served.name, use=True)  # a valid request with a place: now it counts
        except AuthError:
            job.cancel()
            raise
        if params.stream:
            return _EventStream(job, gen, reply, params.include_usage)
        try:
            text = await _unless_client_leaves(_collect(job), request.receive, job)
        except Exception as exc:  # noqa: BLE001 - the generation failed (logged by the worker): a 500, in shape
            raise APIError(500, f"generation failed: {exc}", "server_error") from None
        if text is None:
            return Response(status_code=204)  # nobody is there to read it
        return JSONResponse(reply.whole(text, gen))


# --- the wire format ----------------------------------------------------------------------------

class _Reply:
    """The id, object names and fields of one reply, whole or in chunks."""

    def __init__(self, model: str, chat: bool):
        self.model, self.chat = model, chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def whole(self, text: str, gen: Generation) -> dict:
        finish = _finish_reason(gen)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        obj = "chat.completion" if self.chat else "text_completion"
        return {**self._envelope(obj, [choice]), "usage": _usage(gen)}

    def chunk(self, text: str | None, finish: str | None = None, first: bool = False) -> dict:
        if self.chat:
            delta = {} if text is None else {"content": text}
            if first:
                delta = {"role": "assistant", "content": text or ""}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return self._envelope("chat.completion.chunk", [choice])
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return self._envelope("text_completion", [choice])

    def usage_chunk(self, gen: Generation) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._envelope(obj, []), "usage": _usage(gen)}


def _finish_reason(gen: Generation) -> str:
    return "length" if gen.stats.finish_reason == "length" else "stop"


def _usage(gen: Generation) -> dict:
    s = gen.stats
    return {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
            "total_tokens": s.prompt_tokens + s.completion_tokens}


def _sse(data) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n".encode()


class _EventStream:
    """The streamed reply as server-sent events; the request is cancelled the moment the client leaves."""

    headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]

    def __init__(self, job, gen: Generation, reply: _Reply, with_usage: bool):
        self.job, self.gen, self.reply, self.with_usage = job, gen, reply, with_usage

    async def __call__(self, scope, receive, send) -> None:
        await _unless_client_leaves(self._send_all(send), receive, self.job)

    async def _send_all(self, send) -> bool:
        await send({"type": "http.response.start", "status": 200, "headers": self.headers})

        async def body(data) -> None:
            await send({"type": "http.response.body", "body": _sse(data), "more_body": True})

        if self.reply.chat:
            await body(self.reply.chunk(None, first=True))
        try:
            async for piece in self.job.pieces():
                await body(self.reply.chunk(piece))
        except Exception as exc:  # noqa: BLE001 - the generation failed mid-stream: tell the client, in its format
            await body({"error": APIError(500, f"generation failed: {exc}", "server_error").body()["error"]})
        else:
            await body(self.reply.chunk(None, finish=_finish_reason(self.gen)))
            if self.with_usage:
                await body(self.reply.usage_chunk(self.gen))
        await body("[DONE]")
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return True


async def _collect(job) -> str:
    return "".join([piece async for piece in job.pieces()])


async def _client_left(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_client_leaves(work, receive, job):
    """``work``'s result, or None when the client disconnects first (or its connection fails under a send);
    either way the job is cancelled when this returns, which frees its slot or its queue place."""
    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(_client_left(receive))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        job.cancel()
        for t in (task, gone):
            t.cancel()
        await asyncio.gather(task, gone, return_exceptions=True)
    if task.cancelled() or isinstance(task.exception(), OSError):  # uvicorn's ClientDisconnected is an OSError
        return None
    return task.result()


# --- reading a request --------------------------------------------------------------------------

def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def _bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code="invalid_value")


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(name, f"{value!r} is not a number")
    if value > high or value < low or (low_open and value == low):
        raise _bad(name, f"{value} is out of range; it must be in {'(' if low_open else '['}{low}, {high}]")
    return float(value)


def _whole(body: dict, name: str, minimum: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, f"{value!r} is not a whole number")
    if minimum is not None and value < minimum:
        raise _bad(name, f"{value} must be at least {minimum}")
    return value


def _max_tokens(body: dict) -> int | None:
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return _whole(body, name, 1)


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    words = [stop] if isinstance(stop, str) else stop
    if not isinstance(words, list) or not all(isinstance(w, str) and w for w in words):
        raise _bad("stop", "give a non-empty string or a list of non-empty strings")
    if len(words) > MAX_STOP_WORDS:
        raise _bad("stop", f"at most {MAX_STOP_WORDS} stop words")
    return words


@dataclass
class _Params:
    settings: GenerationSettings
    max_tokens: int | None  # None: what the context leaves
    stop: list[str]  # besides the model's own stop words
    stream: bool
    include_usage: bool  # a last chunk with the usage (stream_options)


def _params(body: dict) -> _Params:
    """The request's sampling and streaming parameters, or a 400 naming the field."""
    for name in UNSUPPORTED:
        if body.get(name) not in (None, False, 0, [], {}):
            raise _bad(name, "not supported by this server")
    if body.get("n") is not None and (_whole(body, "n") != 1):
        raise _bad("n", "only n=1 is supported (one choice per request)")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, 0.0, -2.0, 2.0) != 0:
            raise _bad(name, "not supported by this server; leave it 0")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise _bad("stream", f"{stream!r} is not true or false")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise _bad("stream_options", 'give {"include_usage": true|false}')
    settings = GenerationSettings(temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                                  top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True), top_k=0,
                                  seed=_whole(body, "seed"), min_new_tokens=_whole(body, "min_tokens", 0) or 0)
    return _Params(settings, _max_tokens(body), _stop(body), bool(stream), bool(options.get("include_usage", False)))


def _content(n: int, content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise _bad("messages", f"messages[{n}].content: give a string (or a list of text parts)")


def _messages(body: dict) -> list[dict]:
    """The messages as {"role": system|user|assistant, "content": str}, or a 400 saying what is wrong."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "give a non-empty list of {role, content} messages")
    out = []
    for n, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise _bad("messages", f"messages[{n}]: role must be one of system, user, assistant")
        out.append({"role": ROLES[m["role"]], "content": _content(n, m.get("content"))})
    return out


def _prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise _bad("prompt", "give one prompt as a string")
    return prompt


# --- running it: ``ftstudio serve`` ---------------------------------------------------------------

def is_local_host(host: str) -> bool:
    """Only this machine can reach the address: localhost, 127.0.0.0/8 or ::1."""
    import ipaddress

    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


class _Stopped(Exception):
    """SIGINT or SIGTERM, passed on by uvicorn once it has shut down."""


def _stopped(signum, frame):
    raise _Stopped(signum)


def bind(host: str, port: int):
    """A listening socket on host:port (port 0: a free one); OSError in words when it cannot be had."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def _log_to_stderr() -> None:
    """The serving log (cancelled requests and the like) as lines on stderr."""
    import logging
    import sys

    logger = logging.getLogger("backend.serve")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("ftstudio serve: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def serve_forever(api: Starlette, sock, scheduler: Scheduler, ready: str = "") -> None:
    """Serve ``api`` at /v1 on ``sock`` with uvicorn until SIGINT/SIGTERM; streams in flight get a few
    seconds to finish, then every request still running or waiting is cancelled. ``ready`` is printed
    once a stop signal is ours to handle (a signal from then on ends the server cleanly)."""
    import signal
    import sys

    import uvicorn
    from starlette.routing import Mount

    app = Starlette(routes=[Mount("/v1", app=api)])
    _log_to_stderr()
    config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=3)
    old = {s: signal.signal(s, _stopped) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if ready:
            print(ready, file=sys.stdout, flush=True)
        uvicorn.Server(config).run(sockets=[sock])
    except (_Stopped, KeyboardInterrupt):
        pass
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        scheduler.close()
        sock.close()
