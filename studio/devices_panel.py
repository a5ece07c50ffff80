"""The device panel: each device of this machine with its model, memory
used/total, utilisation and temperature (``backend.devices.inventory.snapshot``),
who holds it (a run of this work directory and its user, or someone outside
it) and which queued runs wait for it, refreshed by a ``gr.Timer``.

Who holds a device is ``backend.devices.status`` (the leases plus the run
folders; ``ftstudio devices`` prints the same). The handlers are module level
and take plain values, so they are tested without a browser."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
import pandas as pd

from backend.devices.inventory import InventoryError
from backend.devices.status import FREE, device_rows

from .context import StudioContext, bind

POLL_S = 2.0  # seconds between looks at the devices (NVML and /proc reads: well under a millisecond each)
HEADERS = ["device", "model", "memory used / total", "utilisation", "temperature", "held by", "waiting"]
# wide enough that no header breaks inside a word ("de/vi/ce", "util/isat/ion" at gradio's even split)
COLUMN_WIDTHS = ["8%", "21%", "15%", "12%", "12%", "16%", "16%"]


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
        devices = device_rows(ctx.work_dir)
    except InventoryError as exc:
        return pd.DataFrame([], columns=HEADERS), f"**Error:** {exc}"
    rows = [[d["id"], d["name"], _memory(d["memory_used_mb"], d["memory_total_mb"]), _unit(d["util_pct"], "%"),
             _unit(d["temp_c"], "°C"), d["held_by"], ", ".join(d["waiting"])] for d in devices]
    free = sum(1 for r in rows if r[5] == FREE)
    note = f"{free} of {len(rows)} device{'s' if len(rows) != 1 else ''} free"
    if any(d["kind"] == "fake" for d in devices):
        note += " · fake devices (FTSTUDIO_FAKE_DEVICES, a test seam): their numbers are made up"
    elif any(d["kind"] == "cpu" for d in devices):
        note += " · no NVIDIA GPU here: the CPU and its RAM (utilisation over the cores this studio may use)"
    if devices and not devices[0]["leases_known"]:
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
                             column_widths=COLUMN_WIDTHS, elem_id="devices-table", max_height=260)
        note = gr.Markdown(elem_id="devices-note")
    seen = gr.State({})
    # queue=False: a plain request per tick (as the Runs tab's), not the queue's event stream
    gr.Timer(POLL_S).tick(bind(devices_refresh, ctx), seen, [table, note, seen], show_progress="hidden",
                          api_name="devices_refresh", queue=False)
    return DevicesPanel(table, note)
