"""Writes that readers never see half-done, and that never destroy what we did not write.

- ``write_text`` / ``write_json``: a temp file beside the target, then a rename.
- ``atomic_dir``: a folder written whole into a temp folder, then moved into
  place. An existing folder is replaced only when it is empty, or when the
  caller proves it is our own earlier output of the same kind *and* the user
  asked to overwrite. The swap is one atomic ``renameat2(RENAME_EXCHANGE)``
  where the file system has it (old and new trade places; there is no moment
  without either), else two renames with the old kept under a backup name
  until the new one is in place. Leftovers of an interrupted write carry our
  mark and are cleaned (or the old output restored) the next time the same
  target is written or read through ``recover``.

This module knows no file names of the product; the artifact and run-folder
contracts (``backend.core.artifacts``, ``backend.core.rundir``) pass in how to
recognise their own outputs.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

PARTIAL_MARK = ".ftstudio-partial"  # inside a temp folder while it is being written
_NEW, _OLD = "ftstudio-new", "ftstudio-old"


class OutputError(OSError):
    """An output we refuse to write (it would destroy something), with why and what to do."""

    def __init__(self, message: str):
        super().__init__(errno.EEXIST, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to a temp file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def write_json(path: str | os.PathLike, data) -> Path:
    return write_text(path, json.dumps(data, indent=1, ensure_ascii=False, default=str))


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object we wrote: {} if the file is missing, a link, unreadable or not an object
    (records are data; a broken or planted one reads as nothing)."""
    path = Path(path)
    try:
        if path.is_symlink() or not path.is_file():
            return {}
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_new_file(path: str | os.PathLike, text: str, *, overwrite: bool = False) -> Path:
    """Like ``write_text`` but refuses to replace an existing file unless asked to."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputError(f"{path} already exists; choose another name (or ask to overwrite it)")
    return write_text(path, text)


# --- folders ---------------------------------------------------------------------------

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2). False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _leftovers(target: Path, tag: str) -> list[Path]:
    return sorted(target.parent.glob(f".{target.name}.{tag}-*")) if target.parent.is_dir() else []


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def recover(target: str | os.PathLike, is_ours: Callable[[Path], bool]) -> list[str]:
    """Finish or undo an interrupted write of ``target``; returns what was done.

    - a temp folder still carrying the partial mark: an unfinished write, removed;
    - a backup of the old output with ``target`` missing: the swap was cut
      between its two renames, so the old output is put back;
    - a backup beside a complete ``target``: the old output, removed.
    Only folders we can prove are ours (our mark, or ``is_ours``) are touched.
    """
    target = Path(target).absolute()
    done = []
    for tmp in _leftovers(target, _NEW):
        if tmp.is_dir() and not tmp.is_symlink() and ((tmp / PARTIAL_MARK).exists() or is_ours(tmp)):
            shutil.rmtree(tmp, ignore_errors=True)
            done.append(f"removed the unfinished write {tmp.name}")
    for old in _leftovers(target, _OLD):
        if not old.is_dir() or old.is_symlink() or not is_ours(old):
            continue
        if not target.exists():
            os.rename(old, target)
            done.append(f"restored {target.name} from an interrupted replacement")
        else:
            shutil.rmtree(old, ignore_errors=True)
            done.append(f"removed the replaced copy {old.name}")
    return done


def check_replaceable(target: Path, is_ours: Callable[[Path], bool], what: str, overwrite: bool) -> None:
    """Raise OutputError unless writing ``target`` destroys nothing we did not write."""
    if target.is_symlink():
        raise OutputError(f"{target} is a symbolic link; give a real folder")
    if re.match(rf"^\..*\.({_NEW}|{_OLD})-", target.name):
        raise OutputError(f"{target.name}: names like .<name>.{_NEW}-* are kept for our temporary writes; "
                          "choose another name")
    if not target.exists() or _is_empty_dir(target):
        return
    if not target.is_dir():
        raise OutputError(f"{target} exists and is a file, not a folder; choose a new folder")
    if not is_ours(target):
        raise OutputError(f"{target} is not empty and was not written by Finetune Studio as {what}; "
                          "choose a new (or empty) folder: nothing there will be deleted")
    if not overwrite:
        raise OutputError(f"{target} already holds {what}; choose a new folder, or ask to overwrite it "
                          "(--overwrite, or the Overwrite box)")


@contextmanager
def atomic_dir(target: str | os.PathLike, *, is_ours: Callable[[Path], bool] = lambda p: False,
               what: str = "an output", overwrite: bool = False):
    """Yield a temp folder beside ``target``; on success it takes ``target``'s
    place (see the module docstring for when an existing folder may be
    replaced); on failure it vanishes and ``target`` is untouched."""
    target = Path(target).absolute()
    recover(target, is_ours)
    check_replaceable(target, is_ours, what, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{_NEW}-", dir=target.parent))
    (tmp / PARTIAL_MARK).touch()
    try:
        yield tmp
        (tmp / PARTIAL_MARK).unlink()
        _swap_in(tmp, target, is_ours, what, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(tmp: Path, target: Path, is_ours, what: str, overwrite: bool) -> None:
    check_replaceable(target, is_ours, what, overwrite)  # again: it may have changed while we wrote
    if not target.exists() or _is_empty_dir(target):
        os.rename(tmp, target)  # onto nothing, or onto an empty folder (rename replaces it)
        return
    if _exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old output
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.{_OLD}-", dir=target.parent))
    os.rmdir(old)
    os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
