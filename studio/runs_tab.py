"""Runs tab: every run under the work directory (the CLI's too), live curves
for the selected runs overlaid, tokens/s, the log tail, evaluation samples,
the error of a failed run; Abort and Resume.

Everything is read from the run folders (``backend.runs``), so a browser
refresh or a restarted studio shows the same thing, and the browser never
sits between the workers and their files. A ``gr.Timer`` polls once a second;
files are read incrementally and unchanged views are skipped, which keeps a
studio that follows a run at a fraction of a percent of a core."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd

from backend.config import load_config
from backend.launch import start_detached
from backend.runs import (
    JsonlTail, abort, active_runs, effective_status, latest_checkpoint, list_runs, tail_text,
)

from .context import StudioContext

POLL_S = 1.5  # seconds between looks at the run folders: metric -> curve in <= ~2 s, studio CPU < 5%
CURVES = (("loss", "Loss"), ("lr", "Learning rate"), ("grad_norm", "Grad norm"))
TABLE_HEADERS = ["run", "state", "config", "method", "started", "ended", "step", "loss", "tok/s"]

_tails: dict[str, JsonlTail] = {}  # shared by every browser session: one incremental reader per file


def tail(path: Path) -> JsonlTail:
    key = str(path)
    if key not in _tails:
        _tails[key] = JsonlTail(path)
    return _tails[key]


def metrics(run_dir: Path) -> list[dict]:
    return tail(run_dir / "metrics.jsonl").read()[0]


def speed(rows: list[dict]) -> float | None:
    """Tokens/s over the recent steps (one step's figure jumps around)."""
    recent = sorted(r["tokens_per_s"] for r in rows[-20:] if r.get("tokens_per_s"))
    return recent[len(recent) // 2] if recent else None


def _short_time(stamp: str | None) -> str:
    return (stamp or "")[:19].replace("T", " ")


def runs_table(ctx: StudioContext) -> tuple[list[dict], pd.DataFrame]:
    runs = list_runs(ctx.work_dir)
    rows = []
    for r in runs:
        m = metrics(Path(r["run_dir"]))
        last = m[-1] if m else {}
        rows.append([r["name"], r.get("state", "?"), r.get("config", ""), r.get("method", ""),
                     _short_time(r.get("started")), _short_time(r.get("ended")),
                     f"{last.get('step', '')}/{last.get('max_steps', '')}" if last else "",
                     f"{last['loss']:.4f}" if last.get("loss") is not None else "",
                     f"{speed(m):,.0f}" if speed(m) else ""])
    return runs, pd.DataFrame(rows, columns=TABLE_HEADERS)


def curves(ctx: StudioContext, names: list[str]) -> dict[str, pd.DataFrame]:
    frames = {key: [] for key, _ in CURVES}
    for name in names:
        for row in metrics(ctx.work_dir / name):
            for key, _ in CURVES:
                if row.get(key) is not None:
                    frames[key].append((row["step"], float(row[key]), name))
    return {key: pd.DataFrame(rows, columns=["step", key, "run"]) for key, rows in frames.items()}


def summary_md(ctx: StudioContext, name: str) -> str:
    run_dir = ctx.work_dir / name
    st = effective_status(run_dir)
    m = metrics(run_dir)
    parts = [f"**{name}** · {st.get('state', '?')}"]
    if st.get("world_size"):
        parts.append(f"{st['world_size']} process{'es' if st['world_size'] > 1 else ''}"
                     + (f", {st['deepspeed']}" if st.get("deepspeed") else ""))
    if m:
        last = m[-1]
        parts.append(f"step {last['step']}/{last.get('max_steps', '?')}")
        if speed(m):
            parts.append(f"{speed(m):,.0f} tokens/s")
        if last.get("elapsed_s") is not None:
            parts.append(f"{last['elapsed_s']:,.0f} s elapsed")
            if st.get("state") == "running" and last.get("max_steps") and last["step"]:
                left = last["elapsed_s"] / last["step"] * (last["max_steps"] - last["step"])
                parts.append(f"about {left:,.0f} s left")
    text = " · ".join(parts)
    if st.get("state") == "failed":
        text += f"\n\n**Error:** `{st.get('error') or 'see train.log'}`"
    if st.get("resumed_from"):
        text += f"\n\nresumed from `{st['resumed_from']}`"
    return text


@dataclass
class RunsTab:
    selected: gr.Dropdown
    runs_state: gr.State


def select_update(ctx: StudioContext, value: list[str] | None = None):
    runs = list_runs(ctx.work_dir)
    names = [r["name"] for r in runs]
    if value is None:  # default: the newest running run, else the newest run
        running = [r["name"] for r in runs if r.get("state") in ("running", "queued")]
        value = running[:1] or names[:1]
    return gr.update(choices=names, value=[v for v in value if v in names])


def build(ctx: StudioContext) -> RunsTab:
    gr.Markdown("Every run under the work directory, also those started with `ftstudio train`. "
                "Select several to overlay their curves.")
    table = gr.Dataframe(headers=TABLE_HEADERS, interactive=False, label="Runs", elem_id="runs-table",
                         max_height=260)
    with gr.Row():
        selected = gr.Dropdown(choices=[], value=[], multiselect=True, label="Show", allow_custom_value=True, scale=4, elem_id="runs-selected")
        abort_btn = gr.Button("Abort", variant="stop", scale=0, elem_id="runs-abort")
        resume_btn = gr.Button("Resume", scale=0, elem_id="runs-resume")
    action_msg = gr.Markdown(elem_id="runs-action")
    summary = gr.Markdown(elem_id="runs-summary")
    with gr.Row():
        plots = {key: gr.LinePlot(x="step", y=key, color="run", title=title, height=260, elem_id=f"runs-{key}",
                                  x_title="step", y_title=title.lower())
                 for key, title in CURVES}
    with gr.Row():
        log = gr.Textbox(label="train.log (end)", lines=14, max_lines=14, autoscroll=True, elem_id="runs-log",
                         interactive=False, scale=3)
        samples = gr.Dataframe(headers=["step", "input", "output"], label="Evaluation samples", wrap=True,
                               interactive=False, elem_id="runs-samples", scale=2, max_height=330)
    timer = gr.Timer(POLL_S)
    seen = gr.State({})  # this browser session: what it already shows, so unchanged views are skipped

    def refresh(names, shown):
        ctx.reap()
        runs, df = runs_table(ctx)
        out = {}
        sig = df.to_json()
        out[table] = df if shown.get("table") != sig else gr.skip()
        shown["table"] = sig
        names = [n for n in (names or []) if (ctx.work_dir / n).is_dir()]
        curve_sig = tuple((n, len(metrics(ctx.work_dir / n))) for n in names)
        if shown.get("curves") != curve_sig:
            shown["curves"] = curve_sig
            frames = curves(ctx, names)
            for key, _ in CURVES:
                out[plots[key]] = frames[key]
        else:
            for key, _ in CURVES:
                out[plots[key]] = gr.skip()
        first = names[0] if names else None
        text = summary_md(ctx, first) if first else "Select a run."
        out[summary] = text if shown.get("summary") != text else gr.skip()
        shown["summary"] = text
        if first:
            run_dir = ctx.work_dir / first
            log_path = run_dir / "train.log" if (run_dir / "train.log").exists() else run_dir / "launcher.log"
            log_sig = (first, log_path.stat().st_size if log_path.exists() else 0)
            out[log] = tail_text(log_path, 12000) if shown.get("log") != log_sig else gr.skip()
            shown["log"] = log_sig
            rows = tail(run_dir / "samples.jsonl").read()[0]
            s_sig = (first, len(rows))
            out[samples] = (pd.DataFrame([[r["step"], r["input"], r["output"]] for r in rows[-20:]],
                                         columns=["step", "input", "output"])
                            if shown.get("samples") != s_sig else gr.skip())
            shown["samples"] = s_sig
        else:
            out[log], out[samples] = "", None
            shown.pop("log", None), shown.pop("samples", None)
        return out

    outputs = [table, *plots.values(), summary, log, samples]
    # queue=False: a plain request per tick, without the queue's event stream
    # (a third of the CPU a queued tick costs; see bench/bench_studio.py)
    timer.tick(refresh, [selected, seen], outputs, show_progress="hidden", api_name="runs_refresh", queue=False)
    selected.change(refresh, [selected, seen], outputs, show_progress="hidden")

    def do_abort(names):
        if not names:
            return "Select a run first."
        said = []
        for name in names:
            ok = abort(ctx.work_dir / name)
            said.append(f"asked **{name}** to stop; it saves nothing more and ends as aborted at the next step"
                        if ok else f"**{name}** is not running")
        return "  \n".join(said)

    def do_resume(names):
        if not names:
            return "Select a run first."
        name = names[0]
        run_dir = ctx.work_dir / name
        st = effective_status(run_dir)
        if st.get("state") in ("running", "queued"):
            return f"**{name}** is still {st['state']}."
        if st.get("state") == "finished":
            return f"**{name}** has finished; nothing to resume."
        busy = active_runs(ctx.work_dir)
        if busy:
            return f"**Error:** run **{busy[0]['name']}** is {busy[0]['state']}; one run at a time."
        if latest_checkpoint(run_dir) is None:
            return f"**Error:** **{name}** has no complete checkpoint to resume from (it stopped before the first save)."
        world = int(st.get("world_size") or 1)
        env = {"NPROC_PER_NODE": str(world)} if world > 1 else {}
        ctx.reap()
        ctx.children.append(start_detached(load_config(run_dir / "config.yaml"), run_dir, resume=True,
                                           deepspeed=st.get("deepspeed"), env=env))
        return f"resuming **{name}** from its latest checkpoint"

    abort_btn.click(do_abort, selected, action_msg, api_name="runs_abort")
    resume_btn.click(do_resume, selected, action_msg, api_name="runs_resume", concurrency_id="launch")
    return RunsTab(selected, seen)
