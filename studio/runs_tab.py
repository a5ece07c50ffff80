"""Runs tab: every run under the work directory (the CLI's too), live curves
for the selected runs overlaid (training and eval loss, smoothed or not, on a
log scale or not, against steps, tokens or time), tokens/s, the log tail,
the checkpoint comparison grid (the evaluation prompts answered by the base
model and at every save, next to their reference answers), benchmark
results per checkpoint with an Evaluate panel that runs lm-eval
(``backend.evaluate``), where the run's trackers logged it, the error of a
failed run; Abort and Resume.

Everything is read from the run folders (``backend.runs``), so a browser
refresh or a restarted studio shows the same thing, and the browser never
sits between the workers and their files. A ``gr.Timer`` polls once a second;
files are read incrementally and unchanged views are skipped, which keeps a
studio that follows a run at a fraction of a percent of a core. The slower
views (grid, benchmarks, trackers) follow on a second, slower timer.
Handlers are module level, taking plain values, so they are tested without
a browser; ``build`` only lays out and wires."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd

from backend import runs as run_control
from backend.config import guard_config, load_config
from backend.core.rundir import JsonlTail, RunDir, effective_status, summarize, tail_text
from backend.evaluate import SHIPPED_TASKS, EvalError, evaluate
from backend.launch import start_detached
from backend import slurm
from backend.devices import queue as device_queue
from backend.runs import abort, list_runs

from .context import USER_ERRORS, StudioContext, bind, error_md
from .export_tab import GPU

POLL_S = 1.5  # seconds between looks at the run folders: metric -> curve in <= ~2 s, studio CPU < 5%
DETAILS_POLL_S = 5.0  # the grid, benchmark results and trackers change at saves and evaluations only
# metrics.jsonl key -> plot title; peak_memory_mb: the largest rank's peak device memory (CPU: peak RSS)
CURVES = (("loss", "Loss"), ("peak_memory_mb", "Peak memory (MiB)"), ("lr", "Learning rate"),
          ("grad_norm", "Grad norm"))
TABLE_HEADERS = ["run", "state", "user", "devices", "config", "method", "started", "ended", "step", "loss", "tok/s"]
# x-axis choice -> (metrics.jsonl key, axis title)
X_AXES = {"steps": ("step", "step"), "tokens": ("tokens_seen", "tokens seen"), "time": ("elapsed_s", "time (s)")}
DEFAULT_OPTS = {"x": "steps", "smooth": 0.0, "log": False}
MAX_GRID_STEPS = 12  # columns of the comparison grid: the base, the last step and evenly spaced ones between
BASE = "base"  # the run's base model, as the grid and the Evaluate panel name it (step 0)

_tails: dict[str, JsonlTail] = {}  # shared by every browser session: one incremental reader per file


def tail(path: Path) -> JsonlTail:
    key = str(path)
    if key not in _tails:
        _tails[key] = JsonlTail(path)
    return _tails[key]


def metrics(run: RunDir) -> list[dict]:
    """Every metrics row of a run: training rows, and eval rows (told apart by their "eval_loss")."""
    return tail(run.metrics_file).read()[0]


def train_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "eval_loss" not in r]


def _short_time(stamp: str | None) -> str:
    return (stamp or "")[:19].replace("T", " ")


def runs_table(ctx: StudioContext) -> pd.DataFrame:
    rows = []
    waiting = {e["run"]: e for e in device_queue.entries(ctx.work_dir)}
    for r in list_runs(ctx.work_dir):
        s = summarize(r, train_rows(metrics(RunDir(r["run_dir"]))))
        rows.append([r["name"], state_text(waiting.get(r["name"]), s.state), r.get("user", ""), ",".join(map(str, r.get("devices") or [])),
                     r.get("config", ""), r.get("method", ""),
                     _short_time(r.get("started")), _short_time(r.get("ended")),
                     f"{s.step}/{s.max_steps or ''}" if s.step is not None else "",
                     f"{s.loss:.4f}" if s.loss is not None else "",
                     f"{s.tokens_per_s:,.0f}" if s.tokens_per_s else ""])
    return pd.DataFrame(rows, columns=TABLE_HEADERS)


def state_text(entry: dict | None, state: str) -> str:
    """The state column: a run waiting in the device queue (``device_queue.entries``) says its place in
    line and the devices it waits for."""
    if state != "queued" or not entry:
        return state
    waits = ",".join(map(str, entry.get("waiting_for") or []))
    return f"queued #{entry['position']}" + (f" (waits for device {waits})" if waits else "")


def selected_runs(ctx: StudioContext, names) -> list[RunDir]:
    """The runs a caller named that are runs of this studio (anything else is dropped)."""
    out = []
    for name in names or []:
        try:
            out.append(ctx.guard.run(name))
        except USER_ERRORS:
            continue
    return out


def ema(values: list[float], weight: float) -> list[float]:
    """Exponential moving average, debiased (as TensorBoard smooths): the first points are not pulled to 0."""
    if not weight:
        return list(values)
    out, acc = [], 0.0
    for n, v in enumerate(values, 1):
        acc = weight * acc + (1 - weight) * v
        out.append(acc / (1 - weight ** n))
    return out


def plot_options(x=None, smooth=None, log=None) -> dict:
    """The curve options a caller sent, each checked (anything else: the default)."""
    try:
        smooth = min(max(float(smooth), 0.0), 0.99) if smooth is not None else 0.0
    except (TypeError, ValueError):
        smooth = 0.0
    return {"x": x if x in X_AXES else DEFAULT_OPTS["x"], "smooth": smooth if math.isfinite(smooth) else 0.0,
            "log": bool(log)}


def _series(rows: list[dict], key: str, xkey: str) -> tuple[list, list]:
    points = [(r[xkey], float(r[key])) for r in rows if r.get(key) is not None and r.get(xkey) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def curves(runs: list[RunDir], x: str = "steps", smooth: float = 0.0, log: bool = False) -> dict[str, pd.DataFrame]:
    """One frame per plot: columns <x>, <value>, run, curve. The loss plot holds each run's training loss
    (smoothed by ``smooth``) and its eval loss as two curves; ``log``: log10 of the values."""
    opts = plot_options(x, smooth, log)
    xkey, xname = X_AXES[opts["x"]]
    frames = {key: [] for key, _ in CURVES}
    for run in runs:
        rows = metrics(run)
        train = train_rows(rows)
        for key, _ in CURVES:
            xs, ys = _series(train, key, xkey)
            if key == "loss":
                ys = ema(ys, opts["smooth"])
            frames[key] += [(a, b, run.name, f"{run.name} · train" if key == "loss" else run.name)
                            for a, b in zip(xs, ys)]
        xs, ys = _series([r for r in rows if "eval_loss" in r], "eval_loss", xkey)
        frames["loss"] += [(a, b, run.name, f"{run.name} · eval") for a, b in zip(xs, ys)]
    out = {}
    for key, points in frames.items():
        if opts["log"]:
            points = [(a, math.log10(b), r, c) for a, b, r, c in points if b > 0]
        out[key] = pd.DataFrame(points, columns=[xname, key, "run", "curve"])
    return out


def plot_update(frame: pd.DataFrame, key: str, title: str, opts: dict):
    """A plot's new points with the axes they are drawn on."""
    xname = X_AXES[opts["x"]][1]
    ytitle = f"log10 {_axis(title)}" if opts["log"] else _axis(title)
    return gr.update(value=frame, x=xname, y=key, x_title=xname, y_title=ytitle)


