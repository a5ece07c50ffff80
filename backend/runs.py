"""Run directories: the only place where a training run and its observers meet.

The launcher writes ``config.yaml`` and ``status.json``; the workers write
``train.log``, ``metrics.jsonl``, ``samples.jsonl``, ``iter_<N>.pth`` and
``checkpoints/``. The CLI, the studio (after a refresh or a restart) and
tests learn everything about a run from these files.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import tempfile
import time
from pathlib import Path

STATES = ("queued", "running", "finished", "failed", "aborted")
_ITER = re.compile(r"^iter_(\d+)\.pth$")
_CKPT = re.compile(r"^checkpoint-(\d+)$")
COMPLETE_MARK = "COMPLETE"  # written into a Trainer checkpoint folder once it is whole


def write_json_atomic(path: Path, data) -> None:
    """Write JSON to a temp file beside ``path``, then rename: readers never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, ensure_ascii=False, default=str)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_status(run_dir) -> dict:
    try:
        return json.loads((Path(run_dir) / "status.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def update_status(run_dir, **fields) -> dict:
    status = read_status(run_dir)
    status.update(fields)
    write_json_atomic(Path(run_dir) / "status.json", status)
    return status


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def last_error(log: Path, lines: int = 12) -> str | None:
    """The last line of ``log`` that reads like an error, else its last lines."""
    try:
        text = Path(log).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    for i in range(len(text) - 1, -1, -1):
        if re.match(r"^\w*(Error|Exception)\b.*:", text[i]) or "error:" in text[i].lower():
            return text[i].strip()[:500]
    return "\n".join(text[-lines:])[-500:] or None


def effective_status(run_dir) -> dict:
    """status.json, corrected when it says queued/running but its launcher is
    gone (a failed preflight, SIGKILL, a reboot) and on this host."""
    status = read_status(run_dir)
    if status.get("state") in ("queued", "running") and status.get("host") == socket.gethostname():
        if not _alive(status.get("pid")):
            error = status.get("error") or (last_error(Path(run_dir) / "launcher.log")
                                            if status["state"] == "queued" else None) or "the launcher died"
            status = {**status, "state": "failed", "error": error}
    return status


def active_runs(work_dir="work_dirs") -> list[dict]:
    """Runs under ``work_dir`` that are queued or running now."""
    return [r for r in list_runs(work_dir) if r.get("state") in ("queued", "running")]


def list_runs(work_dir="work_dirs") -> list[dict]:
    """Every run under ``work_dir`` (newest first), with its status."""
    runs = []
    root = Path(work_dir)
    if not root.is_dir():
        return runs
    for status_file in root.glob("*/status.json"):
        run_dir = status_file.parent
        status = effective_status(run_dir)
        runs.append({"run_dir": str(run_dir), "name": run_dir.name, **status})
    runs.sort(key=lambda r: r.get("started") or "", reverse=True)
    return runs


def iter_files(run_dir) -> list[tuple[int, Path]]:
    """(step, path) of every complete iter_<N>.pth, oldest first."""
    out = []
    for p in Path(run_dir).glob("iter_*.pth"):
        m = _ITER.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def checkpoints(run_dir) -> list[tuple[int, Path]]:
    """(step, folder) of every complete resumable checkpoint, oldest first."""
    root = Path(run_dir) / "checkpoints"
    out = []
    if root.is_dir():
        for p in root.iterdir():
            m = _CKPT.match(p.name)
            if m and (p / COMPLETE_MARK).exists():
                out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(run_dir) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1][1] if found else None


def abort(run_dir, sig=signal.SIGTERM) -> bool:
    """Ask a running run to stop: SIGTERM to its process group. The workers
    finish the current step, keep the last complete checkpoint, and the run
    ends as ``aborted``. Returns False if it was not running."""
    status = effective_status(run_dir)
    if status.get("state") != "running":
        return False
    pgid = status.get("pgid") or status.get("pid")
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


def read_jsonl(path) -> list[dict]:
    """Complete JSON lines of a file (a line still being written is skipped)."""
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.endswith("\n"):
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        pass
    except OSError:
        pass
    return out


class JsonlTail:
    """The rows of a growing JSON-lines file, read incrementally: each call
    reads only the bytes appended since the last one (what a live view
    polling every second needs), and starts over if the file was replaced."""

    def __init__(self, path):
        self.path = Path(path)
        self.rows: list[dict] = []
        self._pos = 0
        self._ino = None

    def read(self) -> tuple[list[dict], bool]:
        """(all rows so far, whether any row is new since the last call)."""
        try:
            st = self.path.stat()
        except OSError:
            changed = bool(self.rows)
            self.rows, self._pos, self._ino = [], 0, None
            return self.rows, changed
        if st.st_ino != self._ino or st.st_size < self._pos:
            self.rows, self._pos, self._ino = [], 0, st.st_ino
        if st.st_size == self._pos:
            return self.rows, False
        with open(self.path, "rb") as f:
            f.seek(self._pos)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1  # a line still being written waits for the next call
        before = len(self.rows)
        for line in chunk[:end].splitlines():
            try:
                self.rows.append(json.loads(line))
            except ValueError:
                pass
        self._pos += end
        return self.rows, len(self.rows) != before


def tail_text(path, max_bytes: int = 20000) -> str:
    """The end of a text file (whole lines), for log views."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    if size > max_bytes and "\n" in text:
        text = text.split("\n", 1)[1]
    return text
