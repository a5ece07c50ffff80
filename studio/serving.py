"""The studio's own ``/v1`` (OpenAI-compatible) and ``/embed`` (the share
page), on the same server as the tabs.

``StudioModels`` answers the API's "which models, and load this one" from the
Chat tab's catalog and its model cache, so the API serves exactly what the
Chat tab can load (through the same guard) and shares its loaded models.
``routes`` builds the two mounts that ``app.py`` hands to Gradio's FastAPI
app ahead of Gradio's own routes. Gradio's login does not cover them: the API
checks bearer tokens itself (``backend.serve.credentials.Authorizer``) and the
page holds nothing secret, it only calls the API with the token of its link.
"""

from __future__ import annotations

import dataclasses
import threading
import weakref

from starlette.routing import Mount

from backend.core.artifacts import model_source
from backend.core.guard import GuardError
from backend.serve import catalog
from backend.serve.credentials import Authorizer, Scope
from backend.serve.embed import EMBED_PATH, create_embed_app
from backend.serve.engine import RequestError, Scheduler, ServedModel, UnknownModel
from backend.serve.openai_api import create_api, is_local_host

from .context import USER_ERRORS, StudioContext, StudioError

DEFAULT_TEMPLATE = "qwen_chat"  # the Chat tab's default, for models that record none (the demo's format)
_LOCKS: "weakref.WeakKeyDictionary[object, threading.Lock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model) -> threading.Lock:
    """One lock per loaded model object, whichever spec or request reaches it (engine.ServedModel.lock)."""
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(model, threading.Lock())


class StudioModels:
    """``engine.ModelSource`` over the Chat tab's model specs and ``ctx.models``."""

    def __init__(self, ctx: StudioContext):
        self.ctx = ctx

    def names(self, scope: Scope) -> list[str]:
        if scope.model is not None:
            return [scope.model]
        return catalog.model_choices(self.ctx.work_dir)

    def get(self, name: str) -> ServedModel:
        """The model a spec names, loaded (or found loaded) in the Chat tab's cache, in the template and
        system text it was trained with. A spec the guard refuses is an unknown model (404); one that names
        a model the studio may serve but cannot load is a 400 saying why (only a full key gets this far
        with another model than its own: a link's token is refused before)."""
        ctx = self.ctx
        try:
            folder = catalog.resolve(ctx.guard, name)
            template, system = catalog.recorded(ctx.guard, name)
            llm, adapter = model_source(folder)
            # template None: what the model recorded (the Chat tab's "(as trained)", so one cache entry)
            chat = ctx.models.get(llm, adapter, template=None if template else DEFAULT_TEMPLATE, guard=ctx.guard,
                                  trust_remote_code=ctx.allow_custom_code)
        except (GuardError, StudioError):
            raise UnknownModel(name) from None
        except USER_ERRORS as exc:
            raise RequestError(f"model {name} cannot be loaded: {exc}", "model", "model_not_loadable") from None
        return ServedModel(name=name, chat=dataclasses.replace(chat, system=system or ""),
                           lock=model_lock(chat.model))


def open_access(host: str, auth) -> bool:
    """``/v1`` without a key only for a studio without a login that listens on this machine only."""
    return not auth and is_local_host(host)


def routes(ctx: StudioContext, api_keys: list[str], open_access: bool) -> list[Mount]:
    """``/v1`` (the API, for every model with a full key, one model with a link's token) and ``/embed``."""
    authorizer = Authorizer(ctx.credentials, api_keys, open_access=open_access)
    api = create_api(StudioModels(ctx), authorizer, Scheduler())
    return [Mount("/v1", app=api), Mount(EMBED_PATH, app=create_embed_app())]
