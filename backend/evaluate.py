"""Benchmarks: EleutherAI's lm-eval run against a model of ours, for
``ftstudio eval`` and the Runs tab's Evaluate panel alike.

Training loss says how well a model fits its data; a benchmark says whether
it answers. Rather than grow a harness of our own, this runs lm-eval (a
real, well-kept one) two ways:

- **hf**: in this process, through lm-eval's Hugging Face backend (``HFLM``)
  wrapped around the model exactly as chat loads it (``backend.chat``: a
  checkpoint converted once, an adapter on its base, on the card with the
  most free memory). Prompts are rendered in the model's training format:
  its template, exported as the tokenizer's ``chat_template``
  (``backend.chat_template``), is applied by lm-eval's own
  ``apply_chat_template``, the recorded system text goes in as the system
  instruction, and the template's stop words end each answer.
- **openai**: against an OpenAI-compatible server (``ftstudio serve``, the
  studio's ``/v1``, vLLM), through lm-eval's ``local-chat-completions``; the
  server applies the template. Generation tasks only: a chat API gives no
  log-likelihoods.

These machines cannot download task data, so tasks come from lm-eval's own
custom-task mechanism: the shipped ``backend/eval_tasks`` (``ftstudio_qa``,
``ftstudio_qa_mc`` over any local question file, the demo's by default),
folders given with ``include_path``, and lm-eval's built-in tasks where their
data is already in the datasets cache. Results go to the run folder
(``RunDir.write_eval``), one file per checkpoint and task set, which the Runs
tab shows next to the curves.
"""

from __future__ import annotations

import copy
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from .core.artifacts import iter_step, model_source, read_meta
from .core.guard import Guard
from .core.rundir import RunDir

LOCAL_TASKS = Path(__file__).resolve().parent / "eval_tasks"
SHIPPED_TASKS = ("ftstudio_qa", "ftstudio_qa_mc")
BACKENDS = ("hf", "openai")
DATA_KEY = "ftstudio_data"  # the task metadata key the shipped tasks read their question file from
INSTALL = "pip install lm-eval"
EXAMPLES = 10  # answers kept per generation task in the stored result, to see why a score is what it is


class EvalError(ValueError):
    """A benchmark request that cannot run as asked; the message names the field and the way out."""


def require_lm_eval():
    """lm-eval's module, or EvalError saying how to install it (the one place that imports it first)."""
    try:
        import lm_eval
    except ImportError:
        raise EvalError(f"benchmarks run on EleutherAI's lm-eval, which is not installed here: {INSTALL}") from None
    return lm_eval


def parse_tasks(text) -> list[str]:
    """'a,b , c' (or a list) -> ['a', 'b', 'c'], each once, in order."""
    items = text if isinstance(text, (list, tuple)) else str(text or "").split(",")
    names = []
    for item in items:
        name = str(item).strip()
        if name and name not in names:
            names.append(name)
    if not names:
        raise EvalError(f"--tasks: give at least one task, e.g. {SHIPPED_TASKS[0]}")
    return names


# --- what is evaluated, and where its result goes ----------------------------------------


@dataclass
class Target:
    spec: str  # the model as the user named it
    run: RunDir | None  # the run the result is stored with
    step: int | None  # the training step of the weights (0: the run's base model), None when unknown
    label: str  # the checkpoint part of the result's file name


