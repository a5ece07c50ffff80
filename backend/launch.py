"""``ftstudio train``: check everything that can be checked up front, claim the
run folder, start the ranks, follow them, record how the run ended.

Launch modes, as in XTuner's guide:
- no distributed variables: one worker process;
- ``NPROC_PER_NODE`` [``NNODES NODE_RANK ADDR PORT``]: ``torchrun`` with those;
- ``--launcher slurm``: no torchrun; this process is one Slurm task = one rank.

Devices (``--devices 0,1`` or ``auto``, the first free ones): before its ranks
start, the launcher takes a lease on them (``backend.devices.leases``: an
``flock`` per device that dies with the process, handed to the ranks' parent
too) and sets ``CUDA_VISIBLE_DEVICES`` and the process count from the set.
While they are busy the run waits in the work directory's queue
(``backend.devices.queue``), as this same detached process. Slurm and
multi-node runs take no local lease (the scheduler, or each node, decides).

Commands are argument lists (never a shell string). The workers append their
own output to ``train.log``; this process only reads that file to echo it, so
closing a terminal or a browser tab can never stall training. The workers run
in their own session: if this launcher is killed, they train on and the run is
followed through them (``rundir.effective_status``); abort still reaches them
through the run folder's stop request.
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from .config import Config, ConfigError
from .core import procs
from .core.artifacts import ALLOW_CODE_IN_CONFIG, ArtifactError
from .core.guard import is_hub_id
from .core.rundir import ABORTED_EXIT, ACTIVE, WORKER_MODULE, RunDir, RunFolderError, last_error, now
from .devices import leases
from .devices import queue as run_queue
from .models import read_model_config

DEEPSPEED_DIR = Path(__file__).resolve().parent / "deepspeed"
DEEPSPEED_NAMES = ("deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero2_offload", "deepspeed_zero3",
                   "deepspeed_zero3_offload")
QUEUED_ENV = "FTSTUDIO_QUEUED_RUN"  # set by start_detached: the run id this launcher was queued for
RUN_USER_ENV = "FTSTUDIO_RUN_USER"  # set by start_detached: who asked for the run (a studio login)


class LaunchError(RuntimeError):
    """Something about the launch itself is wrong (ports, processes, devices)."""


@dataclass
class LaunchSpec:
    launcher: str = "pytorch"  # pytorch | slurm
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    addr: str = "127.0.0.1"
    port: int | None = None

    @property
    def distributed(self) -> bool:
        return self.launcher == "slurm" or self.nproc_per_node > 1 or self.nnodes > 1

    @property
    def world_size(self) -> int:
        if self.launcher == "slurm":
            return int(os.environ.get("SLURM_NTASKS", "1"))
        return self.nproc_per_node * self.nnodes

    @classmethod
    def from_env(cls, env=None, launcher: str = "pytorch") -> "LaunchSpec":
        env = os.environ if env is None else env

        def num(name, default):
            raw = env.get(name)
            if raw in (None, ""):
                return default
            try:
                return int(raw)
            except ValueError:
                raise LaunchError(f"{name}={raw!r} should be a whole number") from None

        spec = cls(launcher=launcher, nproc_per_node=num("NPROC_PER_NODE", 1), nnodes=num("NNODES", 1),
                   node_rank=num("NODE_RANK", 0), addr=env.get("ADDR") or "127.0.0.1", port=num("PORT", None))
        spec.check(multi_node_needs_addr=not env.get("ADDR"))
        return spec

    def check(self, multi_node_needs_addr: bool = False) -> None:
        if self.nproc_per_node < 1 or self.nnodes < 1:
            raise LaunchError("NPROC_PER_NODE and NNODES must be at least 1")
        if not 0 <= self.node_rank < self.nnodes:
            raise LaunchError(f"NODE_RANK={self.node_rank} must be between 0 and NNODES-1={self.nnodes - 1}")
        if self.port is not None and not 1 <= self.port <= 65535:
            raise LaunchError(f"PORT={self.port} is not a TCP port; use one between 1024 and 65535")
        if self.nnodes > 1 and (multi_node_needs_addr or self.port is None):
            raise LaunchError("NNODES > 1 needs ADDR (node 0's address) and PORT on every node")

    def to_env(self) -> dict:
        """The variables ``ftstudio train`` reads to launch this shape."""
        env = {}
        if self.nproc_per_node > 1 or self.nnodes > 1:
            env["NPROC_PER_NODE"] = str(self.nproc_per_node)
        if self.nnodes > 1:
            env.update(NNODES=str(self.nnodes), NODE_RANK=str(self.node_rank), ADDR=self.addr, PORT=str(self.port))
        return env

    def record(self, deepspeed: Path | None) -> dict:
        """What launch.json keeps, so a resume reproduces the shape exactly."""
        shape = {**asdict(self), "world_size": self.world_size, "deepspeed": deepspeed.name if deepspeed else None}
        shape.pop("node_rank")
        return shape

    @classmethod
    def from_record(cls, shape: dict, node_rank: int = 0) -> "LaunchSpec":
        try:
            return cls(launcher=str(shape["launcher"]), nproc_per_node=int(shape["nproc_per_node"]),
                       nnodes=int(shape["nnodes"]), node_rank=node_rank, addr=str(shape["addr"]),
                       port=None if shape.get("port") is None else int(shape["port"]))
        except (KeyError, TypeError, ValueError):
            raise LaunchError("the run's launch.json is not a launch shape; give the shape again "
                              "(NPROC_PER_NODE, NNODES, ...)") from None


def resolve_deepspeed(name_or_path: str | None) -> Path | None:
    if not name_or_path:
        return None
    if name_or_path in DEEPSPEED_NAMES:
        return DEEPSPEED_DIR / f"{name_or_path}.json"
    path = Path(name_or_path)
    if path.suffix == ".json" and path.is_file():
        try:
            json.loads(path.read_text())
        except ValueError as exc:
            raise ConfigError(f"--deepspeed {path}: not valid JSON ({exc})") from exc
        return path.resolve()
    raise ConfigError(f"--deepspeed {name_or_path!r}: not one of {', '.join(DEEPSPEED_NAMES)} nor an existing .json file")


def worker_args(run_dir: Path, deepspeed: Path | None, resume: Path | None, slurm: bool = False) -> list[str]:
    args = ["-m", WORKER_MODULE, str(run_dir)]
    if deepspeed:
        args += ["--deepspeed", str(deepspeed)]
    if resume:
        args += ["--resume", str(resume)]
    if slurm:
        args.append("--slurm")
    return args


def build_command(spec: LaunchSpec, run_dir: Path, deepspeed: Path | None = None, resume: Path | None = None,
                  python: str = sys.executable) -> list[str]:
    """The command that starts this node's ranks (an argument list)."""
    if spec.launcher == "slurm":
        return [python, *worker_args(run_dir, deepspeed, resume, slurm=True)]
    if not spec.distributed:
        return [python, *worker_args(run_dir, deepspeed, resume)]
    torchrun = shutil.which("torchrun", path=os.path.dirname(python))
    cmd = [torchrun] if torchrun else [python, "-m", "torch.distributed.run"]
    cmd += ["--nproc_per_node", str(spec.nproc_per_node)]
    if spec.nnodes > 1:
        cmd += ["--nnodes", str(spec.nnodes), "--node_rank", str(spec.node_rank)]
    cmd += ["--master_addr", spec.addr, "--master_port", str(spec.port)]
    return cmd + worker_args(run_dir, deepspeed, resume)


