"""The device inventory (with the one test seam, FTSTUDIO_FAKE_DEVICES, and
without it: the CPU here), live device numbers, NVML read through a stand-in
module (these machines have no GPU), the fits check, the device panel's
holders from real leases, and peak_memory_mb in a real tiny training."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from backend.devices import inventory as inv
from backend.devices import status as device_status
from backend.devices.inventory import Device, InventoryError


@pytest.fixture
def no_seam(monkeypatch):
    monkeypatch.delenv(inv.FAKE_ENV, raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


@pytest.fixture
def locks(tmp_path, monkeypatch):
    folder = tmp_path / "locks"
    monkeypatch.setenv("FTSTUDIO_DEVICE_LOCKS", str(folder))
    return folder


# --- the inventory -----------------------------------------------------------------------


def test_fake_devices_are_the_test_seam(monkeypatch):
    monkeypatch.setenv(inv.FAKE_ENV, "2")
    devices = inv.inventory()
    assert [(d.id, d.kind) for d in devices] == [("0", "fake"), ("1", "fake")]
    assert all(d.memory_total_mb == inv.FAKE_MEMORY_MB and "fake" in d.name for d in devices)
    live = inv.snapshot()
    assert [s["id"] for s in live] == ["0", "1"] and all(s["kind"] == "fake" for s in live)
    assert set(live[0]) == {"id", "name", "kind", "memory_used_mb", "memory_total_mb", "util_pct", "temp_c"}
    for bad in ("two", "-1", "1000"):
        monkeypatch.setenv(inv.FAKE_ENV, bad)
        with pytest.raises(InventoryError, match=f"{inv.FAKE_ENV}='{bad}'.*unset it"):
            inv.inventory()


def test_cpu_inventory_and_live_numbers_are_real_here(no_seam):
    if inv.gpu_rows():
        pytest.skip("this machine has NVIDIA GPUs: the CPU inventory is not the one in use")
    (cpu,) = inv.inventory()
    assert cpu.id == "cpu" and cpu.kind == "cpu" and cpu.cores == len(os.sched_getaffinity(0))
    assert f"({cpu.cores} core" in cpu.name and inv.cpu_model() in cpu.name
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    assert 0 < cpu.memory_total_mb <= int(meminfo["MemTotal"].split()[0]) // 1024
    (live,) = inv.snapshot()
    assert live["id"] == "cpu" and live["kind"] == "cpu" and live["memory_total_mb"] == cpu.memory_total_mb
    assert 0 < live["memory_used_mb"] <= live["memory_total_mb"]
    assert 0.0 <= live["util_pct"] <= 100.0
    assert live["temp_c"] is None or 0 < live["temp_c"] < 150


def test_cpu_utilisation_from_proc_stat_deltas(tmp_path):
    stat = tmp_path / "proc" / "stat"
    stat.parent.mkdir(parents=True)
    cores = sorted(os.sched_getaffinity(0))

    def write(busy, idle):  # user nice system idle iowait irq softirq steal guest guest_nice, per core
        lines = [f"cpu  {busy * len(cores)} 0 0 {idle * len(cores)} 0 0 0 0 0 0"]
        lines += [f"cpu{i} {busy} 0 0 {idle} 0 0 0 0 0 0" for i in cores] + ["cpu999 5 0 0 5 0 0 0 0 0 0"]
        stat.write_text("\n".join(lines) + "\n")

    write(100, 100)
    first = inv.cpu_util(tmp_path, sleep=lambda s: write(130, 110))  # the first look measures a short window
    assert first == 75.0
    write(130, 190)
    assert inv.cpu_util(tmp_path) == 0.0  # since the previous call: all idle
    write(230, 190)
    assert inv.cpu_util(tmp_path) == 100.0


def test_cpu_temperature_and_cgroup_ram(tmp_path):
    assert inv.cpu_temp(tmp_path) is None
    zone = tmp_path / "sys/class/thermal/thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "type").write_text("x86_pkg_temp\n")
    (zone / "temp").write_text("51000\n")
    assert inv.cpu_temp(tmp_path) == 51.0
    hw = tmp_path / "sys/class/hwmon/hwmon3"
    hw.mkdir(parents=True)
    (hw / "name").write_text("k10temp\n")
    (hw / "temp1_input").write_text("45500\n")
    assert inv.cpu_temp(tmp_path) == 45.5  # hwmon's CPU sensor first
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/meminfo").write_text("MemTotal:  16777216 kB\nMemFree: 1 kB\nMemAvailable:  4194304 kB\n")
    assert inv.ram_mb(tmp_path) == (12288, 16384)
    cg = tmp_path / "sys/fs/cgroup"
    cg.mkdir(parents=True)
    (cg / "memory.max").write_text(f"{8 * 2**30}\n")
    (cg / "memory.current").write_text(f"{2**30}\n")
    assert inv.ram_mb(tmp_path) == (1024, 8192)  # the container's limit, not the host's RAM
    (cg / "memory.max").write_text("max\n")
    assert inv.ram_mb(tmp_path) == (12288, 16384)


# --- NVIDIA GPUs, through a stand-in for pynvml ---------------------------------------------------


class FakeNvml:
    """pynvml's calls the inventory makes, answering for two GPUs; GPU 1 reads no utilisation."""

    class NVMLError(Exception):
        pass

    NVML_TEMPERATURE_GPU = 0

    def __init__(self, fail_init=False):
        self.fail_init, self.inits = fail_init, 0
        self.cards = [("NVIDIA H100 80GB HBM3", 81559, 1200, 37, 41), (b"NVIDIA A10G", 23028, 0, None, 30)]

    def nvmlInit(self):
        self.inits += 1
        if self.fail_init:
            raise self.NVMLError("NVML Shared Library Not Found")

    def nvmlDeviceGetCount(self):
        return len(self.cards)

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return self.cards[h][0]

    def nvmlDeviceGetUUID(self, h):
        return f"GPU-{h}aaaaaaa-bbbb"

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(total=self.cards[h][1] * 2**20, used=self.cards[h][2] * 2**20, free=0)

    def nvmlDeviceGetUtilizationRates(self, h):
        if self.cards[h][3] is None:
            raise self.NVMLError("Not Supported")
        return SimpleNamespace(gpu=self.cards[h][3], memory=10)

    def nvmlDeviceGetTemperature(self, h, sensor):
        assert sensor == self.NVML_TEMPERATURE_GPU
        return self.cards[h][4]