# --- checkpoint comparison ----------------------------------------------------------------


def step_label(step) -> str:
    return BASE if step == 0 else f"step {step}"


def grid_steps(steps: list[int], most: int = MAX_GRID_STEPS) -> list[int]:
    """All steps, or the first, the last and evenly spaced ones between when there are too many."""
    steps = sorted(set(steps))
    if len(steps) <= most:
        return steps
    picks = {steps[round(i * (len(steps) - 1) / (most - 1))] for i in range(most)}
    return sorted(picks)


def comparison_grid(rows: list[dict]) -> pd.DataFrame:
    """samples.jsonl rows -> one row per prompt (its kind and reference answer when any row has one),
    one column per step (step 0: the base model); a step written twice (a resumed run) shows its last."""
    prompts: dict[tuple, dict] = {}
    for r in rows:
        if not isinstance(r, dict) or r.get("step") is None or r.get("input") is None:
            continue
        key = (r.get("kind") or "prompt", str(r["input"]))
        entry = prompts.setdefault(key, {"reference": None, "answers": {}})
        entry["answers"][int(r["step"])] = str(r.get("output") or "")
        if r.get("reference"):
            entry["reference"] = str(r["reference"])
    steps = grid_steps([s for e in prompts.values() for s in e["answers"]])
    kinds = any(kind != "prompt" for kind, _ in prompts)
    refs = any(e["reference"] for e in prompts.values())
    head = ["prompt"] + (["kind"] if kinds else []) + (["reference"] if refs else []) + [step_label(s) for s in steps]
    table = []
    for (kind, text), e in prompts.items():
        table.append([text] + ([kind] if kinds else []) + ([e["reference"] or ""] if refs else [])
                     + [e["answers"].get(s, "") for s in steps])
    return pd.DataFrame(table, columns=head)


