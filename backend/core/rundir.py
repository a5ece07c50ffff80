"""The run folder: the only place where a training run and its observers meet,
and the one module that spells its file names and moves its state.

    config.yaml      the resolved config that runs (written before any rank starts)
    requested.yaml   what the studio asked for; the launcher resolves it into config.yaml
    launch.json      the launch shape (launcher, processes per node, nodes, address,
                     port, DeepSpeed), so a resume reproduces it exactly
    deepspeed.json   a copy of the DeepSpeed config that ran (custom files too)
    status.json      state, the processes that run it (``procs.ProcessRecord``),
                     times, exit code, error
    result.json      how the ranks ended (rank 0 writes it; the launcher, or
                     whoever follows the run when the launcher is gone, reads it)
    stop.json        an abort request: the ranks agree on a step, save there, stop
    launcher.log     the launcher's own output (studio runs)
    sbatch.sh        the job script of a run submitted to Slurm (``backend.slurm``);
    slurm-<job>.out  that job's output (the launchers' own lines: a refused config, ...)
    train.log        every rank's output       metrics.jsonl / samples.jsonl (rank 0)
    iter_<N>.pth     see ``backend.core.artifacts``
    checkpoints/checkpoint-<N>/   Trainer's resumable state, with a COMPLETE mark once whole
    trackers/        where TensorBoard, MLflow, W&B or trackio log the run (``training.report_to``)
    evals/<name>.json   benchmark results (``ftstudio eval``), one file per model and task set
    .space-reserve   a few bytes given back to record the end of a run on a full disk

States: queued -> running -> finished | failed | aborted, or queued -> failed |
aborted; only a resume starts an ended run again. ``effective_status`` keeps
status.json true after faults: a launcher killed with SIGKILL while its
workers train on (the run is followed through them), workers killed, a reboot.
"""

from __future__ import annotations

import errno
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import procs
from .artifacts import list_iters
from .atomic import read_json, write_json, write_text

STATES = ("queued", "running", "finished", "failed", "aborted")
ACTIVE = ("queued", "running")
ENDED = ("finished", "failed", "aborted")
CONFIG, REQUESTED, LAUNCH, DEEPSPEED = "config.yaml", "requested.yaml", "launch.json", "deepspeed.json"
STATUS, RESULT, STOP = "status.json", "result.json", "stop.json"
TRAIN_LOG, LAUNCHER_LOG = "train.log", "launcher.log"
SBATCH = "sbatch.sh"
METRICS, SAMPLES = "metrics.jsonl", "samples.jsonl"
CHECKPOINTS, COMPLETE_MARK = "checkpoints", "COMPLETE"
TRACKERS, EVALS = "trackers", "evals"
RESERVE = ".space-reserve"
ABORTED_EXIT = 143  # an aborted run exits like a process stopped by SIGTERM
RESERVE_BYTES = 1 << 20
# folders of a work directory that are never runs, whatever they hold
UPLOADS, CONFIGS = "uploads", "configs"
SERVE_STATE = ".serve"  # the serving API's credentials (backend.serve.credentials): never read or written by users
QUEUE = ".queue"  # tickets of runs waiting for their devices (backend.devices.queue), one file a run
NOT_RUNS = (UPLOADS, CONFIGS, SERVE_STATE, QUEUE)
_CKPT = re.compile(r"^checkpoint-(\d+)$")


class RunFolderError(ValueError):
    """A folder that cannot be used as asked (it holds another run, it is not a run, ...)."""


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def read_jsonl(path) -> list[dict]:
    """Complete JSON lines of a file (a line still being written is skipped)."""
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.endswith("\n"):
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        pass
    except OSError:
        pass
    return out


