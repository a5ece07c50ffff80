"""Faults, for real: the launcher or a worker killed with SIGKILL, a full disk
(a small tmpfs), abort during a save, abort of a multi-rank run. Each checks
the state shown, that Abort still works (or says truthfully that there is
nothing left to abort), that the exit code recorded is the one returned, and
a complete checkpoint at the abort step."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from backend.core import procs
from backend.core.artifacts import read_iter
from backend.core.rundir import COMPLETE_MARK, RunDir, effective_status
from backend.runs import abort
from studio_utils import wait_for
from train_utils import FTSTUDIO, ftstudio

ARGS = ["tiny_demo", "training.max_steps=3000", "saving.save_steps=25", "saving.save_total_limit=-1",
        "evaluation.inputs=[]"]


def start(tmp_path, run: RunDir, *extra, env=None) -> subprocess.Popen:
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith("SLURM_") and k not in ("NPROC_PER_NODE", "NNODES", "NODE_RANK", "ADDR", "PORT")}
    return subprocess.Popen([FTSTUDIO, "train", *ARGS, *extra, "--work-dir", str(run.path), "--quiet"], cwd=tmp_path,
                            env={**full_env, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_steps(run: RunDir, proc: subprocess.Popen, steps: int) -> None:
    ok = wait_for(lambda: proc.poll() is not None or len(run.metrics()) >= steps, timeout=300, every=0.05)
    assert ok and proc.poll() is None, (proc.communicate()[1][-3000:] if proc.poll() is not None else "too slow")


def assert_saved_at_abort_step(run: RunDir) -> int:
    """Aborted, with a complete checkpoint (Trainer's and iter_<N>.pth) at the last step trained."""
    st = run.status()
    assert st["state"] == "aborted" and st["exit_code"] == 143, st
    last = run.metrics()[-1]["step"]
    assert run.checkpoints()[-1][0] == last, (run.checkpoints(), last)
    step, path = run.iters()[-1]
    assert step == last and read_iter(path).meta["step"] == last
    assert all((p / COMPLETE_MARK).is_file() for p in run.checkpoints_dir.glob("checkpoint-*"))
    assert not list(run.path.glob(".*.tmp")), "a half-written file was left"
    return last


def test_launcher_killed_the_run_goes_on_and_abort_still_saves(tmp_path, tiny_model):
    run = RunDir(tmp_path / "run")
    proc = start(tmp_path, run)
    wait_steps(run, proc, 10)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    st = effective_status(run)
    assert st["state"] == "running" and "following the workers" in st["note"], st
    listed = ftstudio("runs", "--work-dir", tmp_path, cwd=tmp_path)
    assert listed.stdout.startswith("running"), listed.stdout
    before = len(run.metrics())
    assert wait_for(lambda: len(run.metrics()) > before + 5, timeout=120)  # still training, without its launcher
    asked = ftstudio("abort", run.path, cwd=tmp_path)
    assert asked.returncode == 0 and "save a checkpoint" in asked.stdout, asked.stdout + asked.stderr
    assert wait_for(lambda: effective_status(run).get("state") == "aborted", timeout=300), run.status()
    assert_saved_at_abort_step(run)
    assert ftstudio("abort", run.path, cwd=tmp_path).returncode == 1  # nothing left to abort, and it says so


def test_worker_killed_the_run_fails_and_says_how(tmp_path, tiny_model):
    run = RunDir(tmp_path / "run")
    proc = start(tmp_path, run)
    wait_steps(run, proc, 5)
    os.kill(run.status()["workers"]["pid"], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    st = run.status()
    assert proc.returncode == st["exit_code"] == 137, (proc.returncode, st)
    assert st["state"] == "failed" and "SIGKILL" in st["error"], st
    assert "Traceback" not in err
    said = ftstudio("abort", run.path, cwd=tmp_path)
    assert said.returncode == 1 and "not running (failed)" in said.stderr


def test_a_rank_killed_under_torchrun_fails_the_run(tmp_path, tiny_model):
    run = RunDir(tmp_path / "run")
    proc = start(tmp_path, run, env={"NPROC_PER_NODE": "2"})
    wait_steps(run, proc, 5)
    ranks = procs.descendants(run.status()["workers"]["pid"])
    assert len(ranks) >= 2, ranks
    os.kill(ranks[-1], signal.SIGKILL)
    proc.communicate(timeout=300)
    st = effective_status(run)
    assert st["state"] == "failed" and st["error"], st
    assert proc.returncode == st["exit_code"] != 0


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MB tmpfs: room for the run's files, not for its first checkpoint."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.fail(f"this test needs to mount a small tmpfs (root, as in CI): {mounted.stderr}", pytrace=False)
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_full_disk_fails_the_run_and_says_where(tmp_path, tiny_model, small_disk):
    run = RunDir(small_disk / "run")
    proc = start(tmp_path, run, "saving.save_steps=10")
    _, err = proc.communicate(timeout=600)
    st = run.status()
    assert proc.returncode == st["exit_code"] == 1, (proc.returncode, st, err[-2000:])
    assert st["state"] == "failed" and "no space left on device at" in st["error"], st
    assert "Traceback" not in err, err[-2000:]
    assert effective_status(run)["state"] == "failed"


def test_abort_during_a_save_still_leaves_a_complete_checkpoint(tmp_path, tiny_model):
    run = RunDir(tmp_path / "run")
    proc = start(tmp_path, run, "saving.save_steps=5")
    wait_steps(run, proc, 1)

    def saving():
        return any(not (p / COMPLETE_MARK).exists() for p in run.checkpoints_dir.glob("checkpoint-*")) or \
            any(run.path.glob(".iter_*.tmp"))

    assert wait_for(saving, timeout=300, every=0.002), "never saw a save in progress"
    os.kill(proc.pid, signal.SIGTERM)  # what Ctrl-C at the launcher sends: asks the ranks to save and stop
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    assert_saved_at_abort_step(run)


def test_abort_of_a_multi_rank_run(tmp_path, tiny_model):
    run = RunDir(tmp_path / "run")
    proc = start(tmp_path, run, env={"NPROC_PER_NODE": "2"})
    wait_steps(run, proc, 8)
    asked, said = abort(run)
    assert asked, said
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143 == run.status()["exit_code"], err[-3000:]
    step = assert_saved_at_abort_step(run)
    log = run.train_log.read_text()
    for rank in (0, 1):
        assert f"[rank {rank}] abort: saving at step {step}, then stopping" in log
    assert not procs.ProcessRecord.from_dict(run.status()["workers"]).matches()  # the ranks ended too
