"""The one guard: every path a user names, every permission to run foreign
code, every signal we send passes here.

A studio shared through a link is an attack surface: anyone logged in can call
any of its endpoints with any arguments. So:

- **Paths.** A studio reads only under its roots (the work directory, the
  bundled demo, ``--allow-path`` folders) plus Hub ids and ``demo``; it writes
  only new folders strictly inside the work directory, never into a run
  folder but its ``hf/`` and ``merged/`` exports, never into ``uploads/``.
  Symbolic links are followed before the check, ``..`` is resolved, relative
  paths are taken from the work directory. A command line (the operator at a
  shell) reads anywhere; both refuse to destroy what we did not write
  (``backend.core.atomic``).
- **Code.** Custom map_fn code and ``trust_remote_code`` only when the
  operator allowed them (``--allow-custom-code`` / the CLI's own flags and
  config) -- never because a file says so. A model path found inside an
  artifact is checked like one a user typed.
- **Uploads** keep their bytes in ``uploads/`` and are only ever data: never
  a run, a checkpoint, a model folder or a status file, whatever their name.
- **Runs and checkpoints** named by a user must be ones we list.
- **Signals** go only to a process proven to be the run's (``procs``: host,
  boot, pid, start time, command line).
- **Roles.** Every action a studio user asks for passes ``Guard.require``:
  ``admin`` may do everything; ``trainer`` may read everything and launch,
  write, export and share, but abort, resume, cancel or reorder only the runs
  they started (the run's ``status.json`` ``user``); ``viewer`` may only read
  (and chat). The command line and a studio without logins act as ``admin``.
  Share links are the serving API's own scope (``backend.serve.credentials``).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path

from . import procs
from .artifacts import CONVERTED_SUBDIR, MERGED_SUBDIR
from .rundir import NOT_RUNS, SERVE_STATE, UPLOADS, RunDir, is_launcher_command

PROJECT_ROOT = Path(__file__).resolve().parents[2]
BUNDLED = PROJECT_ROOT / "assets" / "demo"  # ships with the studio: always readable
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*$")


class GuardError(ValueError):
    """Refused by the policy; the message says what was refused and the way out."""


ROLES = ("admin", "trainer", "viewer")
# what each role may do; "control" (abort, resume, cancel, move up) also needs the run to be the user's own,
# unless the role may "control_any"
ACTIONS = {
    "admin": {"read", "launch", "write", "control", "control_any", "share"},
    "trainer": {"read", "launch", "write", "control", "share"},
    "viewer": {"read"},
}
ACTION_WORDS = {"read": "read", "launch": "launch runs", "write": "write files (configs, uploads, exports, "
                "evaluations)", "control": "abort, resume or reorder runs", "share": "create or revoke share links"}


@dataclass(frozen=True)
class User:
    """Who asks: a studio login with its role, or the operator at the command line."""

    name: str
    role: str = "admin"

    def __post_init__(self):
        if self.role not in ROLES:
            raise GuardError(f"role {self.role!r} for user {self.name!r}: use one of {', '.join(ROLES)}")


def local_user() -> User:
    """The command line, or a studio without logins: the machine's user, as admin."""
    import getpass

    return User(getpass.getuser(), "admin")


def is_hub_id(value: str) -> bool:
    """``org/name`` (or a bare ``name``) as the Hub spells it; never a path with ``..``."""
    return bool(_HUB_ID.match(value)) and ".." not in value and not value.endswith(".")


def is_plain_name(name: str) -> bool:
    """A run or config name: letters, digits, '-', '_' and '.', starting with a letter or digit."""
    return bool(_NAME.match(name or "")) and name not in NOT_RUNS


def is_custom_map_fn(value: str | None) -> bool:
    return bool(value) and (":" in str(value) or str(value).endswith(".py"))


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