def checkpoint_step(path: str | os.PathLike) -> int | None:
    m = _CKPT.match(Path(path).name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path).absolute())

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def name(self) -> str:
        return self.path.name

    config_file = property(lambda self: self.path / CONFIG)
    requested_file = property(lambda self: self.path / REQUESTED)
    deepspeed_file = property(lambda self: self.path / DEEPSPEED)
    train_log = property(lambda self: self.path / TRAIN_LOG)
    launcher_log = property(lambda self: self.path / LAUNCHER_LOG)
    sbatch_file = property(lambda self: self.path / SBATCH)
    metrics_file = property(lambda self: self.path / METRICS)
    samples_file = property(lambda self: self.path / SAMPLES)
    checkpoints_dir = property(lambda self: self.path / CHECKPOINTS)
    trackers_dir = property(lambda self: self.path / TRACKERS)
    evals_dir = property(lambda self: self.path / EVALS)

    # --- what it is -----------------------------------------------------------------

    def is_run(self) -> bool:
        """A folder with our status record in it (a regular file naming a known state)."""
        status = self.path / STATUS
        return status.is_file() and not status.is_symlink() and read_json(status).get("state") in STATES

    def claim_new(self) -> None:
        """Make this folder a new run's: it must not exist yet, or be empty."""
        if self.path.is_symlink() or (self.path.exists() and not self.path.is_dir()):
            raise RunFolderError(f"{self.path}: exists and is not a folder; give a new run folder")
        if self.is_run():
            st = self.status()
            raise RunFolderError(f"{self.path} holds an earlier run ({st.get('state')}, started {st.get('started')}); "
                                 "a new run needs a new folder (--work-dir NEW), or continue it with --resume")
        if self.path.is_dir() and any(self.path.iterdir()):
            raise RunFolderError(f"{self.path} is not empty; a new run needs a new or empty folder")
        self.path.mkdir(parents=True, exist_ok=True)
        self.reserve_space()

    def reserve_space(self) -> None:
        """Hold a little disk space back, to record the end of this run even on a full disk."""
        try:
            with open(self.path / RESERVE, "wb") as f:
                f.write(b"\0" * RESERVE_BYTES)
        except OSError:
            (self.path / RESERVE).unlink(missing_ok=True)

    def _write(self, name: str, data: dict) -> None:
        try:
            write_json(self.path / name, data)
        except OSError as exc:
            if exc.errno != errno.ENOSPC or not (self.path / RESERVE).exists():
                raise
            (self.path / RESERVE).unlink()  # the disk is full: spend the reserve on the record
            write_json(self.path / name, data)

    # --- status ---------------------------------------------------------------------

    def status(self) -> dict:
        return read_json(self.path / STATUS)

    def write_status(self, **fields) -> dict:
        status = {**self.status(), **fields}
        self._write(STATUS, status)
        return status

    def start(self, state: str, **fields) -> dict:
        """A (re)start: queued or running, from nothing, queued, or an ended run (resume)."""
        current = self.status().get("state")
        if state not in ACTIVE or (current == "running" and state == "queued"):
            raise RunFolderError(f"{self.path}: cannot go from {current} to {state}")
        return self.write_status(state=state, ended=None, exit_code=None, error=None, **fields)

    def end(self, state: str, exit_code: int, error: str | None = None, **fields) -> dict:
        if state not in ENDED:
            raise ValueError(f"not an end state: {state}")
        return self.write_status(state=state, ended=now(), exit_code=exit_code, error=error, **fields)

    # --- result (written by rank 0) and stop requests ---------------------------------

    def write_result(self, state: str, error: str | None, exit_code: int, phases: dict | None = None) -> None:
        """``phases``: rank 0's seconds per phase (``backend.train.phases``), kept with the result."""
        record = {"state": state, "error": error, "exit_code": exit_code, "time": time.time()}
        if phases:
            record["phases"] = phases
        self._write(RESULT, record)

    def result(self) -> dict:
        return read_json(self.path / RESULT)

    def clear_result(self) -> None:
        (self.path / RESULT).unlink(missing_ok=True)

    def request_stop(self, by: str = "") -> None:
        self._write(STOP, {"requested": now(), "by": by})

    def stop_requested(self) -> bool:
        return (self.path / STOP).is_file()

    def clear_stop(self) -> None:
        (self.path / STOP).unlink(missing_ok=True)

    # --- config and launch shape ------------------------------------------------------

    def write_config(self, text: str) -> None:
        write_text(self.config_file, text)

    def write_requested(self, text: str) -> Path:
        return write_text(self.requested_file, text)

    def write_launch(self, shape: dict) -> None:
        self._write(LAUNCH, shape)

    def launch(self) -> dict:
        return read_json(self.path / LAUNCH)

    # --- metrics and samples ----------------------------------------------------------

    def append_jsonl(self, name: str, rows: list[dict]) -> None:
        with open(self.path / name, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

    def append_metric(self, row: dict) -> None:
        self.append_jsonl(METRICS, [row])

    def append_samples(self, rows: list[dict]) -> None:
        self.append_jsonl(SAMPLES, rows)

    def metrics(self) -> list[dict]:
        return read_jsonl(self.metrics_file)

    def samples(self) -> list[dict]:
        return read_jsonl(self.samples_file)

    def truncate_after(self, step: int) -> None:
        """On resume: drop metric/sample lines past the checkpoint (the resumed run writes them again)."""
        for name in (METRICS, SAMPLES):
            path = self.path / name
            if path.exists():
                rows = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
                write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

    # --- benchmark results ------------------------------------------------------------

    def write_eval(self, name: str, result: dict) -> Path:
        """evals/<name>.json, written whole (temp, then rename); ``name`` is a plain file stem."""
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,120}", name or ""):
            raise RunFolderError(f"evaluation name {name!r}: use letters, digits, '.', '_' or '-'")
        self.evals_dir.mkdir(exist_ok=True)
        path = self.evals_dir / f"{name}.json"
        write_json(path, result)
        return path

    def evals(self) -> list[dict]:
        """Every stored benchmark result, oldest first (unreadable files skipped)."""
        if not self.evals_dir.is_dir():
            return []
        found = [(p.stat().st_mtime, p) for p in self.evals_dir.glob("*.json") if p.is_file()]
        out = []
        for _, p in sorted(found):
            data = read_json(p)
            if data:
                out.append({**data, "name": p.stem})
        return out

    # --- checkpoints ------------------------------------------------------------------

    def iters(self) -> list[tuple[int, Path]]:
        return list_iters(self.path)

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints_dir / f"checkpoint-{int(step)}"

    def mark_complete(self, step: int) -> None:
        folder = self.checkpoint_dir(step)
        if folder.is_dir():
            write_text(folder / COMPLETE_MARK, str(step))

    def checkpoints(self) -> list[tuple[int, Path]]:
        """(step, folder) of every complete resumable checkpoint, oldest first."""
        out = []
        if self.checkpoints_dir.is_dir():
            for p in self.checkpoints_dir.iterdir():
                step = checkpoint_step(p)
                if step is not None and (p / COMPLETE_MARK).is_file():
                    out.append((step, p))
        return sorted(out)

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1][1] if found else None

    def prune_iters(self, keep: int, up_to: int) -> None:
        """save_total_limit for iter files: keep the newest ``keep`` at or before step ``up_to``."""
        mine = [(s, p) for s, p in self.iters() if s <= up_to]
        for _, old in mine[:-keep]:
            old.unlink(missing_ok=True)

    # --- logs -------------------------------------------------------------------------

    def slurm_output(self, job_id: str) -> Path:
        """The output file of Slurm job ``job_id`` (``#SBATCH --output=<run>/slurm-%j.out``)."""
        return self.path / f"slurm-{int(job_id)}.out"

    def log_file(self) -> Path:
        """train.log once the ranks started, launcher.log before."""
        return self.train_log if self.train_log.exists() else self.launcher_log

    def append_log(self, text: str) -> None:
        with open(self.train_log, "a", encoding="utf-8") as f:
            f.write(text)


