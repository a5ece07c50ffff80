"""``ftstudio train``: check everything that can be checked up front, create
the run directory, start the ranks, follow them, record how the run ended.

Launch modes, as in XTuner's guide:
- no distributed variables: one worker process;
- ``NPROC_PER_NODE`` [``NNODES NODE_RANK ADDR PORT``]: ``torchrun`` with those;
- ``--launcher slurm``: no torchrun; this process is one Slurm task = one rank.

Commands are argument lists (never a shell string). The workers append their
own output to ``train.log``; this process only reads that file to echo it, so
closing a terminal or a browser tab can never stall training.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .config import Config, ConfigError
from .runs import last_error, latest_checkpoint, now, read_status, update_status

DEEPSPEED_DIR = Path(__file__).resolve().parent / "deepspeed"
DEEPSPEED_NAMES = ("deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero2_offload", "deepspeed_zero3",
                   "deepspeed_zero3_offload")


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

        spec = cls(
            launcher=launcher,
            nproc_per_node=num("NPROC_PER_NODE", 1),
            nnodes=num("NNODES", 1),
            node_rank=num("NODE_RANK", 0),
            addr=env.get("ADDR") or "127.0.0.1",
            port=num("PORT", None),
        )
        if spec.nproc_per_node < 1 or spec.nnodes < 1:
            raise LaunchError("NPROC_PER_NODE and NNODES must be at least 1")
        if not 0 <= spec.node_rank < spec.nnodes:
            raise LaunchError(f"NODE_RANK={spec.node_rank} must be between 0 and NNODES-1={spec.nnodes - 1}")
        if spec.nnodes > 1 and (not env.get("ADDR") or spec.port is None):
            raise LaunchError("NNODES > 1 needs ADDR (node 0's address) and PORT on every node")
        return spec


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
    args = ["-m", "backend.train.worker", str(run_dir)]
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


def _looks_like_hub_id(name: str) -> bool:
    return bool(re.match(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$", name)) and not name.startswith((".", "/"))


def preflight(cfg: Config, spec: LaunchSpec, deepspeed: Path | None, build_data: bool = True):
    """Every check that can fail before a process is started. Raises ConfigError,
    DataError or LaunchError with a message that says what to change."""
    model = cfg.model.name_or_path
    if model != "demo" and not Path(model).expanduser().exists() and not _looks_like_hub_id(model):
        raise ConfigError(f"model.name_or_path {model!r}: no such folder, and not a Hub id like org/name")
    if cfg.training.method == "qlora":
        try:
            import bitsandbytes  # noqa: F401
        except Exception as exc:  # ImportError, or a broken native library
            raise ConfigError(
                f"training.method is qlora, but bitsandbytes is not usable here ({exc}); "
                "pip install bitsandbytes, or use training.method=lora"
            ) from None
    if deepspeed is not None:
        try:
            import deepspeed as _ds  # noqa: F401
        except Exception as exc:
            raise ConfigError(f"--deepspeed needs the deepspeed package ({exc}); pip install deepspeed") from None
    if spec.launcher != "slurm":
        have, kind = device_count()
        if spec.nproc_per_node > have:
            raise LaunchError(f"NPROC_PER_NODE={spec.nproc_per_node}, but this machine has {have} {kind}")
        if spec.distributed and spec.node_rank == 0 and spec.port is not None and not port_free(spec.port):
            raise LaunchError(f"PORT={spec.port} is already in use on this machine; pick a free one")
    if not build_data:
        return None
    from .train.data import training_data, training_tokenizer

    _, report = training_data(cfg, training_tokenizer(cfg), pack=False)
    return report


def default_run_dir(cfg: Config, spec: LaunchSpec, work_root: str = "work_dirs") -> Path:
    """A new run folder. Ranks on several nodes / Slurm tasks must agree on it
    without talking, so those names come from what they share."""
    if spec.launcher == "slurm" and os.environ.get("SLURM_JOB_ID"):
        tag = f"slurm{os.environ['SLURM_JOB_ID']}.{os.environ.get('SLURM_STEP_ID', '0')}"
    elif spec.nnodes > 1:
        tag = f"{spec.addr}-{spec.port}"
    else:
        tag = time.strftime("%Y%m%d-%H%M%S")
    return Path(work_root) / f"{cfg.name}-{tag}"


def find_resume(resume: str | bool, run_dir: Path | None, cfg_name: str, work_root="work_dirs") -> tuple[Path, Path]:
    """(run_dir, checkpoint folder) to resume from.

    ``resume`` True: the latest complete checkpoint of ``run_dir`` (or of the
    newest run of this config under work_dirs). A path: a checkpoint folder,
    an ``iter_<N>.pth`` (its run's checkpoint-N), or a run folder (its latest).
    """
    if resume is True:
        if run_dir is None:
            candidates = sorted(Path(work_root).glob(f"{cfg_name}-*/status.json"), key=lambda p: p.stat().st_mtime)
            if not candidates:
                raise ConfigError(f"--resume: no earlier run of {cfg_name!r} under {work_root}; give --work-dir or a checkpoint")
            run_dir = candidates[-1].parent
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise ConfigError(f"--resume: {run_dir} has no complete checkpoint yet")
        return Path(run_dir), ckpt
    path = Path(resume)
    if path.is_file() and path.name.startswith("iter_"):
        step = path.stem.split("_", 1)[1]
        ckpt = path.parent / "checkpoints" / f"checkpoint-{step}"
        if not ckpt.is_dir():
            raise ConfigError(f"--resume {path}: its resumable state {ckpt} is gone (save_total_limit?)")
        return path.parent, ckpt
    if path.is_dir() and (path / "checkpoints").is_dir():
        return find_resume(True, path, cfg_name)
    if path.is_dir() and path.name.startswith("checkpoint-") and path.parent.name == "checkpoints":
        return path.parent.parent, path
    raise ConfigError(f"--resume {resume}: not a checkpoint folder, iter_<N>.pth or run folder")


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


def run(cfg: Config, spec: LaunchSpec, *, deepspeed: Path | None = None, run_dir: Path | None = None,
        resume: Path | None = None, follow=sys.stdout, work_root: str = "work_dirs") -> tuple[int, Path]:
    """Start this node's ranks and wait for them. Returns (exit code, run_dir)."""
    run_dir = Path(run_dir or default_run_dir(cfg, spec, work_root)).resolve()
    owner = spec.node_rank == 0 and int(os.environ.get("SLURM_PROCID", "0")) == 0
    if spec.distributed and spec.launcher != "slurm" and spec.port is None:
        spec.port = free_port()
    cmd = build_command(spec, run_dir, deepspeed, resume)
    run_dir.mkdir(parents=True, exist_ok=True)
    if owner:
        if not resume:
            tmp = run_dir / ".config.yaml.tmp"
            tmp.write_text(cfg.to_yaml(), encoding="utf-8")
            os.replace(tmp, run_dir / "config.yaml")
        if deepspeed:
            shutil.copyfile(deepspeed, run_dir / "deepspeed.json")
        (run_dir / "result.json").unlink(missing_ok=True)
    else:  # another node / Slurm task: wait for the owner to lay out the run folder
        deadline = time.time() + 300
        while not (run_dir / "config.yaml").exists():
            if time.time() > deadline:
                raise LaunchError(f"{run_dir}/config.yaml did not appear: did node 0 / task 0 start?")
            time.sleep(0.2)
    printable = " ".join(cmd)
    if follow is not None:
        follow.write(f"run dir: {run_dir}\ncommand: {printable}\n")
        follow.flush()
    log_path = run_dir / "train.log"
    log = open(log_path, "ab")
    log.write(f"== {now()} {socket.gethostname()} node {spec.node_rank}: {printable}\n".encode())
    log.flush()
    follower = Follower(log_path, follow, start_at_end=True) if follow is not None else None
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=spec.launcher != "slurm", cwd=os.getcwd())
    log.close()
    if owner:
        previous = read_status(run_dir)
        update_status(
            run_dir, state="running", pid=os.getpid(), pgid=proc.pid if spec.launcher != "slurm" else os.getpgid(0),
            command=cmd, host=socket.gethostname(), started=previous.get("started") if resume else now(),
            resumed_at=now() if resume else previous.get("resumed_at"), resumed_from=str(resume) if resume else None,
            ended=None, exit_code=None, error=None, config=cfg.name, method=cfg.training.method,
            world_size=int(os.environ.get("SLURM_NTASKS", "1")) if spec.launcher == "slurm"
            else spec.nproc_per_node * spec.nnodes, deepspeed=deepspeed.stem if deepspeed else None,
        )
    stop = {"asked": False}

    def forward(signum, frame):  # Ctrl-C / SIGTERM here: ask the ranks to stop gracefully
        stop["asked"] = True
        try:
            if spec.launcher == "slurm":
                proc.send_signal(signal.SIGTERM)
            else:
                os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while proc.poll() is None:
            if follower:
                follower.poll()
            time.sleep(0.2)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if follower:
        follower.poll()
    code = proc.returncode
    if owner:
        result = {}
        try:
            result = json.loads((run_dir / "result.json").read_text())
        except (OSError, ValueError):
            pass
        if result.get("state") == "aborted" or (stop["asked"] and result.get("state") != "finished"):
            state = "aborted"
        elif code == 0 and result.get("state") == "finished":
            state = "finished"
        else:
            state = "failed"
            if code == 0:
                code = 1  # a rank died without saying so: never report success
        error = result.get("error") if state == "failed" else None
        if state == "failed" and not error:
            error = last_error(log_path)
        update_status(run_dir, state=state, ended=now(), exit_code=code, error=error)
        if follow is not None:
            follow.write(f"run {state} (exit code {code}): {run_dir}\n")
            follow.flush()
        if state == "aborted" and code == 0:
            code = 143
    return code, run_dir