def port_free(port: int, host: str = "") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device_count() -> tuple[int, str]:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count(), "GPUs"
    return os.cpu_count() or 1, "CPU cores"


def run_user() -> str:
    """Who starts this run: the studio login that asked (``FTSTUDIO_RUN_USER``), else the machine's user."""
    return os.environ.get(RUN_USER_ENV) or getpass.getuser()


def device_request(devices: str | None, spec: LaunchSpec, nproc_fixed_by: str | None = None
                   ) -> leases.DeviceRequest | None:
    """The devices this machine's ranks will lease (``--devices 0,1`` or ``auto``/None: the first free ones),
    checked against the inventory. On GPUs (and fake devices) the set fixes the process count:
    ``spec.nproc_per_node`` is set to its size; ``nproc_fixed_by`` names what already fixed the count (e.g.
    ``NPROC_PER_NODE=2``), and a set of another size is refused. On a CPU-only machine the one device is
    "cpu" and the process count stays as asked. None where nothing is leased here: under Slurm (it
    allocates) and for runs over several nodes."""
    if spec.launcher == "slurm" or spec.nnodes > 1:
        if devices not in (None, "", "auto"):
            raise LaunchError(f"--devices {devices}: only for runs on this machine; under --launcher slurm or "
                              "with NNODES > 1 the devices are the scheduler's or each node's own (leave it out)")
        return None
    try:
        request = leases.request(devices, spec.nproc_per_node, nproc_fixed_by)
    except leases.DeviceError as exc:
        raise LaunchError(str(exc)) from None
    if request.kind != "cpu":
        spec.nproc_per_node = request.count
    return request


