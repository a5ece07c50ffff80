"""Helpers for tests that run `ftstudio train` for real, as a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

FTSTUDIO = shutil.which("ftstudio", path=os.path.dirname(sys.executable)) or "ftstudio"


def ftstudio(*args, cwd, env=None, timeout=600, check=False):
    """Run the real CLI; returns CompletedProcess (text)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    for k in ("NPROC_PER_NODE", "NNODES", "NODE_RANK", "ADDR", "PORT"):
        full_env.pop(k, None)
    full_env.update(env or {})
    proc = subprocess.run([FTSTUDIO, *map(str, args)], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"ftstudio {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def status(run_dir) -> dict:
    return json.loads((Path(run_dir) / "status.json").read_text())


def write_config(path: Path, **sections) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path
