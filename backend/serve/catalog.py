"""Model specs: the names a person gives a model to chat with or to serve,
shared by the studio's Chat tab, its ``/v1`` API, share links and
``ftstudio serve``, so a link made in the studio names the same model the
command line serves.

A spec is 'demo', ``RUN/iter_N.pth`` (a run's checkpoint, converted once into
``RUN/hf/iter_N`` on first use), ``RUN/hf/X`` or ``RUN/merged/X`` (a run's
exports), all relative to the work directory, or a model folder or Hub id.
Whatever a caller sends passes the guard: runs and exports must be ones the
work directory lists, anything else the guard's path policy.
"""

from __future__ import annotations

from pathlib import Path

from backend.config import load_config
from backend.core.artifacts import CONVERTED_SUBDIR, MERGED_SUBDIR, exported_folders, iter_step, read_meta
from backend.core.guard import Guard, GuardError
from backend.core.rundir import RunDir
from backend.runs import list_runs


def model_choices(work_dir: str | Path) -> list[str]:
    """'demo', every run checkpoint (run/iter_N.pth) and every exported folder (run/hf/x, run/merged/x)."""
    work_dir = Path(work_dir)
    out = ["demo"]
    for r in list_runs(work_dir):
        run = RunDir(r["run_dir"])
        out += [str(p.relative_to(work_dir)) for p in exported_folders(run.path)]
        out += [f"{run.name}/{p.name}" for _, p in reversed(run.iters())]
    return out


def run_item(guard: Guard, spec: str) -> tuple[RunDir, Path] | None:
    """(run, checkpoint or exported folder) for a run/iter_N.pth or run/{hf,merged}/x spec; None otherwise."""
    parts = Path(spec).parts
    if len(parts) == 2 and iter_step(parts[1]) is not None:
        run = guard.run(parts[0])
        return run, guard.checkpoint(run, parts[1])
    if len(parts) == 3 and parts[1] in (CONVERTED_SUBDIR, MERGED_SUBDIR) and not Path(spec).is_absolute():
        run = guard.run(parts[0])
        folder = run.path / parts[1] / parts[2]
        if folder not in exported_folders(run.path):
            raise GuardError(f"model {spec}: run {run.name} has no such export")
        return run, folder
    return None


def resolve(guard: Guard, spec: str, *, may_convert: bool = True) -> str:
    """A spec -> a model folder, 'demo' or a Hub id (a checkpoint is converted once, on first use).
    ``may_convert=False`` (a caller who may not write, e.g. a viewer) refuses a checkpoint not yet
    converted: converting writes ``<run>/hf/iter_N``."""
    from backend.export import ensure_hf, is_converted

    if not spec or not str(spec).strip():
        raise GuardError("pick a model")
    item = run_item(guard, str(spec).strip())
    if item is None:
        return guard.model(str(spec).strip(), "model")
    run, path = item
    if iter_step(path) is None:
        return str(path)
    if not may_convert and not is_converted(path):
        raise GuardError(f"model {spec}: this checkpoint is not converted yet, and converting it writes into run "
                         f"{run.name}, which you may not; a trainer or admin converts it once by chatting with it "
                         "(or with ftstudio convert pth_to_hf), then anyone can chat with it")
    return str(ensure_hf(path, guard=guard, log=lambda *_: None))


def recorded(guard: Guard, spec: str) -> tuple[str | None, str]:
    """(template, system) a model was trained with, read without loading it. Raises the guard's and the
    artifacts' errors; callers that only want a default catch them."""
    item = run_item(guard, str(spec or "").strip())
    if item is None:
        folder = guard.model(spec, "model")
        meta = read_meta(folder) if folder and Path(folder).is_dir() else {}
        return meta.get("template"), meta.get("system", "")
    run, path = item
    if iter_step(path) is not None:
        cfg = load_config(run.config_file)
        return cfg.data.template, cfg.evaluation.system
    meta = read_meta(path)
    return meta.get("template"), meta.get("system", "")
