"""Write folders all at once: readers see the old folder or the new one, never half of one."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_dir(target: str | os.PathLike):
    """Yield a temp folder; on success it replaces ``target``, on failure it vanishes."""
    target = Path(target).resolve()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