# --- the truth about a run ---------------------------------------------------------------


WORKER_MODULE = "backend.train.worker"


def is_launcher_command(argv) -> bool:
    """``ftstudio train ...`` (or ``python -m backend.cli train ...``): a launcher of ours."""
    argv = list(argv)
    return "train" in argv and ("backend.cli" in argv or any(Path(a).name == "ftstudio" for a in argv[:2]))


def is_worker_command(argv, run: "RunDir") -> bool:
    """A rank (or torchrun over ranks) of this very run: the worker module with this run folder."""
    return WORKER_MODULE in argv and str(run.path) in argv


def _alive(record, run: "RunDir", launcher: bool) -> bool:
    """The recorded process is running now, is the very process recorded, and is one of ours for this run."""
    rec = procs.ProcessRecord.from_dict(record)
    if rec is None or not rec.matches():
        return False
    return is_launcher_command(rec.argv) if launcher else is_worker_command(rec.argv, run)


# scheduler name -> fn(run, status) -> the status as the scheduler tells it (registered by the module that
# submits to it, e.g. backend.slurm; the core never imports what sits above it)
FOLLOWERS: dict = {}


def effective_status(run: RunDir) -> dict:
    """status.json as it is true now. A queued/running run on this machine whose
    launcher and workers are both gone (SIGKILL, OOM, a reboot) ended: how is
    read off result.json, else it failed; the correction is written back.
    While the workers still train, the run is running even if its launcher died.
    A run submitted to a scheduler whose launcher is not alive here asks the
    scheduler's follower (``FOLLOWERS``; ``backend.slurm`` registers Slurm's);
    no other run ever runs a command."""
    status = run.status()
    if status.get("state") not in ACTIVE:
        return status
    launcher, workers = status.get("launcher") or {}, status.get("workers") or {}
    if status.get("scheduler") and not _alive(launcher, run, launcher=True):
        follow = FOLLOWERS.get(status["scheduler"])
        if follow is None:
            return {**status, "note": f"submitted to {status['scheduler']}; its state cannot be read here"}
        return follow(run, status)
    record = procs.ProcessRecord.from_dict(launcher)
    if record is not None and not record.local and record.host != procs.hostname():
        return {**status, "remote": record.host}  # another machine: its own channel tells (see runs.abort)
    if _alive(launcher, run, launcher=True):
        return status
    if _alive(workers, run, launcher=False):
        return {**status, "note": "the launcher is gone; following the workers"}
    return _record_end(run)


