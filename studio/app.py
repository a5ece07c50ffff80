"""The studio: five tabs (Dataset, Train, Runs, Export, Chat) over the backend,
and the server that serves them, with the OpenAI-compatible API at ``/v1`` and
the share links' chat page at ``/embed`` (``studio/serving.py``).

    python app.py [--host 127.0.0.1] [--port 7860] [--share] [--auth USER:PASS | --auth-file F]
                  [--work-dir DIR] [--allow-path DIR ...] [--allow-custom-code]
                  [--api-key KEY | --api-key-file F]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import gradio as gr

from backend.core.rundir import CONFIGS
from backend.serve.credentials import read_api_key

from . import chat_tab, dataset_tab, devices_panel, export_tab, runs_tab, serving, train_tab
from .context import StudioContext, parse_role_line

CSS = """
#ds-sample .textfield { font-family: ui-monospace, monospace; white-space: pre-wrap; }
#runs-log textarea { font-family: ui-monospace, monospace; font-size: 12px; }
"""


def build_app(ctx: StudioContext) -> gr.Blocks:
    with gr.Blocks(title="Finetune Studio") as app:
        gr.Markdown("## Finetune Studio\nDataset → Train → Runs → Export → Chat. "
                    f"Work directory: `{ctx.work_dir}`")
        with gr.Tabs(selected="dataset", elem_id="tabs") as tabs:
            with gr.Tab("Dataset", id="dataset", elem_id="tab-dataset"):
                ds = dataset_tab.build(ctx)
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                devices_panel.build(ctx)  # what each device holds, live, above the form that picks them
                tr = train_tab.build(ctx)
            with gr.Tab("Runs", id="runs", elem_id="tab-runs"):
                rn = runs_tab.build(ctx)
            with gr.Tab("Export", id="export", elem_id="tab-export"):
                export_run, export_refresh = export_tab.build(ctx)
            with gr.Tab("Chat", id="chat", elem_id="tab-chat"):
                chat_model = chat_tab.build(ctx)

        # Dataset -> Train: carry the data choices into the form
        data_keys = ["data.path", "data.name", "data.split", "data.map_fn", "data.template", "data.max_length",
                     "model.add_template_tokens"]

        def use_data(src, sub, spl, fn, tpl, max_len, add_tokens):
            try:
                max_len = int(max_len or 256)
            except (TypeError, ValueError):
                max_len = 256
            return [src, sub or "", spl or "train", fn or "auto", tpl, max_len, bool(add_tokens),
                    gr.Tabs(selected="train")]

        ds.use.click(use_data, [ds.source, ds.subset, ds.split, ds.map_fn, ds.template, ds.max_length, ds.add_tokens],
                     [*(tr.fields[k] for k in data_keys), tabs]).then(tr.check, tr.check_inputs, tr.check_outputs)

        # Train -> Runs: follow the run that was just launched
        tr.launched_run.change(
            lambda name: (runs_tab.select_update(ctx, [name]) if name else gr.skip(),
                          gr.Tabs(selected="runs") if name else gr.skip()),
            tr.launched_run, [rn.selected, tabs])

        # on page load (a refresh or a restarted studio): the demo data, the form's
        # checks, the newest running run, fresh pickers
        app.load(lambda: runs_tab.select_update(ctx), None, rn.selected)
        app.load(tr.check, tr.check_inputs, tr.check_outputs)
        app.load(lambda: (export_refresh(None), gr.update(choices=chat_tab.model_choices(ctx))), None,
                 [export_run, chat_model])
        ds.load_on_start(app)
    return app


def warm_imports() -> None:
    """Import the heavy libraries once, before the server's worker threads
    do: transformers' lazy modules fail when several threads import them at
    once ("module 'transformers' has no attribute ...")."""
    import datasets  # noqa: F401
    import peft  # noqa: F401
    from transformers import (  # noqa: F401
        AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase,
    )


def calm_queue(app: gr.Blocks) -> None:
    """Gradio's queue loop polls for work every 1 ms when idle, which alone
    costs ~6% of a core here (measured: a one-Markdown Gradio app idles at
    6.8%). Every 50 ms is plenty for a studio (an event starts at most 50 ms
    later) and lets a studio that follows a run stay under 5% of a core
    (bench/bench_studio.py). These are private attributes: skipped if a
    Gradio release renames them."""
    queue = getattr(app, "_queue", None)
    if queue is not None and hasattr(queue, "sleep_when_free"):
        queue.sleep_when_free = max(queue.sleep_when_free, 0.05)
    if queue is not None and hasattr(queue, "progress_update_sleep_when_free"):
        queue.progress_update_sleep_when_free = max(queue.progress_update_sleep_when_free, 0.1)


def read_auth(args) -> tuple[list[tuple[str, str]] | None, dict[str, str]]:
    """(logins for Gradio, login -> role). ``--auth USER:PASS`` is an admin; ``--auth-file`` lines read
    ``USER:PASS`` (an admin) or ``USER:PASS:ROLE`` with ROLE admin, trainer or viewer."""
    pairs = []
    if args.auth:
        pairs.append(args.auth)
    if args.auth_file:
        try:
            lines = Path(args.auth_file).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise SystemExit(f"app.py: error: --auth-file {args.auth_file}: {exc.strerror}")
        pairs += [(f"{args.auth_file} line {i}", line.strip()) for i, line in enumerate(lines, 1)
                  if line.strip() and not line.startswith("#")]
    logins, roles = [], {}
    for where, item in pairs:
        try:
            user, password, role = parse_role_line(item)
        except ValueError as exc:
            raise SystemExit(f"app.py: error: {where}: {exc}")
        if user in roles:
            raise SystemExit(f"app.py: error: {where}: user {user!r} is listed twice")
        logins.append((user, password))
        roles[user] = role
    return logins or None, roles


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="app.py", description="Finetune Studio: the browser studio")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="a public Gradio link (needs --auth or --auth-file)")
    p.add_argument("--auth", metavar="USER:PASS", type=lambda s: ("--auth", s), help="require this login")
    p.add_argument("--auth-file", metavar="FILE", help="logins, one USER:PASS[:ROLE] per line; ROLE is admin "
                   "(the default: everything), trainer (launch; abort and resume their own runs) or viewer (read only)")
    p.add_argument("--work-dir", default="work_dirs", help="runs, uploads, configs and exports (default work_dirs)")
    p.add_argument("--allow-path", action="append", default=[], metavar="DIR",
                   help="also let users read datasets and models from DIR (repeatable)")
    p.add_argument("--allow-custom-code", action="store_true",
                   help="allow custom map_fn files and trust_remote_code models (they run on this server)")
    keys = p.add_mutually_exclusive_group()
    keys.add_argument("--api-key", metavar="KEY", help="a key for /v1 (every model); without one, /v1 is open only "
                      "to this machine when the studio has no login, else it takes share-link tokens only")
    keys.add_argument("--api-key-file", metavar="FILE", help="keys for /v1, one a line")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    auth, roles = read_auth(args)
    if args.share and not auth:
        print("app.py: error: --share makes the studio public: a GPU box must not be open to anyone with the "
              "link. Add --auth USER:PASS or --auth-file FILE.", file=sys.stderr)
        return 2
    if not serving.is_local_host(args.host) and not auth:
        print(f"app.py: warning: listening on {args.host} without --auth: anyone who can reach this port "
              "can train and run code on this machine", file=sys.stderr)
    try:
        api_keys = read_api_key(args.api_key, args.api_key_file)
    except ValueError as exc:
        print(f"app.py: error: {exc}", file=sys.stderr)
        return 2
    from backend.demo import demo_model_dir

    print("preparing the demo model (built once, on first start)…", flush=True)
    warm_imports()
    demo_model_dir()
    ctx = StudioContext(Path(args.work_dir), allow_custom_code=args.allow_custom_code,
                        allowed_paths=[Path(p) for p in args.allow_path], roles=roles)
    app = build_app(ctx)
    app.queue(default_concurrency_limit=1)
    calm_queue(app)
    open_api = serving.open_access(args.host, auth)
    print(f"OpenAI-compatible API at /v1: {api_access(open_api, api_keys)}", flush=True)
    # ahead of Gradio's routes and outside its login: they check bearer tokens themselves
    mounts = serving.routes(ctx, api_keys, open_api)
    app.launch(server_name=args.host, server_port=args.port, share=args.share, auth=auth,
               auth_message="Finetune Studio: log in" if auth else None, theme=gr.themes.Soft(), css=CSS,
               allowed_paths=[str(ctx.work_dir / CONFIGS)], max_file_size="2gb", footer_links=["api"],
               ssr_mode=False, app_kwargs={"routes": mounts})
    return 0


def api_access(open_api: bool, api_keys: list[str]) -> str:
    if open_api:
        return "open to this machine (no studio login); share-link tokens keep their scope"
    keys = f"{len(api_keys)} API key{'s' if len(api_keys) != 1 else ''} (every model)" if api_keys else "no API key"
    return f"needs a key: {keys}, or a share link's token (its one model)"