def preflight(cfg: Config, spec: LaunchSpec, deepspeed: Path | None, build_data: bool = True, phases=None):
    """Every check that can fail before a process is started. Raises ConfigError,
    DataError or LaunchError with a message that says what to change. ``phases``
    (``train.phases.Phases``) is told when the data part begins and ends."""
    model = cfg.model.name_or_path
    if model != "demo" and not Path(model).expanduser().exists() and not is_hub_id(model):
        raise ConfigError(f"model.name_or_path {model!r}: no such folder, and not a Hub id like org/name")
    try:  # its config, not its weights: a model that needs its own code, or an unreachable Hub, fails here
        read_model_config(model, trust_remote_code=cfg.model.trust_remote_code, what="model.name_or_path",
                          allow=ALLOW_CODE_IN_CONFIG)
    except ArtifactError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.training.method == "qlora":
        try:
            import bitsandbytes  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - ImportError, or a broken native library
            raise ConfigError(f"training.method is qlora, but bitsandbytes is not usable here ({exc}); "
                              "pip install bitsandbytes, or use training.method=lora") from None
    if deepspeed is not None:
        try:
            import deepspeed as _ds  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - as above
            raise ConfigError(f"--deepspeed needs the deepspeed package ({exc}); pip install deepspeed") from None
    if spec.launcher != "slurm":
        have, kind = device_count() if spec.nproc_per_node > 1 else (1, "")  # one process fits any machine
        if spec.nproc_per_node > have:
            raise LaunchError(f"NPROC_PER_NODE={spec.nproc_per_node}, but this machine has {have} {kind}")
        if spec.distributed and spec.node_rank == 0 and spec.port is not None and not port_free(spec.port):
            raise LaunchError(f"PORT={spec.port} is already in use on this machine; pick a free one")
    if not build_data:
        return None
    if cfg.training.report_to:  # rank 0, the one that reports, runs where the data is built
        from .train.trackers import check_installed

        check_installed(cfg.training.report_to)
    from .train.data import eval_data, training_data, training_tokenizer

    if phases is not None:
        phases.begin("data_preflight")
    # the whole pipeline, unpacked: its errors now, not in the ranks, and the datasets cache is filled, so
    # the ranks read the encoded rows back (their data phase) and only pack them
    tokenizer = training_tokenizer(cfg)
    _, report = training_data(cfg, tokenizer, pack=False)
    eval_data(cfg, tokenizer, pack=False)
    if phases is not None:
        phases.end()
    return report