# --- benchmarks ---------------------------------------------------------------------------


def eval_label(record: dict) -> str:
    step = record.get("step")
    label = step_label(step) if step is not None else str(record.get("model") or record.get("name"))
    return label + (" (openai)" if record.get("backend") == "openai" else "")


def evals_frame(run: RunDir | None) -> pd.DataFrame:
    """The run's stored benchmark results: one row per checkpoint (base first, then by step), one column
    per task metric; a later result of the same checkpoint and metric replaces an earlier one."""
    rows: dict[str, dict] = {}
    order: dict[str, tuple] = {}
    columns: list[str] = []
    for record in run.evals() if run is not None else []:
        label = eval_label(record)
        step = record.get("step")
        order[label] = (step is None, step if step is not None else 0, label)
        for task, values in (record.get("tasks") or {}).items():
            for metric, value in (values or {}).items():
                if "_stderr" in metric or not isinstance(value, (int, float)):
                    continue
                col = f"{task} {metric}"
                columns += [col] if col not in columns else []
                rows.setdefault(label, {})[col] = f"{value:.4f}"
    labels = sorted(rows, key=lambda k: order[k])
    return pd.DataFrame([[k] + [rows[k].get(c, "") for c in columns] for k in labels],
                        columns=["checkpoint", *columns])


def eval_choices(run: RunDir | None) -> list[str]:
    """What the Evaluate panel offers for a run: its base model, its checkpoints (newest first), its exports."""
    from backend.core.artifacts import exported_folders

    if run is None:
        return []
    exports = [str(p.relative_to(run.path)) for p in exported_folders(run.path)]
    return [BASE, *[p.name for _, p in reversed(run.iters())], *exports]


def eval_spec(ctx: StudioContext, run: RunDir, choice: str) -> str:
    """A choice of the Evaluate panel -> a model spec (checked again by ``backend.evaluate`` and the guard)."""
    choice = str(choice or "").strip()
    if choice not in eval_choices(run):
        raise EvalError(f"checkpoint {choice!r}: run {run.name} has no such checkpoint; pick one from the list")
    if choice == BASE:
        return load_config(run.config_file).model.name_or_path
    return f"{run.name}/{choice}"


def parse_limit(limit) -> int | None:
    """The Evaluate panel's limit: empty or 0 = every question; else a whole number of at least 1."""
    if limit in (None, ""):
        return None
    try:
        value = float(limit)
    except (TypeError, ValueError):
        value = float("nan")
    if not math.isfinite(value) or value < 0 or value != int(value):
        raise EvalError(f"limit {limit!r}: give a whole number of questions (0 or empty: all of them)")
    return int(value) or None


