"""training.report_to, for real: one run reporting to TensorBoard, MLflow and
trackio through Trainer's own integrations, into the run folder, offline; each
tracker read back with its own reader holds the losses of metrics.jsonl.
Also: the run takes its eval loss from another dataset (data.eval_path), and
unknown or missing trackers are refused before anything starts."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from backend.config import ConfigError, load_config
from backend.core.rundir import RunDir
from train_utils import ftstudio, metrics

TRACKIO = importlib.util.find_spec("trackio") is not None
REPORT_TO = ["tensorboard", "mlflow"] + (["trackio"] if TRACKIO else [])


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, tiny_model):
    from backend.demo import DEMO_DATA

    tmp = tmp_path_factory.mktemp("trackers")
    other = tmp / "other_qa.jsonl"
    other.write_text("\n".join(DEMO_DATA.read_text(encoding="utf-8").splitlines()[:8]) + "\n")
    run_dir = tmp / "run"
    out = ftstudio("train", "tiny_demo", "training.max_steps=6", "saving.save_steps=3", "evaluation.inputs=[]",
                   f"data.eval_path={other}", f"training.report_to=[{','.join(REPORT_TO)}]", "--work-dir", run_dir,
                   cwd=tmp)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:]
    rows = metrics(run_dir)
    train = {r["step"]: r["loss"] for r in rows if "loss" in r}
    evals = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
    assert sorted(train) == list(range(1, 7)) and sorted(evals) == [0, 3, 6]  # eval_steps 0: at the saves
    return RunDir(run_dir), train, evals


def test_tensorboard_event_files_hold_the_losses(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, train, evals = tracked_run
    folder = run.trackers_dir / "tensorboard"
    assert list(folder.glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(folder))
    acc.Reload()
    logged = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert logged.keys() == train.keys() and all(logged[s] == pytest.approx(train[s], rel=1e-6) for s in train)
    logged = {e.step: e.value for e in acc.Scalars("eval/loss")}
    assert logged.keys() == evals.keys() and all(logged[s] == pytest.approx(evals[s], rel=1e-6) for s in evals)
    assert "train/tokens_seen" in acc.Tags()["scalars"]


def test_mlflow_file_store_holds_the_losses(tracked_run, monkeypatch):
    from mlflow.tracking import MlflowClient

    from backend.train.trackers import mlflow_uri

    run, train, evals = tracked_run
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=mlflow_uri(run))
    experiments = client.search_experiments()
    assert [e.name for e in experiments] == ["tiny_demo"]
    (found,) = client.search_runs([experiments[0].experiment_id])
    assert found.info.run_name == run.name
    history = {m.step: m.value for m in client.get_metric_history(found.info.run_id, "loss")}
    assert history == pytest.approx(train, rel=1e-12)
    history = {m.step: m.value for m in client.get_metric_history(found.info.run_id, "eval_loss")}
    assert history == pytest.approx(evals, rel=1e-12)


@pytest.mark.skipif(not TRACKIO, reason="trackio is not installed (pip install trackio)")
def test_trackio_local_database_holds_the_losses(tracked_run):
    run, train, evals = tracked_run
    # trackio reads TRACKIO_DIR when imported: read it back in a process of its own
    code = ("import json; from trackio.sqlite_storage import SQLiteStorage as S; "
            "print(json.dumps({k: [v['value'] for v in S.get_metric_values('tiny_demo', 'run', k)] "
            "for k in ('train/loss', 'eval/loss')}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRACKIO_DIR": str(run.trackers_dir / "trackio")}, check=True)
    logged = json.loads(out.stdout.strip().splitlines()[-1])
    # trackio numbers its own steps (Trainer logs train/global_step beside them): compare in order
    assert logged["train/loss"] == pytest.approx([train[s] for s in sorted(train)], rel=1e-12)
    assert logged["eval/loss"] == pytest.approx([evals[s] for s in sorted(evals)], rel=1e-12)


def test_tracker_locations_say_where_and_how(tracked_run):
    from backend.runs import tracker_locations

    run, _, _ = tracked_run
    found = tracker_locations(run)
    assert [f["tracker"] for f in found] == REPORT_TO
    where = {f["tracker"]: f for f in found}
    assert where["tensorboard"]["how"] == f"tensorboard --logdir {run.trackers_dir / 'tensorboard'}"
    assert where["mlflow"]["where"] == (run.trackers_dir / "mlflow").as_uri()
    assert "mlflow ui --backend-store-uri " + where["mlflow"]["where"] in where["mlflow"]["how"]
    if TRACKIO:
        assert where["trackio"]["how"].endswith("trackio show --project tiny_demo")
    assert tracker_locations(RunDir(run.path / "not-a-run")) == []


def test_unknown_and_missing_trackers_are_refused(tmp_path, monkeypatch, tiny_model):
    from backend.config import TRACKERS
    from backend.launch import LaunchSpec, preflight
    from backend.train import trackers

    assert set(trackers.PACKAGES) == set(TRACKERS)

    with pytest.raises(ConfigError, match=r"unknown tracker 'tensorbord' \(did you mean tensorboard\?\)"):
        load_config("tiny_demo", ["training.report_to=[tensorbord]"])
    cfg = load_config("tiny_demo", ["training.report_to=[tensorboard, wandb]"])
    real = importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(ConfigError, match=r"lists wandb, which is not installed here: pip install wandb"):
        preflight(cfg, LaunchSpec(), None)
    out = ftstudio("train", "tiny_demo", "training.report_to=[comet]", "--work-dir", tmp_path / "run", cwd=tmp_path)
    assert out.returncode == 2 and "unknown tracker 'comet'" in out.stderr.strip().splitlines()[-1]
