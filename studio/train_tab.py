"""Train tab: a recipe, then a form generated from ``backend.config.schema()``
(grouped by section, help under each field, errors beside it), the launch
shape (DeepSpeed, processes, nodes), the YAML and command line it will run,
a memory estimate, and Launch / Save / Load."""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import yaml

from backend.config import (
    SECTIONS, Config, ConfigError, from_dict, guard_field, list_recipes, load_config, schema, set_field,
)
from backend.core.atomic import write_text
from backend.core.guard import is_plain_name
from backend.core.rundir import CONFIG, CONFIGS, RunDir, effective_status
from backend import slurm
from backend.launch import DEEPSPEED_NAMES, LaunchError, LaunchSpec, start_detached
from backend.memory import estimate_for, fits

from . import placement
from .context import USER_ERRORS, StudioContext, StudioError, bind, error_md

FIELDS = schema()
OPEN_SECTIONS = ("model", "data", "training")
SECTION_TITLES = {
    "model": "Model", "data": "Data", "training": "Training", "lora": "LoRA (method lora / qlora)",
    "quantization": "Quantization (method qlora)", "saving": "Saving", "evaluation": "Evaluation",
}
LINES_FIELDS = {"evaluation.inputs"}  # lists typed one item per line
NO_DEEPSPEED = "none"
DEFAULT_RECIPE = "tiny_demo"  # the bundled demo: trains on a CPU in under a minute


# --- form values <-> config ---------------------------------------------------------------


def to_ui(f: dict, value):
    if f["key"] in LINES_FIELDS:
        return "\n".join(map(str, value or []))
    if f["type"].startswith("list") or (isinstance(value, list) and f["type"] != "bool"):
        return "" if value is None else yaml.safe_dump(value, default_flow_style=True).strip()
    if value is None and f["type"] != "bool" and f["choices"] is None:
        return ""
    if f["type"] in ("int | None", "float | None"):
        return str(value)
    return value


def from_ui(f: dict, raw):
    """A form value -> the config value (ValueError on text that does not parse)."""
    t = f["type"]
    if t == "bool":
        return bool(raw)
    if f["key"] in LINES_FIELDS:
        return [line.strip() for line in str(raw or "").splitlines() if line.strip()]
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None if "None" in t else ("" if t == "str" else None)
    if t.startswith("list"):
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ValueError(f"not a list: {str(exc).splitlines()[0]}") from None
        return value
    if isinstance(raw, float) and raw.is_integer() and "int" in t:
        return int(raw)
    if isinstance(raw, str) and t in ("int | None", "float | None"):
        try:
            return int(raw) if t.startswith("int") else float(raw)
        except ValueError:
            raise ValueError(f"{f['key']} should be a number or empty, got {raw!r}") from None
    return raw


def form_to_config(ctx: StudioContext, name: str, values: list) -> tuple[Config | None, dict[str, str], str]:
    """(config or None, {field key: error}, cross-field error)."""
    data: dict = {"name": str(name or "run").strip()}
    errors: dict[str, str] = {}
    for f, raw in zip(FIELDS, values):
        try:
            value = from_ui(f, raw)
            set_field(SECTIONS[f["section"]](), f["section"], f["name"], value, source="form")
            value = guard_field(ctx.guard, f["key"], value)  # paths resolved, code only if allowed
        except (ValueError, TypeError, AttributeError) as exc:  # ConfigError, GuardError; any value via the API
            errors[f["key"]] = str(exc).removeprefix("form: ")
            continue
        data.setdefault(f["section"], {})[f["name"]] = value
    if errors:
        return None, errors, ""
    if not is_plain_name(data["name"]):
        return None, {}, f"run name {data['name']!r}: use letters, digits, '-', '_' and '.' only"
    try:
        return from_dict(data, source="form"), {}, ""
    except ConfigError as exc:
        return None, {}, str(exc).removeprefix("form: ")


def config_values(cfg: Config) -> list:
    d = cfg.to_dict()
    return [to_ui(f, d[f["section"]][f["name"]]) for f in FIELDS]