def do_evaluate(ctx: StudioContext, names, choice, tasks, limit, data, request: gr.Request = None):
    """Evaluate: run lm-eval on a checkpoint of the first selected run; (message, its results table)."""
    runs = selected_runs(ctx, names)
    if not runs:
        return "Select a run first.", gr.skip()
    run = runs[0]
    try:
        ctx.require(request, "write")
        spec = eval_spec(ctx, run, choice)
        record, path = evaluate(ctx.guard, spec, tasks or [], run=run, limit=parse_limit(limit),
                                data=str(data or "").strip() or None, trust_remote_code=ctx.allow_custom_code,
                                loader=ctx.models.get)
    except (EvalError, *USER_ERRORS) as exc:
        return error_md(exc), gr.skip()
    scores = ", ".join(f"{task} {metric} **{value:.4f}**" for task, values in record["tasks"].items()
                       for metric, value in values.items() if "_stderr" not in metric)
    notes = "".join(f"  \n{n}" for n in record.get("notes") or [])
    where = step_label(record["step"]) if record["step"] is not None else spec
    return (f"{where}: {scores or 'no scores'} ({record['seconds']:.0f} s); stored in "
            f"`{path.relative_to(ctx.work_dir)}`{notes}"), evals_frame(run)


def trackers_md(run: RunDir | None) -> str:
    """Where the run's trackers logged it, and the command that opens each."""
    find = getattr(run_control, "tracker_locations", None)
    if run is None or find is None:
        return ""
    try:
        found = find(run)
    except (OSError, ValueError):
        return ""
    if not found:
        return "No trackers for this run (`training.report_to`)."
    lines = []
    for t in found:
        where, how = str(t.get("where") or ""), str(t.get("how") or "")
        lines.append(f"- **{t.get('tracker')}**: `{how}`" + ("" if where in how else f" (logged to `{where}`)"))
    return "**Trackers** (open with)\n" + "\n".join(lines)


def summary_md(run: RunDir) -> str:
    st = effective_status(run)
    s = summarize(st, train_rows(metrics(run)))
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
    return text + phases_md(st)


def phases_md(status: dict) -> str:
    """Where an ended run's time went (status.json ``phases``, ``launcher_phases``), one line each."""
    from backend.train.phases import format_phases

    lines = [format_phases(status[key], prefix=label) for key, label in
             (("phases", "phases"), ("launcher_phases", "launcher phases")) if isinstance(status.get(key), dict)]
    return "".join(f"\n\n{line}" for line in lines)


def do_abort(ctx: StudioContext, names, request: gr.Request = None):
    """Abort the selected runs the caller may control (their own; an admin's: any)."""
    runs = selected_runs(ctx, names)
    if not runs:
        return "Select a run first."
    said = []
    for run in runs:
        try:
            user = ctx.require(request, "control", run)
        except USER_ERRORS as exc:
            said.append(error_md(exc))
            continue
        said.append(abort(run, ctx.guard, by=f"{user.name} in the studio", user=user)[1])
    return "  \n".join(said)


def do_move_up(ctx: StudioContext, names, request: gr.Request = None):
    """Move each selected queued run one place up its queue (the caller's own runs; an admin's: any)."""
    runs = selected_runs(ctx, names)
    if not runs:
        return "Select a queued run first."
    said = []
    for run in runs:
        try:
            said.append(device_queue.move_up(ctx.work_dir, run, ctx.user_of(request), ctx.guard))
        except USER_ERRORS as exc:
            said.append(error_md(exc))
    return "  \n".join(said)


def do_resume(ctx: StudioContext, names, request: gr.Request = None):
    runs = selected_runs(ctx, names)
    if not runs:
        return "Select a run first."
    run = runs[0]
    try:
        ctx.require(request, "control", run)
    except USER_ERRORS as exc:
        return error_md(exc)
    st = effective_status(run)
    if st.get("state") in ("running", "queued"):
        return f"**{run.name}** is still {st['state']}."
    if st.get("state") == "finished":
        return f"**{run.name}** has finished; nothing to resume."
    if run.latest_checkpoint() is None:
        return f"**Error:** **{run.name}** has no complete checkpoint to resume from (it stopped before the first save)."
    if st.get("scheduler") == "slurm":
        try:
            job = slurm.resubmit(run, ctx.user_of(request), ctx.guard)
        except USER_ERRORS as exc:
            return error_md(exc)
        return f"resubmitted **{run.name}** to Slurm as job {job}: it resumes from its latest checkpoint"
    shape = run.launch()
    if shape.get("launcher") == "slurm":
        return (f"**Error:** **{run.name}** ran under Slurm; resume it the same way: "
                f"`srun ... ftstudio train {run.config_file} --launcher slurm --work-dir {run.path} --resume`")
    try:
        cfg = guard_config(ctx.guard, load_config(run.config_file))  # a CLI run may hold what this studio forbids
        ctx.reap()
        ctx.children.append(start_detached(cfg, run.path, resume=True, user=st.get("user")))
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