def default_run_dir(cfg: Config, spec: LaunchSpec, work_root: str = "work_dirs") -> Path:
    """A new run folder. Ranks on several nodes / Slurm tasks must agree on it
    without talking, so those names come from what they share; a rerun with the
    same shape finds the earlier run there and is refused (give --work-dir)."""
    if spec.launcher == "slurm" and os.environ.get("SLURM_JOB_ID"):
        return Path(work_root) / f"{cfg.name}-slurm{os.environ['SLURM_JOB_ID']}.{os.environ.get('SLURM_STEP_ID', '0')}"
    if spec.nnodes > 1:
        return Path(work_root) / f"{cfg.name}-{spec.addr}-{spec.port}"
    base = Path(work_root) / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def find_resume(resume: str | bool, run_dir: Path | None, cfg_name: str, work_root="work_dirs") -> tuple[RunDir, Path]:
    """(run, checkpoint folder) to resume from.

    ``resume`` True: the latest complete checkpoint of ``run_dir`` (or of the
    newest run of this config under work_dirs). A path: a checkpoint folder,
    an ``iter_<N>.pth`` (its run's checkpoint-N), or a run folder (its latest).
    """
    from .core.artifacts import iter_step
    from .core.rundir import checkpoint_step, list_runs

    if resume is True:
        if run_dir is None:
            mine = [r for r in list_runs(work_root) if r.name.startswith(f"{cfg_name}-")]
            if not mine:
                raise ConfigError(f"--resume: no earlier run of {cfg_name!r} under {work_root}; give --work-dir or a checkpoint")
            run_dir = mine[0].path
        run = RunDir(run_dir)
        if not run.is_run():
            raise ConfigError(f"--resume: {run_dir} is not a run folder")
        ckpt = run.latest_checkpoint()
        if ckpt is None:
            raise ConfigError(f"--resume: {run_dir} has no complete checkpoint yet")
        return run, ckpt
    path = Path(resume)
    if path.is_file() and iter_step(path) is not None:
        run = RunDir(path.parent)
        ckpt = run.checkpoint_dir(iter_step(path))
        if ckpt not in [c for _, c in run.checkpoints()]:
            raise ConfigError(f"--resume {path}: its resumable state {ckpt} is gone or incomplete (save_total_limit?)")
        return run, ckpt
    if path.is_dir() and RunDir(path).is_run():
        return find_resume(True, path, cfg_name)
    if path.is_dir() and checkpoint_step(path) is not None and RunDir(path.parent.parent).is_run():
        return RunDir(path.parent.parent), path
    raise ConfigError(f"--resume {resume}: not a checkpoint folder, iter_<N>.pth or run folder")


def resume_shape(run: RunDir, env_spec: LaunchSpec, deepspeed: Path | None, env=None) -> tuple[LaunchSpec, Path | None]:
    """The launch shape and DeepSpeed config a resume must use: the recorded ones.
    A different shape asked for in the environment is refused, not silently used."""
    env = os.environ if env is None else env
    shape = run.launch()
    if not shape:  # a run from before launch.json: take what was asked
        return env_spec, deepspeed
    spec = LaunchSpec.from_record(shape, node_rank=env_spec.node_rank)
    for var, field_name in (("NPROC_PER_NODE", "nproc_per_node"), ("NNODES", "nnodes")):
        if env.get(var) and int(env[var]) != getattr(spec, field_name):
            raise LaunchError(f"{run.path} was launched with {var}={getattr(spec, field_name)}; resume it with "
                              f"the same shape (or unset {var}: the recorded shape is used)")
    if env_spec.launcher != spec.launcher:
        raise LaunchError(f"{run.path} was launched with --launcher {spec.launcher}; resume it the same way")
    if spec.nnodes > 1 and env.get("PORT"):
        spec.port = env_spec.port
    if spec.nnodes > 1 and env.get("ADDR"):
        spec.addr = env_spec.addr
    recorded = run.deepspeed_file if shape.get("deepspeed") else None
    if deepspeed is not None and (recorded is None or json.loads(deepspeed.read_text()) != json.loads(recorded.read_text())):
        raise LaunchError(f"{run.path} ran with DeepSpeed {shape.get('deepspeed') or 'off'}; resume it with the "
                          "same config (or leave --deepspeed out: the recorded one is used)")
    return spec, recorded


class Follower:
    """Echo train.log to a stream as it grows (reading a file never blocks the writers)."""

    def __init__(self, path: Path, out, start_at_end: bool = False):
        self.path, self.out = path, out
        self.pos = path.stat().st_size if start_at_end and path.exists() else 0

    def poll(self):
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                chunk = f.read()
        except OSError:
            return
        if chunk:
            self.pos += len(chunk)
            self.out.write(chunk.decode("utf-8", errors="replace"))
            self.out.flush()