def start_detached(config: Config, run_dir: str | os.PathLike, *, deepspeed: str | None = None,
                   env: dict | None = None, resume: bool = False) -> subprocess.Popen:
    """Start ``ftstudio train`` for ``config`` in the background (its own
    session, output into the run folder only) and return at once: what the
    studio uses. The run is then followed through its run folder, so a
    restarted caller finds it again (``backend.runs``)."""
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "requested.yaml"
    config_path.write_text(config.to_yaml(), encoding="utf-8")
    cmd = [sys.executable, "-m", "backend.cli", "train", str(run_dir / "config.yaml" if resume else config_path),
           "--work-dir", str(run_dir), "--quiet"]
    if deepspeed:
        cmd += ["--deepspeed", deepspeed]
    if resume:
        cmd.append("--resume")
    # "queued" until the launcher's preflight passes and it writes "running";
    # if the preflight fails, effective_status() reads the error off launcher.log
    fresh = {} if resume else {"started": now(), "config": config.name, "method": config.training.method}
    update_status(run_dir, state="queued", pid=None, host=socket.gethostname(), ended=None, exit_code=None,
                  error=None, command=cmd, **fresh)
    with open(run_dir / "launcher.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env={**os.environ, **(env or {})})
    if read_status(run_dir).get("state") == "queued":
        update_status(run_dir, pid=proc.pid)
    return proc
