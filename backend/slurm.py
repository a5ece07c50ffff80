"""Training on a Slurm cluster: ``ftstudio submit`` and the studio's "Where: Slurm".

A submitted run is an ordinary run folder on the shared file system plus a
Slurm job. ``submit`` claims the folder, writes ``requested.yaml`` and
``sbatch.sh`` (the whole job, readable before it is submitted: the studio
shows it), records ``scheduler: "slurm"``, ``user`` and state ``queued``, and
hands the script to ``sbatch --parsable``. On the nodes, ``srun`` starts one
``ftstudio train --launcher slurm`` per task (one task = one rank); the task
on rank 0 accepts the pre-claimed folder through ``FTSTUDIO_QUEUED_RUN`` (see
``launch.claim``) and from then on the run is followed exactly like a local
one, through its folder. Slurm itself says what the folder cannot: a job
still PENDING, a job that ended without its launcher recording how
(``rundir.effective_status`` asks ``job_state``).

No scheduler of our own and nothing held in memory: a restarted studio finds
every submitted run again in its folder. Commands are argument lists; the
script's values are validated (plain names, Slurm time formats, whole
numbers) and shell-quoted, so no field typed in a form can become a command.
We signal or cancel only jobs proven ours (``job_is_ours``).

What this cluster kind offers (checked on Debian bookworm's Slurm 22.05, the
tests' one-node cluster, ``AccountingStorageType=accounting_storage/none``):
``sacct`` answers only "Slurm accounting storage is disabled", so the state
comes from ``squeue -t all -j ID``, which still lists an ended job with its
final state (COMPLETED, FAILED, CANCELLED, TIMEOUT, ...) for ``MinJobAge``
seconds (60 there). ``sacct`` is asked only when squeue no longer knows the
job (clusters with accounting keep it there); past both, the run folder's own
record (status.json, result.json, the logs) is the truth. ``#SBATCH`` lines
take single-quoted values (paths with spaces work); ``scancel --signal=TERM``
reaches the job's step tasks (our launchers and their workers), not the batch
shell, and ``squeue -o %o`` of a batch job is the script's path.
"""

from __future__ import annotations

import getpass
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, fields, replace

from .config import Config
from .core.atomic import write_text
from .core.guard import Guard, GuardError, User
from .core import procs
from .core.rundir import (ABORTED_EXIT, ACTIVE, ENDED, FOLLOWERS, RunDir, RunFolderError, effective_status,
                          last_error, now, result_outcome, result_phases)
from .launch import DEEPSPEED_NAMES, QUEUED_ENV, RUN_USER_ENV, LaunchError, resolve_deepspeed

_PLAIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")  # partition and account names
_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$|^(UNLIMITED|INFINITE)$")  # Slurm's --time formats
_NOT_IN_SBATCH_LINES = set("'\"\\%\n\r\0")  # sbatch's own parser (and its %j patterns) would misread these
# squeue states: still waiting for nodes; holding nodes (training, starting or ending). Anything else ended.
WAITING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "CONFIGURING"}
HOLDING = {"RUNNING", "COMPLETING", "SUSPENDED", "STOPPED", "RESIZING", "SIGNALING", "STAGE_OUT"}
SLURM_TIMEOUT_S = 30
UNREACHABLE_S = 60  # a controller that did not answer is not asked again for this long (a refused connect
_unreachable = {"until": 0.0, "why": ""}  # retries for ~18 s; the Runs tab polls every 1.5 s)


class SlurmError(LaunchError):
    """Slurm cannot be used as asked (not installed, not reachable, a refused job); the message says why."""