def claim(run: RunDir, spec: LaunchSpec, resume: Path | None, owner: bool) -> None:
    """Make sure this folder is ours to run in: a new (or empty) one, the run we
    resume, or the one the studio queued for this very launcher."""
    if not owner:
        return _wait_for_owner(run, spec)
    if resume is not None:
        if not run.is_run():
            raise RunFolderError(f"{run.path} is not a run folder; nothing to resume")
        return None
    queued = os.environ.get(QUEUED_ENV)
    if queued:  # the studio claimed the folder and queues this launcher; it writes "queued" just after starting us
        deadline = time.time() + 60
        while time.time() < deadline:
            if run.status().get("run_id") == queued and run.status().get("state") == "queued":
                return None
            time.sleep(0.1)
        raise RunFolderError(f"{run.path}: this launcher was queued for run {queued}, but the folder does not say so")
    return run.claim_new()


def _wait_for_owner(run: RunDir, spec: LaunchSpec, timeout: float = 300) -> None:
    """Another node / Slurm task: wait until node 0 has started this run (not an earlier one)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        st, shape = run.status(), run.launch()
        if st.get("state") in ACTIVE and shape.get("nnodes") == spec.nnodes and shape.get("port") == spec.port \
                and run.config_file.exists():
            return
        time.sleep(0.2)
    held = run.status().get("state")
    raise LaunchError(f"{run.path}: node 0 / task 0 did not start this run within {timeout:.0f} s"
                      + (f" (the folder holds an earlier run, {held}; give every node the same new --work-dir)"
                         if held else "; did it start, with the same --work-dir?"))


def prepare(run: RunDir, cfg: Config, spec: LaunchSpec, deepspeed: Path | None, resume: Path | None) -> Path | None:
    """Lay out the run folder (owner only). Returns the DeepSpeed file the workers use."""
    if not resume:
        run.write_config(cfg.to_yaml())
    if deepspeed and deepspeed != run.deepspeed_file:
        shutil.copyfile(deepspeed, run.deepspeed_file)
    run.write_launch(spec.record(run.deepspeed_file if deepspeed else None))
    run.clear_result()
    return run.deepspeed_file if deepspeed else None


def take_devices(rd: RunDir, cfg: Config, request: leases.DeviceRequest) -> leases.Lease | None:
    """The lease on this run's devices: at once if they are free and no earlier run of this work directory
    waits for one of them; else the run is queued (status "queued", a ticket in ``.queue/``) and this
    launcher waits its turn. None if a stop was asked for (SIGTERM/SIGINT or a stop request) meanwhile."""
    lease = run_queue.try_now(rd.path.parent, request)
    if lease is not None:
        return lease
    previous = rd.status()
    hint = {"user": previous.get("user") or run_user(), "devices": None if request.auto else list(request.devices),
            "waiting_for": list(request.devices)}
    if previous.get("state") == "queued":  # the studio queued this launcher (start_detached)
        rd.write_status(**hint)
    else:
        me = procs.self_record()
        rd.start("queued", run_id=previous.get("run_id") or uuid.uuid4().hex, launcher=me.to_dict(), workers=None,
                 command=list(me.argv), host=socket.gethostname(), started=previous.get("started") or now(),
                 config=cfg.name, method=cfg.training.method, **hint)
    asked = []
    old = {s: signal.signal(s, lambda signum, frame: asked.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return run_queue.wait_turn(rd, request, hint["user"], stopped=lambda: bool(asked),
                                   say=lambda text: print(text, flush=True))
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run(cfg: Config, spec: LaunchSpec, *, deepspeed: Path | None = None, run_dir: Path | None = None,
        resume: Path | None = None, follow=sys.stdout, work_root: str = "work_dirs",
        devices: leases.DeviceRequest | None = None, phases=None) -> tuple[int, Path]:
    """Start this node's ranks on ``devices`` (``device_request``; None: no lease, e.g. under Slurm), waiting
    in the work directory's queue while they are busy, and wait for the ranks. Returns (exit code, run_dir);
    the code returned is the one recorded in status.json. ``phases``: this launcher's (``train.phases``);
    its time in the queue is added, and status.json gets them with the ranks' own."""
    rd = RunDir(run_dir or default_run_dir(cfg, spec, work_root))
    owner = spec.node_rank == 0 and int(os.environ.get("SLURM_PROCID", "0")) == 0
    claim(rd, spec, resume, owner)
    lease = None
    if owner:
        if not os.environ.get(QUEUED_ENV):  # a queued run's stop request is for this very attempt: keep it
            rd.clear_stop()
        if devices is not None:
            if phases is not None:
                phases.begin("queued")
            lease = take_devices(rd, cfg, devices)
            if phases is not None:
                phases.end()
            if lease is None:  # asked to stop while it waited for its devices
                rd.end("aborted", ABORTED_EXIT, None)
                return ABORTED_EXIT, rd.path
    try:
        return _run_ranks(rd, cfg, spec, deepspeed, resume, follow, owner, devices, lease, phases)
    finally:
        if lease is not None:
            lease.release()


