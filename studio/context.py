"""What every tab of one studio shares: the work directory, the guard that
holds what the operator allowed (``backend.core.guard``: paths, custom code,
runs, uploads, signals), the background runs it started, the loaded chat
models and the work directory's share links (``backend.serve.credentials``).
No policy is decided here: every handler asks the guard."""

from __future__ import annotations

import functools
import inspect
import subprocess
from functools import cached_property
from dataclasses import dataclass, field
from pathlib import Path

from backend.chat import ModelCache
from backend.config import ConfigError
from backend.core.artifacts import ArtifactError
from backend.core.atomic import OutputError
from backend.core.guard import ROLES, Guard, GuardError, User, local_user
from backend.core.rundir import RunFolderError
from backend.data import DataError
from backend.launch import LaunchError
from backend.serve.credentials import CredentialStore


class StudioError(ValueError):
    """A user mistake the tab shows in words (never a traceback)."""


# what a handler turns into a message in its tab: every mistake a user (or a caller of the API) can make
USER_ERRORS = (StudioError, GuardError, DataError, ConfigError, ArtifactError, RunFolderError, OutputError,
               LaunchError, OSError)


def error_md(exc: Exception) -> str:
    return f"**Error:** {exc}"


@dataclass
class StudioContext:
    work_dir: Path
    allow_custom_code: bool = False
    allowed_paths: list[Path] = field(default_factory=list)
    children: list[subprocess.Popen] = field(default_factory=list)
    models: ModelCache = field(default_factory=ModelCache)
    roles: dict[str, str] = field(default_factory=dict)  # login -> role; empty: a studio without logins
    guard: Guard = field(init=False)

    def __post_init__(self):
        self.guard = Guard(Path(self.work_dir), list(self.allowed_paths), self.allow_custom_code)
        self.work_dir = self.guard.work_dir
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.allowed_paths = self.guard.allowed_paths

    @cached_property
    def credentials(self) -> CredentialStore:
        """The share links of this work directory (the same file ``ftstudio share`` and ``serve`` read)."""
        return CredentialStore(self.work_dir)

    def user_of(self, request) -> User:
        """Who is calling: the login Gradio checked (``gr.Request.username``) with its role. A studio without
        logins is the operator's own (admin); with logins, a call that carries none is refused."""
        if not self.roles:
            return local_user()
        name = getattr(request, "username", None)
        if not name or name not in self.roles:
            raise GuardError("not logged in: log in to the studio first")
        return User(name, self.roles[name])

    def require(self, request, action: str, run=None) -> User:
        """``Guard.require`` for the caller of a handler; returns the caller."""
        user = self.user_of(request)
        self.guard.require(user, action, run)
        return user

    def reap(self) -> None:
        """Collect finished background launchers (no zombies in a long-lived studio)."""
        self.children = [p for p in self.children if p.poll() is None]


def bind(fn, ctx: StudioContext):
    """``fn`` with the studio's context as its first argument, keeping its name
    (Gradio names API endpoints after it), its signature minus ``ctx`` and its
    annotations (Gradio hands a ``request: gr.Request`` parameter the caller's
    request, which carries the login), and staying a generator function if
    ``fn`` is one (Gradio streams those). A ``functools.partial`` would lose the
    annotations."""
    if inspect.isgeneratorfunction(fn):
        def bound(*args, **kwargs):
            yield from fn(ctx, *args, **kwargs)
    else:
        def bound(*args, **kwargs):
            return fn(ctx, *args, **kwargs)
    functools.update_wrapper(bound, fn)
    sig = inspect.signature(fn)
    bound.__signature__ = sig.replace(parameters=list(sig.parameters.values())[1:])
    return bound


def parse_role_line(item: str) -> tuple[str, str, str]:
    """``USER:PASS`` (an admin) or ``USER:PASS:ROLE`` -> (user, password, role); ValueError says what is wrong."""
    user, sep, rest = item.partition(":")
    password, role = rest, "admin"
    head, colon, tail = rest.rpartition(":")
    if colon and tail in ROLES:
        password, role = head, tail
    if not sep or not user or not password:
        raise ValueError("credentials should read USER:PASSWORD or USER:PASSWORD:ROLE "
                         f"(ROLE one of {', '.join(ROLES)})")
    return user, password, role