def launch_spec(nproc, nnodes, addr, port) -> LaunchSpec:
    """The launch shape the form asks for (LaunchError naming what is wrong)."""
    try:
        nproc, nnodes = int(nproc or 1), int(nnodes or 1)
        port = int(port or 29500)
    except (TypeError, ValueError):
        raise LaunchError("processes per node, nodes and port must be whole numbers") from None
    addr = str(addr or "127.0.0.1").strip()
    if not addr.replace(".", "").replace("-", "").replace(":", "").replace("_", "").isalnum():
        raise LaunchError(f"node 0 address {addr!r}: give a host name or an IP address")
    spec = LaunchSpec(nproc_per_node=nproc, nnodes=nnodes, addr=addr, port=port if nnodes > 1 else None)
    spec.check()
    return spec


def deepspeed_choice(name) -> str | None:
    """The form's DeepSpeed choice: a shipped config or none (files are for the command line)."""
    if name in (None, "", NO_DEEPSPEED):
        return None
    if name not in DEEPSPEED_NAMES:
        raise LaunchError(f"DeepSpeed {name!r}: pick one of {', '.join(DEEPSPEED_NAMES)}")
    return name


def command_text(ctx: StudioContext, cfg: Config, deepspeed: str | None, spec: LaunchSpec,
                 run_dir: Path | None = None) -> str:
    """The ``ftstudio train`` command of every node, as shell lines to paste. Once
    launched (``run_dir``), they name the run folder node 0 uses and the config
    copy inside it, so the folder the nodes must share anyway is all they need."""
    if run_dir is None:
        config_file, tail = ctx.work_dir / CONFIGS / f"{cfg.name}.yaml", []
    else:
        config_file, tail = RunDir(run_dir).requested_file, ["--work-dir", str(run_dir)]
    args = ["ftstudio", "train", str(config_file), *(["--deepspeed", deepspeed] if deepspeed else []), *tail]

    def line(env: dict) -> str:
        return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(args)])

    env = spec.to_env()
    lines = [line(env)]
    if spec.nnodes > 1:
        where = "" if run_dir else " (Launch names the run folder they must share)"
        lines.append(f"# then on node 1..{spec.nnodes - 1}, with the same files at the same paths{where}:")
        lines += [line({**env, "NODE_RANK": str(r)}) for r in range(1, spec.nnodes)]
    return "\n".join(lines)


def size(gib: float) -> str:
    return f"{gib:,.2f} GiB" if gib >= 1 else f"{gib * 1024:,.1f} MiB"


def memory_md(cfg: Config, deepspeed: str | None, world: int, devices: list[str] | None = None) -> str:
    """The estimate's table; with ``devices`` (ids ticked, or none: the first ``world`` of this machine),
    whether it fits them."""
    try:
        est, dtype = estimate_for(cfg, deepspeed=deepspeed, world_size=world)
        verdict = fits_line(est, devices, world)
    except ValueError as exc:
        return f"Memory estimate unavailable: {exc}"
    rows = [("weights", est.weights_gib), ("LoRA / trained params", None), ("gradients", est.gradients_gib),
            ("optimizer states", est.optimizer_gib), ("activations", est.activations_gib)]
    table = "| per GPU | memory |\n|---|---:|\n"
    for label, gib in rows:
        if gib is None:
            table += f"| {label} | {est.trainable_params / 1e6:,.2f}M of {est.params / 1e6:,.1f}M params |\n"
        else:
            table += f"| {label} | {size(gib)} |\n"
    table += f"| **total** | **{size(est.total_gib)}** |\n"
    if est.cpu_offload_gib:
        table += f"| offloaded to CPU memory | {size(est.cpu_offload_gib)} |\n"
    return (f"**Memory estimate** ({cfg.training.method}, {dtype}, {world} GPU{'s' if world > 1 else ''}, "
            f"{deepspeed or 'no ZeRO'}):\n\n{table}{verdict}")


def fits_line(est, devices: list[str] | None, world: int) -> str:
    """"It fits / does not fit the chosen devices" under the table (none ticked: the first ``world`` devices)."""
    ids = list(devices or []) or [i for _, i in placement.device_choices()][:max(world, 1)]
    if not ids:
        return ""
    ok, words = fits(est, ids, ranks=world)
    return f"\n{'✅' if ok else '⚠️'} {words}"


# --- the tab ------------------------------------------------------------------------------


