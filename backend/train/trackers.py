"""Experiment trackers (``training.report_to``) through Trainer's own integrations.

Trainer already has TensorBoard, MLflow, W&B and trackio callbacks; what is
ours is where they write: each into ``<run>/trackers/<name>/``, offline (these
machines may have no network), set through the variables those integrations
read (``TENSORBOARD_LOGGING_DIR``, ``MLFLOW_TRACKING_URI`` as a local folder
store, ``WANDB_DIR`` with ``WANDB_MODE=offline``, ``TRACKIO_DIR``), and how to
open each afterwards.
Only rank 0 reports (the trainer gives the others no trackers).

Nothing heavy is imported here: the launcher's preflight and the Runs tab use it.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
from pathlib import Path

from ..config import ConfigError
from ..core.rundir import RunDir

# tracker -> (the module it needs, what to pip install)
PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow"),
    "wandb": ("wandb", "wandb"),
    "trackio": ("trackio", "trackio"),
}


def check_installed(report_to: list[str]) -> None:
    """A ConfigError naming the ``pip install`` for every listed tracker that is missing."""
    missing = [name for name in report_to if importlib.util.find_spec(PACKAGES[name][0]) is None]
    if missing:
        pips = " ".join(PACKAGES[name][1] for name in missing)
        one = len(missing) == 1
        raise ConfigError(f"training.report_to lists {', '.join(missing)}, which {'is' if one else 'are'} not installed "
                          f"here: pip install {pips} (or leave {'it' if one else 'them'} out of training.report_to)")


def tracker_dir(run: RunDir, name: str) -> Path:
    return run.trackers_dir / name


def mlflow_uri(run: RunDir) -> str:
    return tracker_dir(run, "mlflow").as_uri()


def tracker_env(run: RunDir, report_to: list[str], project: str) -> dict[str, str]:
    """The variables that point each integration at the run folder (offline)."""
    env: dict[str, str] = {}
    if "tensorboard" in report_to:
        env["TENSORBOARD_LOGGING_DIR"] = str(tracker_dir(run, "tensorboard"))
    if "mlflow" in report_to:
        # a folder store, no server or database: MLflow keeps it working, in maintenance mode, behind this switch
        env.update(MLFLOW_TRACKING_URI=mlflow_uri(run), MLFLOW_EXPERIMENT_NAME=project, MLFLOW_ALLOW_FILE_STORE="true")
    if "wandb" in report_to:
        env.update(WANDB_DIR=str(tracker_dir(run, "wandb")), WANDB_PROJECT=project,
                   WANDB_MODE=os.environ.get("WANDB_MODE") or "offline")  # offline unless the user asked otherwise
    if "trackio" in report_to:
        env["TRACKIO_DIR"] = str(tracker_dir(run, "trackio"))
    return env


def setup(run: RunDir, report_to: list[str], project: str) -> None:
    """Point the integrations at the run folder; call before the Trainer is built
    (the callbacks read these variables when they are created)."""
    for name in report_to:
        tracker_dir(run, name).mkdir(parents=True, exist_ok=True)
    os.environ.update(tracker_env(run, report_to, project))


def locations(run: RunDir, report_to: list[str], project: str) -> list[dict]:
    """For each tracker: where it put the run and the command that opens it."""
    out = []
    for name in report_to:
        where = tracker_dir(run, name)
        q = shlex.quote(str(where))
        if name == "tensorboard":
            how = f"tensorboard --logdir {q}"
        elif name == "mlflow":
            where = mlflow_uri(run)
            how = f"MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri {shlex.quote(where)}"
        elif name == "wandb":
            offline = sorted(where.glob("wandb/offline-run-*"))
            how = f"wandb sync {shlex.quote(str(offline[-1])) if offline else q + '/wandb/offline-run-*'}"
        else:
            how = f"TRACKIO_DIR={q} trackio show --project {shlex.quote(project)}"
        out.append({"tracker": name, "where": str(where), "how": how})
    return out
