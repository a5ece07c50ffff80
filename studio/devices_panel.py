"""The device panel: each device of this machine with its model, memory
used/total, utilisation and temperature (``backend.devices.inventory.snapshot``),
who holds it (a run of this work directory and its user, or someone outside
it) and which queued runs wait for it, refreshed by a ``gr.Timer``.

Who holds a device comes from two places: the leases (``backend.devices.leases``:
a device is busy while some process holds its lock, whoever started it) and
the run folders (a running run's status.json names its ``devices`` and
``user``). A busy device that no run here names is "in use outside this work
directory" (another user's studio, a shell). The handlers are module level
and take plain values, so they are tested without a browser."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
import pandas as pd

from backend.devices.inventory import InventoryError, snapshot
from backend.runs import active_runs

from .context import StudioContext, bind

POLL_S = 2.0  # seconds between looks at the devices (NVML and /proc reads: well under a millisecond each)
HEADERS = ["device", "model", "memory used / total", "utilisation", "temperature", "held by", "waiting"]
FREE = "free"
OUTSIDE = "in use outside this work directory"


def lease_state() -> dict[str, bool] | None:
    """{device id: busy} from the leases, or None when they cannot be read."""
    try:
        from backend.devices import leases
    except ImportError:  # the leases module is not there (a partial install)
        return None
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


def _memory(used, total) -> str:
    """"545 / 24,105 MiB", or in GiB for cards and machines of 10 GiB and more."""
    if total is None:
        return "?"
    if total < 10 * 1024:
        return f"{'?' if used is None else f'{used:,}'} / {total:,} MiB"
    return f"{'?' if used is None else f'{used / 1024:,.1f}'} / {total / 1024:,.1f} GiB"


def _unit(value, unit: str) -> str:
    return "—" if value is None else f"{value:.0f} {unit}"


def devices_table(ctx: StudioContext) -> tuple[pd.DataFrame, str]:
    """The panel: one row per device, and a line under it (what is free; where the numbers come from)."""
    try:
        devices = snapshot()
    except InventoryError as exc:
        return pd.DataFrame([], columns=HEADERS), f"**Error:** {exc}"
    leases = lease_state()
    held, waiting = run_claims(ctx.work_dir)
    rows = []
    for d in devices:
        busy = None if leases is None else leases.get(d["id"], False)
        rows.append([d["id"], d["name"], _memory(d["memory_used_mb"], d["memory_total_mb"]),
                     _unit(d["util_pct"], "%"), _unit(d["temp_c"], "°C"), holder(d["id"], busy, held),
                     ", ".join(waiting.get(d["id"], []))])
    free = sum(1 for r in rows if r[5] == FREE)
    note = f"{free} of {len(rows)} device{'s' if len(rows) != 1 else ''} free"
    if any(d["kind"] == "fake" for d in devices):
        note += " · fake devices (FTSTUDIO_FAKE_DEVICES, a test seam): their numbers are made up"
    elif any(d["kind"] == "cpu" for d in devices):
        note += " · no NVIDIA GPU here: the CPU and its RAM (utilisation over the cores this studio may use)"
    if leases is None:
        note += " · leases unreadable: holders from the run folders only"
    return pd.DataFrame(rows, columns=HEADERS), note


def devices_refresh(ctx: StudioContext, shown):
    """A timer tick: (table, note, what this session shows), each view skipped while unchanged."""
    shown = shown if isinstance(shown, dict) else {}
    df, note = devices_table(ctx)
    out = []
    for key, value in (("table", df), ("note", note)):
        sig = value.to_json() if isinstance(value, pd.DataFrame) else value
        out.append(gr.skip() if shown.get(key) == sig else value)
        shown[key] = sig
    return (*out, shown)


@dataclass
class DevicesPanel:
    table: gr.Dataframe
    note: gr.Markdown


def build(ctx: StudioContext) -> DevicesPanel:
    """An open accordion (at the top of the Train tab): the table, its note, the timer."""
    with gr.Accordion("Devices", open=True, elem_id="devices"):
        table = gr.Dataframe(value=lambda: devices_table(ctx)[0], headers=HEADERS, interactive=False, wrap=True,
                             elem_id="devices-table", max_height=260)
        note = gr.Markdown(elem_id="devices-note")
    seen = gr.State({})
    # queue=False: a plain request per tick (as the Runs tab's), not the queue's event stream
    gr.Timer(POLL_S).tick(bind(devices_refresh, ctx), seen, [table, note, seen], show_progress="hidden",
                          api_name="devices_refresh", queue=False)
    return DevicesPanel(table, note)