def ranks_env(cfg: Config, spec: LaunchSpec, devices: leases.DeviceRequest | None,
              lease: leases.Lease | None) -> dict[str, str]:
    """What this node's ranks get in their environment on top of ours: the leased devices, and for
    several ranks the precision ``model.dtype: auto`` chose here, so that they all agree
    (backend/train/precision.py)."""
    env = devices.child_env(lease.devices) if devices is not None and lease is not None else {}
    if spec.distributed:
        from .train.precision import rank_env

        env.update(rank_env(cfg.model.dtype, across_machines=spec.nnodes > 1 or spec.launcher == "slurm"))
    return env


def _run_ranks(rd: RunDir, cfg: Config, spec: LaunchSpec, deepspeed: Path | None, resume: Path | None, follow,
               owner: bool, devices: leases.DeviceRequest | None, lease: leases.Lease | None,
               phases=None) -> tuple[int, Path]:
    if spec.distributed and spec.launcher != "slurm" and spec.port is None:
        spec.port = free_port()  # chosen now, not before a wait in the queue
    if owner:
        deepspeed = prepare(rd, cfg, spec, deepspeed, resume)
        if rd.stop_requested():  # aborted while it was queued
            rd.end("aborted", ABORTED_EXIT, None)
            return ABORTED_EXIT, rd.path
    if phases is not None:
        phases.end()  # the launcher's own part ends where the ranks begin
    cmd = build_command(spec, rd.path, deepspeed, resume)
    extra_env = ranks_env(cfg, spec, devices, lease)
    printable = " ".join(cmd)
    if follow is not None:
        follow.write(f"run dir: {rd.path}\ncommand: {printable}\n")
        follow.flush()
    on = f" on devices {','.join(lease.devices)}" if lease is not None else ""
    rd.append_log(f"== {now()} {socket.gethostname()} node {spec.node_rank}{on}: "
                  + "".join(f"{k}={v} " for k, v in extra_env.items()) + f"{printable}\n")
    follower = Follower(rd.train_log, follow, start_at_end=True) if follow is not None else None
    with open(rd.train_log, "ab") as log:  # the lease's descriptors go to the child: it holds the devices too
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=spec.launcher != "slurm", cwd=os.getcwd(),
                                env={**os.environ, **extra_env} if extra_env else None,
                                pass_fds=lease.fds if lease is not None else ())
    if owner:
        _record_start(rd, cfg, spec, cmd, proc, resume, deepspeed, lease)
    stop = _StopHandlers(rd, spec, proc, owner)
    try:
        while proc.poll() is None:
            if follower:
                follower.poll()
            time.sleep(0.2)
    finally:
        stop.restore()
    if follower:
        follower.poll()
    if not owner:
        return _exit_code(proc.returncode), rd.path
    state, code, error = outcome(rd, proc.returncode, stop.asked)
    timings = _phase_fields(rd, phases)
    rd.end(state, code, error, **timings)
    if follow is not None:
        follow.write(f"run {state} (exit code {code}): {rd.path}\n" + (f"error: {error}\n" if error else ""))
        if timings.get("launcher_phases"):
            from .train.phases import format_phases

            follow.write(format_phases(timings["launcher_phases"], prefix="launcher phases") + "\n")
        follow.flush()
    return code, rd.path


