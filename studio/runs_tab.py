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

from backend.config import guard_config, load_config
from backend.core.rundir import JsonlTail, RunDir, effective_status, summarize, tail_text
from backend.launch import start_detached
from backend.runs import abort, active_runs, list_runs

from .context import USER_ERRORS, StudioContext, bind, error_md

POLL_S = 1.5  # seconds between looks at the run folders: metric -> curve in <= ~2 s, studio CPU < 5%
CURVES = (("loss", "Loss"), ("lr", "Learning rate"), ("grad_norm", "Grad norm"))
TABLE_HEADERS = ["run", "state", "config", "method", "started", "ended", "step", "loss", "tok/s"]

_tails: dict[str, JsonlTail] = {}  # shared by every browser session: one incremental reader per file


def tail(path: Path) -> JsonlTail:
    key = str(path)
    if key not in _tails:
        _tails[key] = JsonlTail(path)
    return _tails[key]


def metrics(run: RunDir) -> list[dict]:
    return tail(run.metrics_file).read()[0]


def _short_time(stamp: str | None) -> str:
    return (stamp or "")[:19].replace("T", " ")


def runs_table(ctx: StudioContext) -> pd.DataFrame:
    rows = []
    for r in list_runs(ctx.work_dir):
        s = summarize(r, metrics(RunDir(r["run_dir"])))
        rows.append([r["name"], s.state, r.get("config", ""), r.get("method", ""),
                     _short_time(r.get("started")), _short_time(r.get("ended")),
                     f"{s.step}/{s.max_steps or ''}" if s.step is not None else "",
                     f"{s.loss:.4f}" if s.loss is not None else "",
                     f"{s.tokens_per_s:,.0f}" if s.tokens_per_s else ""])
    return pd.DataFrame(rows, columns=TABLE_HEADERS)


def selected_runs(ctx: StudioContext, names) -> list[RunDir]:
    """The runs a caller named that are runs of this studio (anything else is dropped)."""
    out = []
    for name in names or []:
        try:
            out.append(ctx.guard.run(name))
        except USER_ERRORS:
            continue
    return out


def curves(runs: list[RunDir]) -> dict[str, pd.DataFrame]:
    frames = {key: [] for key, _ in CURVES}
    for run in runs:
        for row in metrics(run):
            for key, _ in CURVES:
                if row.get(key) is not None:
                    frames[key].append((row["step"], float(row[key]), run.name))
    return {key: pd.DataFrame(rows, columns=["step", key, "run"]) for key, rows in frames.items()}


def summary_md(run: RunDir) -> str:
    st = effective_status(run)
    s = summarize(st, metrics(run))
    parts = [f"**{run.name}** · {s.state}"]
    if st.get("world_size"):
        parts.append(f"{st['world_size']} process{'es' if st['world_size'] > 1 else ''}"
                     + (f" on {st['nnodes']} nodes" if (st.get("nnodes") or 1) > 1 else "")
                     + (f", {st['deepspeed']}" if st.get("deepspeed") else ""))
    if s.step is not None:
        parts.append(f"step {s.step}/{s.max_steps or '?'}")
    if s.tokens_per_s:
        parts.append(f"{s.tokens_per_s:,.0f} tokens/s")
    if s.elapsed_s is not None:
        parts.append(f"{s.elapsed_s:,.0f} s elapsed")
    if s.left_s is not None:
        parts.append(f"about {s.left_s:,.0f} s left")
    parts += s.notes
    text = " · ".join(parts)
    if s.error:
        text += f"\n\n**Error:** `{s.error}`"
    if st.get("resumed_from"):
        text += f"\n\nresumed from `{st['resumed_from']}`"
    return text


def do_abort(ctx: StudioContext, names):
    runs = selected_runs(ctx, names)
    if not runs:
        return "Select a run first."
    return "  \n".join(abort(run, ctx.guard, by="the studio")[1] for run in runs)


def do_resume(ctx: StudioContext, names):
    runs = selected_runs(ctx, names)
    if not runs:
        return "Select a run first."
    run = runs[0]
    st = effective_status(run)
    if st.get("state") in ("running", "queued"):
        return f"**{run.name}** is still {st['state']}."
    if st.get("state") == "finished":
        return f"**{run.name}** has finished; nothing to resume."
    busy = active_runs(ctx.work_dir)
    if busy:
        return f"**Error:** run **{busy[0]['name']}** is {busy[0]['state']}; one run at a time."
    if run.latest_checkpoint() is None:
        return f"**Error:** **{run.name}** has no complete checkpoint to resume from (it stopped before the first save)."
    shape = run.launch()
    if shape.get("launcher") == "slurm":
        return (f"**Error:** **{run.name}** ran under Slurm; resume it the same way: "
                f"`srun ... ftstudio train {run.config_file} --launcher slurm --work-dir {run.path} --resume`")
    try:
        cfg = guard_config(ctx.guard, load_config(run.config_file))  # a CLI run may hold what this studio forbids
        ctx.reap()
        ctx.children.append(start_detached(cfg, run.path, resume=True))
    except USER_ERRORS as exc:
        return error_md(exc)
    said = f"resuming **{run.name}** from its latest checkpoint, as it was launched"
    if (shape.get("nnodes") or 1) > 1:
        said += (f"; on nodes 1..{shape['nnodes'] - 1} run: `NODE_RANK=<n> ... ftstudio train {run.config_file} "
                 f"--work-dir {run.path} --resume`")
    return said


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
        shown = shown if isinstance(shown, dict) else {}
        df = runs_table(ctx)
        out = {}
        sig = df.to_json()
        out[table] = df if shown.get("table") != sig else gr.skip()
        shown["table"] = sig
        runs = selected_runs(ctx, names)
        curve_sig = tuple((r.name, len(metrics(r))) for r in runs)
        if shown.get("curves") != curve_sig:
            shown["curves"] = curve_sig
            frames = curves(runs)
            for key, _ in CURVES:
                out[plots[key]] = frames[key]
        else:
            for key, _ in CURVES:
                out[plots[key]] = gr.skip()
        first = runs[0] if runs else None
        text = summary_md(first) if first else "Select a run."
        out[summary] = text if shown.get("summary") != text else gr.skip()
        shown["summary"] = text
        if first:
            log_path = first.log_file()
            log_sig = (first.name, log_path.stat().st_size if log_path.exists() else 0)
            out[log] = tail_text(log_path, 12000) if shown.get("log") != log_sig else gr.skip()
            shown["log"] = log_sig
            rows = tail(first.samples_file).read()[0]
            s_sig = (first.name, len(rows))
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

    abort_btn.click(bind(do_abort, ctx), selected, action_msg, api_name="runs_abort")
    resume_btn.click(bind(do_resume, ctx), selected, action_msg, api_name="runs_resume", concurrency_id="launch")
    return RunsTab(selected, seen)