def result_phases(result: dict) -> dict:
    """status.json's ``phases`` field from rank 0's result.json (its seconds per phase), or nothing."""
    return {"phases": result["phases"]} if isinstance(result.get("phases"), dict) else {}


def _record_end(run: RunDir) -> dict:
    status = run.status()  # again: the launcher may have recorded the end meanwhile
    if status.get("state") not in ACTIVE:
        return status
    result = run.result()
    extra = result_phases(result)
    if status["state"] == "running" and result.get("state") in ENDED:
        state, code, error = result_outcome(result)
    elif status["state"] == "queued" and run.stop_requested():
        state, code, error = "aborted", ABORTED_EXIT, None  # stopped, as asked, before training began
    elif status["state"] == "queued":
        state, code = "failed", 1
        error = last_error(run.launcher_log) or "the launcher stopped before training began"
    else:
        state, code = "failed", 1
        error = ("the launcher and the workers are gone without a result (killed with SIGKILL, out of memory, "
                 "or the machine restarted); resume from the last checkpoint")
    try:
        return run.end(state, code, error, **extra)
    except OSError:
        return {**status, "state": state, "exit_code": code, "error": error}


def result_outcome(result: dict) -> tuple[str, int, str | None]:
    """(state, exit code, error) as rank 0's result.json tells how the ranks ended."""
    state = result["state"]
    code = 0 if state == "finished" else ABORTED_EXIT if state == "aborted" else int(result.get("exit_code") or 1)
    return state, code, result.get("error") if state == "failed" else None