# --- the views a timer tick refreshes (each skipped while unchanged for this browser session) ----------

REFRESH = ("table", *(key for key, _ in CURVES), "summary", "log", "samples")  # /runs_refresh's outputs, in order
DETAILS = ("grid", "benchmarks", "tracker_links", "eval_ckpt")


def _changed(shown: dict, key: str, sig, value):
    """``value`` if ``sig`` differs from what this session shows under ``key``, else a skip."""
    if shown.get(key) == sig:
        return gr.skip()
    shown[key] = sig
    return value() if callable(value) else value


def refresh_view(ctx: StudioContext, names, shown) -> dict:
    """The fast views: the runs table, the curves (as this session's plot options say), the summary, the
    log tail and the latest samples of the first selected run."""
    ctx.reap()
    shown = shown if isinstance(shown, dict) else {}
    opts = plot_options(**shown.get("opts", DEFAULT_OPTS))
    df = runs_table(ctx)
    out = {"table": _changed(shown, "table", df.to_json(), df)}
    runs = selected_runs(ctx, names)
    curve_sig = (tuple((r.name, len(metrics(r))) for r in runs), tuple(sorted(opts.items())))
    if shown.get("curves") != curve_sig:
        shown["curves"] = curve_sig
        frames = curves(runs, **opts)
        out.update({key: plot_update(frames[key], key, title, opts) for key, title in CURVES})
    else:
        out.update({key: gr.skip() for key, _ in CURVES})
    first = runs[0] if runs else None
    text = summary_md(first) if first else "Select a run."
    out["summary"] = _changed(shown, "summary", text, text)
    if first is None:
        shown.pop("log", None), shown.pop("samples", None)
        return {**out, "log": "", "samples": None}
    log_path = first.log_file()
    out["log"] = _changed(shown, "log", (first.name, log_path.stat().st_size if log_path.exists() else 0),
                          lambda: tail_text(log_path, 12000))
    rows = tail(first.samples_file).read()[0]
    out["samples"] = _changed(shown, "samples", (first.name, len(rows)), lambda: pd.DataFrame(
        [[r.get("step"), r.get("input"), r.get("output")] for r in rows[-20:]], columns=["step", "input", "output"]))
    return out


def set_plot_options(ctx: StudioContext, names, x, smooth, log, shown):
    """The curve options changed: remember them for this session and redraw the curves at once."""
    shown = shown if isinstance(shown, dict) else {}
    opts = plot_options(x, smooth, log)
    shown["opts"], shown["curves"] = opts, None
    frames = curves(selected_runs(ctx, names), **opts)
    return (*(plot_update(frames[key], key, title, opts) for key, title in CURVES), shown)


def _evals_sig(run: RunDir) -> tuple:
    folder = run.evals_dir
    if not folder.is_dir():
        return ()
    return tuple(sorted((p.name, p.stat().st_mtime_ns) for p in folder.glob("*.json")))


def details_view(ctx: StudioContext, names, current, shown) -> dict:
    """The slow views of the first selected run: the comparison grid, the benchmark results, the
    trackers, and the checkpoints the Evaluate panel offers (keeping the one picked)."""
    shown = shown if isinstance(shown, dict) else {}
    runs = selected_runs(ctx, names)
    run = runs[0] if runs else None
    name = run.name if run else None
    rows = tail(run.samples_file).read()[0] if run else []
    choices = eval_choices(run)
    keep = current if current in choices else (choices[0] if choices else None)
    return {"grid": _changed(shown, "grid", (name, len(rows)), lambda: comparison_grid(rows)),
            "benchmarks": _changed(shown, "benchmarks", (name, _evals_sig(run) if run else ()),
                                   lambda: evals_frame(run)),
            "tracker_links": _changed(shown, "tracker_links", (name, trackers_md(run)), lambda: trackers_md(run)),
            "eval_ckpt": _changed(shown, "eval_ckpt", (name, tuple(choices), keep),
                                  lambda: gr.update(choices=choices, value=keep))}