@dataclass
class TrainTab:
    fields: dict  # key -> component
    launched_run: gr.Textbox  # name of the run Launch just started (watched by the Runs tab)
    name: gr.Textbox
    check: object  # (fn, inputs, outputs): refresh the YAML, command, memory and messages
    check_inputs: list
    check_outputs: list


def _component(f: dict, ctx: StudioContext, value):
    label, info = f["key"].split(".", 1)[1], f["help"]
    elem_id = "cfg-" + f["key"].replace(".", "-").replace("_", "-")
    if f["choices"] is not None:
        return gr.Dropdown(choices=f["choices"], value=value, label=label, info=info, elem_id=elem_id)
    if f["type"] == "bool":
        interactive = f["key"] != "model.trust_remote_code" or ctx.allow_custom_code
        return gr.Checkbox(value=value, label=label, info=info, elem_id=elem_id, interactive=interactive,
                           min_width=220)
    if f["type"] in ("int", "float"):
        return gr.Number(value=value, label=label, info=info, elem_id=elem_id,  # range checked by the config
                         precision=0 if f["type"].startswith("int") else None)
    lines = 3 if f["key"] in LINES_FIELDS else 1
    return gr.Textbox(value=value, label=label, info=info, lines=lines, elem_id=elem_id)


def saved_configs(ctx: StudioContext) -> list[str]:
    root = ctx.work_dir / CONFIGS
    return sorted(str(p) for p in root.glob("*.yaml")) if root.is_dir() else []


