"""The run queue: runs waiting for their devices, kept as files in the work
directory (``<work>/.queue/<run_id>.json``, one ticket a run), so it survives a
restarted studio and needs no scheduler process.

A waiting run is its own detached launcher (``ftstudio train``), polling:
its turn comes when no live ticket with a smaller ``seq`` wants one of its
devices (FIFO per device set), and it starts when it can then take the lease
(``leases``); a device held by someone outside the queue keeps it waiting. A
ticket whose launcher is gone (not the very process recorded, see
``procs``), or whose run no longer says it is queued, is stale: ignored and
removed. Decisions that change the order (taking a turn, moving up) are made
under an ``flock`` of ``.queue/.lock``; readers need no lock (tickets are
written whole, temp then rename).

Ticket fields: ``run`` (the run folder's name in the work directory),
``run_id``, ``devices`` (the set, or the candidates of an ``auto`` request),
``count``, ``auto``, ``user``, ``seq`` (``time_ns`` at enqueue, unique), and
``launcher`` (the waiting launcher's process record). The status fields
``queue_position`` and ``waiting_for`` are hints written by the launcher;
``entries`` computes positions from the tickets, the truth.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..core import procs
from ..core.atomic import read_json, write_json
from ..core.rundir import QUEUE, RunDir, RunFolderError, effective_status, is_launcher_command
from . import leases

_RUN_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_RUN_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*$")
POLL_S = 0.5


class QueueError(RunFolderError):
    """A queue action that does not apply (the run is not waiting, or is in another work directory)."""


@dataclass(frozen=True)
class Ticket:
    run: str
    run_id: str
    devices: tuple[str, ...]
    count: int
    auto: bool
    user: str | None
    seq: int
    launcher: dict

    @property
    def key(self) -> tuple[int, str]:
        return self.seq, self.run_id

    def shares(self, devices) -> bool:
        return bool(set(self.devices) & set(devices))

    def to_dict(self) -> dict:
        return {**asdict(self), "devices": list(self.devices)}

    @classmethod
    def from_dict(cls, data: dict) -> "Ticket | None":
        """A ticket read back from a file; None if it is not one (files are data)."""
        try:
            user = None if data.get("user") is None else str(data["user"])
            ticket = cls(str(data["run"]), str(data["run_id"]), tuple(str(d) for d in data["devices"]),
                         int(data["count"]), bool(data.get("auto")), user, int(data["seq"]), dict(data["launcher"]))
        except (KeyError, TypeError, ValueError):
            return None
        if not (_RUN_ID.match(ticket.run_id) and _RUN_NAME.match(ticket.run)) or ticket.count < 1:
            return None
        return ticket


def queue_dir(work_dir) -> Path:
    return Path(work_dir).absolute() / QUEUE


def ticket_path(work_dir, run_id: str) -> Path:
    if not _RUN_ID.match(run_id or ""):
        raise QueueError(f"run id {run_id!r} is not one of ours")
    return queue_dir(work_dir) / f"{run_id}.json"


@contextlib.contextmanager
def _locked(work_dir):
    """Hold the queue's order lock (short: one decision)."""
    folder = queue_dir(work_dir)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _live(ticket: Ticket, work_dir) -> bool:
    """The ticket's launcher is the very process recorded, a launcher of ours, and its run's status names it
    and says queued."""
    record = procs.ProcessRecord.from_dict(ticket.launcher)
    if record is None or not record.matches() or not is_launcher_command(record.argv):
        return False
    status = RunDir(Path(work_dir) / ticket.run).status()
    return (status.get("run_id") == ticket.run_id and status.get("state") == "queued"
            and procs.ProcessRecord.from_dict(status.get("launcher")) == record)


def tickets(work_dir, prune: bool = True) -> list[Ticket]:
    """The live tickets of ``work_dir``, in queue order; stale ones are removed (``prune``)."""
    folder = queue_dir(work_dir)
    if not folder.is_dir():
        return []
    out = []
    for path in folder.glob("*.json"):
        ticket = Ticket.from_dict(read_json(path))
        if ticket is not None and path.name == f"{ticket.run_id}.json" and _live(ticket, work_dir):
            out.append(ticket)
        elif prune:
            path.unlink(missing_ok=True)
    return sorted(out, key=lambda t: t.key)


def _ahead(live: list[Ticket], ticket: Ticket) -> list[Ticket]:
    return [t for t in live if t.key < ticket.key and t.run_id != ticket.run_id and t.shares(ticket.devices)]


def _held_by(work_dir) -> dict[str, str]:
    """{device: run} for the running runs of this work directory (from their status ``devices``)."""
    from ..core.rundir import list_runs

    out = {}
    for run in list_runs(work_dir):
        status = run.status()
        if status.get("state") == "running":
            for device in status.get("devices") or []:
                out[str(device)] = run.name
    return out


def entries(work_dir) -> list[dict]:
    """The queue as the studio and ``ftstudio queue`` show it, in order: per waiting run its ``position``
    (1 = next on its devices), ``run``, ``run_dir``, ``run_id``, ``user``, ``devices``, ``count``, ``auto``,
    ``waiting_for`` (its devices), ``busy`` (those held now), ``held_by`` ({device: run of this work
    directory, or None when held from outside}), ``ahead`` (runs before it on its devices)."""
    live = tickets(work_dir)
    if not live:
        return []
    held = _held_by(work_dir)
    busy = leases.holders(sorted({d for t in live for d in t.devices}, key=leases.sort_key))
    out = []
    for t in live:
        ahead = _ahead(live, t)
        taken = [d for d in t.devices if busy.get(d)]
        out.append({"position": len(ahead) + 1, "run": t.run, "run_dir": str(Path(work_dir).absolute() / t.run),
                    "run_id": t.run_id, "user": t.user, "devices": list(t.devices), "count": t.count,
                    "auto": t.auto, "waiting_for": list(t.devices), "busy": taken,
                    "held_by": {d: held.get(d) for d in taken}, "ahead": [a.run for a in ahead], "seq": t.seq})
    return out