@dataclass
class EvaluatePanel:
    checkpoint: gr.Dropdown
    tasks: gr.Dropdown
    limit: gr.Number
    data: gr.Textbox
    button: gr.Button
    message: gr.Markdown


def _axis(title: str) -> str:
    """A plot's title as its y axis reads it ("Peak memory (MiB)" -> "peak memory (MiB)")."""
    return title[:1].lower() + title[1:]


def _curve_views() -> tuple[dict, dict]:
    """The plot options, the loss with the peak memory beside it, learning rate and grad norm below
    with the benchmark results and trackers."""
    with gr.Row():
        opts = {"x": gr.Radio(list(X_AXES), value=DEFAULT_OPTS["x"], label="x axis", scale=2, elem_id="runs-x"),
                "smooth": gr.Slider(0, 0.99, value=DEFAULT_OPTS["smooth"], step=0.01, scale=3, elem_id="runs-smooth",
                                    label="smoothing (EMA of the training loss)"),
                "log": gr.Checkbox(value=DEFAULT_OPTS["log"], label="log scale", scale=1, elem_id="runs-logy")}
    plots = {}
    with gr.Row():
        plots["loss"] = gr.LinePlot(x="step", y="loss", color="curve", title="Loss (training and eval)", height=300,
                                    elem_id="runs-loss", x_title="step", y_title="loss", scale=3)
        plots["peak_memory_mb"] = gr.LinePlot(x="step", y="peak_memory_mb", color="run", title=CURVES[1][1],
                                              height=300, elem_id="runs-memory", x_title="step",
                                              y_title=_axis(CURVES[1][1]), scale=2)
    with gr.Row():
        for key, title in CURVES[2:]:
            plots[key] = gr.LinePlot(x="step", y=key, color="run", title=title, height=240, elem_id=f"runs-{key}",
                                     x_title="step", y_title=_axis(title), scale=2)
        with gr.Column(scale=2):
            opts["benchmarks"] = gr.Dataframe(headers=["checkpoint"], label="Benchmarks (lm-eval), per checkpoint",
                                              interactive=False, wrap=True, elem_id="runs-evals", max_height=300)
            opts["tracker_links"] = gr.Markdown(elem_id="runs-trackers")
    return opts, plots


def _evaluate_panel() -> EvaluatePanel:
    with gr.Accordion("Evaluate a checkpoint (lm-eval)", open=False, elem_id="runs-evaluate"):
        with gr.Row():
            checkpoint = gr.Dropdown(choices=[], label="Checkpoint of the selected run", scale=2,
                                     elem_id="runs-eval-ckpt")
            tasks = gr.Dropdown(choices=list(SHIPPED_TASKS), value=[SHIPPED_TASKS[0]], multiselect=True,
                                allow_custom_value=True, label="Tasks", scale=2, elem_id="runs-eval-tasks",
                                info="the local ones, or lm-eval task names whose data is on this machine")
            limit = gr.Number(value=None, precision=0, minimum=0, label="At most N questions per task", scale=1,
                              elem_id="runs-eval-limit")
        data = gr.Textbox(label="Question file of the ftstudio_qa tasks (JSON lines of question/answer or chat "
                          "messages; empty: the demo's questions)", elem_id="runs-eval-data")
        button = gr.Button("Evaluate", variant="primary", elem_id="runs-eval-run")
        message = gr.Markdown(elem_id="runs-eval-msg")
    return EvaluatePanel(checkpoint, tasks, limit, data, button, message)