def build(ctx: StudioContext) -> TrainTab:
    gr.Markdown("Start from a recipe, change what you need, check the memory estimate, launch. "
                "The run keeps going if you close the browser; follow it in **Runs**.")
    with gr.Row():
        recipe = gr.Dropdown(choices=list_recipes() + saved_configs(ctx), value=DEFAULT_RECIPE, label="Recipe",
                             scale=3, elem_id="train-recipe", info="shipped recipes and configs saved here")
        name = gr.Textbox(value=DEFAULT_RECIPE, label="Run name", scale=2, elem_id="train-name")
        load_up = gr.UploadButton("Load config…", file_types=[".yaml", ".yml"], scale=1)
    with gr.Row():
        deepspeed = gr.Dropdown(choices=[NO_DEEPSPEED, *DEEPSPEED_NAMES], value=NO_DEEPSPEED, label="DeepSpeed",
                                elem_id="train-deepspeed", info="ZeRO stage (needs several processes to shard)")
        nproc = gr.Number(value=1, precision=0, minimum=1, label="Processes per node", elem_id="train-nproc",
                          info="one per GPU (torchrun)")
        nnodes = gr.Number(value=1, precision=0, minimum=1, label="Nodes", elem_id="train-nnodes")
        addr = gr.Textbox(value="", label="Node 0 address", info="nodes > 1 only")
        port = gr.Number(value=29500, precision=0, label="Port", info="nodes > 1 only")
    place = placement.build()
    comps: dict = {}
    initial = dict(zip((f["key"] for f in FIELDS), config_values(load_config(DEFAULT_RECIPE))))
    for section in SECTIONS:
        with gr.Accordion(SECTION_TITLES.get(section, section), open=section in OPEN_SECTIONS):
            with gr.Row():
                for f in (f for f in FIELDS if f["section"] == section):
                    comps[f["key"]] = _component(f, ctx, initial[f["key"]])
    field_list = [comps[f["key"]] for f in FIELDS]
    problems = gr.Markdown(elem_id="train-problems")
    with gr.Row():
        with gr.Column():
            memory = gr.Markdown(elem_id="train-memory")
        with gr.Column():
            command = gr.Code(language="shell", label="Command line (Launch saves the config to that file)",
                              elem_id="train-command", lines=2)
    yaml_view = gr.Code(language="yaml", label=CONFIG, elem_id="train-yaml", lines=12, max_lines=30)
    with gr.Row():
        launch = gr.Button("Launch", variant="primary", elem_id="train-launch")
        save = gr.Button("Save config", elem_id="train-save")
    launch_msg = gr.Markdown(elem_id="train-launch-msg")
    saved_file = gr.File(label="Saved config", visible=False, interactive=False)
    launched_run = gr.Textbox(visible=False)

    def check(run_name, ds_name, n_proc, n_nodes, a, p, *rest):
        """Per-field messages, the YAML, the command (or the sbatch script) and the memory estimate."""
        values, (picked, where, *slurm_values) = rest[:len(FIELDS)], rest[len(FIELDS):]
        cfg, errors, general = form_to_config(ctx, run_name, list(values))
        updates = [gr.update(info=(f"! {errors[f['key']]}" if f["key"] in errors else f["help"]))
                   for f in FIELDS]
        if cfg is None:
            msg = general or f"! {len(errors)} field{'s' if len(errors) > 1 else ''} to fix: " + \
                "; ".join(errors[k] for k in errors)
            return [f"**Error:** {msg}", gr.skip(), gr.skip(), gr.skip(), *updates]
        try:
            ds, spec = deepspeed_choice(ds_name), launch_spec(n_proc, n_nodes, a, p)
            if placement.is_slurm(where):
                options = placement.slurm_options(slurm_values)
                world, shown = options.nodes * options.tasks_per_node, sbatch_preview(ctx, cfg, ds, options)
            else:
                world, shown = spec.world_size, command_text(ctx, cfg, ds, spec)
        except USER_ERRORS as exc:
            return [error_md(exc), gr.skip(), gr.skip(), gr.skip(), *updates]
        picked = None if placement.is_slurm(where) else list(picked or [])
        return ["OK: config is valid", cfg.to_yaml(), shown, memory_md(cfg, ds, world, picked), *updates]

    check_inputs = [name, deepspeed, nproc, nnodes, addr, port, *field_list, *place.inputs]
    check_outputs = [problems, yaml_view, command, memory, *field_list]

    def on_recipe(choice):
        try:
            cfg = load_config(config_source(ctx, choice))
        except USER_ERRORS as exc:
            return [error_md(exc), gr.skip(), *[gr.skip()] * len(FIELDS)]
        return ["", cfg.name, *config_values(cfg)]

    def on_upload(file, request: gr.Request):
        try:
            ctx.require(request, "write")
            path = ctx.guard.save_upload(file if isinstance(file, str) else file.name)
        except (*USER_ERRORS, AttributeError) as exc:
            return [error_md(exc), gr.skip(), *[gr.skip()] * len(FIELDS)]
        return on_recipe(str(path))

    recipe.input(on_recipe, recipe, [problems, name, *field_list]).then(check, check_inputs, check_outputs)
    load_up.upload(on_upload, load_up, [problems, name, *field_list]).then(check, check_inputs, check_outputs)
    gr.on([c.input for c in [name, deepspeed, nproc, nnodes, addr, port, *field_list, *place.inputs]], check, check_inputs,
          check_outputs, trigger_mode="always_last", show_progress="hidden")

    def save_config(request: gr.Request, run_name, *values):
        cfg, errors, general = form_to_config(ctx, run_name, list(values))
        if cfg is None:
            return f"**Error:** not saved: {general or '; '.join(errors.values())}", gr.skip(), gr.skip()
        try:
            ctx.require(request, "write")
            path = _write_config(ctx, cfg)
        except USER_ERRORS as exc:
            return error_md(exc), gr.skip(), gr.skip()
        return (f"Saved {path}", gr.update(value=str(path), visible=True),
                gr.update(choices=list_recipes() + saved_configs(ctx)))

    save.click(save_config, [name, *field_list], [launch_msg, saved_file, recipe], api_name="train_save")

    launched = launch.click(bind(do_launch, ctx), check_inputs, [launch_msg, launched_run], api_name="train_launch",
                            concurrency_id="launch", concurrency_limit=1)
    launched.then(bind(wait_start, ctx), [launched_run, launch_msg], launch_msg)
    return TrainTab(comps, launched_run, name, check, check_inputs, check_outputs)


def sbatch_preview(ctx: StudioContext, cfg: Config, deepspeed: str | None, options) -> str:
    """The job script Launch would submit (the run folder's name gets Launch's time stamp)."""
    folder = ctx.work_dir / f"{cfg.name}-YYYYMMDD-HHMMSS"
    return slurm.sbatch_script(folder, options, user="you", deepspeed=deepspeed)


