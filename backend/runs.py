"""Run control, for the CLI and the studio alike: which runs there are, how
they stand, where their trackers put them, and abort. Everything is read from the run folders
(``backend.core.rundir``); signals pass the guard (``backend.core.guard``).

Abort = save + stop. It writes the run folder's stop request, which rank 0
reads at every step end; the ranks agree on the step, save a complete
checkpoint there and stop. That reaches ranks on any host that shares the
folder, and a run whose launcher was killed. A queued run (its launcher still
checking the data) is stopped by SIGTERM to that launcher, once proven to be
it; a Slurm run on another host also gets ``scancel --signal=TERM`` of its job.
A run submitted to Slurm (``backend.slurm``) still pending there is cancelled
(``scancel``: nothing has started, nothing to save); once its job runs, it
gets the stop request plus ``scancel --signal=TERM`` (the graceful save).
Resuming a submitted run is a new job: ``backend.slurm.resubmit``.
"""

from __future__ import annotations

from pathlib import Path

from . import slurm as _slurm  # noqa: F401 - registers Slurm's follower, so submitted runs read true here
from .core.guard import Guard, User
from .core.rundir import (ABORTED_EXIT, ACTIVE, RunDir, RunFolderError, effective_status,
                          list_runs as _run_folders)


def list_runs(work_dir="work_dirs") -> list[dict]:
    """Every run under ``work_dir`` (newest first), with its true status."""
    return [{"run_dir": str(r.path), "name": r.name, **effective_status(r)} for r in _run_folders(work_dir)]


def active_runs(work_dir="work_dirs") -> list[dict]:
    """Runs under ``work_dir`` that are queued or running now."""
    return [r for r in list_runs(work_dir) if r.get("state") in ACTIVE]


def run_folder(path: str | Path) -> RunDir:
    """A run folder named on the command line (refused if it holds no run)."""
    run = RunDir(path)
    if not run.is_run():
        raise RunFolderError(f"{path}: not a run folder (no run status in it)")
    return run


def abort(run: RunDir, guard: Guard | None = None, by: str = "", user: User | None = None) -> tuple[bool, str]:
    """Ask a run to save and stop. Returns (asked, what happened, in words). With ``user``, only if
    ``guard.require(user, "control", run)`` allows it (their own run, or an admin)."""
    guard = guard or Guard.cli()
    if user is not None:
        guard.require(user, "control", run)
    status = effective_status(run)
    state = status.get("state")
    if state not in ACTIVE:
        return False, f"{run.name} is not running ({state or 'no state'})"
    run.request_stop(by)
    if status.get("scheduler") == "slurm":
        return _abort_submitted(run, status)
    if status.get("remote"):
        said = f"asked {run.name} through its run folder; its ranks on {status['remote']} save and stop at the next step"
        if status.get("slurm_job_id"):
            said += "; " + slurm_stop(str(status["slurm_job_id"]), run)
        return True, said
    if state == "queued":
        guard.signal_launcher(run)
        return True, f"stopped {run.name} before training began"
    return True, f"asked {run.name} to save a checkpoint at the next step and stop"


def tracker_locations(run: RunDir) -> list[dict]:
    """Where each tracker of the run's ``training.report_to`` put it, and how to open it:
    ``[{"tracker", "where", "how"}]`` (empty for a run without trackers or without a readable config)."""
    from .config import ConfigError, load_config
    from .train.trackers import locations

    try:
        cfg = load_config(run.config_file)
    except (ConfigError, OSError):
        return []
    return locations(run, cfg.training.report_to, project=cfg.name)


def slurm_stop(job_id: str, run: RunDir | None = None) -> str:
    """``scancel --signal=TERM`` of a job, only if it is a job of ours: the same
    user, running ``ftstudio`` or this run's sbatch.sh (a job id in a file is data, not proof)."""
    from .slurm import cancel

    return cancel(job_id, run, graceful=True)[1]


def _abort_submitted(run: RunDir, status: dict) -> tuple[bool, str]:
    """A run submitted to Slurm (its stop request is written): a job still pending is cancelled and the run
    ends aborted; a job that runs gets ``scancel --signal=TERM``, and its ranks save and stop."""
    from .slurm import SlurmError, cancel, job_state

    job_id = str(status.get("slurm_job_id") or "")
    if not job_id:
        return True, f"asked {run.name} to stop; it is still being submitted, and its launcher will stop at once"
    try:
        job = job_state(job_id)
    except SlurmError as exc:
        return True, f"asked {run.name} through its run folder; {exc}"
    if job is not None and job.waiting:
        sent, said = cancel(job_id, run, graceful=False)
        if sent and run.status().get("state") == "queued":
            run.end("aborted", ABORTED_EXIT, None)
        return True, (f"cancelled {run.name} while it was pending in Slurm ({said})" if sent else
                      f"asked {run.name} to stop before it starts; {said}")
    said = cancel(job_id, run, graceful=True)[1]
    return True, f"asked {run.name} to save a checkpoint at the next step and stop; {said}"