def build(ctx: StudioContext) -> RunsTab:
    gr.Markdown("Every run under the work directory, also those started with `ftstudio train`. "
                "Select several to overlay their curves.")
    table = gr.Dataframe(headers=TABLE_HEADERS, interactive=False, label="Runs", elem_id="runs-table",
                         max_height=260)
    with gr.Row():
        selected = gr.Dropdown(choices=[], value=[], multiselect=True, label="Show", allow_custom_value=True, scale=4,
                               elem_id="runs-selected")
        abort_btn = gr.Button("Abort", variant="stop", scale=0, elem_id="runs-abort")
        resume_btn = gr.Button("Resume", scale=0, elem_id="runs-resume")
        up_btn = gr.Button("Move up", scale=0, elem_id="runs-move-up", min_width=90)
    action_msg = gr.Markdown(elem_id="runs-action")
    summary = gr.Markdown(elem_id="runs-summary")
    opts, plots = _curve_views()
    with gr.Row():
        log = gr.Textbox(label="train.log (end)", lines=14, max_lines=14, autoscroll=True, elem_id="runs-log",
                         interactive=False, scale=3)
        samples = gr.Dataframe(headers=["step", "input", "output"], label="Evaluation samples (latest)", wrap=True,
                               interactive=False, elem_id="runs-samples", scale=2, max_height=330)
    grid = gr.Dataframe(headers=["prompt"], label="Checkpoint comparison: the evaluation prompts answered by the "
                        "base model and at each save", wrap=True, interactive=False, elem_id="runs-grid",
                        max_height=420)
    panel = _evaluate_panel()
    seen = gr.State({})  # this browser session: what it already shows (and its plot options)
    fast = {"table": table, **plots, "summary": summary, "log": log, "samples": samples}
    slow = {"grid": grid, "benchmarks": opts["benchmarks"], "tracker_links": opts["tracker_links"],
            "eval_ckpt": panel.checkpoint}
    _wire_views(ctx, selected, seen, fast, slow, opts, plots)
    abort_btn.click(bind(do_abort, ctx), selected, action_msg, api_name="runs_abort")
    resume_btn.click(bind(do_resume, ctx), selected, action_msg, api_name="runs_resume", concurrency_id="launch")
    up_btn.click(bind(do_move_up, ctx), selected, action_msg, api_name="runs_move_up")
    panel.button.click(bind(do_evaluate, ctx), [selected, panel.checkpoint, panel.tasks, panel.limit, panel.data],
                       [panel.message, opts["benchmarks"]], api_name="runs_evaluate", concurrency_id=GPU,
                       concurrency_limit=1)
    return RunsTab(selected, seen)


def _wire_views(ctx: StudioContext, selected, seen, fast: dict, slow: dict, opts: dict, plots: dict) -> None:
    """The timers (fast views every POLL_S, slow ones every DETAILS_POLL_S), a new selection, new plot options."""
    details_seen = gr.State({})

    def refresh(names, shown):
        view = refresh_view(ctx, names, shown)
        return tuple(view[k] for k in REFRESH)

    def details(names, current, shown):
        view = details_view(ctx, names, current, shown)
        return tuple(view[k] for k in DETAILS)

    outputs = [fast[k] for k in REFRESH]
    detail_io = ([selected, slow["eval_ckpt"], details_seen], [slow[k] for k in DETAILS])
    # queue=False: a plain request per tick, without the queue's event stream
    # (a third of the CPU a queued tick costs; see bench/bench_studio.py)
    gr.Timer(POLL_S).tick(refresh, [selected, seen], outputs, show_progress="hidden", api_name="runs_refresh",
                          queue=False)
    gr.Timer(DETAILS_POLL_S).tick(details, *detail_io, show_progress="hidden", api_name="runs_details", queue=False)
    selected.change(refresh, [selected, seen], outputs, show_progress="hidden").then(
        details, *detail_io, show_progress="hidden")
    option_inputs = [selected, opts["x"], opts["smooth"], opts["log"], seen]
    for key in ("x", "smooth", "log"):  # a dragged slider: only its last value is drawn
        opts[key].change(bind(set_plot_options, ctx), option_inputs, [*(plots[k] for k, _ in CURVES), seen],
                         show_progress="hidden", trigger_mode="always_last")
