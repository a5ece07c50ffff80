"""``ftstudio``: the command line. Each subcommand is a thin shell over a
backend function that the studio calls too."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .config import ConfigError
from .core.artifacts import ArtifactError
from .core.atomic import OutputError
from .core.guard import GuardError
from .core.rundir import RunFolderError
from .data.errors import DataError
from .export import MERGE_DEVICE_HELP, MERGE_DEVICES, MERGE_DTYPE_HELP, MERGE_DTYPES
from .launch import DEEPSPEED_NAMES, LaunchError

# every mistake a user can make becomes one line and exit code 2 (a failed run: 1)
USER_ERRORS = (DataError, ConfigError, LaunchError, ArtifactError, GuardError, RunFolderError, OutputError)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def non_negative_float(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number of at least 0")
    return value


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="dataset: local file (.json .jsonl .csv .parquet .arrow .txt), folder, or Hub id")
    p.add_argument("--map-fn", default="auto", help="map_fn name, file.py:function or module:function (default: auto-detect)")
    p.add_argument("--template", default="qwen_chat", help="prompt template (ftstudio list-template)")
    p.add_argument("--tokenizer", required=True,
                   help="tokenizer folder or Hub id; 'demo' builds the bundled demo tokenizer")
    p.add_argument("--max-length", type=positive_int, default=2048, help="cut samples at this many tokens")
    p.add_argument("--split", default="train", help="dataset split (default: train)")
    p.add_argument("--name", default=None, help="dataset configuration name (Hub datasets)")
    p.add_argument("--data-files", nargs="+", default=None, help="data_files for load_dataset")
    p.add_argument("--pack", action="store_true", help="also pack samples into max_length blocks")
    p.add_argument("--add-template-tokens", action="store_true",
                   help="add the template's markers the tokenizer lacks as special tokens (model.add_template_tokens)")
    p.add_argument("--num-proc", type=positive_int, default=None, help="processes for the batched map")
    p.add_argument("--max-rows", type=positive_int, default=None, help="only the first N rows")


def resolve_tokenizer(spec: str):
    from .data import load_tokenizer

    if spec == "demo":
        from .demo import demo_tokenizer_dir

        spec = str(demo_tokenizer_dir())
    return load_tokenizer(spec)


def _use_color(mode: str) -> bool:
    if mode == "always":
        return True
    if mode == "never" or os.environ.get("NO_COLOR"):
        return False
    return sys.stdout.isatty()


def render_trained(input_ids, labels, tokenizer, color: bool) -> str:
    """The sample as text with its trained part marked: green in a terminal,
    between ⟦ and ⟧ otherwise."""
    out, group, trained = [], [], None
    for tok, lab in zip(input_ids, labels):
        flag = lab != -100
        if trained is not None and flag != trained:
            out.append((trained, tokenizer.decode(group)))
            group = []
        group.append(tok)
        trained = flag
    if group:
        out.append((trained, tokenizer.decode(group)))
    parts = []
    for flag, text in out:
        if color:
            parts.append(f"\x1b[32m{text}\x1b[0m" if flag else f"\x1b[2m{text}\x1b[0m")
        else:
            parts.append(f"⟦{text}⟧" if flag else text)
    return "".join(parts)


def cmd_list_map_fn(args) -> int:
    from .data.map_fns import MAP_FNS

    width = max(map(len, MAP_FNS))
    for name, info in sorted(MAP_FNS.items()):
        print(f"{name:<{width}}  {info.description}")
    return 0


def cmd_list_template(args) -> int:
    from .data.templates import TEMPLATES

    width = max(map(len, TEMPLATES))
    for name, t in sorted(TEMPLATES.items()):
        print(f"{name:<{width}}  {t.description}")
    return 0


def cmd_check_dataset(args) -> int:
    from .data import build_dataset

    tokenizer = resolve_tokenizer(args.tokenizer)
    if args.add_template_tokens:
        from .data import add_template_tokens

        added = add_template_tokens(tokenizer, args.template)
        if added:
            print(f"added to the tokenizer: {', '.join(added)} (train with model.add_template_tokens=true)")
    samples, report = build_dataset(
        args.path, tokenizer=tokenizer, template=args.template, map_fn=args.map_fn,
        max_length=args.max_length, pack=args.pack, split=args.split, name=args.name,
        data_files=args.data_files, num_proc=args.num_proc, max_rows=args.max_rows,
    )
    if args.json:
        print(json.dumps(report.to_dict(), ensure_ascii=False, indent=2))
        return 0
    r = report
    print(f"dataset     {r.source}")
    print(f"map_fn      {r.map_fn} ({r.map_fn_reason})")
    print(f"template    {r.template}    max_length {r.max_length}")
    print(f"rows        {r.rows}   kept {r.kept}   dropped {r.dropped} "
          f"(empty conversation {r.dropped_empty}, nothing to train {r.dropped_no_loss})   truncated {r.truncated}")
    print(f"tokens      {r.tokens} in all, {r.trained_tokens} trained ({100 * r.trained_tokens / max(r.tokens, 1):.1f}%)")
    pct = "  ".join(f"p{p}={v}" for p, v in r.length_percentiles.items())
    print(f"length      {pct}")
    if r.packed_blocks is not None:
        print(f"packed      {r.packed_blocks} blocks of <= {r.max_length} tokens, {100 * r.pack_fill:.1f}% full")
    print(f"cache       {'read from the datasets cache' if r.from_cache else 'computed'}")
    color = _use_color(args.color)
    first = samples[0]
    if r.packed_blocks is not None:  # show the first sample of the first block
        n = first["seq_lens"][0]
        first = {"input_ids": first["input_ids"][:n], "labels": first["labels"][:n]}
    legend = "trained part in green" if color else "trained part between ⟦ and ⟧"
    print(f"\nfirst sample ({len(first['input_ids'])} tokens, {legend}):")
    print(render_trained(first["input_ids"], first["labels"], tokenizer, color))
    return 0


def cmd_list_cfg(args) -> int:
    from .config import list_recipes, load_config

    for name in list_recipes(args.pattern):
        cfg = load_config(name)
        print(f"{name:<40}  {cfg.training.method:<5}  {cfg.model.name_or_path}  on  {cfg.data.path}")
    return 0


def cmd_copy_cfg(args) -> int:
    from pathlib import Path

    from .config import recipe_path
    from .core.atomic import write_new_file

    src = recipe_path(args.name)
    dest_dir = Path(args.dest)
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = write_new_file(dest_dir / f"{args.name}_copy.yaml", src.read_text(encoding="utf-8"),
                          overwrite=args.overwrite)
    print(f"copied {args.name} to {dest}")
    return 0


class _AbortedBeforeStart(Exception):
    """SIGTERM/SIGINT while the launcher still checks the config and data."""


def _abort_before_start(signum, frame):
    raise _AbortedBeforeStart(signum)


def cmd_train(args) -> int:
    import signal
    from pathlib import Path

    from .config import load_config
    from .core.rundir import RunDir
    from .launch import (ABORTED_EXIT, QUEUED_ENV, LaunchSpec, device_request, find_resume, preflight,
                         resolve_deepspeed, resume_shape, run)
    from .train.phases import Phases

    phases = Phases("preflight", since_process_start=True)  # this launcher's own: its checks, the data, the queue
    spec = LaunchSpec.from_env(launcher=args.launcher)
    deepspeed = resolve_deepspeed(args.deepspeed)
    run_dir = Path(args.work_dir) if args.work_dir else None
    resume_ckpt = None
    fixed_by = f"NPROC_PER_NODE={os.environ['NPROC_PER_NODE']}" if os.environ.get("NPROC_PER_NODE") else None
    if args.resume is not None:
        # the config's name is only needed to find "the newest run of this config"
        cfg_name = load_config(args.config, args.overrides).name if args.resume is True and run_dir is None else ""
        rd, resume_ckpt = find_resume(args.resume, run_dir, cfg_name)
        run_dir = rd.path
        cfg = load_config(rd.config_file)
        spec, deepspeed = resume_shape(rd, spec, deepspeed)
        fixed_by = "the run's recorded launch shape" if rd.launch() else fixed_by
        if args.overrides:
            print("ftstudio train: note: --resume uses the run's own config.yaml; overrides are ignored",
                  file=sys.stderr)
    else:
        cfg = load_config(args.config, args.overrides)
    devices = device_request(args.devices, spec, fixed_by)  # sets the process count from a GPU set
    owner = spec.node_rank == 0 and os.environ.get("SLURM_PROCID", "0") == "0"
    old = {s: signal.signal(s, _abort_before_start) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        report = preflight(cfg, spec, deepspeed, build_data=owner, phases=phases)
    except _AbortedBeforeStart:
        if os.environ.get(QUEUED_ENV) and run_dir is not None:
            RunDir(run_dir).end("aborted", ABORTED_EXIT, None)
        print("ftstudio train: aborted before training began", file=sys.stderr)
        return ABORTED_EXIT
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if report is not None:
        print(f"data: {report.rows} rows, {report.kept} samples ({report.dropped} dropped, "
              f"{report.truncated} truncated), map_fn {report.map_fn}, template {report.template}")
    code, run_dir = run(cfg, spec, deepspeed=deepspeed, run_dir=run_dir, resume=resume_ckpt,
                        follow=None if args.quiet else sys.stdout, devices=devices, phases=phases)
    return code


def cmd_estimate_memory(args) -> int:
    from .config import load_config
    from .memory import estimate_for

    cfg = load_config(args.config, args.overrides)
    try:
        est, dtype = estimate_for(cfg, deepspeed=args.deepspeed, world_size=args.world_size)
    except ValueError as exc:
        print(f"ftstudio estimate-memory: error: {exc}", file=sys.stderr)
        return 2
    print(f"{cfg.training.method} on {cfg.model.name_or_path}: {est.params / 1e6:,.1f}M parameters, "
          f"{est.trainable_params / 1e6:,.2f}M trained; per GPU ({args.world_size} ranks, "
          f"{args.deepspeed or 'no ZeRO'}, {dtype}):")
    for name in ("weights", "gradients", "optimizer", "activations"):
        print(f"  {name:<12} {getattr(est, name + '_gib'):8.2f} GiB")
    print(f"  {'total':<12} {est.total_gib:8.2f} GiB" + (f"   (+{est.cpu_offload_gib:.2f} GiB in CPU memory)"
                                                        if est.cpu_offload_gib else ""))
    return 0


def cmd_eval(args) -> int:
    """Benchmark a model with lm-eval (``backend.evaluate``); the result is printed and kept with its run."""
    import contextlib

    from .core.guard import Guard
    from .evaluate import EvalError, evaluate, format_table
    from .runs import run_folder

    guard = Guard(args.work_dir, [], args.trust_remote_code, confined=False)
    try:  # stdout is for the result alone (--json is read by scripts): the libraries' chatter goes to stderr
        with contextlib.redirect_stdout(sys.stderr):
            run = None
            if args.run:
                run = run_folder(args.run) if "/" in args.run else guard.run(args.run)
            record, path = evaluate(guard, args.model, args.tasks, run=run, limit=args.limit, backend=args.backend,
                                    base_url=args.base_url, device=args.device,
                                    trust_remote_code=args.trust_remote_code, include_paths=args.include_path,
                                    data=args.data, template=args.prompt_template, batch_size=args.batch_size)
    except EvalError as exc:
        print(f"ftstudio eval: error: {exc}", file=sys.stderr)
        return 2
    for note in record.get("notes") or []:
        print(f"ftstudio eval: note: {note}", file=sys.stderr)
    if args.json:
        print(json.dumps(record, ensure_ascii=False, indent=2))
    else:
        step = record.get("step")
        how = f"template {record['template']}" if record.get("template") else f"asked at {record.get('base_url')}"
        print(f"{record['model']}" + ("" if step is None else " (base model)" if step == 0 else f" (step {step})")
              + f", {how}, {record['seconds']:.0f} s")
        print(format_table(record))
    print(f"stored in {path}" if path else "not stored: give --run RUN to keep the result with a run",
          file=sys.stderr if args.json else sys.stdout)
    return 0


def _devices_text(devices) -> str:
    return ",".join(map(str, devices)) if devices else "-"


def cmd_runs(args) -> int:
    from .devices.queue import entries
    from .runs import list_runs

    places = {e["run_id"]: e for e in entries(args.work_dir)}
    for r in list_runs(args.work_dir):
        where = f"  on {r['remote']}" if r.get("remote") else ""
        waiting = places.get(r.get("run_id")) if r.get("state") == "queued" else None
        queued = f"  queue position {waiting['position']} for {_devices_text(waiting['devices'])}" if waiting else ""
        note = f"  ({r['note']})" if r.get("note") and r.get("state") in ("queued", "running") else ""
        print(f"{r.get('state', '?'):<9} {r.get('started') or '':<25} {r.get('user') or '-':<12} "
              f"{_devices_text(r.get('devices')):<8} {r['run_dir']}{where}{queued}{note}"
              + (f"  error: {r['error']}" if r.get("error") else ""))
    return 0


def cmd_devices(args) -> int:
    """This machine's devices, who holds each and who waits (``backend.devices.status``: the studio's panel)."""
    from .devices.status import device_rows

    for d in device_rows(args.work_dir):
        used, total = d.get("memory_used_mb"), d.get("memory_total_mb")
        memory = f"{'?' if used is None else f'{used / 1024:,.1f}'}/{'?' if total is None else f'{total / 1024:,.1f}'} GiB"
        util = "-" if d.get("util_pct") is None else f"{d['util_pct']:.0f}%"
        temp = "-" if d.get("temp_c") is None else f"{d['temp_c']:.0f}C"
        waits = f"  waiting: {', '.join(d['waiting'])}" if d["waiting"] else ""
        print(f"{d['id']:<5} {d['name'][:40]:<40} {memory:>16} {util:>5} {temp:>5}  {d['held_by']}{waits}")
    return 0


def _queue_target(args):
    """(work dir, run) for ``ftstudio queue up|cancel RUN``: RUN is a name in --work-dir or a run folder."""
    from pathlib import Path

    from .runs import run_folder

    run = run_folder(args.run if "/" in args.run else Path(args.work_dir) / args.run)
    return run.path.parent, run


def cmd_queue(args) -> int:
    """The queue of a work directory (``backend.devices.queue``), read from its files; up / cancel a run."""
    from .core.guard import Guard, local_user
    from .devices import queue

    if args.queue_command in ("up", "cancel"):
        work, run = _queue_target(args)
        if args.queue_command == "up":
            print(queue.move_up(work, run, local_user(), Guard.cli()))
            return 0
        asked, said = queue.cancel(work, run, local_user(), Guard.cli())
        print(said if asked else f"ftstudio queue cancel: {said}", file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 1
    waiting = queue.entries(args.work_dir)
    if not waiting:
        print(f"no run is waiting for devices in {args.work_dir}")
        return 0
    width = max(len(e["run"]) for e in waiting)
    print(f"{'pos':<4} {'run':<{width}} {'user':<12} {'devices':<8} waiting for")
    for e in waiting:
        held = [f"{d} (held by {e['held_by'].get(d) or 'a run outside this work directory'})" for d in e["busy"]]
        what = ", ".join(held + [f"after {r}" for r in e["ahead"]]) or "its turn (starting)"
        wanted = f"any {e['count']} of {_devices_text(e['devices'])}" if e["auto"] else _devices_text(e["devices"])
        print(f"{e['position']:<4} {e['run']:<{width}} {e['user'] or '-':<12} {wanted:<8} {what}")
    return 0


def cmd_abort(args) -> int:
    from .runs import abort, run_folder

    asked, said = abort(run_folder(args.run_dir), by="ftstudio abort")
    print(said if asked else f"ftstudio abort: {said}", file=sys.stdout if asked else sys.stderr)
    return 0 if asked else 1


def cmd_submit(args) -> int:
    """Submit a run to Slurm, or resume a submitted one as a new job: the calls the Train tab's "Where: Slurm"
    makes (``backend.slurm``). --dry-run prints the job script and submits nothing."""
    from . import slurm
    from .config import load_config
    from .core.guard import Guard, local_user
    from .core.rundir import RunDir
    from .launch import LaunchSpec, default_run_dir
    from .runs import run_folder

    given = {k: getattr(args, k) for k in ("partition", "nodes", "gpus_per_node", "ntasks_per_node", "time",
                                           "account") if getattr(args, k) is not None}
    guard, user = Guard.cli(), local_user()
    if args.resume is not None:
        if args.config or args.overrides:
            print("ftstudio submit: error: --resume RUN continues that run's own config; give no CONFIG",
                  file=sys.stderr)
            return 2
        run = run_folder(args.resume)
        st = run.status()
        options = slurm.SlurmOptions.from_dict({**(st.get("slurm") or {}), **given})
        if args.dry_run:
            print(slurm.sbatch_script(run, options, user=user.name, run_id=st.get("run_id"),
                                      deepspeed=slurm.deepspeed_arg(args.deepspeed, guard), resume=True), end="")
            return 0
        job = slurm.resubmit(run, user, guard, options, deepspeed=args.deepspeed)
    else:
        if not args.config:
            print("ftstudio submit: error: give CONFIG (a recipe name or .yaml), or --resume RUN", file=sys.stderr)
            return 2
        cfg = load_config(args.config, args.overrides)
        run = RunDir(args.work_dir or default_run_dir(cfg, LaunchSpec()))
        options = slurm.SlurmOptions.from_dict(given)
        if args.dry_run:
            deepspeed = slurm.deepspeed_arg(args.deepspeed, guard)
            print(slurm.sbatch_script(run, options, user=user.name, deepspeed=deepspeed), end="")
            return 0
        job = slurm.submit(cfg, run.path, options, user, guard, deepspeed=args.deepspeed)
    print(f"submitted Slurm job {job} for run {run.path}\n  script {run.sbatch_file}\n"
          f"  follow it: ftstudio runs --work-dir {run.path.parent}; stop it: ftstudio abort {run.path}")
    return 0


def cmd_convert(args) -> int:
    from .export import merge, pth_to_hf

    if args.convert_command == "pth_to_hf":
        # CONFIG is optional (the .pth carries its config): 2 args = PTH SAVE_PATH, 3 = CONFIG PTH SAVE_PATH
        if len(args.paths) == 2:
            config, pth, save = None, *args.paths
        elif len(args.paths) == 3:
            config, pth, save = args.paths
        else:
            print("ftstudio convert pth_to_hf: give [CONFIG] PTH SAVE_PATH", file=sys.stderr)
            return 2
        pth_to_hf(pth, save, config=config, overwrite=args.overwrite, trust_remote_code=args.trust_remote_code,
                  safe_serialization=args.safe_serialization, max_shard_size=args.max_shard_size)
        return 0
    merge(args.llm, args.adapter, args.save_path, overwrite=args.overwrite, trust_remote_code=args.trust_remote_code,
          max_shard_size=args.max_shard_size, safe_serialization=args.safe_serialization, dtype=args.dtype,
          device=args.device)
    return 0


def cmd_chat(args) -> int:
    from .chat import GenerationSettings, load_chat_model, stream_reply
    from .data.templates import SYSTEM_TEMPLATE

    system = args.system
    if args.system_template:
        if args.system_template not in SYSTEM_TEMPLATE.names():
            print(f"ftstudio chat: error: unknown --system-template {args.system_template!r}; known: "
                  f"{', '.join(SYSTEM_TEMPLATE.names())}", file=sys.stderr)
            return 2
        system = getattr(SYSTEM_TEMPLATE, args.system_template)
    chat = load_chat_model(args.llm, adapter=args.adapter, template=args.prompt_template, system=system,
                           bits=args.bits, device=args.device, trust_remote_code=args.trust_remote_code)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                                  seed=args.seed)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {args.llm}{' + ' + args.adapter if args.adapter else ''} "
              f"(template {chat.template}). RESET clears the history, EXIT quits.")
    history = []
    while True:
        try:
            line = input(">>> ") if interactive else sys.stdin.readline()
        except EOFError:
            break
        if not interactive and line == "":
            break  # end of the piped input
        message = line.rstrip("\n")
        if message.strip() == "EXIT":
            break
        if message.strip() == "RESET":
            history = []
            if interactive:
                print("(history cleared)")
            continue
        if not message.strip():
            continue
        pieces = []
        for piece in stream_reply(chat, history, message, settings):
            pieces.append(piece)
            if not args.no_streamer:
                print(piece, end="", flush=True)
        answer = "".join(pieces)
        print(answer if args.no_streamer else "", flush=True)
        history.append({"input": message, "output": answer})
    return 0


def cmd_share(args) -> int:
    """Scoped links: the same backend calls as the studio's Share panel."""
    from .core.guard import Guard
    from .serve.credentials import CredentialStore, format_time
    from .serve.embed import create_link, link_url

    store = CredentialStore(args.work_dir)
    try:
        if args.share_command == "create":
            guard = Guard(args.work_dir, args.allow_path)  # what a studio on this work dir may serve
            cred, token = create_link(guard, store, args.model, expires=args.expires, requests=args.requests,
                                      label=args.label)
            limit = f"{cred.request_limit} requests" if cred.request_limit else "no request limit"
            print(f"link {cred.id} for {cred.model}: expires {format_time(cred.expires)}, {limit}")
            print(f"  page:    {link_url(args.url, token)}")
            print(f"  API key: {token}   (OpenAI-compatible API at {args.url.rstrip('/')}/v1, this model only)")
            print("the token is shown only now; `ftstudio share revoke ID` ends it")
        elif args.share_command == "list":
            for c in store.list():
                uses = f"{c.uses}/{c.request_limit}" if c.request_limit is not None else str(c.uses)
                print(f"{c.id}  {c.state():<8} uses {uses:<8} expires {format_time(c.expires):<23} "
                      f"{c.model}" + (f"  ({c.label})" if c.label else ""))
        else:
            cred = store.revoke(args.id)
            print(f"link {cred.id} ({cred.model}) revoked")
    except ValueError as exc:  # a bad expiry, limit or id, a refused model, a damaged store: one line
        print(f"ftstudio share {args.share_command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _whole_in(low: int, high: int):
    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} must be from {low} to {high}")
        return value
    return check


