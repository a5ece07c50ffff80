"""What devices this machine has, and how busy they are right now.

``inventory()`` is the list a run's devices are chosen from (``--devices``,
the Train tab's picker, the leases and the queue): the NVIDIA GPUs through
NVML (``nvidia-ml-py``'s ``pynvml``; ``nvidia-smi`` when that package is
missing), else the one device ``"cpu"`` (the CPU model with its cores, and
the RAM). GPU ids are NVML's indices, the numbering of ``nvidia-smi`` and of
``CUDA_VISIBLE_DEVICES`` under ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (which
``leases.DeviceRequest.child_env`` sets); a process started with
``CUDA_VISIBLE_DEVICES`` sees only those GPUs, under their machine-wide ids,
so a lock file means the same device to every user.

``snapshot()`` adds live numbers per device (memory used, utilisation,
temperature; None when unknown) for the studio's device panel.

THE ONE TEST SEAM: ``FTSTUDIO_FAKE_DEVICES=N`` gives N fake devices "0".."N-1"
(kind "fake", static plausible numbers), so the leases and the queue run for
real on machines without a GPU. Nothing else here is replaceable by
environment. Functions that read NVML take the module as a parameter
(``nvml``), so tests pass a stand-in object instead of patching globals.

"MB" in field names is MiB (2**20 bytes), as nvidia-smi counts.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

FAKE_ENV = "FTSTUDIO_FAKE_DEVICES"
FAKE_MAX = 64
FAKE_MEMORY_MB = 24576  # a 24 GiB card
MB = 2**20


class InventoryError(ValueError):
    """The device inventory cannot be read as asked (a bad FTSTUDIO_FAKE_DEVICES)."""


@dataclass(frozen=True)
class Device:
    id: str  # "0", "1", ... (GPU or fake) or "cpu"
    kind: str  # "gpu" | "cpu" | "fake"
    name: str  # the model, e.g. "NVIDIA H100 80GB HBM3", or "AMD EPYC 9B14 (2 cores)"
    memory_total_mb: int  # the card's memory, or the RAM this process may use
    uuid: str | None = None  # a GPU's NVML UUID ("GPU-..."), when known
    cores: int | None = None  # CPU: the cores this process may run on

    def to_dict(self) -> dict:
        return asdict(self)


def inventory(nvml=None) -> list[Device]:
    """Every device of this machine a run may lease: fake ones under the test seam,
    else the visible NVIDIA GPUs, else the CPU. ``nvml``: a pynvml-like module
    (None: import the real one)."""
    fake = fake_count()
    if fake:
        return fake_devices(fake)
    rows = gpu_rows(nvml)
    if rows:
        return [Device(r["id"], "gpu", r["name"], r["memory_total_mb"], uuid=r.get("uuid")) for r in rows]
    return [cpu_device()]


def snapshot(nvml=None, root: Path = Path("/")) -> list[dict]:
    """Live numbers per device of ``inventory()``: id, name, kind, memory_used_mb,
    memory_total_mb, util_pct, temp_c (None when this machine does not say).
    ``root``: where /proc and /sys are (tests give a folder)."""
    fake = fake_count()
    if fake:
        return [{**_base(d), "memory_used_mb": 0, "util_pct": 0.0, "temp_c": 30.0} for d in fake_devices(fake)]
    rows = gpu_rows(nvml)
    if rows:
        keys = ("id", "name", "memory_used_mb", "memory_total_mb", "util_pct", "temp_c")
        return [{**{k: r.get(k) for k in keys}, "kind": "gpu"} for r in rows]
    cpu = cpu_device(root)
    used, total = ram_mb(root)
    return [{**_base(cpu), "memory_total_mb": total or cpu.memory_total_mb, "memory_used_mb": used,
             "util_pct": cpu_util(root), "temp_c": cpu_temp(root)}]


def _base(d: Device) -> dict:
    return {"id": d.id, "name": d.name, "kind": d.kind, "memory_total_mb": d.memory_total_mb}


def by_id(devices: list[Device] | None = None) -> dict[str, Device]:
    return {d.id: d for d in (inventory() if devices is None else devices)}


# --- the test seam -----------------------------------------------------------------------


def fake_count() -> int:
    """N from FTSTUDIO_FAKE_DEVICES (0: unset or empty)."""
    raw = os.environ.get(FAKE_ENV, "").strip()
    if not raw:
        return 0
    try:
        n = int(raw)
    except ValueError:
        n = -1
    if not 0 <= n <= FAKE_MAX:
        raise InventoryError(f"{FAKE_ENV}={raw!r}: give a number of fake devices from 0 to {FAKE_MAX} "
                             "(a test seam), or unset it to use this machine's devices")
    return n


def fake_devices(n: int) -> list[Device]:
    return [Device(str(i), "fake", f"fake device {i} ({FAKE_ENV})", FAKE_MEMORY_MB) for i in range(n)]


# --- NVIDIA GPUs -------------------------------------------------------------------------


def load_nvml():
    """The real pynvml module (package nvidia-ml-py), or None when it is not installed."""
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


_NVML_READY: list = []  # the NVML modules initialised in this process


def gpu_rows(nvml=None) -> list[dict]:
    """One dict per visible NVIDIA GPU (id, uuid, name, memory_total_mb, memory_used_mb,
    util_pct, temp_c) through NVML, else through nvidia-smi; [] without GPUs."""
    nvml = load_nvml() if nvml is None else nvml
    rows = nvml_rows(nvml) if nvml is not None else smi_rows()
    return visible(rows, os.environ.get("CUDA_VISIBLE_DEVICES"))


def nvml_rows(nvml) -> list[dict]:
    """Every GPU NVML knows; [] when NVML cannot start (no driver, no GPU)."""
    error = getattr(nvml, "NVMLError", OSError)
    try:
        if not any(m is nvml for m in _NVML_READY):
            nvml.nvmlInit()
            _NVML_READY.append(nvml)
        count = nvml.nvmlDeviceGetCount()
    except (error, OSError):
        return []
    rows = []
    for i in range(count):
        try:
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            mem = nvml.nvmlDeviceGetMemoryInfo(h)
            row = {"id": str(i), "name": _text(nvml.nvmlDeviceGetName(h)),
                   "memory_total_mb": int(mem.total // MB), "memory_used_mb": int(mem.used // MB)}
        except error:
            continue  # a GPU NVML cannot read (lost, or being reset) is no device to lease
        row["uuid"] = _ask(error, lambda: _text(nvml.nvmlDeviceGetUUID(h)))
        row["util_pct"] = _ask(error, lambda: float(nvml.nvmlDeviceGetUtilizationRates(h).gpu))
        row["temp_c"] = _ask(error, lambda: float(nvml.nvmlDeviceGetTemperature(
            h, getattr(nvml, "NVML_TEMPERATURE_GPU", 0))))
        rows.append(row)
    return rows


def _ask(error, read):
    """One optional NVML reading (None when the card does not support it)."""
    try:
        return read()
    except error:
        return None


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


SMI_FIELDS = "index,uuid,name,memory.total,memory.used,utilization.gpu,temperature.gpu"


def smi_rows(run=subprocess.run) -> list[dict]:
    """The GPUs as nvidia-smi lists them (when nvidia-ml-py is not installed); [] without it."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = run([exe, f"--query-gpu={SMI_FIELDS}", "--format=csv,noheader,nounits"], capture_output=True,
                  text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if out.returncode != 0:
        return []
    return parse_smi(out.stdout)


