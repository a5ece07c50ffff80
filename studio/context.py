"""What every tab of one studio shares: the work directory, the guard that
holds what the operator allowed (``backend.core.guard``: paths, custom code,
runs, uploads, signals), the background runs it started, the loaded chat
models and the work directory's share links (``backend.serve.credentials``).
No policy is decided here: every handler asks the guard."""

from __future__ import annotations

import subprocess
from functools import cached_property, partial
from dataclasses import dataclass, field
from pathlib import Path

from backend.chat import ModelCache
from backend.config import ConfigError
from backend.core.artifacts import ArtifactError
from backend.core.atomic import OutputError
from backend.core.guard import Guard, GuardError
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

    def reap(self) -> None:
        """Collect finished background launchers (no zombies in a long-lived studio)."""
        self.children = [p for p in self.children if p.poll() is None]


def bind(fn, ctx: StudioContext):
    """``fn`` with the studio's context as its first argument, keeping its name
    (Gradio names API endpoints after it) and its signature minus ``ctx``."""
    bound = partial(fn, ctx)
    bound.__name__ = fn.__name__
    return bound