def _plain(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-") or "model"


def _is_base_of(run: RunDir, spec: str, guard: Guard) -> bool:
    from .config import load_config

    try:
        base = load_config(run.config_file).model.name_or_path
    except (OSError, ValueError):
        return False
    if spec == base:
        return True
    a, b = guard.model(spec), guard.model(base)
    return bool(a and b and Path(a).exists() and Path(a).resolve() == Path(b).resolve())


def target_of(guard: Guard, spec: str, run: RunDir | None = None) -> Target:
    """Which run and step ``spec`` is: RUN/iter_N.pth and RUN/{hf,merged}/X name their run; the run's
    own base model is step 0 of ``run``; anything else is stored with ``run`` (if given) at no step."""
    from .serve import catalog

    spec = str(spec or "").strip()
    if not spec:
        raise EvalError("MODEL: give a model (demo, RUN/iter_N.pth, RUN/hf/X, RUN/merged/X, a folder or Hub id)")
    item = catalog.run_item(guard, spec)
    if item is not None:
        own, path = item
        if run is not None and run.path != own.path:
            raise EvalError(f"--run {run.name}: {spec} is a checkpoint of run {own.name}; leave --run out")
        step = iter_step(path)
        if step is not None:
            return Target(spec, own, step, path.stem)
        return Target(spec, own, read_meta(path).get("step"), f"{path.parent.name}_{path.name}")
    if run is not None and _is_base_of(run, spec, guard):
        return Target(spec, run, 0, "base")
    return Target(spec, run, None, _plain(Path(spec).name if "/" in spec else spec))


def eval_name(target: Target, tasks: list[str], backend: str = "hf") -> str:
    """<checkpoint>-<task>[.<task>...][-openai], cut to a file stem RunDir.write_eval takes."""
    name = f"{target.label}-{'.'.join(_plain(t) for t in tasks)}" + ("-openai" if backend == "openai" else "")
    if len(name) > 120:
        import hashlib

        name = name[:110] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return name


# --- tasks -------------------------------------------------------------------------------


def task_manager(names: list[str], include_paths=(), data: str | None = None):
    """lm-eval's TaskManager over the shipped tasks and ``include_paths``; lm-eval's own tasks are
    indexed (tens of seconds) only when a name is not found locally. Unknown names: EvalError."""
    from lm_eval.tasks import TaskManager

    paths = [str(LOCAL_TASKS), *map(str, include_paths)]
    meta = {DATA_KEY: data} if data else {}
    manager = TaskManager(include_path=paths, include_defaults=False, metadata=meta)
    if any(n not in manager.all_tasks for n in names):
        manager = TaskManager(include_path=paths, metadata=meta)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise EvalError(f"--tasks: unknown task {', '.join(unknown)}; the local ones are "
                        f"{', '.join(SHIPPED_TASKS)} (add your own task folders with --include-path)")
    return manager


def load_tasks(manager, names: list[str]) -> dict:
    """The tasks, built (their data read). A task whose data is not on this machine: EvalError."""
    from .data.errors import DataError

    try:
        return manager.load(names)
    except DataError as exc:  # the shipped tasks' question file
        raise EvalError(str(exc)) from None
    except (OSError, ConnectionError, ValueError) as exc:  # datasets offline: the data is not in the cache
        raise EvalError(f"task {', '.join(names)}: its data could not be read here ({_first_line(exc)}); these "
                        f"machines cannot download benchmarks: use {SHIPPED_TASKS[0]} with --data FILE, or a task "
                        "of your own over local files (--include-path)") from None


def add_stop_words(tasks: dict, stops: list[str]) -> None:
    """Generation tasks also stop at the model's own stop words (its template's, its EOS)."""
    for task in tasks["tasks"].values():
        if task.get_config("output_type") != "generate_until" or not stops:
            continue
        kwargs = dict(task.get_config("generation_kwargs") or {})
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        kwargs["until"] = until + [s for s in stops if s not in until]
        task.set_config(key="generation_kwargs", value=kwargs)


# --- models ------------------------------------------------------------------------------


def prompt_format(guard: Guard, target: Target, template: str | None) -> tuple[str, str]:
    """(template, system) to ask in: ``template`` if given, else what the model recorded, else the run's
    own for its base model, else the tokenizer's own chat template."""
    from .config import load_config
    from .serve import catalog

    recorded, system = catalog.recorded(guard, target.spec)
    if not recorded and target.step == 0 and target.run is not None:
        cfg = load_config(target.run.config_file)
        recorded, system = cfg.data.template, cfg.evaluation.system
    return template or recorded or "hf_chat_template", system or ""


def apply_template(tokenizer, template: str) -> tuple[bool, str | None]:
    """Give ``tokenizer`` the training format as its chat_template; (apply it?, a note when not)."""
    from .chat_template import inexpressible_reason, template_to_jinja
    from .data import get_template

    tpl = get_template(template)
    if tpl.uses_tokenizer_chat_template:
        if getattr(tokenizer, "chat_template", None):
            return True, None
        return False, "the tokenizer has no chat template: questions are asked as plain text"
    jinja = template_to_jinja(tpl, tokenizer)
    if jinja is None:
        return False, f"template {template}: {inexpressible_reason(tpl, tokenizer)}; questions are asked as plain text"
    tokenizer.chat_template = jinja
    return True, None


@dataclass
class Loaded:
    lm: object  # an lm-eval LM
    apply_chat_template: bool
    system: str
    stops: list[str] = field(default_factory=list)
    template: str | None = None
    notes: list[str] = field(default_factory=list)


def hf_model(guard: Guard, target: Target, *, template: str | None, device: str, trust_remote_code: bool,
             batch_size: int, loader=None) -> Loaded:
    """The model loaded as chat loads it (``loader``: ``load_chat_model``'s signature, e.g. the studio's
    model cache), wrapped in lm-eval's HFLM with a copy of its tokenizer carrying the training format."""
    from lm_eval.models.huggingface import HFLM

    from .chat import load_chat_model
    from .serve import catalog

    name, system = prompt_format(guard, target, template)
    folder = catalog.resolve(guard, target.spec)
    llm, adapter = model_source(folder)
    if loader is None:
        chat = load_chat_model(llm, adapter, template=name, device=device, trust_remote_code=trust_remote_code,
                               guard=guard)
    else:
        chat = loader(llm, adapter, template=name, guard=guard, trust_remote_code=trust_remote_code)
    tokenizer = copy.deepcopy(chat.tokenizer)  # lm-eval sets its chat template and pad token
    apply, note = apply_template(tokenizer, chat.template)
    lm = HFLM(pretrained=chat.model, tokenizer=tokenizer, batch_size=batch_size)
    return Loaded(lm, apply, system, list(chat.stop_words), chat.template, [note] if note else [])


def chat_url(base_url: str) -> str:
    """A server's chat-completions endpoint from its base URL (…/v1) or the endpoint itself."""
    url = str(base_url or "").strip().rstrip("/")
    if not re.match(r"^https?://[^/\s]+", url):
        raise EvalError(f"--base-url {base_url!r}: give the server's address, e.g. http://127.0.0.1:8000/v1")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


def openai_model(model: str, base_url: str, tasks: dict, max_length: int = 4096) -> Loaded:
    """lm-eval's local-chat-completions against the server; the key, if any, from OPENAI_API_KEY."""
    from lm_eval.models.openai_completions import LocalChatCompletion

    needs_scores = [n for n, t in tasks["tasks"].items() if t.get_config("output_type") != "generate_until"]
    if needs_scores:
        raise EvalError(f"task {', '.join(needs_scores)} scores answers by log-likelihood, which a chat API "
                        "does not give; run it with --backend hf")
    lm = LocalChatCompletion(model=model, base_url=chat_url(base_url), tokenized_requests=False,
                             max_length=max_length, max_retries=1, timeout=600)
    return Loaded(lm, True, "")


def openai_target(guard: Guard, spec: str, run: RunDir | None) -> Target:
    """A served model's id: a run's checkpoint when it names one here (``ftstudio serve RUN/iter_N.pth``
    serves it under that name), else just the id, stored with ``run`` if given."""
    from .core.guard import GuardError

    try:
        return target_of(guard, spec, run)
    except GuardError:
        return Target(str(spec).strip(), run, None, _plain(str(spec)))


# --- running -----------------------------------------------------------------------------


def quiet_logs() -> None:
    """lm-eval's warnings are for its own users (passing a loaded model, custom datasets): not ours.
    Its results also record the git commit of the working directory, asking ``git`` there, which
    prints "fatal: not a git repository" outside one: a user's folder is not lm-eval's source."""
    import lm_eval.evaluator

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    if hasattr(lm_eval.evaluator, "get_git_commit_hash"):
        lm_eval.evaluator.get_git_commit_hash = lambda: None


def _top_level(tasks: dict, names: list[str]) -> list:
    """The loaded groups asked for by name, and every task not inside one of them."""
    groups = [tasks["groups"][n] for n in names if n in tasks["groups"]]
    inside = {t.task_name for g in groups for t in g.get_all_tasks()}
    return groups + [t for name, t in tasks["tasks"].items() if name not in inside]


def run_tasks(loaded: Loaded, tasks: dict, manager, names: list[str], limit: int | None) -> dict:
    from lm_eval import simple_evaluate

    try:
        out = simple_evaluate(loaded.lm, tasks=_top_level(tasks, names), task_manager=manager, limit=limit,
                              apply_chat_template=loaded.apply_chat_template,
                              system_instruction=loaded.system or None, bootstrap_iters=1000, log_samples=True)
    except (OSError, ConnectionError, TimeoutError) as exc:  # a server that is not there, or failed
        raise EvalError(f"the model could not be asked: {_first_line(exc)}") from None
    except ValueError as exc:  # lm-eval refusing a task as set up (e.g. one that runs generated code)
        raise EvalError(f"lm-eval: {_first_line(exc)}") from None
    return out or {}


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def task_metrics(results: dict) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} out of lm-eval's results ('metric,filter' keys; filter 'none' left out)."""
    import numbers

    out = {}
    for task, values in (results.get("results") or {}).items():
        row = {}
        for key, value in values.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, numbers.Real) \
                    or not math.isfinite(value):  # 'N/A' and NaN stderrs (one question) are left out
                continue
            metric, flt = key.split(",", 1)
            row[metric if flt == "none" else f"{metric}/{flt}"] = float(value)
        out[task] = row
    return out