def _named(text: str) -> tuple[str, str]:
    """NAME=SPEC -> (NAME, SPEC); a SPEC alone is its own name. A local folder given relative to here
    is read from here (run specs like RUN/hf/X are the work directory's)."""
    from pathlib import Path

    name, sep, spec = text.partition("=")
    if not (sep and name and spec and "/" not in name):
        name, spec = text, text
    return name, str(Path(spec).resolve()) if Path(spec).is_dir() and not Path(spec).is_absolute() else spec


def cmd_serve(args) -> int:
    """An OpenAI-compatible API (``backend.serve``) for the models until Ctrl-C or SIGTERM."""
    from .core.guard import Guard
    from .serve.credentials import Authorizer, CredentialStore, read_api_key
    from .serve.engine import Scheduler, load_fixed
    from .serve.openai_api import bind, create_api, is_local_host, serve_forever

    models, adapters = [_named(m) for m in args.models], [_named(a) for a in args.adapter]
    ids = [name for name, _ in models + adapters]
    twice = sorted({n for n in ids if ids.count(n) > 1})
    try:
        if twice:
            raise ValueError(f"model id {', '.join(twice)} given twice; name them NAME=SPEC")
        keys = read_api_key(args.api_key, args.api_key_file)
    except ValueError as exc:
        print(f"ftstudio serve: error: {exc}", file=sys.stderr)
        return 2
    if not keys and not is_local_host(args.host):
        print(f"ftstudio serve: error: refusing to listen on {args.host} without a key: anyone who can reach "
              "it could use the models. Give --api-key KEY or --api-key-file FILE, or --host 127.0.0.1",
              file=sys.stderr)
        return 2
    guard = Guard(args.work_dir, [], args.trust_remote_code, confined=False)
    if args.engine == "vllm":
        return _serve_vllm(args, models, adapters, keys, guard)
    scheduler = Scheduler(args.parallel, args.max_queue)
    # loaded on the thread that generates: one OpenMP team in the process (backend.serve.engine's docstring)
    served = scheduler.call(load_fixed, models, adapters, guard=guard, template=args.prompt_template,
                            system=args.system, device=args.device, trust_remote_code=args.trust_remote_code)
    auth = Authorizer(CredentialStore(args.work_dir), keys, open_access=not keys)
    sock = bind(args.host, args.port)
    host = f"[{args.host}]" if ":" in args.host else args.host
    access = "API key required" if keys else "no key needed: this machine only"
    ready = f"serving {', '.join(ids)} at http://{host}:{sock.getsockname()[1]}/v1 ({access}); Ctrl-C stops"
    serve_forever(create_api(served, auth, scheduler), sock, scheduler, ready)
    return 0