@dataclass(frozen=True)
class SlurmOptions:
    """Where and how big the job is: what ``ftstudio submit`` and the Train tab's Slurm fields ask."""

    partition: str | None = None  # Slurm partition (default: the cluster's default partition)
    nodes: int = 1  # machines
    gpus_per_node: int = 0  # GPUs per machine (0: a CPU job)
    ntasks_per_node: int | None = None  # ranks per machine (default: one per GPU, else 1)
    time: str | None = None  # time limit: MINUTES, HH:MM:SS, D-HH:MM[:SS] (default: the partition's)
    account: str | None = None  # account to charge
    chdir: str | None = None  # the job's working folder; relative data paths read from here (default: ours)

    @property
    def tasks_per_node(self) -> int:
        return self.ntasks_per_node or max(self.gpus_per_node, 1)

    def check(self) -> None:
        """Raise SlurmError naming the field and what it accepts."""
        for name, value in (("partition", self.partition), ("account", self.account)):
            if value is not None and not _PLAIN.match(value):
                raise SlurmError(f"--{name} {value!r}: use a plain name (letters, digits, '_', '-', '.')")
        for name, value, least in (("nodes", self.nodes, 1), ("gpus-per-node", self.gpus_per_node, 0),
                                   ("ntasks-per-node", self.ntasks_per_node, 1)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < least):
                raise SlurmError(f"--{name} {value!r}: give a whole number of at least {least}")
        if self.time is not None and not _TIME.match(self.time):
            raise SlurmError(f"--time {self.time!r}: use Slurm's formats, e.g. 90 (minutes), 02:00:00, 1-12:00")
        if self.chdir is not None:
            _sbatch_path(self.chdir, "the job's working folder")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> "SlurmOptions":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in known})


@dataclass(frozen=True)
class JobState:
    """A job as Slurm reports it: its state word (PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, ...)
    and squeue's reason (why it waits, or why it ended)."""

    state: str
    reason: str = ""

    @property
    def waiting(self) -> bool:
        return self.state in WAITING

    @property
    def holding(self) -> bool:
        return self.state in HOLDING


def available() -> bool:
    """Whether this machine can submit to a Slurm cluster (``sbatch`` on PATH): the Train tab's "Where" choice."""
    return shutil.which("sbatch") is not None


def _sbatch_path(path, what: str) -> str:
    text = str(path)
    bad = sorted(_NOT_IN_SBATCH_LINES & set(text))
    if bad:
        shown = " ".join(repr(c) for c in bad)
        raise SlurmError(f"{what} {text!r}: an #SBATCH line cannot hold {shown}; use a folder without them")
    return text


def sbatch_script(run: RunDir | str | os.PathLike, options: SlurmOptions, *, user: str, run_id: str | None = None,
                  deepspeed: str | None = None, resume: bool = False, python: str | None = None) -> str:
    """The job script of ``run`` (what ``<run>/sbatch.sh`` holds): ``#SBATCH`` lines, then ``srun`` of one
    ``ftstudio train --launcher slurm`` per task. ``run_id`` None makes a preview (``submit`` fills it in);
    ``deepspeed`` is a shipped config's name or a .json path; ``resume`` continues the run's last checkpoint."""
    options.check()
    run = run if isinstance(run, RunDir) else RunDir(run)
    folder = _sbatch_path(run.path, "run folder")
    chdir = _sbatch_path(options.chdir or os.getcwd(), "the job's working folder")
    python = python or sys.executable
    q = shlex.quote
    lines = ["#!/bin/bash",
             f"# Finetune Studio run {run.name}, written for sbatch {now()}. It is followed through this",
             "# folder and squeue/sacct; `ftstudio abort RUN` (or the studio) stops it: scancel --signal=TERM.",
             f"#SBATCH --job-name={q('ftstudio-' + run.name)}",
             f"#SBATCH --output={q(folder + '/slurm-%j.out')}",
             f"#SBATCH --chdir={q(chdir)}",
             f"#SBATCH --nodes={options.nodes}",
             f"#SBATCH --ntasks-per-node={options.tasks_per_node}"]
    if options.gpus_per_node > 0:
        lines.append(f"#SBATCH --gpus-per-node={options.gpus_per_node}")
    for name, value in (("time", options.time), ("partition", options.partition), ("account", options.account)):
        if value:
            lines.append(f"#SBATCH --{name}={value}")  # checked: plain names, a Slurm time
    lines.append("#SBATCH --export=ALL")
    train = ["-m", "backend.cli", "train", str(run.config_file if resume else run.requested_file),
             "--launcher", "slurm", "--work-dir", str(run.path), "--quiet"]
    train += (["--deepspeed", deepspeed] if deepspeed else []) + (["--resume"] if resume else [])
    lines += ["set -eu",
              f"PY={q(python)}",
              'if [ ! -x "$PY" ]; then',
              '    echo "ftstudio submit: error: $PY: not found on $(hostname); the nodes need this Python environment'
              ' (on a shared file system)" >&2',
              "    exit 2",
              "fi",
              "unset NPROC_PER_NODE NNODES NODE_RANK ADDR PORT  # the shape is Slurm's: one task is one rank",
              f"export {QUEUED_ENV}={q(run_id or 'RUN-ID')} {RUN_USER_ENV}={q(user)}",
              'exec srun --kill-on-bad-exit=1 "$PY" ' + shlex.join(train)]
    return "\n".join(lines) + "\n"


