"""Run control, for the CLI and the studio alike: which runs there are, how
they stand, where their trackers put them, and abort. Everything is read from the run folders
(``backend.core.rundir``); signals pass the guard (``backend.core.guard``).

Abort = save + stop. It writes the run folder's stop request, which rank 0
reads at every step end; the ranks agree on the step, save a complete
checkpoint there and stop. That reaches ranks on any host that shares the
folder, and a run whose launcher was killed. A queued run (its launcher still
checking the data) is stopped by SIGTERM to that launcher, once proven to be
it; a Slurm run on another host also gets ``scancel --signal=TERM`` of its job.
"""

from __future__ import annotations

import getpass
import subprocess
from pathlib import Path

from .core.guard import Guard
from .core.rundir import ACTIVE, RunDir, RunFolderError, effective_status, list_runs as _run_folders


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


def abort(run: RunDir, guard: Guard | None = None, by: str = "") -> tuple[bool, str]:
    """Ask a run to save and stop. Returns (asked, what happened, in words)."""
    guard = guard or Guard.cli()
    status = effective_status(run)
    state = status.get("state")
    if state not in ACTIVE:
        return False, f"{run.name} is not running ({state or 'no state'})"
    run.request_stop(by)
    if status.get("remote"):
        said = f"asked {run.name} through its run folder; its ranks on {status['remote']} save and stop at the next step"
        if status.get("slurm_job_id"):
            said += "; " + slurm_stop(str(status["slurm_job_id"]))
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


def scancel_command(job_id: str) -> list[str]:
    return ["scancel", "--signal=TERM", job_id]


def slurm_stop(job_id: str) -> str:
    """``scancel --signal=TERM`` of a job, only if it is a job of ours: the same
    user, running ``ftstudio`` (a job id in a file is data, not proof)."""
    if not job_id.isdigit():
        return f"Slurm job {job_id!r} is not a job id; not signalled"
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%u|%o"], capture_output=True, text=True,
                             timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"Slurm not reachable from here ({exc}); the stop request in the run folder still applies"
    user, _, command = out.partition("|")
    if user != getpass.getuser() or "ftstudio" not in command and "backend" not in command:
        return f"Slurm job {job_id} is not a Finetune Studio job of {getpass.getuser()}; not signalled"
    done = subprocess.run(scancel_command(job_id), capture_output=True, text=True, timeout=30)
    return f"scancel --signal=TERM {job_id}: " + ("sent" if done.returncode == 0 else done.stderr.strip())