def _serve_vllm(args, models, adapters, keys, guard) -> int:
    import shlex
    import tempfile

    from .serve.engine import vllm_sources
    from .serve.vllm import run_vllm, vllm_serve_command

    if args.system is not None:
        print("ftstudio serve: note: vLLM has no default system text; --system is ignored (clients send a "
              "system message)", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="ftstudio-vllm-") as tmp:
        base, loras, name, template = vllm_sources(models, adapters, guard, prompt_template=args.prompt_template,
                                                   out_dir=tmp)
        cmd = vllm_serve_command(base, loras, host=args.host, port=args.port, served_name=name,
                                 chat_template=template)
        print(f"starting {shlex.join(cmd)}", flush=True)
        return run_vllm(cmd, keys)


TRUST_HELP = "let the model's own code (from its folder or the Hub) run: only for models you trust"


def _add_output_args(q: argparse.ArgumentParser) -> None:
    q.add_argument("--overwrite", action="store_true",
                   help="replace our own earlier output of the same kind there (anything else is never deleted)")
    q.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ftstudio",
        description="Finetune Studio: instruction fine-tuning of LLMs, from the command line.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("list-map-fn", help="list the built-in map_fns")
    p.set_defaults(func=cmd_list_map_fn)
    p = sub.add_parser("list-template", help="list the prompt templates")
    p.set_defaults(func=cmd_list_template)

    p = sub.add_parser(
        "check-dataset",
        help="load, map, template and tokenize a dataset; print counts, lengths and the first sample",
    )
    _add_data_args(p)
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_check_dataset)

    p = sub.add_parser("list-cfg", help="list the shipped recipes")
    p.add_argument("-p", "--pattern", default=None, help="only names containing this")
    p.set_defaults(func=cmd_list_cfg)
    p = sub.add_parser("copy-cfg", help="copy a recipe to a folder to edit it")
    p.add_argument("name")
    p.add_argument("dest")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier copy")
    p.set_defaults(func=cmd_copy_cfg)

    p = sub.add_parser(
        "train", help="train: one process, or torchrun via NPROC_PER_NODE/NNODES/NODE_RANK/ADDR/PORT, or Slurm",
        description="Train from a recipe name or a YAML config. Distributed launch is read from the "
                    "environment: NPROC_PER_NODE, NNODES, NODE_RANK, ADDR, PORT (torchrun), or "
                    "--launcher slurm under srun.",
    )
    p.add_argument("config", help="recipe name (ftstudio list-cfg) or path to a .yaml config")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. training.lr=1e-4")
    p.add_argument("--deepspeed", default=None, help="deepspeed_zero1|zero2|zero2_offload|zero3|zero3_offload or a .json")
    p.add_argument("--launcher", choices=["pytorch", "slurm"], default="pytorch")
    p.add_argument("--work-dir", default=None, help="the run folder (default: work_dirs/<config>-<time>)")
    p.add_argument("--resume", nargs="?", const=True, default=None,
                   help="continue the latest checkpoint (of --work-dir), or a given checkpoint / iter_N.pth")
    p.add_argument("--quiet", action="store_true", help="do not echo the training log")
    p.add_argument("--devices", default="auto", metavar="0,1|auto",
                   help="GPUs to lease for the run (sets CUDA_VISIBLE_DEVICES and one process per device); auto: "
                        "the first free ones (NPROC_PER_NODE of them, default 1). While they are busy the run "
                        "waits in the work directory's queue (ftstudio queue). CPU-only machines: one device, cpu")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("convert", help="pth_to_hf: checkpoint -> HF adapter/model; merge: base + adapter -> model")
    conv = p.add_subparsers(dest="convert_command", metavar="pth_to_hf|merge", required=True)
    q = conv.add_parser("pth_to_hf", help="iter_<N>.pth -> Hugging Face adapter (LoRA) or model (full)")
    q.add_argument("paths", nargs="+", metavar="[CONFIG] PTH SAVE_PATH")
    _add_output_args(q)
    q.add_argument("--safe-serialization", action=argparse.BooleanOptionalAction, default=True)
    q.add_argument("--max-shard-size", default="2GB")
    q = conv.add_parser("merge", help="merge an adapter into its base model (checks logits parity)")
    q.add_argument("llm")
    q.add_argument("adapter")
    q.add_argument("save_path")
    _add_output_args(q)
    q.add_argument("--max-shard-size", default="2GB")
    q.add_argument("--safe-serialization", action=argparse.BooleanOptionalAction, default=True)
    q.add_argument("--dtype", choices=MERGE_DTYPES, default="auto", help=MERGE_DTYPE_HELP)
    q.add_argument("--device", choices=MERGE_DEVICES, default="cpu", help=MERGE_DEVICE_HELP)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("chat", help="chat with a model (+ adapter), streaming; RESET / EXIT at the prompt")
    p.add_argument("llm", help="model folder or Hub id ('demo' for the bundled tiny model)")
    p.add_argument("--adapter", default=None)
    p.add_argument("--prompt-template", default=None, help="default: what the adapter/model recorded")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--system", default=None, help="system text (default: what the adapter recorded)")
    g.add_argument("--system-template", default=None, help="a named system text, e.g. alpaca, coder, medical")
    p.add_argument("--bits", type=int, choices=[4, 8], default=None, help="load the model quantized (bitsandbytes)")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    p.add_argument("--temperature", type=non_negative_float, default=0.1)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=non_negative_float, default=0.75)
    p.add_argument("--repetition-penalty", type=non_negative_float, default=1.0)
    p.add_argument("--max-new-tokens", type=positive_int, default=512)
    p.add_argument("--no-streamer", action="store_true", help="print each reply whole")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto",
                   help="auto: CUDA if there is one, else CPU. On CUDA the model goes onto the card with the most "
                        "free memory, or is spread over all cards when it fits on none")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("estimate-memory", help="memory per GPU for a config, before launching it")
    p.add_argument("config", help="recipe name or .yaml config")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--world-size", type=positive_int, default=1, help="data-parallel ranks")
    p.add_argument("--deepspeed", choices=DEEPSPEED_NAMES, default=None)
    p.set_defaults(func=cmd_estimate_memory)

    p = sub.add_parser("eval", help="benchmark a model with EleutherAI's lm-eval (local tasks: ftstudio_qa, "
                                    "ftstudio_qa_mc); results go to the run folder",
                       description="Run lm-eval tasks on a model, in its training prompt format. The shipped "
                                   "tasks ask the questions of a local file (--data; default: the demo's).")
    p.add_argument("model", help="demo, RUN/iter_N.pth, RUN/hf/X, RUN/merged/X (in --work-dir), a folder or a Hub "
                                 "id; with --backend openai: the model id the server serves")
    p.add_argument("--tasks", required=True, metavar="T[,T...]", help="lm-eval task names, comma separated")
    p.add_argument("--limit", type=positive_int, default=None, help="at most N questions per task")
    p.add_argument("--run", default=None, help="keep the result with this run (a name in --work-dir or a run "
                                               "folder); a checkpoint's own run by default")
    p.add_argument("--work-dir", default="work_dirs", help="where RUN names live")
    p.add_argument("--data", default=None, metavar="FILE",
                   help="question file of the ftstudio_qa tasks: JSON lines of question/answer, input/output "
                        "or chat messages")
    p.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="a folder of your own lm-eval task YAML files (repeatable)")
    p.add_argument("--backend", choices=["hf", "openai"], default="hf",
                   help="hf: load the model here; openai: ask an OpenAI-compatible server (ftstudio serve, "
                        "the studio's /v1, vLLM; key from OPENAI_API_KEY)")
    p.add_argument("--base-url", default=None, help="the server's address for --backend openai, e.g. "
                                                    "http://127.0.0.1:8000/v1")
    p.add_argument("--prompt-template", default=None, help="default: what the model recorded")
    p.add_argument("--batch-size", type=positive_int, default=1)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    p.add_argument("--json", action="store_true", help="print the stored record as JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("devices", help="this machine's devices: memory, utilisation, temperature, who holds them")
    p.add_argument("--work-dir", default="work_dirs", help="the work directory whose runs name the holders")
    p.set_defaults(func=cmd_devices)
    p = sub.add_parser("runs", help="list runs: state, start, user, devices, queue position")
    p.add_argument("--work-dir", default="work_dirs")
    p.set_defaults(func=cmd_runs)
    p = sub.add_parser("queue", help="runs waiting for their devices; up RUN: move it ahead; cancel RUN",
                       description="The queue of a work directory, read from its files (.queue/). A waiting run "
                                   "starts by itself when its devices are free and no earlier run waits for "
                                   "one of them.")
    p.add_argument("--work-dir", default="work_dirs")
    queue_sub = p.add_subparsers(dest="queue_command", metavar="up|cancel")
    for name, words in (("up", "move a waiting run ahead of the one before it on its devices"),
                        ("cancel", "take a waiting run out of the queue (it ends aborted)")):
        q = queue_sub.add_parser(name, help=words)
        q.add_argument("run", help="a run name in --work-dir, or a run folder")
        q.add_argument("--work-dir", default=argparse.SUPPRESS)
    p.set_defaults(func=cmd_queue)
    p = sub.add_parser("abort", help="stop a running run gracefully (keeps its last checkpoint)")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_abort)
    p = sub.add_parser("submit", help="submit a training run to a Slurm cluster (sbatch); resume one as a new job",
                       description="Write <run>/sbatch.sh (srun of one `ftstudio train --launcher slurm` per task) "
                                   "and submit it with sbatch. The run is followed through its folder on the shared "
                                   "file system plus squeue/sacct: ftstudio runs, ftstudio abort, the studio.")
    p.add_argument("config", nargs="?", help="recipe name (ftstudio list-cfg) or path to a .yaml config")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. training.lr=1e-4")
    p.add_argument("--slurm", action="store_true", help="submit to Slurm (the one scheduler so far: may be left out)")
    p.add_argument("--partition", default=None, help="Slurm partition (default: the cluster's default)")
    p.add_argument("--nodes", type=positive_int, default=None, help="machines (default 1)")
    p.add_argument("--gpus-per-node", type=_whole_in(0, 1024), default=None, help="GPUs per machine (default 0)")
    p.add_argument("--ntasks-per-node", type=positive_int, default=None,
                   help="ranks per machine (default: one per GPU, else 1)")
    p.add_argument("--time", default=None, help="time limit: minutes, HH:MM:SS or D-HH:MM (default: the partition's)")
    p.add_argument("--account", default=None, help="Slurm account to charge")
    p.add_argument("--deepspeed", default=None, help="deepspeed_zero1|zero2|zero2_offload|zero3|zero3_offload or "
                                                     "a .json")
    p.add_argument("--work-dir", default=None, help="the new run folder (default: work_dirs/<config>-<time>)")
    p.add_argument("--resume", default=None, metavar="RUN",
                   help="resume this submitted run from its last checkpoint as a new job (its recorded shape, "
                        "unless options are given)")
    p.add_argument("--dry-run", action="store_true", help="print the job script; submit nothing, write nothing")
    p.set_defaults(func=cmd_submit)
    p = sub.add_parser("share", help="scoped links: chat with one model (the studio's /embed page and /v1 API)")
    share = p.add_subparsers(dest="share_command", metavar="create|list|revoke", required=True)
    q = share.add_parser("create", help="a new link for one model (shown once)")
    q.add_argument("model", help="a model spec as the Chat tab takes it: demo, RUN/iter_N.pth, RUN/hf/X, a folder")
    q.add_argument("--expires", default=None, help="e.g. 30m, 1h, 7d (default: never)")
    q.add_argument("--requests", type=positive_int, default=None, help="at most this many requests (default: no limit)")
    q.add_argument("--label", default="", help="who or what the link is for")
    q.add_argument("--url", default="http://127.0.0.1:7860", help="the studio's address, for the printed link")
    q.add_argument("--allow-path", action="append", default=[], metavar="DIR",
                   help="a folder the studio was started with --allow-path (models outside the work dir)")
    q = share.add_parser("list", help="every link, its use count and state")
    q = share.add_parser("revoke", help="end a link now")
    q.add_argument("id")
    for q in share.choices.values():
        q.add_argument("--work-dir", default="work_dirs")
    p.set_defaults(func=cmd_share)
    p = sub.add_parser("serve", help="an OpenAI-compatible API (/v1) for models, checkpoints and adapters",
                       description="Serve models over an OpenAI-compatible HTTP API (GET /v1/models, POST "
                                   "/v1/chat/completions, /v1/completions), in the template, system text and "
                                   "stop words each was trained with.")
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="[NAME=]SPEC: demo, RUN/iter_N.pth, RUN/hf/X, RUN/merged/X (in --work-dir), a folder or "
                        "a Hub id; clients send NAME (default: SPEC) as the model")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH",
                   help="a LoRA adapter on the first MODEL's base, served as NAME (default: PATH); repeatable. "
                        "Adapters on one base share one copy of it")
    p.add_argument("--work-dir", default="work_dirs", help="where RUN specs and share links live")
    p.add_argument("--host", default="127.0.0.1", help="any other address than this machine's needs a key")
    p.add_argument("--port", type=_whole_in(0, 65535), default=8000,
                   help="0: a free port (the printed URL says which)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--api-key", default=None, help="the key clients send (Authorization: Bearer KEY)")
    g.add_argument("--api-key-file", default=None, help="a file of keys, one a line")
    p.add_argument("--prompt-template", default=None, help="default: what each model recorded")
    p.add_argument("--system", default=None, help="default system text (default: what each model recorded)")
    p.add_argument("--max-queue", type=_whole_in(0, 1 << 20), default=16,
                   help="requests that may wait; past it: HTTP 429")
    p.add_argument("--parallel", type=positive_int, default=1, help="generations at once")
    p.add_argument("--engine", choices=["transformers", "vllm"], default="transformers",
                   help="vllm: start `vllm serve` with the base and its adapters (a GPU box with vllm installed)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    p.set_defaults(func=cmd_serve)
    return parser


def parse(parser: argparse.ArgumentParser, argv):
    """Like parse_args, but key=value overrides may also follow the options
    (argparse stops filling a nargs='*' positional at the first option, and its
    parse_intermixed_args does not take subcommands)."""
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*(args.overrides or []), *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv=None) -> int:
    parser = build_parser()
    args = parse(parser, argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"ftstudio {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the file system said no: read-only, full, missing, not allowed
        print(f"ftstudio {args.command}: error: {os_error_text(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def os_error_text(exc: OSError) -> str:
    """One line for a file-system refusal, naming the path."""
    import errno

    if exc.errno == errno.ENOSPC:
        return f"no space left on device at {exc.filename or 'the output folder'}"
    if exc.strerror and exc.filename:
        return f"{exc.filename}: {exc.strerror.lower()}"
    return " ".join(str(exc).split())[:400] or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