def position(work_dir, run: RunDir) -> int | None:
    """The run's place in line on its devices (1 = next), None if it is not waiting."""
    run_id = run.status().get("run_id")
    return next((e["position"] for e in entries(work_dir) if e["run_id"] == run_id), None)


# --- the waiting launcher's side -----------------------------------------------------


def try_now(work_dir, request: leases.DeviceRequest) -> leases.Lease | None:
    """The lease at once, if no waiting run wants one of these devices and they are free."""
    with _locked(work_dir):
        if any(t.shares(request.devices) for t in tickets(work_dir)):
            return None
        lease = request.grab()
        if lease is None:  # a look at who holds what (leases.holders) takes a device's lock for a moment
            time.sleep(0.05)
            lease = request.grab()
        return lease


def enqueue(run: RunDir, request: leases.DeviceRequest, user: str | None) -> Ticket:
    """Write this launcher's ticket for ``run`` (its status must already say queued, with its run id)."""
    work = run.path.parent
    run_id = str(run.status().get("run_id") or "")
    with _locked(work):
        last = max((t.seq for t in tickets(work)), default=0)
        ticket = Ticket(run.name, run_id, request.devices, request.count, request.auto, user,
                        max(time.time_ns(), last + 1), procs.self_record().to_dict())
        write_json(ticket_path(work, run_id), ticket.to_dict())
    return ticket


def _turn(work_dir, ticket: Ticket, request: leases.DeviceRequest) -> tuple[leases.Lease | None, Ticket, int]:
    """(the lease if it is this ticket's turn and the devices are free, the ticket as it stands now, position)."""
    with _locked(work_dir):
        live = tickets(work_dir)
        mine = next((t for t in live if t.run_id == ticket.run_id), None)
        if mine is None:  # its file went missing: put it back where it was
            write_json(ticket_path(work_dir, ticket.run_id), ticket.to_dict())
            mine, live = ticket, sorted([*live, ticket], key=lambda t: t.key)
        ahead = _ahead(live, mine)
        if not ahead:
            lease = request.grab()
            if lease is not None:
                ticket_path(work_dir, mine.run_id).unlink(missing_ok=True)
                return lease, mine, 0
        return None, mine, len(ahead) + 1


def wait_turn(run: RunDir, request: leases.DeviceRequest, user: str | None, *, stopped=lambda: False,
              say=None, poll: float = POLL_S) -> leases.Lease | None:
    """Queue ``run`` (whose status says queued) and wait for its turn and its devices. Returns the lease,
    or None when a stop was asked for meanwhile (``stopped()`` or the run's stop request); the ticket is
    gone either way."""
    work = run.path.parent
    ticket = enqueue(run, request, user)
    shown = None
    try:
        while not (stopped() or run.stop_requested()):
            lease, ticket, place = _turn(work, ticket, request)
            if lease is not None:
                return lease
            if place != shown:
                run.write_status(queue_position=place, waiting_for=list(request.devices))
                if say:
                    say(f"queued: waiting for {request.words()}, position {place} ({queue_dir(work)})")
                shown = place
            time.sleep(poll)
        return None
    finally:
        ticket_path(work, ticket.run_id).unlink(missing_ok=True)


# --- owner / admin actions -------------------------------------------------------------


def _waiting_ticket(work_dir, run: RunDir) -> tuple[Ticket, list[Ticket]]:
    if run.path.parent != Path(work_dir).absolute():
        raise QueueError(f"run {run.name} is not in the work directory {work_dir}")
    run_id = run.status().get("run_id")
    live = tickets(work_dir)
    mine = next((t for t in live if t.run_id == run_id), None)
    if mine is None:
        state = effective_status(run).get("state")
        raise QueueError(f"run {run.name} is not waiting in the queue (it is {state or 'not a run'})")
    return mine, live


def move_up(work_dir, run: RunDir, user, guard) -> str:
    """Swap the run's place with the nearest earlier waiting run that shares one of its devices
    (its owner or an admin: ``guard.require(user, "control", run)``). Returns what happened, in words."""
    guard.require(user, "control", run)
    with _locked(work_dir):
        mine, live = _waiting_ticket(work_dir, run)
        ahead = _ahead(live, mine)
        if not ahead:
            return f"{run.name} is already first in line for {', '.join(mine.devices)}"
        other = ahead[-1]
        write_json(ticket_path(work_dir, mine.run_id), {**mine.to_dict(), "seq": other.seq})
        write_json(ticket_path(work_dir, other.run_id), {**other.to_dict(), "seq": mine.seq})
    return f"moved {run.name} ahead of {other.run}"


def cancel(work_dir, run: RunDir, user, guard) -> tuple[bool, str]:
    """Take a waiting run out of the queue: it ends aborted (``runs.abort``; its owner or an admin)."""
    from ..runs import abort

    guard.require(user, "control", run)
    _waiting_ticket(work_dir, run)
    return abort(run, guard, by=f"cancelled by {user.name}")