@dataclass
class Guard:
    """The policy of one studio (``confined``) or of the command line (not confined)."""

    work_dir: Path | None = None
    allowed_paths: list[Path] = field(default_factory=list)
    allow_custom_code: bool = False
    confined: bool = True

    def __post_init__(self):
        if self.work_dir is not None:
            self.work_dir = Path(self.work_dir).expanduser().resolve()
        self.allowed_paths = [Path(p).expanduser().resolve() for p in self.allowed_paths]

    @classmethod
    def cli(cls, allow_custom_code: bool = False) -> "Guard":
        return cls(None, [], allow_custom_code, confined=False)

    @property
    def roots(self) -> list[Path]:
        return [r for r in (self.work_dir, BUNDLED, *self.allowed_paths) if r is not None]

    # --- reading ----------------------------------------------------------------------

    def _local(self, value: str) -> Path:
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = (self.work_dir or Path.cwd()) / path
        return path.resolve()

    def readable(self, value: str | None, what: str, *, must_exist: bool = False, hub: bool = True) -> str | None:
        """``value`` if it may be read: 'demo', a Hub id, or a path under the roots
        (resolved: links followed, ``..`` gone). Returns what to hand the loaders."""
        if value is None or not str(value).strip():
            return value
        value = str(value).strip()
        if value == "demo":
            return value
        explicit = value.startswith(("/", ".", "~"))
        path = self._local(value)
        if not explicit and not path.exists():
            as_loaders_see_it = Path(value).resolve()  # datasets/transformers try the working directory first
            if as_loaders_see_it.exists():
                path = as_loaders_see_it
            elif hub and is_hub_id(value):
                return value  # a Hub id: the libraries download it; nothing on this box is read
        if self.confined and not any(_inside(path, root) for root in self.roots):
            raise GuardError(
                f"{what} {value}: outside the folders this studio may read ({', '.join(map(str, self.roots))}). "
                "Copy it into the work directory, upload it, or restart the studio with --allow-path DIR.")
        if self.work_dir and _inside(path, self.work_dir / SERVE_STATE):
            raise GuardError(f"{what} {value}: {SERVE_STATE}/ holds the API's credentials; it is no one's data")
        if must_exist and not path.exists():
            raise GuardError(f"{what} {value}: no such file or folder")
        return str(path)

    def model(self, value: str | None, what: str = "model") -> str | None:
        """A model, tokenizer or adapter location: readable, and never an upload."""
        out = self.readable(value, what)
        if out and self.confined and self.work_dir and _inside(Path(out), self.work_dir / UPLOADS):
            raise GuardError(f"{what} {value}: uploads are data files, never models; give a model folder or Hub id")
        return out

    def data_files(self, values) -> list | None:
        """data_files entries: relative names stay inside the dataset; anything else is a path."""
        if values is None:
            return None
        out = []
        for entry in values if isinstance(values, (list, tuple)) else [values]:
            text = str(entry)
            if Path(text).is_absolute() or text.startswith("~") or ".." in Path(text).parts:
                text = self.readable(text, "data.data_files entry", hub=False)
            out.append(text)
        return out

    # --- code -------------------------------------------------------------------------

    def allow_code(self, what: str) -> None:
        if not self.allow_custom_code:
            how = ("restart the studio with --allow-custom-code" if self.confined
                   else "pass --trust-remote-code (or set model.trust_remote_code in your own config)")
            raise GuardError(f"{what} would run code on this machine, which is off; {how} to allow it")

    def map_fn(self, value: str | None) -> str | None:
        """A built-in map_fn name, or custom code only when allowed (its file under the roots)."""
        if is_custom_map_fn(value):
            self.allow_code(f"map_fn {value}")
            file_part = str(value).split(":", 1)[0]
            if file_part.endswith(".py"):
                self.readable(file_part, "map_fn file", must_exist=True, hub=False)
        return value

    def trust_remote_code(self, wanted: bool, what: str) -> bool:
        """The operator's answer to 'may this model's own code run?' (asking is not allowing)."""
        if wanted:
            self.allow_code(f"{what} with trust_remote_code")
        return bool(wanted)

    # --- writing ----------------------------------------------------------------------

    def output_dir(self, value: str | os.PathLike | None, what: str = "output folder") -> Path:
        """A folder to write an export into: new (or our own of the same kind, see
        ``atomic``), never a run folder, and in a studio only inside the work directory."""
        if value is None or not str(value).strip():
            raise GuardError(f"{what}: give a folder" + (f" inside the work directory {self.work_dir}"
                                                         if self.confined else ""))
        raw = Path(str(value).strip()).expanduser()
        base = self.work_dir if self.confined else Path.cwd()
        path = raw if raw.is_absolute() else base / raw
        if path.is_symlink():
            raise GuardError(f"{what} {value}: a symbolic link; give a real folder")
        path = path.resolve()
        if RunDir(path).is_run():
            raise GuardError(f"{what} {value}: that folder holds a training run; exports go to a new folder")
        if self.confined:
            self._confined_output(path, value, what)
        return path

    def _confined_output(self, path: Path, value, what: str) -> None:
        work = self.work_dir
        if work not in path.parents:
            raise GuardError(f"{what} {value}: the studio writes only inside the work directory {work}")
        parts = path.relative_to(work).parts
        if parts[0] in NOT_RUNS:
            raise GuardError(f"{what} {value}: {parts[0]}/ is not a place for exports; choose another folder")
        for depth in range(1, len(parts)):
            if RunDir(work.joinpath(*parts[:depth])).is_run():
                if depth + 2 == len(parts) and parts[depth] in (CONVERTED_SUBDIR, MERGED_SUBDIR):
                    return
                raise GuardError(f"{what} {value}: inside run {parts[depth - 1]}; exports of a run go to "
                                 f"<run>/{CONVERTED_SUBDIR}/<name> or <run>/{MERGED_SUBDIR}/<name>, or a new folder")

    # --- runs, checkpoints, uploads ---------------------------------------------------

    def run(self, name: str | None) -> RunDir:
        """A run a user selected by name: a folder directly in the work directory that holds a run."""
        name = str(name or "")
        plain = name and not name.startswith(".") and not any(c in name for c in "/\\\0")
        if not plain or name in NOT_RUNS or self.work_dir is None:
            raise GuardError(f"run {name!r}: not a run of this studio; pick one from the list")
        run = RunDir(self.work_dir / name)
        if run.path.is_symlink() or not run.is_run():
            raise GuardError(f"run {name!r}: not a run of this studio; pick one from the list")
        return run

    def checkpoint(self, run: RunDir, name: str | None) -> Path:
        """One of the run's own iter_<N>.pth files."""
        for _, path in run.iters():
            if path.name == str(name or "").strip():
                return path
        raise GuardError(f"checkpoint {name!r}: run {run.name} has no such checkpoint "
                         f"(it has {', '.join(p.name for _, p in run.iters()) or 'none yet'})")

    def new_run(self, name: str) -> RunDir:
        if not is_plain_name(name):
            raise GuardError(f"run name {name!r}: use letters, digits, '-', '_' and '.' only")
        return RunDir(self.work_dir / name)

    def save_upload(self, tmp_path: str) -> Path:
        """Copy an uploaded file into <work>/uploads, keeping its bytes, never its authority:
        its name is made plain, and uploads/ is never read as a run, checkpoint or model."""
        src = Path(tmp_path)
        dest_dir = self.work_dir / UPLOADS
        dest_dir.mkdir(parents=True, exist_ok=True)
        name = re.sub(r"[^\w.-]", "_", src.name).lstrip(".") or "upload"
        dest, tmp = dest_dir / name, dest_dir / f".{name}.part"
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
        return dest

    # --- roles ------------------------------------------------------------------------

    def require(self, user: User, action: str, run: RunDir | None = None) -> None:
        """Refuse ``action`` (one of ``ACTIONS``' words) unless ``user``'s role allows it; "control" of a run
        also needs the run to be theirs (its status.json ``user``) unless they are an admin."""
        allowed = ACTIONS.get(user.role, set())
        if action not in allowed:
            raise GuardError(f"{user.name} is a {user.role}: a {user.role} may not {ACTION_WORDS.get(action, action)}; "
                             "ask an admin for the trainer role")
        if action == "control" and run is not None and "control_any" not in allowed:
            owner = run.status().get("user")
            if owner != user.name:
                raise GuardError(f"run {run.name} was started by {owner or 'someone else'}: a trainer may abort, "
                                 "resume or reorder only their own runs; ask its owner or an admin")

    # --- processes --------------------------------------------------------------------

    def signal_launcher(self, run: RunDir, sig: int = signal.SIGTERM) -> bool:
        """Signal the run's launcher, only if it is proven to be that process and one of ours."""
        record = procs.ProcessRecord.from_dict(run.status().get("launcher"))
        if record is None or not record.matches() or not is_launcher_command(record.argv):
            return False
        os.kill(record.pid, sig)
        return True
