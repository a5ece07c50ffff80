"""Background runs, as the studio starts them: start, follow through the run
folder only, abort, resume."""

import time

from backend.config import load_config
from backend.launch import start_detached
from backend.core.rundir import RunDir, effective_status, read_jsonl
from backend.runs import abort, list_runs


def wait_for(predicate, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_start_follow_abort_resume(tmp_path, tiny_model):
    cfg = load_config("tiny_demo", ["training.max_steps=400", "saving.save_steps=20", "evaluation.inputs=[]"])
    run_dir = tmp_path / "work_dirs" / "bg"
    proc = start_detached(cfg, run_dir)
    assert wait_for(lambda: len(read_jsonl(run_dir / "metrics.jsonl")) >= 25), (run_dir / "launcher.log").read_text()
    assert effective_status(RunDir(run_dir))["state"] == "running"
    assert [r["name"] for r in list_runs(tmp_path / "work_dirs")] == ["bg"]
    assert abort(RunDir(run_dir))[0]
    assert proc.wait(timeout=120) != 0
    assert effective_status(RunDir(run_dir))["state"] == "aborted"
    stopped = read_jsonl(run_dir / "metrics.jsonl")[-1]["step"]
    proc = start_detached(cfg, run_dir, resume=True)
    assert proc.wait(timeout=600) == 0, (run_dir / "launcher.log").read_text()[-3000:]
    st = effective_status(RunDir(run_dir))
    assert st["state"] == "finished" and st["resumed_from"]
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")]
    assert steps == list(range(1, 401)) and stopped < 400


def test_abort_while_queued_stops_the_launcher_before_training(tmp_path, tiny_model):
    cfg = load_config("tiny_demo", ["training.max_steps=400", "evaluation.inputs=[]"])
    run = RunDir(tmp_path / "work_dirs" / "queued")
    proc = start_detached(cfg, run.path)
    assert effective_status(run)["state"] == "queued"
    asked, said = abort(run)
    assert asked and "before training began" in said, said
    # 143 from its handler, or -15 if SIGTERM came before Python had installed one: the same stop to a shell
    assert proc.wait(timeout=120) in (143, -15), run.launcher_log.read_text()[-2000:]
    st = effective_status(run)
    assert st["state"] == "aborted" and st["exit_code"] == 143, st
    assert not run.metrics() and not run.train_log.exists()  # no rank ever started
