"""One training rank: ``python -m backend.train.worker RUN_DIR [--deepspeed JSON] [--resume CKPT]``.

Started by ``ftstudio train`` (alone, under torchrun, or as a Slurm task). It
reads ``RUN_DIR/config.yaml``, builds the data with the data pipeline, the
model with transformers/peft/bitsandbytes, and trains with ``transformers.Trainer``
(DeepSpeed through Trainer's own integration). Everything it produces goes
into the run directory. Its own stdout/stderr are appended to ``train.log``
at the file-descriptor level, so no pipe ever needs draining. It keeps
bitsandbytes and DeepSpeed out unless the run uses them, and ends with a line
of where its time went (``phases.py``), also kept in result.json.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import traceback
from pathlib import Path


def slurm_to_torch_env(default_port: int = 29500) -> None:
    """Under ``--launcher slurm`` each Slurm task is one rank: derive the
    torch.distributed variables from Slurm's."""
    env = os.environ
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env["SLURM_NTASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env["LOCAL_WORLD_SIZE"] = env.get("SLURM_NTASKS_PER_NODE", env["SLURM_NTASKS"]).split("(")[0]
    env["NODE_RANK"] = env.get("SLURM_NODEID", "0")
    if "MASTER_ADDR" not in env:
        env["MASTER_ADDR"] = env.get("ADDR") or first_slurm_host()
    if "MASTER_PORT" not in env:
        job = int(env.get("SLURM_JOB_ID", "0") or 0)
        env["MASTER_PORT"] = env.get("PORT") or str(default_port + job % 1000)


def first_slurm_host() -> str:
    import subprocess

    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1")


def redirect_output(log_path: Path) -> None:
    """Append this process's stdout and stderr to train.log (fd level, so
    C extensions and child processes land there too)."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
    sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)


class AbortFlag:
    """An abort asked for by a signal (SIGTERM/SIGINT: the launcher, Slurm's
    scancel, a pre-emption) or by the run folder's stop request (ftstudio abort,
    the studio; rank 0 reads it). Either only sets a flag: at the next step end
    the ranks agree on it, save a complete checkpoint there and stop."""

    def __init__(self, run=None):
        self.signalled = False
        self.run = run
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if not self.signalled:
            print(f"[rank {os.environ.get('RANK', '0')}] received signal {signum}: saving and stopping after this step",
                  flush=True)
        self.signalled = True

    @property
    def requested(self) -> bool:
        return self.signalled or (self.run is not None and os.environ.get("RANK", "0") == "0"
                                  and self.run.stop_requested())


def skip_deepspeed_shm_build() -> None:
    """DeepSpeed JIT-compiles its shared-memory all-reduce op at every
    ``init_distributed`` on CPU. Training never uses it (it serves inference
    all-reduce, and only when LOCAL_SIZE is set), yet its build takes ~45 s on
    a fresh machine, races between ranks, and a build killed half-way leaves
    a lock file that hangs every later run. So it is not built."""
    import importlib

    import torch

    if torch.cuda.is_available():
        return
    try:
        # `import deepspeed.comm.torch` would bind the torch package (deepspeed.comm re-exports it)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    except ImportError:
        pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="backend.train.worker")
    ap.add_argument("run_dir")
    ap.add_argument("--deepspeed", default=None, help="DeepSpeed JSON file")
    ap.add_argument("--resume", default=None, help="checkpoint folder to resume from")
    ap.add_argument("--slurm", action="store_true", help="take ranks from SLURM_* variables")
    ap.add_argument("--no-redirect", action="store_true", help="keep stdout/stderr (debugging)")
    args = ap.parse_args(argv)
    from ..core.rundir import RunDir
    from .allocator import prepare_training_process
    from .phases import Phases

    prepare_training_process()  # freed tensors reused, oneDNN's cache bounded (allocator.py)

    phases = Phases("imports", since_process_start=True)
    run_dir = Path(args.run_dir).resolve()
    run = RunDir(run_dir)
    if args.slurm:
        slurm_to_torch_env()
    if not args.no_redirect:
        redirect_output(run.train_log)
    abort_flag = AbortFlag(run)
    rank = int(os.environ.get("RANK", "0"))
    try:
        hide_unused_stacks(run, args.deepspeed)
        if args.deepspeed:
            skip_deepspeed_shm_build()
        from .trainer import train

        state = train(run_dir, deepspeed=args.deepspeed, resume=args.resume, abort_flag=abort_flag, phases=phases)
    except BaseException as exc:  # noqa: BLE001 - any failure ends the run as failed, with its summary
        if isinstance(exc, SystemExit) and exc.code in (0, None):
            raise
        summary = failure_summary(exc)
        try:
            traceback.print_exc()
            print(f"[rank {rank}] failed: {summary}", flush=True)
        except OSError:  # train.log is on the full disk too
            pass
        if rank == 0:
            _write_result(run, "failed", summary, 1, _phases_record(phases, rank))
        return 1
    if rank == 0:
        _write_result(run, state, None, 0, _phases_record(phases, rank))
    if close_process_group():
        exit_without_teardown(0)
    return 0


def close_process_group() -> bool:
    """Tear the ranks' process group down while the interpreter still runs; True if there was one."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    try:
        dist.destroy_process_group()
    except (RuntimeError, ValueError) as exc:  # a peer already gone: nothing left to tear down
        print(f"closing the process group: {exc}", file=sys.stderr, flush=True)
    return True


def exit_without_teardown(code: int) -> None:
    """End a distributed rank whose result is recorded without the interpreter's teardown.

    After a ZeRO-3 run, destroying the process group was not always enough: at interpreter exit a
    C++ thread object of the distributed stack was still destroyed joinable ("terminate called
    without an active exception", SIGABRT), so torchrun reported a finished run's rank as killed
    (seen in about one run in three on 2 CPU ranks). Everything the run writes is closed by now
    (Trainer's callbacks end at train end, the result is renamed into place), so the streams are
    flushed and the process ends at once.
    """
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or full log: nothing more can reach it
            pass
    os._exit(code)


def hide_unused_stacks(run, deepspeed: str | None) -> list[str]:
    """bitsandbytes only for QLoRA, DeepSpeed only with ``--deepspeed``: peft and
    accelerate import them whenever they are installed (a few seconds each at
    start-up), so a run that does not use one hides it (``phases.hide``)."""
    import yaml

    from ..config import from_dict
    from .phases import hide

    cfg = from_dict(yaml.safe_load(run.config_file.read_text(encoding="utf-8")), str(run.config_file))
    unused = ([] if cfg.training.method == "qlora" else ["bitsandbytes"]) + ([] if deepspeed else ["deepspeed"])
    return hide(unused)


def _phases_record(phases, rank: int) -> dict:
    """End the last phase, print the line (rank 0) and return the record for result.json."""
    from .phases import format_phases

    phases.end()
    record = phases.to_dict()
    if rank == 0:
        try:
            print(format_phases(record), flush=True)
        except OSError:
            pass
    return record


def failure_summary(exc: BaseException) -> str:
    """One line; a full disk says so and where."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return f"no space left on device at {seen.filename or 'the run folder'}"
        seen = seen.__cause__ or seen.__context__
    return f"{type(exc).__name__}: {exc}"


def _write_result(run, state: str, error: str | None, code: int, phases: dict | None = None) -> None:
    try:
        run.write_result(state, error, code, phases=phases)
    except OSError as exc:  # the launcher (or whoever follows the run) infers it from the exit code
        print(f"could not write the run's result: {exc}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