def deepspeed_arg(deepspeed: str | None, guard: Guard) -> str | None:
    """A shipped DeepSpeed config's name as it is, a custom .json as its checked absolute path."""
    if not deepspeed or deepspeed in DEEPSPEED_NAMES:
        return deepspeed or None
    path = guard.readable(deepspeed, "--deepspeed", must_exist=True, hub=False)
    return str(resolve_deepspeed(path))


def _submit_env() -> dict:
    """sbatch's environment: ours (the job inherits it: --export=ALL), less what would silently override the
    script we showed (SBATCH_* options) or confuse the job (SLURM_* of an allocation we may be inside;
    SLURM_CONF, which names the cluster, stays)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("SBATCH_", "SLURM_")) or k == "SLURM_CONF"}


def _slurm(cmd: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=SLURM_TIMEOUT_S, stdin=subprocess.DEVNULL,
                              env=_submit_env())
    except (OSError, subprocess.SubprocessError) as exc:
        raise SlurmError(f"{cmd[0]} could not run here ({exc}); is Slurm installed and its controller up?") from None


def _sbatch(run: RunDir) -> str:
    """Submit ``<run>/sbatch.sh``; record and return the job id. A refusal is recorded as the run's failure."""
    try:
        done = _slurm(["sbatch", "--parsable", str(run.sbatch_file)])
    except SlurmError as exc:
        error = str(exc)
    else:
        job_id = done.stdout.strip().split(";")[0]  # --parsable: ID or ID;CLUSTER
        if done.returncode == 0 and job_id.isdigit():
            # the job's launcher cannot write status.json this soon (Python starts, then checks the config and data)
            run.write_status(slurm_job_id=job_id)
            return job_id
        error = f"sbatch refused the job: {(done.stderr or done.stdout).strip() or f'exit code {done.returncode}'}"
    run.end("failed", 1, error)
    raise SlurmError(f"{error} (recorded in {run.path})")


def submit(cfg: Config, run_dir: str | os.PathLike, options: SlurmOptions, user: User, guard: Guard,
           deepspeed: str | None = None) -> str:
    """Submit a new run of ``cfg`` in the new folder ``run_dir`` to Slurm; returns the job id. The run reads
    "queued" (pending in Slurm) until its job starts training."""
    guard.require(user, "launch")
    run = RunDir(run_dir)
    if guard.confined and guard.new_run(run.name).path != run.path:  # a studio: a new run in its work directory
        raise GuardError(f"run folder {run_dir}: a studio submits runs only directly inside {guard.work_dir}")
    if not available():
        raise SlurmError("sbatch is not on PATH: this machine cannot submit to a Slurm cluster; train here instead")
    options = replace(options, chdir=options.chdir or os.getcwd())
    deepspeed = deepspeed_arg(deepspeed, guard)
    run_id = uuid.uuid4().hex
    script = sbatch_script(run, options, user=user.name, run_id=run_id, deepspeed=deepspeed)  # checks all values
    run.claim_new()
    run.write_requested(cfg.to_yaml())
    write_text(run.sbatch_file, script)
    run.start("queued", run_id=run_id, user=user.name, scheduler="slurm", slurm=options.to_dict(), started=now(),
              host=socket.gethostname(), launcher=None, workers=None, config=cfg.name, method=cfg.training.method,
              command=["sbatch", "--parsable", str(run.sbatch_file)])
    return _sbatch(run)


