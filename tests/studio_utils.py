"""Start the real studio (``python app.py``) in a subprocess for a test."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_studio(work_dir: Path, *args: str, timeout: float = 180, env: dict | None = None,
                   abort_runs: bool = True):
    """Yield (url, process); the studio is stopped afterwards (its runs keep their folders) and, unless
    ``abort_runs`` is False, the work directory's active runs are aborted. ``env``: extra variables (a Slurm
    job's own SLURM_* variables are never passed on, but SLURM_CONF may be given here)."""
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, **(env or {})}
    env["GRADIO_ANALYTICS_ENABLED"] = "False"
    log = open(work_dir.parent / f"studio-{port}.log", "wb")
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--work-dir", str(work_dir), *args],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"the studio exited ({proc.returncode}):\n{Path(log.name).read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except urllib.error.HTTPError:
                break  # it answers (e.g. 401 behind auth)
            except OSError:
                if time.time() > deadline:
                    raise AssertionError(f"the studio did not start:\n{Path(log.name).read_text()[-3000:]}")
                time.sleep(0.3)
        yield url, proc
    finally:
        from backend.core.rundir import RunDir
        from backend.runs import abort, active_runs

        for run in active_runs(work_dir) if abort_runs else []:  # runs outlive the studio by design; not a test's
            abort(RunDir(run["run_dir"]))
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def wait_for(predicate, timeout: float = 300, every: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    return None