def do_launch(ctx: StudioContext, request: gr.Request, run_name, ds_name, n_proc, n_nodes, a, p, *rest):
    """Launch: on this machine (the devices picked, or the first free ones; queued while they are busy), or
    submitted to Slurm. Returns (message, the new run's name or "")."""
    values, (picked, where, *slurm_values) = rest[:len(FIELDS)], rest[len(FIELDS):]
    cfg, errors, general = form_to_config(ctx, run_name, list(values))
    if cfg is None:
        return f"**Error:** not launched: {general or '; '.join(errors.values())}", ""
    try:
        user = ctx.require(request, "launch")
        ds, on_slurm = deepspeed_choice(ds_name), placement.is_slurm(where)
        options = placement.slurm_options(slurm_values) if on_slurm else None
        spec = None if on_slurm else launch_spec(n_proc, n_nodes, a, p)
        devices = None if on_slurm else placement.devices_arg(picked)
        _write_config(ctx, cfg)
        run = ctx.guard.new_run(f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        if on_slurm:
            job = slurm.submit(cfg, run.path, options, user, ctx.guard, deepspeed=ds)
            return (f"submitted **{run.name}** to Slurm as job {job} (`{run.sbatch_file}`); it reads queued while "
                    "the job waits for its nodes"), run.name
        ctx.reap()
        ctx.children.append(start_detached(cfg, run.path, deepspeed=ds, spec=spec, devices=devices, user=user.name))
    except USER_ERRORS as exc:
        return f"**Error:** not launched: {exc}", ""
    said = f"started **{run.name}**: checking the model and the data…"
    if spec.nnodes > 1:
        said += f"\n\n```\n{command_text(ctx, cfg, ds, spec, run.path)}\n```"
    return said, run.name


def waiting(status: dict) -> bool:
    """Still before training: the launcher's checks, or waiting for devices (queue) or nodes (Slurm)."""
    return status.get("state") == "queued" and not status.get("queue_position") and status.get("scheduler") != "slurm"


def wait_start(ctx: StudioContext, run_name, said=None, timeout: float = 300):
    """Follow the new run until its preflight passes or fails (or it waits in a queue), then say so
    (keeping the other nodes' commands that Launch printed)."""
    try:
        run = ctx.guard.run(run_name)
    except USER_ERRORS:
        return gr.skip()
    deadline = time.time() + timeout
    while time.time() < deadline and waiting(effective_status(run)):
        time.sleep(0.5)
    st = effective_status(run)
    if st.get("state") == "failed":
        return f"**Error:** **{run.name}** failed before training: {st.get('error')}"
    if st.get("state") == "queued" and st.get("scheduler") == "slurm":
        return f"OK: **{run.name}** is submitted to Slurm (job {st.get('slurm_job_id')}); follow it in **Runs**."
    if st.get("state") == "queued":
        waits = ", ".join(map(str, st.get("waiting_for") or [])) or "its devices"
        return (f"OK: **{run.name}** is queued (#{st.get('queue_position')}), waiting for {waits}; it starts by "
                "itself when they are free. See **Runs**.")
    nodes = str(said or "").partition("\n\n")[2]
    wait = f"\n\nnode 0 waits until the other nodes join; start them with:\n\n{nodes}" \
        if nodes.startswith("```") else ""
    return f"OK: **{run.name}** is {st.get('state')}: see **Runs** for the live curves.{wait}"


def _write_config(ctx: StudioContext, cfg: Config) -> Path:
    root = ctx.work_dir / CONFIGS
    root.mkdir(parents=True, exist_ok=True)
    return write_text(root / f"{cfg.name}.yaml", cfg.to_yaml())


def config_source(ctx: StudioContext, choice) -> str:
    """A recipe name, or a YAML file this studio may read (a saved config, an upload)."""
    choice = str(choice or "").strip()
    if choice in list_recipes():
        return choice
    path = ctx.guard.readable(choice, "config", must_exist=True, hub=False)
    if not path or Path(path).suffix not in (".yaml", ".yml") or not Path(path).is_file():
        raise StudioError(f"config {choice!r}: pick a recipe, or a .yaml file saved or uploaded here")
    return path
