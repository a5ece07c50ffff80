"""Who holds each device of this machine, and who waits for it: the one
picture the studio's Devices panel and ``ftstudio devices`` show.

It comes from two places: the leases (``leases``: a device is busy while some
process holds its lock, whoever started it) and the run folders of a work
directory (a running run's status.json names its ``devices`` and ``user``; a
queued one its ``waiting_for``). A busy device that no run there names is "in
use outside this work directory" (another user's studio, a shell)."""

from __future__ import annotations

from . import leases
from .inventory import InventoryError, snapshot

FREE = "free"
OUTSIDE = "in use outside this work directory"


def lease_state() -> dict[str, bool] | None:
    """{device id: busy} from the leases, or None when they cannot be read."""
    try:
        return {str(k): bool(v) for k, v in leases.holders().items()}
    except (OSError, InventoryError, leases.DeviceError):  # an unreadable or foreign lock folder
        return None


def _label(run: dict) -> str:
    return f"{run['name']} ({run['user']})" if run.get("user") else str(run["name"])


def run_claims(work_dir) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """From this work directory's active runs: (device -> runs holding it, device -> runs waiting
    for it, by queue position). A running run holds its ``devices``; a queued one waits for its
    ``waiting_for`` (or may hold its ``devices`` while it starts)."""
    from ..runs import active_runs

    held: dict[str, list[str]] = {}
    starting: dict[str, list[str]] = {}
    waiting: dict[str, list[tuple[int, str]]] = {}
    for run in active_runs(work_dir):
        devices = [str(d) for d in run.get("devices") or []]
        if run.get("state") == "running":
            for d in devices:
                held.setdefault(d, []).append(_label(run))
        elif run.get("waiting_for"):
            position = run.get("queue_position")
            rank = position if isinstance(position, int) else 1 << 30
            for d in (str(x) for x in run["waiting_for"]):
                waiting.setdefault(d, []).append((rank, _label(run) + (f" #{position}" if position else "")))
        else:  # queued without waiting: past the queue, taking its lease
            for d in devices:
                starting.setdefault(d, []).append(_label(run) + ", starting")
    for d, names in starting.items():
        held.setdefault(d, names)
    return held, {d: [name for _, name in sorted(v)] for d, v in waiting.items()}


def holder(device: str, busy: bool | None, held: dict[str, list[str]]) -> str:
    """Who holds ``device``: the runs here that name it, else someone outside (the lease is
    taken), else free. Without lease information: the runs here, else "unknown"."""
    if busy is False:
        return FREE
    if held.get(device):
        return ", ".join(held[device])
    return OUTSIDE if busy else "unknown (no lease information)"


def device_rows(work_dir) -> list[dict]:
    """Per device: ``snapshot()``'s live numbers plus ``held_by`` (words) and ``waiting`` (runs in line);
    raises InventoryError for a bad inventory setting."""
    busy_map = lease_state()
    held, waiting = run_claims(work_dir)
    out = []
    for d in snapshot():
        busy = None if busy_map is None else busy_map.get(d["id"], False)
        out.append({**d, "held_by": holder(d["id"], busy, held), "waiting": waiting.get(d["id"], []),
                    "leases_known": busy_map is not None})
    return out