def test_gpus_through_nvml(no_seam, monkeypatch):
    nvml = FakeNvml()
    devices = inv.inventory(nvml)
    assert devices == [Device("0", "gpu", "NVIDIA H100 80GB HBM3", 81559, uuid="GPU-0aaaaaaa-bbbb"),
                       Device("1", "gpu", "NVIDIA A10G", 23028, uuid="GPU-1aaaaaaa-bbbb")]
    live = inv.snapshot(nvml)
    assert live[0] == {"id": "0", "name": "NVIDIA H100 80GB HBM3", "kind": "gpu", "memory_used_mb": 1200,
                       "memory_total_mb": 81559, "util_pct": 37.0, "temp_c": 41.0}
    assert live[1]["util_pct"] is None and live[1]["temp_c"] == 30.0  # not supported: unknown, not an error
    assert nvml.inits == 1  # NVML starts once per process
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # a studio started on GPU 1 only sees GPU 1, by its own id
    assert [d.id for d in inv.inventory(nvml)] == ["1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1aaa,0,7,1")
    assert [d.id for d in inv.inventory(nvml)] == ["1", "0"]  # up to the first entry naming no GPU, as CUDA
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert [d.kind for d in inv.inventory(nvml)] == ["cpu"]  # no GPU visible: the CPU
    monkeypatch.setenv(inv.FAKE_ENV, "3")
    assert [d.kind for d in inv.inventory(nvml)] == ["fake"] * 3  # the seam wins over real GPUs


def test_no_driver_means_the_cpu(no_seam):
    assert [d.id for d in inv.inventory(FakeNvml(fail_init=True))] == ["cpu"]
    assert inv.snapshot(FakeNvml(fail_init=True))[0]["kind"] == "cpu"


def test_nvidia_smi_rows():
    text = ("0, GPU-abc, NVIDIA H100 80GB HBM3, 81559, 1024, 12, 40\n"
            "1, GPU-def, Tesla T4, 15360, [N/A], [Not Supported], 35\n")
    rows = inv.parse_smi(text)
    assert rows[0] == {"id": "0", "uuid": "GPU-abc", "name": "NVIDIA H100 80GB HBM3", "memory_total_mb": 81559,
                       "memory_used_mb": 1024, "util_pct": 12.0, "temp_c": 40.0}
    assert rows[1]["memory_used_mb"] is None and rows[1]["util_pct"] is None and rows[1]["temp_c"] == 35.0