def _phase_fields(rd: RunDir, phases) -> dict:
    """status.json's ``phases`` (rank 0's, from result.json: imports, data, model load, steps, save)
    and ``launcher_phases`` (this launcher's preflight, data preflight, queue)."""
    fields = {}
    ranks = rd.result().get("phases")
    if isinstance(ranks, dict):
        fields["phases"] = ranks
    if phases is not None:
        fields["launcher_phases"] = {**phases.seconds, "total": phases.total}
    return fields


def _record_start(rd: RunDir, cfg: Config, spec: LaunchSpec, cmd: list[str], proc, resume: Path | None,
                  deepspeed: Path | None, lease: leases.Lease | None = None) -> None:
    previous = rd.status()
    workers = procs.capture(proc.pid)
    slurm = {k: os.environ[v] for k, v in (("slurm_job_id", "SLURM_JOB_ID"), ("slurm_step_id", "SLURM_STEP_ID"))
             if spec.launcher == "slurm" and os.environ.get(v)}
    rd.start("running", launcher=procs.self_record().to_dict(), workers=workers.to_dict() if workers else None,
             run_id=previous.get("run_id") or uuid.uuid4().hex, command=cmd, host=socket.gethostname(),
             started=previous.get("started") if (resume or previous.get("started")) else now(),
             resumed_at=now() if resume else previous.get("resumed_at"),
             resumed_from=str(resume) if resume else previous.get("resumed_from"),
             config=cfg.name, method=cfg.training.method, world_size=spec.world_size, nnodes=spec.nnodes,
             launcher_kind=spec.launcher, deepspeed=_deepspeed_label(rd) if deepspeed else None,
             user=previous.get("user") or run_user(), resumed_by=run_user() if resume else previous.get("resumed_by"),
             devices=list(lease.devices) if lease is not None else None, queue_position=None, waiting_for=None,
             **slurm)


def _deepspeed_label(rd: RunDir) -> str | None:
    """The DeepSpeed config's name for views: a shipped one by its name, a custom one as 'custom'."""
    try:
        ran = json.loads(rd.deepspeed_file.read_text())
    except (OSError, ValueError):
        return None
    for name in DEEPSPEED_NAMES:
        if json.loads((DEEPSPEED_DIR / f"{name}.json").read_text()) == ran:
            return name
    return "custom"


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def outcome(rd: RunDir, returncode: int, stop_asked: bool) -> tuple[str, int, str | None]:
    """(state, exit code, error) of a run whose workers exited with ``returncode``."""
    result = rd.result()
    code = _exit_code(returncode)
    if result.get("state") == "aborted" or (stop_asked and result.get("state") != "finished" and code == 0):
        return "aborted", ABORTED_EXIT, None
    if code == 0 and result.get("state") == "finished":
        return "finished", 0, None
    error = result.get("error")
    if returncode < 0:
        error = error or f"the workers were killed by {signal.Signals(-returncode).name}"
    error = error or last_error(rd.train_log) or f"the workers exited with code {code} without saying why"
    if _disk_full(rd.path) or "No space left on device" in error:
        error = f"no space left on device at {rd.path} ({error})"
    return "failed", code or 1, error  # a rank died without saying so: never report success


def _disk_full(path: Path) -> bool:
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (1 << 20)


