"""What every tab of one studio shares: the work directory, what the operator
allowed (custom code, extra folders), the background runs it started, and the
loaded chat models. Serving policy lives here; no model code does."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from backend.chat import ModelCache

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BUNDLED = PROJECT_ROOT / "assets" / "demo"  # the demo data ships with the studio: always readable
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class StudioError(ValueError):
    """A user mistake the tab shows in words (never a traceback)."""


@dataclass
class StudioContext:
    work_dir: Path
    allow_custom_code: bool = False
    allowed_paths: list[Path] = field(default_factory=list)
    children: list[subprocess.Popen] = field(default_factory=list)
    models: ModelCache = field(default_factory=ModelCache)

    def __post_init__(self):
        self.work_dir = Path(self.work_dir).expanduser().resolve()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.allowed_paths = [Path(p).expanduser().resolve() for p in self.allowed_paths]

    @property
    def roots(self) -> list[Path]:
        return [self.work_dir, BUNDLED, *self.allowed_paths]

    def reap(self) -> None:
        """Collect finished background launchers (no zombies in a long-lived studio)."""
        self.children = [p for p in self.children if p.poll() is None]

    def check_path(self, value: str | None, what: str, *, must_exist: bool = False) -> str | None:
        """``value`` if this studio may read it: 'demo', a Hub id, or a path
        inside the work directory, the bundled demo or an --allow-path folder."""
        if value is None or not str(value).strip():
            return value
        value = str(value).strip()
        if value == "demo":
            return value
        local = value.startswith(("/", ".", "~")) or os.path.exists(value)
        if not local and _HUB_ID.match(value):
            return value  # a Hub id: downloaded by the libraries, nothing on this box is read
        path = Path(value).expanduser().resolve()
        if not any(path == root or root in path.parents for root in self.roots):
            raise StudioError(
                f"{what} {value}: outside the folders this studio may read ({', '.join(map(str, self.roots))}). "
                "Copy it into the work directory, upload it, or restart the studio with --allow-path DIR."
            )
        if must_exist and not path.exists():
            raise StudioError(f"{what} {value}: no such file or folder")
        return str(path)

    def check_output(self, value: str | None, what: str) -> str:
        """A folder to write: only inside the work directory."""
        if not value or not str(value).strip():
            raise StudioError(f"{what}: give a folder inside the work directory {self.work_dir}")
        path = Path(str(value).strip()).expanduser()
        path = (path if path.is_absolute() else self.work_dir / path).resolve()
        if self.work_dir not in path.parents:
            raise StudioError(f"{what} {value}: the studio writes only inside the work directory {self.work_dir}")
        return str(path)

    def check_map_fn(self, value: str) -> str:
        """A built-in map_fn name, or custom code only when the operator allowed it."""
        if ":" in value or value.endswith(".py"):
            if not self.allow_custom_code:
                raise StudioError(
                    f"map_fn {value}: custom map_fn code runs on this server, so it is off; "
                    "restart the studio with --allow-custom-code to allow it"
                )
            file_part = value.split(":", 1)[0]
            if file_part.endswith(".py"):
                self.check_path(file_part, "map_fn file", must_exist=True)
        return value

    def save_upload(self, tmp_path: str) -> str:
        """Copy an uploaded file into <work_dir>/uploads (temp file, then rename)."""
        src = Path(tmp_path)
        dest_dir = self.work_dir / "uploads"
        dest_dir.mkdir(parents=True, exist_ok=True)
        name = re.sub(r"[^\w.-]", "_", src.name) or "upload"
        dest = dest_dir / name
        tmp = dest_dir / f".{name}.part"
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
        return str(dest)
