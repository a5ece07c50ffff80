"""Abort a run mid-way (SIGTERM to its process group), then --resume it: the
resumed metrics continue the original's, step for step, like a run that was
never interrupted."""

import subprocess
import time

from backend.core.rundir import RunDir, read_jsonl
from train_utils import FTSTUDIO, ftstudio, metrics, status

ARGS = ["tiny_demo", "training.max_steps=60", "saving.save_steps=10", "saving.save_total_limit=-1",
        "evaluation.inputs=[]", "training.logging_steps=1"]


def test_abort_then_resume_matches_uninterrupted(tmp_path, tiny_model):
    ref_dir = tmp_path / "ref"
    ftstudio("train", *ARGS, "--work-dir", ref_dir, "--quiet", cwd=tmp_path, check=True)
    reference = {r["step"]: r for r in metrics(ref_dir)}
    assert len(reference) == 60

    run_dir = tmp_path / "run"
    proc = subprocess.Popen([FTSTUDIO, "train", *ARGS, "--work-dir", str(run_dir), "--quiet"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")]
        if steps and steps[-1] >= 15:
            break
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    aborted = ftstudio("abort", run_dir, cwd=tmp_path)
    assert aborted.returncode == 0, aborted.stderr
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out
    st = status(run_dir)
    assert st["state"] == "aborted", st
    stopped_at = metrics(run_dir)[-1]["step"]
    assert stopped_at < 60
    done = RunDir(run_dir).checkpoints()
    assert done and done[-1][0] <= stopped_at
    last_ckpt = done[-1][0]
    assert (run_dir / f"iter_{last_ckpt}.pth").exists()
    assert not list(run_dir.glob(".iter_*"))  # no half-written checkpoint

    out = ftstudio("train", "tiny_demo", "--work-dir", run_dir, "--resume", "--quiet", cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    st = status(run_dir)
    assert st["state"] == "finished" and st["resumed_from"].endswith(f"checkpoint-{last_ckpt}")
    resumed = metrics(run_dir)
    assert [r["step"] for r in resumed] == list(range(1, 61))  # no gap, no duplicate
    for row in resumed:
        ref = reference[row["step"]]
        assert abs(row["loss"] - ref["loss"]) < 1e-4 * max(1.0, abs(ref["loss"])), (row, ref)
        assert abs(row["lr"] - ref["lr"]) < 1e-9
