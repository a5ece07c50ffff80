"""Device leases: one lock file per device, held with ``flock`` by the run that
uses the device, so the kernel frees it when the holder dies.

No daemon and no record to clean up: a lease is an open file description with
an exclusive ``flock`` on it. The launcher takes it and hands the same file
descriptors to its direct child (the worker, or the torchrun agent) through
``pass_fds``, so the lease lives while either of them lives and ends with the
last of them, whether it exits, crashes, is killed with SIGKILL or the machine
restarts.

The lock folder is machine-wide (every user's runs share the devices):
``FTSTUDIO_DEVICE_LOCKS`` (tests point it at a temporary folder), else
``/tmp/ftstudio-devices``, created with mode 1777 like ``/tmp`` itself; lock
files are 0644 and opened read-only (``flock`` needs no write access), so any
user can lock a file another user created.

``DeviceRequest`` is what a run asks for: an explicit set (``--devices 0,1``)
or any N free devices (``auto``); ``request`` checks a ``--devices`` text
against the inventory (``backend.devices.inventory``).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

LOCKS_ENV = "FTSTUDIO_DEVICE_LOCKS"
DEFAULT_LOCKS = "/tmp/ftstudio-devices"
CPU = "cpu"  # the one device of a machine without GPUs
_DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class DeviceError(ValueError):
    """A device set that cannot be used as asked (unknown ids, wrong count, a bad lock folder)."""


def sort_key(device_id: str):
    """Numeric ids in number order ("2" before "10"), then the others by name."""
    return (0, int(device_id), "") if device_id.isdigit() else (1, 0, device_id)


def lock_dir() -> Path:
    """The machine-wide lock folder, created (mode 1777) if missing; never a symbolic link."""
    path = Path(os.environ.get(LOCKS_ENV) or DEFAULT_LOCKS)
    try:
        path.mkdir(parents=True)
        os.chmod(path, 0o1777)  # mkdir's mode passes through the umask; chmod does not
    except FileExistsError:
        pass
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise DeviceError(f"device lock folder {path}: not a real folder; remove it or set {LOCKS_ENV} to another one")
    return path


def _open_lock(device_id: str) -> int:
    """A read-only descriptor of the device's lock file (created 0644 if missing), not inherited by children
    unless passed on purpose (``pass_fds``)."""
    if not _DEVICE_ID.match(device_id or ""):
        raise DeviceError(f"device id {device_id!r}: use letters, digits, '_', '.' or '-'")
    path = lock_dir() / f"{device_id}.lock"
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        if os.fstat(fd).st_uid == os.getuid():
            os.fchmod(fd, 0o644)  # readable by every user whatever our umask, so they can lock it too
    except OSError:
        pass
    return fd


def _try_lock(device_id: str, how: int) -> int | None:
    """The descriptor holding a ``how`` lock on the device, or None if someone else holds it."""
    fd = _open_lock(device_id)
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise
    return fd


@dataclass
class Lease:
    """Exclusive locks on ``devices``, held through ``fds`` (pass them to the child that uses the devices)."""

    devices: tuple[str, ...]
    fds: tuple[int, ...]

    def release(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = ()

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire(devices) -> Lease | None:
    """Every one of ``devices`` or none: exclusive, non-blocking, in sorted order."""
    ids = sorted(set(devices), key=sort_key)
    fds: list[int] = []
    for device_id in ids:
        fd = _try_lock(device_id, fcntl.LOCK_EX)
        if fd is None:
            Lease((), tuple(fds)).release()
            return None
        fds.append(fd)
    return Lease(tuple(ids), tuple(fds))


def acquire_any(candidates, count: int) -> Lease | None:
    """The first ``count`` free devices of ``candidates`` (sorted), or none at all."""
    ids, fds = [], []
    for device_id in sorted(set(candidates), key=sort_key):
        fd = _try_lock(device_id, fcntl.LOCK_EX)
        if fd is not None:
            ids.append(device_id)
            fds.append(fd)
            if len(ids) == count:
                return Lease(tuple(ids), tuple(fds))
    Lease((), tuple(fds)).release()
    return None


def busy(device_id: str) -> bool:
    """Someone holds the device now (a non-blocking shared lock is refused)."""
    fd = _try_lock(device_id, fcntl.LOCK_SH)
    if fd is None:
        return True
    os.close(fd)
    return False


def holders(devices=None) -> dict[str, bool]:
    """``{device id: busy}`` for ``devices`` (default: the inventory's)."""
    if devices is None:
        from .inventory import inventory

        devices = [d.id for d in inventory()]
    return {d: busy(d) for d in sorted(devices, key=sort_key)}


# --- what a run asks for ------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceRequest:
    """A run's devices: the set it wants (``auto`` False) or the candidates it takes ``count`` of (``auto``)."""

    devices: tuple[str, ...]
    count: int
    auto: bool
    kind: str  # gpu | fake | cpu

    def grab(self) -> Lease | None:
        return acquire_any(self.devices, self.count) if self.auto else acquire(self.devices)

    def words(self) -> str:
        if self.auto and self.count < len(self.devices):
            return f"any {self.count} of devices {','.join(self.devices)}"
        return f"device{'s' if len(self.devices) > 1 else ''} {','.join(self.devices)}"

    def child_env(self, granted) -> dict[str, str]:
        """What the ranks' environment gets for the granted devices (nothing for the CPU)."""
        if self.kind == "cpu":
            return {}
        env = {"CUDA_VISIBLE_DEVICES": ",".join(granted)}
        if self.kind == "gpu":
            env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # CUDA's numbering then equals NVML's, the inventory's
        return env


def _listing(devices) -> str:
    return ", ".join(f"{d.id} ({'fake' if d.kind == 'fake' else getattr(d, 'name', None) or d.kind})"
                     for d in devices) or "none"


def request(text: str | None, nproc: int, nproc_fixed_by: str | None = None, devices=None) -> DeviceRequest:
    """Check ``--devices`` (``0,1`` or ``auto``/None) against the inventory. ``nproc``: processes per node
    asked for; ``nproc_fixed_by`` names what fixed it (e.g. ``NPROC_PER_NODE=2``), None if nothing did."""
    if devices is None:
        from .inventory import InventoryError, inventory

        try:
            devices = inventory()
        except InventoryError as exc:
            raise DeviceError(str(exc)) from None
    text = (text or "auto").strip() or "auto"
    accel = [d for d in devices if d.kind != "cpu"]
    if not accel:
        if text not in ("auto", CPU):
            raise DeviceError(f"--devices {text}: this machine has no GPUs; its one device is {CPU!r} "
                              f"(--devices {CPU} or auto)")
        return DeviceRequest((CPU,), 1, False, "cpu")
    kind = "fake" if all(d.kind == "fake" for d in accel) else "gpu"
    known = [d.id for d in accel]
    if text == "auto":
        if nproc > len(known):
            raise DeviceError(f"{nproc} processes need {nproc} devices, but this machine has {len(known)}: "
                              f"{_listing(accel)}")
        return DeviceRequest(tuple(sorted(known, key=sort_key)), nproc, True, kind)
    wanted = [part.strip() for part in text.split(",")]
    if "" in wanted or len(set(wanted)) != len(wanted):
        raise DeviceError(f"--devices {text}: give device ids separated by commas, each once, e.g. 0,1")
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise DeviceError(f"--devices {text}: no device {', '.join(unknown)} on this machine; it has "
                          f"{_listing(accel)} (or use --devices auto)")
    if nproc_fixed_by and len(wanted) != nproc:
        plural = "es" if nproc > 1 else ""
        raise DeviceError(f"--devices {text} is {len(wanted)} device{'s' if len(wanted) > 1 else ''}, but "
                          f"{nproc_fixed_by} asks for {nproc} process{plural}; give {nproc} device id(s), or "
                          "leave the process count out (one process per device)")
    return DeviceRequest(tuple(sorted(wanted, key=sort_key)), len(wanted), False, kind)