def resubmit(run: RunDir, user: User, guard: Guard, options: SlurmOptions | None = None,
             deepspeed: str | None = None) -> str:
    """Resume an ended submitted run from its last complete checkpoint, as a new Slurm job (by default in the
    shape it was submitted with); returns the new job id. The run keeps its owner."""
    guard.require(user, "control", run)
    status = effective_status(run)
    if status.get("scheduler") != "slurm":
        raise RunFolderError(f"run {run.name} was not submitted to Slurm; resume it where it ran (ftstudio train "
                             "--resume)")
    if status.get("state") in ACTIVE:
        raise RunFolderError(f"run {run.name} is still {status['state']}; abort it first, or let it end")
    if run.latest_checkpoint() is None:
        raise RunFolderError(f"run {run.name} has no complete checkpoint to resume from; submit it anew")
    if not available():
        raise SlurmError("sbatch is not on PATH: this machine cannot submit to a Slurm cluster")
    options = options or SlurmOptions.from_dict(status.get("slurm"))
    options = replace(options, chdir=options.chdir or os.getcwd())
    script = sbatch_script(run, options, user=user.name, run_id=status.get("run_id"),
                           deepspeed=deepspeed_arg(deepspeed, guard), resume=True)
    write_text(run.sbatch_file, script)
    run.clear_stop()  # the abort that ended it; a stop asked while the new job waits is kept for its launcher
    run.clear_result()
    run.start("queued", slurm=options.to_dict(), launcher=None, workers=None, slurm_job_id=None,
              command=["sbatch", "--parsable", str(run.sbatch_file)])
    return _sbatch(run)


def job_state(job_id: str) -> JobState | None:
    """The job's state as Slurm knows it now; None once Slurm has forgotten it (ended longer than MinJobAge
    ago, and no accounting). Raises SlurmError when Slurm cannot be asked."""
    _check_job_id(job_id)
    if time.monotonic() < _unreachable["until"]:
        raise SlurmError(_unreachable["why"])
    try:
        out = _slurm(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T|%r"])
        if out.returncode != 0 and "invalid job id" not in out.stderr.lower():
            raise SlurmError(f"squeue: {out.stderr.strip() or f'exit code {out.returncode}'}")
    except SlurmError as exc:
        _unreachable.update(until=time.monotonic() + UNREACHABLE_S, why=f"{exc} (asked again in a minute)")
        raise
    if out.returncode == 0 and out.stdout.strip():
        state, _, reason = out.stdout.strip().splitlines()[0].partition("|")
        return JobState(state.strip(), reason.strip())
    acct = _slurm(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "State,ExitCode"])
    rows = acct.stdout.strip().splitlines() if acct.returncode == 0 else []  # no accounting: an error, no rows
    if rows and rows[0].strip():
        state, _, code = rows[0].partition("|")
        return JobState(state.split()[0], f"exit code {code.strip()}")  # "CANCELLED by 0" -> CANCELLED
    return None


def _check_job_id(job_id: str) -> None:
    if not str(job_id).isdigit():
        raise SlurmError(f"Slurm job {job_id!r} is not a job id")


def job_is_ours(job_id: str, run: RunDir | None = None) -> tuple[bool, str]:
    """(proven, why not): the job is the machine user's, and runs this very run's ``sbatch.sh`` (a submitted
    run) or ``ftstudio`` itself (an ``srun ftstudio train`` job). A job id in a file is data, not proof."""
    _check_job_id(job_id)
    out = _slurm(["squeue", "-h", "-j", job_id, "-o", "%u|%o"])  # pending or running jobs only: signallable ones
    me = getpass.getuser()
    user, _, command = out.stdout.strip().partition("|")
    if run is not None and run.status().get("scheduler") == "slurm":
        ours = command == str(run.sbatch_file)
    else:
        ours = "ftstudio" in command or "backend" in command
    if out.returncode != 0 or user != me or not ours:
        return False, f"Slurm job {job_id} is not a Finetune Studio job of {me}; not signalled"
    return True, ""