# --- fits ----------------------------------------------------------------------------------------


def _estimate(total_gib, offload=0.0):
    from backend.memory import MemoryEstimate

    return MemoryEstimate(10, 10, total_gib, 0.0, 0.0, 0.0, offload)


def test_fits_the_chosen_devices(monkeypatch):
    from backend.memory import fits

    monkeypatch.setenv(inv.FAKE_ENV, "2")  # two 24 GiB devices
    ok, words = fits(_estimate(10), ["0", "1"])
    assert ok and words.startswith("fits") and "devices 0, 1" in words and "24.0 GiB" in words
    ok, words = fits(_estimate(30), ["1"])
    assert not ok and "does not fit" in words and "33.8 GiB per GPU needed on device 1" in words and "qlora" in words
    assert not fits(_estimate(21.5), ["0"])[0]  # 21.5 GiB + 10% + the CUDA context is more than 24 GiB
    assert fits(_estimate(20), ["0"])[0]
    with pytest.raises(ValueError, match="device '7'.*it has 0, 1"):
        fits(_estimate(1), ["7"])
    small = Device("0", "gpu", "small card", 8192)
    big = Device("1", "gpu", "big card", 81920)
    assert not fits(_estimate(10), [small, big])[0]  # each rank needs its share on every card: the smallest counts
    ok, words = fits(_estimate(1, offload=10**6), [big])
    assert not ok and "CPU offload needs" in words


def test_fits_on_the_cpu(no_seam):
    from backend.memory import fits

    cpu = inv.cpu_device()
    ram = cpu.memory_total_mb / 1024
    assert fits(_estimate(ram / 4), [cpu])[0]
    ok, words = fits(_estimate(ram / 4), [cpu], ranks=4)  # four processes share the RAM
    assert not ok and "4 processes on the CPU" in words
    with pytest.raises(ValueError, match="GPUs or the CPU"):
        fits(_estimate(1), [cpu, Device("0", "gpu", "card", 8192)])


def test_fits_a_real_estimate(tmp_path, tiny_model, no_seam):
    from backend.config import load_config
    from backend.memory import estimate_for, fits

    est, _ = estimate_for(load_config("tiny_demo"))
    ok, words = fits(est, ["cpu"])
    assert ok and "fits" in words and "RAM" in words


# --- the device panel ------------------------------------------------------------------------


def _launcher_like(fds=()):
    """A process whose command line reads as a launcher of ours, holding ``fds`` (a lease) while it lives."""
    code = "import sys, time; time.sleep(120)"
    return subprocess.Popen([sys.executable, "-c", code, "backend.cli", "train"], pass_fds=fds)


def _record(pid):
    from backend.core import procs

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        rec = procs.capture(pid)
        if rec is not None and "backend.cli" in rec.argv:
            return rec.to_dict()
        time.sleep(0.05)
    raise AssertionError("the launcher-like process did not start")


def test_panel_shows_who_holds_each_device(tmp_path, monkeypatch, locks):
    from backend.core.rundir import RunDir
    from backend.devices import leases
    from studio import devices_panel as panel
    from studio.context import StudioContext

    import gradio as gr
    monkeypatch.setenv(inv.FAKE_ENV, "3")
    ctx = StudioContext(tmp_path / "work")
    lease = leases.acquire(["0"])
    holder = _launcher_like(lease.fds)
    lease.release()  # the "launcher" holds device 0 now, as a real run's launcher does
    outside = leases.acquire(["2"])  # held by this test process: no run of this work directory names it
    queued = _launcher_like()
    try:
        run = RunDir(ctx.work_dir / "ann-run")
        run.path.mkdir(parents=True)
        run.write_status(state="running", user="ann", devices=["0"], started="2026-01-01T00:00:00+0000",
                         launcher=_record(holder.pid))
        waiting = RunDir(ctx.work_dir / "bob-run")
        waiting.path.mkdir()
        waiting.write_status(state="queued", user="bob", devices=["0"], waiting_for=["0"], queue_position=1,
                             started="2026-01-01T00:01:00+0000", launcher=_record(queued.pid))
        df, note = panel.devices_table(ctx)
        rows = {r["device"]: r for r in df.to_dict("records")}
        assert rows["0"]["held by"] == "ann-run (ann)" and rows["0"]["waiting"] == "bob-run (bob) #1"
        assert rows["1"]["held by"] == device_status.FREE
        assert rows["2"]["held by"] == device_status.OUTSIDE
        assert "24.0 GiB" in rows["0"]["memory used / total"] and "1 of 3 devices free" in note and "fake" in note
        table, said, shown = panel.devices_refresh(ctx, {})
        assert table.equals(df) and said == note
        again = panel.devices_refresh(ctx, shown)
        assert again[:2] == (gr.skip(), gr.skip())  # unchanged views are not sent again
        holder.kill()
        holder.wait()  # kill -9 frees the lease at once; the run folder is corrected by effective_status
        rows = {r["device"]: r for r in panel.devices_table(ctx)[0].to_dict("records")}
        assert rows["0"]["held by"] == device_status.FREE
    finally:
        outside.release()
        for proc in (holder, queued):
            proc.kill()
            proc.wait()


