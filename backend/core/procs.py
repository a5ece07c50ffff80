"""Which process is which: a record that proves a pid is still the process we started.

A pid alone proves nothing: pids are reused, and a pid written in a file can
name any process on the box. A ``ProcessRecord`` holds what a reused or forged
pid cannot match all at once: the host, this boot (``boot_id``), the pid, the
process's start time (clock ticks since boot, from ``/proc/<pid>/stat``) and
its command line. ``matches`` checks all of them against ``/proc``; callers
that signal (``backend.core.guard``) also check that the command line is one
of ours for the run in question.

Linux only (``/proc``), like the rest of the launch side.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path


def hostname() -> str:
    return socket.gethostname()


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (which may hold spaces)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    return raw.rsplit(")", 1)[1].split()


def start_ticks(pid: int) -> int | None:
    fields = _stat_fields(pid)
    # field 22 of stat is starttime; after the name, state is field 3 -> index 0, so 22 -> index 19
    return int(fields[19]) if fields and len(fields) > 19 else None


def cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode("utf-8", "replace") for part in raw.split(b"\0") if part] or None


def running(pid: int) -> bool:
    """Alive and not a zombie."""
    fields = _stat_fields(pid)
    return bool(fields) and fields[0] not in ("Z", "X")


@dataclass(frozen=True)
class ProcessRecord:
    host: str
    boot: str
    pid: int
    start: int
    argv: tuple[str, ...]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["argv"] = list(self.argv)
        return d

    @classmethod
    def from_dict(cls, data) -> "ProcessRecord | None":
        """A record read back from a file; None if it is not one (files are data)."""
        if not isinstance(data, dict):
            return None
        try:
            argv = tuple(str(a) for a in data["argv"])
            return cls(str(data["host"]), str(data["boot"]), int(data["pid"]), int(data["start"]), argv)
        except (KeyError, TypeError, ValueError):
            return None

    @property
    def local(self) -> bool:
        """Recorded on this machine in this boot (only then can /proc tell us anything)."""
        return self.host == hostname() and self.boot == boot_id()

    def matches(self) -> bool:
        """This exact process is still running here: same boot, pid, start time and command line."""
        if not self.local or self.pid <= 1 or not running(self.pid):
            return False
        return start_ticks(self.pid) == self.start and tuple(cmdline(self.pid) or ()) == self.argv


def capture(pid: int, wait_s: float = 10.0) -> ProcessRecord | None:
    """The record of a live local process (None if it is gone). A child just
    started may still be inside execve, where /proc shows an empty command line
    (the new program's arguments are set up after the parent resumes): wait for them."""
    deadline = time.monotonic() + wait_s
    while True:
        start, argv = start_ticks(pid), cmdline(pid)
        if start is None:
            return None
        if argv is not None:
            return ProcessRecord(hostname(), boot_id(), pid, start, tuple(argv))
        if time.monotonic() > deadline:
            return None
        time.sleep(0.005)


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc/<pid>/task/*/children)."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return out


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        for child in children(todo.pop()):
            if child not in found:
                found.append(child)
                todo.append(child)
    return found


def self_record() -> ProcessRecord:
    record = capture(os.getpid())
    assert record is not None  # /proc/self always exists for a running process
    return record