def parse_smi(text: str) -> list[dict]:
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) != 7 or not cells[0].isdigit():
            continue
        rows.append({"id": cells[0], "uuid": cells[1] or None, "name": cells[2],
                     "memory_total_mb": int(_number(cells[3]) or 0), "memory_used_mb": _int(_number(cells[4])),
                     "util_pct": _number(cells[5]), "temp_c": _number(cells[6])})
    return rows


def _number(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None  # "[N/A]", "[Not Supported]"


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)


def visible(rows: list[dict], cuda_visible: str | None) -> list[dict]:
    """The rows CUDA_VISIBLE_DEVICES lets this process see (indices or GPU UUIDs, in its
    order; as CUDA, up to the first entry that names no GPU). Unset: all; "" or -1: none.
    MIG ids are not NVML indices of whole GPUs: such a setting leaves the list as it is."""
    if cuda_visible is None:
        return rows
    entries = [e.strip() for e in cuda_visible.split(",")]
    if any(e.startswith("MIG-") for e in entries):
        return rows
    picked = []
    for entry in entries:
        match = [r for r in rows if r["id"] == entry
                 or (entry.startswith("GPU-") and (r.get("uuid") or "").startswith(entry))]
        if not match or match[0] in picked:
            break
        picked.append(match[0])
    return picked