class _StopHandlers:
    """Ctrl-C / SIGTERM here: the first asks the ranks to save and stop (through the
    run folder; torchrun is not signalled, it would kill ranks mid-save after 30 s);
    a second one stops them hard."""

    def __init__(self, rd: RunDir, spec: LaunchSpec, proc, owner: bool):
        self.rd, self.spec, self.proc, self.owner = rd, spec, proc, owner
        self.asked = False
        self.old = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        try:
            if self.asked:
                self._signal_workers(signal.SIGTERM, hard=True)
            elif self.owner:
                self.rd.request_stop(by=f"signal {signum} to the launcher")
            else:
                self._signal_workers(signal.SIGTERM, hard=False)
        except (ProcessLookupError, OSError):
            pass
        self.asked = True

    def _signal_workers(self, sig, hard: bool):
        if self.spec.launcher == "slurm" or not self.spec.distributed:
            self.proc.send_signal(sig)  # our own child: the worker itself
        elif hard:
            os.killpg(self.proc.pid, sig)  # our own child's process group
        else:
            for pid in procs.descendants(self.proc.pid):  # the ranks under our torchrun, not torchrun
                os.kill(pid, sig)

    def restore(self):
        for s, h in self.old.items():
            signal.signal(s, h)


def start_detached(config: Config, run_dir: str | os.PathLike, *, deepspeed: str | None = None,
                   spec: LaunchSpec | None = None, resume: bool = False, devices: str | None = None,
                   user: str | None = None) -> subprocess.Popen:
    """Start ``ftstudio train`` for ``config`` in the background (its own
    session, output into the run folder only) and return at once: what the
    studio uses. The run is then followed through its run folder, so a
    restarted caller finds it again. A new run needs a new folder; ``resume``
    continues a run in its recorded launch shape. ``devices``: "0,1" or
    None/"auto" (the first free ones; checked here, so an unknown id is an
    error now, not a failed run); while they are busy the run waits in the
    queue (``backend.devices.queue``). ``user``: who asks (a studio login;
    default the machine's user), recorded as the run's owner (a resumed run
    keeps its owner)."""
    rd = RunDir(run_dir)
    spec = spec or LaunchSpec()
    if resume:
        if not rd.is_run():
            raise RunFolderError(f"{rd.path} is not a run folder; nothing to resume")
        source = rd.config_file
    request = _check_devices(devices, rd if resume else None, spec)
    if not resume:
        rd.claim_new()
        source = rd.write_requested(config.to_yaml())
    cmd = [sys.executable, "-m", "backend.cli", "train", str(source), "--work-dir", str(rd.path), "--quiet"]
    if deepspeed:
        cmd += ["--deepspeed", deepspeed]
    if resume:
        cmd.append("--resume")
    if devices and devices != "auto":
        cmd += ["--devices", devices]
    previous = rd.status()
    run_id = previous.get("run_id") or uuid.uuid4().hex
    asker = user or getpass.getuser()
    rd.clear_stop()
    rd.clear_result()
    env = {k: v for k, v in os.environ.items() if k not in ("NPROC_PER_NODE", "NNODES", "NODE_RANK", "ADDR", "PORT")}
    env.update(spec.to_env(), **{QUEUED_ENV: run_id, RUN_USER_ENV: asker})
    with open(rd.launcher_log, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env)
    record = procs.capture(proc.pid)
    fresh = {} if resume else {"started": now(), "config": config.name, "method": config.training.method}
    # "queued" until the launcher's preflight passes and it writes "running"; if the
    # preflight fails, effective_status() reads the error off launcher.log
    rd.start("queued", run_id=run_id, host=socket.gethostname(), launcher=record.to_dict() if record else None,
             workers=None, command=cmd, user=(previous.get("user") if resume else None) or asker,
             devices=list(request.devices) if request is not None and not request.auto else None,
             queue_position=None, waiting_for=None, **fresh)
    return proc


def _check_devices(devices: str | None, resumed: RunDir | None, spec: LaunchSpec) -> leases.DeviceRequest | None:
    """``device_request`` as the launcher will see it (the recorded shape for a resume), without touching
    ``spec``."""
    if resumed is not None and resumed.launch():
        shape = LaunchSpec.from_record(resumed.launch())
        return device_request(devices, shape, "the run's recorded launch shape")
    shape = dataclasses.replace(spec)
    return device_request(devices, shape, f"NPROC_PER_NODE={spec.nproc_per_node}" if spec.nproc_per_node > 1 else None)