def task_examples(results: dict, metrics: dict) -> dict[str, list[dict]]:
    """The first answers of each generation task: question, answer, reference, scores."""
    out = {}
    for task, samples in (results.get("samples") or {}).items():
        keep = [m for m in metrics.get(task, {}) if "/" not in m and not m.endswith("_stderr")]
        rows = []
        for s in samples[:EXAMPLES]:
            resp = (s.get("filtered_resps") or [None])[0]
            if not isinstance(resp, str):
                break  # log-likelihood tasks: scores, no answer text
            doc = s.get("doc") or {}
            rows.append({"input": doc.get("question") or str(s["arguments"][0][0]), "output": resp,
                         "target": s.get("target"), **{m: s[m] for m in keep if m in s}})
        if rows:
            out[task] = rows
    return out


def make_record(results: dict, target: Target, loaded: Loaded, *, backend: str, limit, data, base_url,
                version: str, seconds: float) -> dict:
    """What is stored in the run folder (``<run>/evals/<name>.json``) and shown: the scores per task and
    metric, what was asked how, and the first answers."""
    from .core.rundir import now

    metrics = task_metrics(results)
    counts = results.get("n-samples") or {}
    return {"model": target.spec, "step": target.step, "tasks": metrics, "lm_eval_version": version,
            "created": now(), "limit": int(limit) if limit else None, "backend": backend,
            "template": loaded.template, "data": data, "base_url": base_url,
            "samples": {t: (counts.get(t) or {}).get("effective") for t in metrics}, "seconds": round(seconds, 1),
            "notes": loaded.notes, "examples": task_examples(results, metrics)}