# --- the CPU -----------------------------------------------------------------------------


def cpu_device(root: Path = Path("/")) -> Device:
    cores = _cores()
    _, total = ram_mb(root)
    return Device("cpu", "cpu", f"{cpu_model(root)} ({cores} core{'s' if cores != 1 else ''})",
                  total or _sysconf_ram_mb(), cores=cores)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_model(root: Path = Path("/")) -> str:
    try:
        for line in (root / "proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.lower().startswith(("model name", "hardware")) and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def ram_mb(root: Path = Path("/")) -> tuple[int | None, int | None]:
    """(used, total) RAM in MiB for this process: the machine's (MemTotal − MemAvailable),
    or its cgroup's when a smaller memory limit is set. (None, None) where unknown."""
    info = {}
    try:
        for line in (root / "proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            info[key] = int(rest.split()[0]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return None, None
    total, avail = info.get("MemTotal"), info.get("MemAvailable", info.get("MemFree"))
    if total is None or avail is None:
        return None, None
    limit = _read_int(root / "sys/fs/cgroup/memory.max")
    current = _read_int(root / "sys/fs/cgroup/memory.current")
    if limit and current is not None and limit < total:
        return current // MB, limit // MB
    return (total - avail) // MB, total // MB


def _sysconf_ram_mb() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // MB
    except (ValueError, OSError, AttributeError):
        return 0


_CPU_LAST: dict[str, tuple[float, int, int]] = {}  # root -> (when, busy jiffies, all jiffies)
CPU_WINDOW_S = 0.1  # the first look (or one after a long pause) measures over this window


def cpu_times(root: Path = Path("/")) -> tuple[int, int] | None:
    """(busy, all) jiffies of the cores this process may use, from /proc/stat."""
    try:
        lines = (root / "proc/stat").read_text().splitlines()
    except OSError:
        return None
    try:
        mine = {f"cpu{i}" for i in os.sched_getaffinity(0)}
    except AttributeError:
        mine = set()
    rows = [ln.split() for ln in lines if ln.startswith("cpu")]
    per_core = [r for r in rows if r[0] in mine]
    busy = total = 0
    for r in per_core or [r for r in rows if r[0] == "cpu"]:
        v = [int(x) for x in r[1:9]]  # user nice system idle iowait irq softirq steal (guest is within user)
        total += sum(v)
        busy += sum(v) - v[3] - v[4]
    return (busy, total) if total else None


def cpu_util(root: Path = Path("/"), clock=time.monotonic, sleep=time.sleep) -> float | None:
    """CPU utilisation in percent since the previous call (the first one measures a short window)."""
    key = str(root)
    now, times = clock(), cpu_times(root)
    if times is None:
        return None
    last = _CPU_LAST.get(key)
    if last is None or now - last[0] > 60 or times[1] <= last[2]:
        sleep(CPU_WINDOW_S)
        last, now, times = (now, *times), clock(), cpu_times(root) or times
    _CPU_LAST[key] = (now, *times)
    span = times[1] - last[2]
    return round(100.0 * (times[0] - last[1]) / span, 1) if span > 0 else None


TEMP_SENSORS = ("k10temp", "coretemp", "zenpower", "cpu_thermal", "cpu-thermal", "soc_thermal")
THERMAL_ZONES = ("x86_pkg_temp", "cpu-thermal", "cpu_thermal", "soc-thermal", "acpitz")


def cpu_temp(root: Path = Path("/")) -> float | None:
    """The CPU's temperature in °C from hwmon (k10temp, coretemp, ...) or a thermal zone; None if none."""
    for hw in sorted((root / "sys/class/hwmon").glob("hwmon*")):
        try:
            name = (hw / "name").read_text().strip()
        except OSError:
            continue
        if name in TEMP_SENSORS:
            milli = _read_int(hw / "temp1_input")
            if milli is not None:
                return milli / 1000
    zones = {}
    for zone in sorted((root / "sys/class/thermal").glob("thermal_zone*")):
        try:
            zones.setdefault(zone.joinpath("type").read_text().strip(), zone)
        except OSError:
            continue
    for kind in THERMAL_ZONES:
        milli = _read_int(zones[kind] / "temp") if kind in zones else None
        if milli is not None:
            return milli / 1000
    return None