def last_error(log: Path, lines: int = 12, skip: tuple[str, ...] = ()) -> str | None:
    """The last line of ``log`` that reads like an error, else its last lines; lines starting with one of
    ``skip`` (e.g. srun's own "srun: error: task 0: Exited with exit code 2") are passed over."""
    try:
        text = Path(log).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    text = [line for line in text if not line.startswith(skip)] if skip else text
    for i in range(len(text) - 1, -1, -1):
        if re.match(r"^\w*(Error|Exception)\b.*:", text[i]) or "error:" in text[i].lower():
            return text[i].strip()[:500]
    return "\n".join(text[-lines:])[-500:] or None


def list_runs(work_dir) -> list[RunDir]:
    """Every run folder directly under ``work_dir``, newest first."""
    root = Path(work_dir)
    if not root.is_dir():
        return []
    runs = [RunDir(p) for p in root.iterdir() if p.name not in NOT_RUNS and p.is_dir() and not p.is_symlink()]
    runs = [r for r in runs if r.is_run()]
    return sorted(runs, key=lambda r: str(r.status().get("started") or ""), reverse=True)


# --- reading while it grows --------------------------------------------------------------


class JsonlTail:
    """The rows of a growing JSON-lines file, read incrementally: each call
    reads only the bytes appended since the last one (what a live view
    polling every second needs), and starts over if the file was replaced."""

    def __init__(self, path):
        self.path = Path(path)
        self.rows: list[dict] = []
        self._pos = 0
        self._ino = None

    def read(self) -> tuple[list[dict], bool]:
        """(all rows so far, whether any row is new since the last call)."""
        try:
            st = self.path.stat()
        except OSError:
            changed = bool(self.rows)
            self.rows, self._pos, self._ino = [], 0, None
            return self.rows, changed
        if st.st_ino != self._ino or st.st_size < self._pos:
            self.rows, self._pos, self._ino = [], 0, st.st_ino
        if st.st_size == self._pos:
            return self.rows, False
        with open(self.path, "rb") as f:
            f.seek(self._pos)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1  # a line still being written waits for the next call
        before = len(self.rows)
        for line in chunk[:end].splitlines():
            try:
                self.rows.append(json.loads(line))
            except ValueError:
                pass
        self._pos += end
        return self.rows, len(self.rows) != before


def tail_text(path, max_bytes: int = 20000) -> str:
    """The end of a text file (whole lines), for log views."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    if size > max_bytes and "\n" in text:
        text = text.split("\n", 1)[1]
    return text


@dataclass
class Summary:
    """What a view shows of a run, computed from its folder alone."""

    state: str
    step: int | None = None
    max_steps: int | None = None
    loss: float | None = None
    tokens_per_s: float | None = None
    elapsed_s: float | None = None
    left_s: float | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)


def speed(rows: list[dict]) -> float | None:
    """Tokens/s over the recent steps (one step's figure jumps around)."""
    recent = sorted(r["tokens_per_s"] for r in rows[-20:] if r.get("tokens_per_s"))
    return recent[len(recent) // 2] if recent else None


def summarize(status: dict, rows: list[dict]) -> Summary:
    s = Summary(state=status.get("state", "?"), error=status.get("error") if status.get("state") == "failed" else None)
    if rows:
        last = rows[-1]
        s.step, s.max_steps, s.loss = last.get("step"), last.get("max_steps"), last.get("loss")
        s.tokens_per_s, s.elapsed_s = speed(rows), last.get("elapsed_s")
        if s.state == "running" and s.max_steps and s.step and s.elapsed_s is not None:
            s.left_s = s.elapsed_s / s.step * (s.max_steps - s.step)
    for key in ("note", "remote"):
        if status.get(key):
            s.notes.append(status[key] if key == "note" else f"on host {status[key]}")
    return s