def evaluate(guard: Guard, spec: str, tasks, *, run: RunDir | None = None, limit: int | None = None,
             backend: str = "hf", base_url: str | None = None, device: str = "auto",
             trust_remote_code: bool = False, include_paths=(), data: str | None = None,
             template: str | None = None, batch_size: int = 1, loader=None) -> tuple[dict, Path | None]:
    """Run ``tasks`` on the model ``spec``; (the result record, where it was stored or None).

    ``run``: store the result with that run (a checkpoint's own run by default). ``data``: the question
    file of the shipped tasks. ``loader``: how the hf backend loads models (default ``load_chat_model``)."""
    lm_eval = require_lm_eval()
    names = parse_tasks(tasks)
    if backend not in BACKENDS:
        raise EvalError(f"--backend {backend!r}: choose {' or '.join(BACKENDS)}")
    if backend == "openai" and not base_url:
        raise EvalError("--backend openai needs --base-url, the server's address (e.g. http://127.0.0.1:8000/v1)")
    if backend == "hf" and base_url:
        raise EvalError("--base-url is for --backend openai; the hf backend loads the model itself")
    if limit is not None and int(limit) < 1:
        raise EvalError(f"--limit {limit}: give at least 1 (questions per task)")
    data = guard.readable(data, "--data question file", must_exist=True, hub=False) if data else None
    include = [guard.readable(p, "--include-path", must_exist=True, hub=False) for p in include_paths or ()]
    target = target_of(guard, spec, run) if backend == "hf" else openai_target(guard, spec, run)
    quiet_logs()
    manager = task_manager(names, include, data)
    loaded_tasks = load_tasks(manager, names)
    if backend == "hf":
        loaded = hf_model(guard, target, template=template, device=device, trust_remote_code=trust_remote_code,
                          batch_size=batch_size, loader=loader)
    else:
        loaded = openai_model(target.spec, base_url, loaded_tasks)
    add_stop_words(loaded_tasks, loaded.stops)
    started = time.time()
    results = run_tasks(loaded, loaded_tasks, manager, names, limit)
    record = make_record(results, target, loaded, backend=backend, limit=limit, data=data, base_url=base_url,
                         version=getattr(lm_eval, "__version__", "?"), seconds=time.time() - started)
    path = target.run.write_eval(eval_name(target, names, backend), record) if target.run is not None else None
    return record, path


# --- showing -----------------------------------------------------------------------------


def result_rows(record: dict) -> list[list]:
    """[task, metric, value, stderr or None, questions] for each metric of a stored result."""
    rows = []
    for task, metrics in (record.get("tasks") or {}).items():
        for metric, value in metrics.items():
            if metric.endswith("_stderr") or "_stderr/" in metric:
                continue
            base, _, flt = metric.partition("/")
            stderr = metrics.get(f"{base}_stderr" + (f"/{flt}" if flt else ""))
            rows.append([task, metric, value, stderr, (record.get("samples") or {}).get(task)])
    return rows


def format_table(record: dict) -> str:
    """The result as a plain-text table, for a terminal."""
    head = ["task", "metric", "value", "± stderr", "questions"]
    body = [[t, m, f"{v:.4f}", "" if s is None else f"{s:.4f}", "" if n is None else str(n)]
            for t, m, v, s, n in result_rows(record)]
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [head, *body]]
    return "\n".join(lines)