def test_panel_without_leases_reads_the_run_folders(tmp_path, monkeypatch):
    from studio import devices_panel as panel
    from studio.context import StudioContext

    monkeypatch.setenv(inv.FAKE_ENV, "1")
    monkeypatch.setattr(device_status, "lease_state", lambda: None)
    df, note = panel.devices_table(StudioContext(tmp_path / "work"))
    assert df.to_dict("records")[0]["held by"].startswith("unknown") and "leases unreadable" in note
    monkeypatch.setenv(inv.FAKE_ENV, "x")
    df, note = panel.devices_table(StudioContext(tmp_path / "work"))
    assert df.empty and "FTSTUDIO_FAKE_DEVICES='x'" in note


# --- peak memory in metrics.jsonl -------------------------------------------------------------


def test_peak_memory_in_a_real_training(tmp_path, tiny_model, locks):
    from train_utils import ftstudio, metrics

    run_dir = tmp_path / "run"
    out = ftstudio("train", "tiny_demo", "training.max_steps=4", "training.logging_steps=2", "evaluation.inputs=[]",
                   "saving.save_steps=100", "--work-dir", run_dir, cwd=tmp_path,
                   env={"FTSTUDIO_DEVICE_LOCKS": str(locks)})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [r for r in metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in rows] == [2, 4]
    # a CPU run: the worker's peak resident set, a torch process of a few hundred MiB
    assert all(50 < r["peak_memory_mb"] < inv.cpu_device().memory_total_mb for r in rows)
    assert rows[1]["peak_memory_mb"] >= rows[0]["peak_memory_mb"]  # ru_maxrss only grows


def test_curves_draw_peak_memory(tmp_path):
    from backend.core.rundir import RunDir
    from studio import runs_tab as rt

    run = RunDir(tmp_path / "r")
    run.path.mkdir()
    run.write_status(state="finished")
    for step, peak in ((1, 500.0), (2, 650.5), (3, None)):
        run.append_metric({"step": step, "loss": 1.0, "lr": 1e-3, "grad_norm": 1.0, "peak_memory_mb": peak})
    frame = rt.curves([run])["peak_memory_mb"]
    assert list(frame.columns) == ["step", "peak_memory_mb", "run", "curve"]
    assert list(frame.peak_memory_mb) == [500.0, 650.5] and set(frame.run) == {"r"}
    upd = rt.plot_update(frame, "peak_memory_mb", "Peak memory (MiB)", rt.plot_options())
    assert upd["y_title"] == "peak memory (MiB)"


def test_ftstudio_devices_prints_the_panels_picture(tmp_path, monkeypatch, locks):
    """The CLI's view of the devices is the panel's: the same holders, from a fresh process."""
    from backend.devices import leases
    from train_utils import ftstudio

    monkeypatch.setenv(inv.FAKE_ENV, "2")
    lease = leases.acquire(["1"])  # this test process holds device 1; no run of the work directory names it
    try:
        out = ftstudio("devices", "--work-dir", str(tmp_path / "work"), cwd=tmp_path)
    finally:
        lease.release()
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("0 ") and lines[0].endswith(device_status.FREE), out.stdout
    assert lines[1].startswith("1 ") and lines[1].endswith(device_status.OUTSIDE), out.stdout