def cancel(job_id: str, run: RunDir | None = None, *, graceful: bool = True) -> tuple[bool, str]:
    """``scancel --signal=TERM`` (graceful: the job's tasks save and stop) or plain ``scancel`` (a job that
    has not started), only of a job proven ours. Returns (sent, what happened, in words)."""
    try:
        ours, why = job_is_ours(job_id, run)
        if not ours:
            return False, why
        cmd = ["scancel", "--signal=TERM", job_id] if graceful else ["scancel", job_id]
        done = _slurm(cmd)
    except SlurmError as exc:
        return False, f"{exc}; the stop request in the run folder still applies"
    return done.returncode == 0, f"{shlex.join(cmd)}: " + ("sent" if done.returncode == 0 else done.stderr.strip())


# --- following a submitted run (rundir.effective_status asks this) ---------------------------------


def follow_submitted(run: RunDir, status: dict) -> dict:
    """A submitted run not followed through a live launcher here: its Slurm job says where it stands.
    PENDING reads "queued" with Slurm's reason; a job that ended while status.json still says queued or
    running (its launcher never ran, or was killed) is recorded as ended, with the error from its logs."""
    job_id = str(status.get("slurm_job_id") or "")
    if not job_id:
        return {**status, "note": "being submitted to Slurm"}
    try:
        job = job_state(job_id)
    except SlurmError as exc:
        return {**status, "note": f"Slurm job {job_id}: cannot ask Slurm from here ({exc})"}
    if job is not None and job.waiting:
        return {**status, "state": "queued", "note": f"pending in Slurm ({job.reason or job.state}), job {job_id}"}
    if job is not None and job.holding:
        host = (status.get("launcher") or {}).get("host")
        where = {"remote": host} if host and host != procs.hostname() else {}
        doing = "running" if status["state"] == "running" else "started; checking the config and data"
        return {**status, **where, "note": f"Slurm job {job_id} {doing} ({job.state.lower()})"}
    return _record_slurm_end(run, job_id, job.state if job else None)


def _record_slurm_end(run: RunDir, job_id: str, slurm_state: str | None) -> dict:
    status = run.status()  # again: the launcher may have recorded the end meanwhile
    if status.get("state") not in ACTIVE:
        return status
    result = run.result()
    if status["state"] == "running" and result.get("state") in ENDED:
        state, code, error = result_outcome(result)
    elif run.stop_requested() or slurm_state == "CANCELLED":
        state, code, error = "aborted", ABORTED_EXIT, None  # asked to stop, or cancelled in Slurm (scancel)
    else:
        state, code = "failed", 1
        error = _slurm_error(run, job_id, status["state"], slurm_state)
    extra = result_phases(result)  # rank 0's phases, as the launcher would have copied them
    try:
        return run.end(state, code, error, **extra)
    except OSError:
        return {**status, "state": state, "exit_code": code, "error": error, **extra}


def _slurm_error(run: RunDir, job_id: str, was: str, slurm_state: str | None) -> str:
    """Why a submitted run failed: Slurm's time limit, else the error its logs show (the workers' train.log
    once it ran; the job's own output, where the launcher says what it refused), else the job's end."""
    if slurm_state == "TIMEOUT":
        return (f"Slurm job {job_id} reached its time limit (--time) before the run recorded its end; resume it "
                "from its last checkpoint, with a longer --time")
    found = last_error(run.train_log) if was == "running" else None
    found = found or last_error(run.slurm_output(job_id), skip=("srun:", "slurmstepd:"))
    if found:
        return found
    if slurm_state is None:
        return f"Slurm job {job_id} is gone (Slurm no longer lists it) and the run recorded no end"
    return f"Slurm job {job_id} ended {slurm_state} and the run recorded no end; see {run.slurm_output(job_id)}"


FOLLOWERS["slurm"] = follow_submitted
