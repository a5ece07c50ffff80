"""Device leases and the run queue, for real: two fake devices (the inventory's
one test seam, FTSTUDIO_FAKE_DEVICES) and a private lock folder, but real
launchers (``start_detached``, as the studio starts runs), real flocks, real
kill -9. Nothing waits a fixed time: every wait is a condition with a deadline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backend.config import load_config
from backend.core import procs
from backend.core.guard import Guard, GuardError, User
from backend.core.rundir import RunDir, effective_status
from backend.devices import leases, queue
from backend.devices.inventory import Device
from backend.launch import LaunchError, LaunchSpec, start_detached
from backend.runs import abort
from train_utils import ftstudio

# long enough to stay "running" for the whole test; the runs are aborted or killed, never waited out
LONG = ["training.max_steps=100000", "saving.save_steps=100000", "evaluation.inputs=[]"]


def wait_for(predicate, timeout: float, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")


@pytest.fixture
def devices(tmp_path, monkeypatch):
    """Two fake devices and a lock folder of this test's own (children inherit both)."""
    monkeypatch.setenv("FTSTUDIO_FAKE_DEVICES", "2")
    monkeypatch.setenv("FTSTUDIO_DEVICE_LOCKS", str(tmp_path / "locks"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two trainings at once on a small machine
    return tmp_path / "locks"


# --- leases -----------------------------------------------------------------------------


def test_leases_are_all_or_nothing_and_readable_by_anyone(devices):
    one = leases.acquire(["1"])
    assert one is not None and one.devices == ("1",)
    assert leases.acquire(["0", "1"]) is None  # 1 is held: nothing taken ...
    assert leases.holders() == {"0": False, "1": True}  # ... not even 0
    assert leases.acquire_any(["0", "1"], 2) is None and not leases.busy("0")
    other = leases.acquire_any(["1", "0"], 1)
    assert other.devices == ("0",)  # the first free one
    other.release()
    one.release()
    assert leases.holders() == {"0": False, "1": False}
    assert (devices.stat().st_mode & 0o7777) == 0o1777
    assert {p.name: p.stat().st_mode & 0o777 for p in devices.iterdir()} == {"0.lock": 0o644, "1.lock": 0o644}


def test_a_child_holding_the_lease_fds_keeps_the_devices(devices):
    lease = leases.acquire(["0", "1"])
    held = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE,
                            pass_fds=lease.fds)
    plain = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        lease.release()  # the parent lets go: the child that got the descriptors still holds both
        assert leases.holders() == {"0": True, "1": True}
        held.kill()  # SIGKILL: the kernel frees the locks with the process, no one cleans up
        held.wait(timeout=30)
        assert leases.holders() == {"0": False, "1": False}  # the child without them never held anything
    finally:
        for p in (held, plain):
            p.kill()
            p.wait(timeout=30)


def test_device_requests_are_checked_against_the_inventory(devices):
    assert leases.request("1,0", 1) == leases.DeviceRequest(("0", "1"), 2, False, "fake")
    assert leases.request(None, 2) == leases.DeviceRequest(("0", "1"), 2, True, "fake")
    assert leases.request("0", 1).child_env(["0"]) == {"CUDA_VISIBLE_DEVICES": "0"}
    with pytest.raises(leases.DeviceError, match=r"no device 2 on this machine; it has 0 \(fake\), 1 \(fake\)"):
        leases.request("0,2", 1)
    with pytest.raises(leases.DeviceError, match="NPROC_PER_NODE=2 asks for 2 processes"):
        leases.request("0", 2, "NPROC_PER_NODE=2")
    with pytest.raises(leases.DeviceError, match="3 processes need 3 devices"):
        leases.request("auto", 3)
    with pytest.raises(leases.DeviceError, match="each once"):
        leases.request("0,0", 1)
    cpu = [Device("cpu", "cpu", "some CPU (2 cores)", 4096, cores=2)]
    assert leases.request(None, 2, devices=cpu) == leases.DeviceRequest(("cpu",), 1, False, "cpu")
    assert leases.request("cpu", 1, devices=cpu).child_env(["cpu"]) == {}
    with pytest.raises(leases.DeviceError, match="no GPUs; its one device is 'cpu'"):
        leases.request("0", 1, devices=cpu)
    gpus = [Device("0", "gpu", "NVIDIA H200", 143771)]
    assert leases.request("0", 1, devices=gpus).child_env(["0"]) == {"CUDA_VISIBLE_DEVICES": "0",
                                                                       "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    cfg = load_config("tiny_demo")
    with pytest.raises(LaunchError, match="no device 7"):  # the studio hears of it at once, no run is made
        start_detached(cfg, devices.parent / "work" / "bad", devices="7")
    with pytest.raises(LaunchError, match="only for runs on this machine"):
        start_detached(cfg, devices.parent / "work" / "bad", devices="0", spec=LaunchSpec(launcher="slurm"))
    assert not (devices.parent / "work" / "bad").exists()


def test_a_ticket_whose_launcher_is_gone_is_stale_and_removed(devices, tmp_path):
    work = tmp_path / "work"
    run = RunDir(work / "ghost")
    run.claim_new()
    gone = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    record = procs.capture(gone.pid)
    gone.kill()
    gone.wait(timeout=30)
    run.start("queued", run_id="abc123", launcher=record.to_dict())
    ticket = queue.ticket_path(work, "abc123")
    ticket.parent.mkdir(parents=True)
    ticket.write_text(json.dumps({"run": "ghost", "run_id": "abc123", "devices": ["0"], "count": 1, "seq": 1,
                                  "user": "x", "launcher": record.to_dict()}))
    assert queue.entries(work) == [] and not ticket.exists()
    with pytest.raises(queue.QueueError, match="not waiting in the queue"):
        queue.move_up(work, run, User("x", "admin"), Guard.cli())


# --- runs: concurrency, queue, move up, cancel, kill -9 ----------------------------------


def _worker_env(run: RunDir) -> dict:
    """The environment the run's worker process really has (read from /proc)."""
    pid = run.status()["workers"]["pid"]
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def _state(run: RunDir) -> str | None:
    return effective_status(run).get("state")


def _order(work) -> list[tuple[str, int]]:
    return [(e["run"], e["position"]) for e in queue.entries(work)]


def _kill_run(run: RunDir) -> None:
    """SIGKILL the run's launcher and worker process groups, only if the records prove they are its."""
    status = run.status()
    for key in ("launcher", "workers"):
        record = procs.ProcessRecord.from_dict(status.get(key))
        if record is not None and record.matches():
            try:
                os.killpg(record.pid, signal.SIGKILL)  # each was started in its own session
            except ProcessLookupError:
                pass


@pytest.fixture
def started(tmp_path):
    """Launchers this test starts; whatever still runs at the end is killed (only ours, by record)."""
    launched: list[tuple[subprocess.Popen, RunDir]] = []
    yield launched
    for proc, run in launched:
        _kill_run(run)
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)


def test_runs_share_devices_through_leases_and_the_queue(devices, tmp_path, tiny_model, started):
    work = tmp_path / "work"
    cfg = load_config("tiny_demo", LONG)
    guard = Guard(work)
    runs = {name: RunDir(work / name) for name in "abcde"}

    def launch(name, device, user):
        started.append((start_detached(cfg, runs[name].path, devices=device, user=user), runs[name]))

    # two runs on disjoint devices train at the same time, each seeing only its own device
    launch("a", "0", "alice")
    launch("b", "1", "bob")
    wait_for(lambda: _state(runs["a"]) == "running" and _state(runs["b"]) == "running", 300,
             "a and b both running")
    assert _worker_env(runs["a"])["CUDA_VISIBLE_DEVICES"] == "0"
    assert _worker_env(runs["b"])["CUDA_VISIBLE_DEVICES"] == "1"
    assert runs["a"].status()["devices"] == ["0"] and runs["a"].status()["user"] == "alice"
    assert leases.holders() == {"0": True, "1": True}

    # two more for device 1 wait in line, in the order they came
    launch("c", "1", "carol")
    wait_for(lambda: _order(work) == [("c", 1)], 180, "c queued")
    launch("d", "1", "dave")
    wait_for(lambda: _order(work) == [("c", 1), ("d", 2)], 180, "d queued behind c")
    wait_for(lambda: runs["d"].status().get("queue_position") == 2, 30, "d's status says position 2")
    st = effective_status(runs["c"])
    assert st["state"] == "queued" and st["waiting_for"] == ["1"] and st["user"] == "carol", st
    entry = queue.entries(work)[0]
    assert entry["busy"] == ["1"] and entry["held_by"] == {"1": "b"}

    # a new process reads the same queue back from the files
    listed = ftstudio("queue", "--work-dir", work, cwd=tmp_path, check=True).stdout.splitlines()
    assert listed[1].split()[:4] == ["1", "c", "carol", "1"] and "held by b" in listed[1], listed
    assert listed[2].split()[:4] == ["2", "d", "dave", "1"] and "after c" in listed[2], listed
    table = ftstudio("runs", "--work-dir", work, cwd=tmp_path, check=True).stdout
    assert any(line.startswith("queued") and "carol" in line and "queue position 1 for 1" in line
               for line in table.splitlines()), table

    # moving up: the owner (or an admin) only
    with pytest.raises(GuardError, match="started by dave"):
        queue.move_up(work, runs["d"], User("carol", "trainer"), guard)
    assert "ahead of c" in queue.move_up(work, runs["d"], User("dave", "trainer"), guard)
    assert _order(work) == [("d", 1), ("c", 2)]
    assert "already first" in ftstudio("queue", "up", "d", "--work-dir", work, cwd=tmp_path, check=True).stdout

    # cancel: the waiting run ends aborted and leaves the queue
    with pytest.raises(GuardError):
        queue.cancel(work, runs["c"], User("dave", "trainer"), guard)
    assert ftstudio("queue", "cancel", "c", "--work-dir", work, cwd=tmp_path, check=True).returncode == 0
    wait_for(lambda: _state(runs["c"]) == "aborted", 60, "c aborted")
    assert _order(work) == [("d", 1)] and not runs["c"].train_log.exists()

    # b ends: d, first in line for device 1, starts there by itself
    assert abort(runs["b"])[0]
    wait_for(lambda: _state(runs["b"]) == "aborted", 120, "b aborted")
    wait_for(lambda: _state(runs["d"]) == "running", 300, "d running after b ended")
    assert _worker_env(runs["d"])["CUDA_VISIBLE_DEVICES"] == "1" and runs["d"].status()["devices"] == ["1"]
    assert runs["d"].status().get("queue_position") is None

    # kill -9 of a running run frees its device at once; an 'auto' run waiting for any device takes it
    launch("e", None, "erin")
    wait_for(lambda: _order(work) == [("e", 1)], 180, "e queued for any device")
    assert queue.entries(work)[0]["auto"] and sorted(queue.entries(work)[0]["busy"]) == ["0", "1"]
    _kill_run(runs["a"])
    wait_for(lambda: _order(work) == [], 15, "e's ticket gone: it took device 0")
    wait_for(lambda: _state(runs["e"]) == "running", 300, "e running on device 0")
    assert _worker_env(runs["e"])["CUDA_VISIBLE_DEVICES"] == "0" and runs["e"].status()["devices"] == ["0"]
    assert _state(runs["a"]) == "failed"
