"""Slurm submit for real: ``ftstudio submit`` on the one-node cluster the tests start (conftest's
``slurm_conf``): a run queued behind a job holding the node reads "pending in Slurm", then runs and
finishes with its metrics; a pending run is cancelled, a running one aborted with its checkpoint at the
abort step and resumed by resubmission; a job whose launcher refuses the config reads failed with its
error. The job script itself is checked line by line and run through a real shell."""

from __future__ import annotations

import getpass
import os
import shlex
import stat
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest

from backend import slurm
from backend.config import load_config
from backend.core.guard import Guard, GuardError, User, local_user
from backend.core.rundir import RunDir, effective_status
from backend.runs import abort
from backend.slurm import SlurmError, SlurmOptions, sbatch_script
from studio_utils import wait_for
from train_utils import ftstudio

# tiny: the machine is small and shared; every step counts
TINY = ["evaluation.inputs=[]", "saving.save_steps=100", "training.logging_steps=1"]


@pytest.fixture
def slurm_env(slurm_conf, monkeypatch):
    """SLURM_CONF for this process's squeue/scancel and the environment for the CLI (which sbatch passes on)."""
    monkeypatch.setenv("SLURM_CONF", str(slurm_conf))
    return {"SLURM_CONF": str(slurm_conf)}


def submitted_job(out) -> str:
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    words = out.stdout.split()
    return words[words.index("job") + 1]


@contextmanager
def node_held(env: dict):
    """A job of our own holding the whole node, so a job submitted now waits (PENDING, Resources)."""
    full_env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, **env}
    job = subprocess.run(["sbatch", "--parsable", "--exclusive", "--job-name=holder", "--output=/dev/null",
                          "--wrap", "sleep 600"], env=full_env, capture_output=True, text=True, check=True,
                         stdin=subprocess.DEVNULL).stdout.strip()
    try:
        assert wait_for(lambda: (slurm.job_state(job) or slurm.JobState("?")).state == "RUNNING", timeout=60)
        yield job
    finally:
        subprocess.run(["scancel", job], env=full_env, capture_output=True)


def follow(run: RunDir, timeout: float = 400) -> list[str]:
    """The states a viewer sees, polling as the Runs tab does, until the run ends."""
    seen, deadline = [], time.time() + timeout
    while time.time() < deadline:
        state = effective_status(run)["state"]
        if not seen or seen[-1] != state:
            seen.append(state)
        if state in ("finished", "failed", "aborted"):
            return seen
        time.sleep(0.2)
    raise AssertionError(f"{run.name} did not end in {timeout} s: {seen}; {run.status()}")


# --- the script, without a cluster ---------------------------------------------------------------


def test_sbatch_script_lines_quoting_and_a_real_shell(tmp_path):
    run = RunDir(tmp_path / "shared fs" / "run 1")
    chdir = tmp_path / "data dir"
    opts = SlurmOptions(partition="gpu", nodes=2, gpus_per_node=4, time="1-12:00", account="proj_x",
                        chdir=str(chdir))
    user = "alice $(touch pwned); `id` 'x'"
    text = sbatch_script(run, opts, user=user, run_id="abc123", deepspeed="deepspeed_zero2")
    sbatch = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert sbatch == ["#SBATCH --job-name='ftstudio-run 1'", f"#SBATCH --output='{run.path}/slurm-%j.out'",
                      f"#SBATCH --chdir='{chdir}'", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4",
                      "#SBATCH --gpus-per-node=4", "#SBATCH --time=1-12:00", "#SBATCH --partition=gpu",
                      "#SBATCH --account=proj_x", "#SBATCH --export=ALL"]
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)

    # run it through bash with an srun that prints what it was given: the arguments arrive whole
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text('#!/bin/sh\nprintf "%s\\n" "$@"\necho "run=$FTSTUDIO_QUEUED_RUN"\n'
                               'echo "user=$FTSTUDIO_RUN_USER"\necho "nproc=${NPROC_PER_NODE:-unset}"\n')
    (fake / "srun").chmod(stat.S_IRWXU)
    script = tmp_path / "sbatch.sh"
    script.write_text(text)
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}", "NPROC_PER_NODE": "8"}
    out = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, cwd=tmp_path, check=True)
    assert out.stdout.splitlines() == [
        "--kill-on-bad-exit=1", sys.executable, "-m", "backend.cli", "train", str(run.requested_file),
        "--launcher", "slurm", "--work-dir", str(run.path), "--quiet", "--deepspeed", "deepspeed_zero2",
        "run=abc123", f"user={user}", "nproc=unset"]
    assert not (tmp_path / "pwned").exists()


def test_sbatch_script_defaults_resume_and_refusals(tmp_path):
    run = RunDir(tmp_path / "run")
    text = sbatch_script(run, SlurmOptions(), user="bob")
    assert "--gpus-per-node" not in text and "--partition" not in text and "--time" not in text
    assert "#SBATCH --ntasks-per-node=1" in text and f"#SBATCH --chdir={os.getcwd()}" in text
    assert "FTSTUDIO_QUEUED_RUN=RUN-ID" in text  # a preview: submit fills in the run's id
    assert "#SBATCH --ntasks-per-node=3" in sbatch_script(run, SlurmOptions(ntasks_per_node=3), user="bob")
    resumed = shlex.split(sbatch_script(run, SlurmOptions(), user="bob", resume=True).splitlines()[-1])
    assert resumed[-1] == "--resume" and str(run.config_file) in resumed
    bad = [(SlurmOptions(partition="gpu;reboot"), "--partition"), (SlurmOptions(account="$(id)"), "--account"),
           (SlurmOptions(time="1h"), "--time"), (SlurmOptions(nodes=0), "--nodes"),
           (SlurmOptions(gpus_per_node=-1), "--gpus-per-node"), (SlurmOptions(chdir="/tmp/a'b"), "working folder")]
    for opts, field in bad:
        with pytest.raises(SlurmError, match=field):
            sbatch_script(run, opts, user="bob")
    for folder in ("it's", "100%", 'say "hi"'):
        with pytest.raises(SlurmError, match="run folder"):
            sbatch_script(RunDir(tmp_path / folder), SlurmOptions(), user="bob")
    out = ftstudio("submit", "--slurm", "tiny_demo", "--partition", "a b", "--dry-run", cwd=tmp_path)
    assert out.returncode == 2 and "--partition 'a b'" in out.stderr and not list(tmp_path.iterdir())


def test_a_viewer_may_not_submit_and_a_studio_submits_only_into_its_work_dir(tmp_path):
    cfg = load_config("tiny_demo")
    with pytest.raises(GuardError, match="may not launch"):
        slurm.submit(cfg, tmp_path / "run", SlurmOptions(), User("vera", "viewer"), Guard.cli())
    studio = Guard(tmp_path / "work")
    with pytest.raises(GuardError, match="only directly inside"):
        slurm.submit(cfg, tmp_path / "elsewhere" / "run", SlurmOptions(), User("tom", "trainer"), studio)
    assert not list(tmp_path.iterdir())


def test_slurm_out_of_reach_leaves_the_run_as_recorded(tmp_path, monkeypatch):
    """A studio that cannot reach the controller concludes nothing (and does not ask again at every poll)."""
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=gone\nSlurmctldHost=localhost\nSlurmctldPort=1\nMessageTimeout=1\nTCPTimeout=1\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))
    monkeypatch.setattr(slurm, "_unreachable", {"until": 0.0, "why": ""})
    run = RunDir(tmp_path / "run")
    run.claim_new()
    run.start("queued", scheduler="slurm", slurm_job_id="7", launcher=None)
    for asked_again in (False, True):
        st = effective_status(run)
        assert st["state"] == "queued" and "cannot ask Slurm" in st["note"], st
        assert ("asked again in a minute" in st["note"]) == asked_again, st
    assert run.status()["state"] == "queued" and "note" not in run.status()


def test_a_job_that_ended_unrecorded_keeps_rank_zeros_phases(tmp_path):
    """When the launcher inside the job never wrote the end, the follower records it from result.json,
    with rank 0's phases, as the launcher would have."""
    run = RunDir(tmp_path / "run")
    run.claim_new()
    run.start("running", scheduler="slurm", slurm_job_id="7", launcher=None)
    phases = {"imports": 1.5, "steps": 3.0, "total": 4.5, "optional_imports": []}
    run.write_result("finished", None, 0, phases=phases)
    st = slurm._record_slurm_end(run, "7", "COMPLETED")
    assert st["state"] == "finished" and st["phases"] == phases
    assert run.status()["phases"] == phases


# --- on the cluster ------------------------------------------------------------------------------


def test_submit_pending_running_finished_and_cancel_while_pending(tmp_path, tiny_model, slurm_env):
    run, other = RunDir(tmp_path / "run"), RunDir(tmp_path / "other")
    with node_held(slurm_env):
        job = submitted_job(ftstudio("submit", "--slurm", "tiny_demo", "training.max_steps=3", *TINY,
                                     "--work-dir", run.path, cwd=tmp_path, env=slurm_env))
        st = effective_status(run)
        assert st["state"] == "queued" and st["note"].startswith("pending in Slurm (Resources)"), st
        assert (st["scheduler"], st["slurm_job_id"], st["user"]) == ("slurm", job, getpass.getuser()), st
        assert f"--work-dir {run.path}" in run.sbatch_file.read_text()

        # a second run, cancelled while pending: plain scancel, it never starts
        cfg = load_config("tiny_demo", ["training.max_steps=3", *TINY])
        other_job = slurm.submit(cfg, other.path, SlurmOptions(), local_user(), Guard.cli())
        asked, said = abort(other, by="test", user=local_user())
        assert asked and said.startswith(f"cancelled other while it was pending in Slurm (scancel {other_job}: sent")
        assert other.status()["state"] == "aborted" and slurm.job_state(other_job).state == "CANCELLED"
    seen = follow(run)
    assert seen[0] == "queued" and seen[-1] == "finished" and "running" in seen, seen
    assert [r["step"] for r in run.metrics() if "loss" in r] == [1, 2, 3]
    assert run.status()["slurm_job_id"] == job and run.slurm_output(job).exists()
    assert effective_status(other)["state"] == "aborted" and not other.metrics()


def test_abort_running_job_then_resume_by_resubmission(tmp_path, tiny_model, slurm_env):
    run = RunDir(tmp_path / "run")
    first = submitted_job(ftstudio("submit", "tiny_demo", "training.max_steps=12", *TINY, "--work-dir", run.path,
                                   cwd=tmp_path, env=slurm_env))
    assert wait_for(lambda: len(run.metrics()) >= 2 or effective_status(run)["state"] not in ("queued", "running"),
                    timeout=400, every=0.1)
    assert effective_status(run)["state"] == "running", (run.status(), run.slurm_output(first).read_text()[-2000:])
    with pytest.raises(GuardError, match="only their own runs"):
        abort(run, by="test", user=User("mallory", "trainer"))
    asked, said = abort(run, by="test", user=local_user())
    assert asked and f"scancel --signal=TERM {first}: sent" in said, said
    assert follow(run)[-1] == "aborted", run.status()
    st = run.status()
    last = run.metrics()[-1]["step"]
    assert st["exit_code"] == 143 and last < 12, (st, last)
    assert run.checkpoints()[-1][0] == last and run.iters()[-1][0] == last  # saved at the abort step

    with pytest.raises(GuardError):
        slurm.resubmit(run, User("mallory", "trainer"), Guard.cli())
    second = submitted_job(ftstudio("submit", "--resume", run.path, cwd=tmp_path, env=slurm_env))
    assert second != first and "--resume" in run.sbatch_file.read_text()
    assert follow(run)[-1] == "finished", (run.status(), run.slurm_output(second).read_text()[-2000:])
    st = run.status()
    assert st["slurm_job_id"] == second and st["resumed_from"].endswith(f"checkpoint-{last}"), st
    assert [r["step"] for r in run.metrics() if "loss" in r] == list(range(1, 13))  # no gap, no duplicate


def test_a_job_that_fails_reads_failed_with_its_error(tmp_path, tiny_model, slurm_env):
    run = RunDir(tmp_path / "run")
    gone = tmp_path / "gone.jsonl"
    job = submitted_job(ftstudio("submit", "tiny_demo", f"data.path={gone}", *TINY, "--work-dir", run.path,
                                 cwd=tmp_path, env=slurm_env))
    assert follow(run)[-1] == "failed"
    st = run.status()  # recorded, not only shown
    assert st["state"] == "failed" and str(gone) in st["error"] and "no such file" in st["error"], st
    assert not st["error"].startswith("srun:"), st  # the launcher's words, not srun's summary
    assert slurm.job_state(job).state == "FAILED"

    # a run whose job Slurm no longer knows (ended long ago, no accounting) and that recorded no end
    forged = RunDir(tmp_path / "forgotten")
    forged.claim_new()
    forged.start("running", scheduler="slurm", slurm_job_id="999999", launcher=None)
    st = effective_status(forged)
    assert st["state"] == "failed" and "Slurm job 999999 is gone" in st["error"], st


# --- from the studio's API -------------------------------------------------------------------------


def test_studio_submits_to_slurm_follows_it_and_resubmits(tmp_path, tiny_model, slurm_env):
    """The Train tab's Where = Slurm cluster through gradio_client: the sbatch script is previewed, Launch
    submits it, the Runs tab follows queued -> running -> finished with the loss on the curve, and Resume of
    an aborted submitted run resubmits it."""
    from gradio_client import Client

    from studio.train_tab import config_values
    from studio_utils import running_studio

    work = tmp_path / "work"
    work.mkdir()
    cfg = load_config("tiny_demo", [*TINY, "training.max_steps=8"])
    where = [[], "Slurm cluster", "", 1, 0, 0, "00:10:00", "", str(tmp_path)]
    with running_studio(work, env=slurm_env) as (url, _):  # the studio's sbatch/squeue reach the test cluster
        client = Client(url, verbose=False)
        shown = client.predict("slurmed", "none", 1, 1, "", 29500, *config_values(cfg), *where, api_name="/check")
        assert shown[0] == "OK: config is valid", shown[0]
        assert "#SBATCH --time=00:10:00" in shown[2] and "--launcher slurm" in shown[2], shown[2]
        said, name = client.predict("slurmed", "none", 1, 1, "", 29500, *config_values(cfg), *where,
                                    api_name="/train_launch")
        assert name and "submitted" in said, said
        run = RunDir(work / name)
        assert run.status()["scheduler"] == "slurm" and run.status()["slurm_job_id"]
        seen = follow(run)
        assert seen[-1] == "finished" and "running" in seen, (seen, run.status())
        table, loss, *_ = client.predict([name], api_name="/runs_refresh")
        assert next(r for r in table["data"] if r[0] == name)[1] == "finished"
        assert len((loss.get("value") or loss)["data"]) >= 8  # one loss point a step, from the run folder

        # a viewer-less studio: the operator may resume; a finished run has nothing to resume
        assert client.predict([name], api_name="/runs_resume").endswith("has finished; nothing to resume.")
        run.end("aborted", 143)  # as if stopped after its last save: resume resubmits it as a new job
        first_job = run.status()["slurm_job_id"]
        said = client.predict([name], api_name="/runs_resume")
        assert "resubmitted" in said, said
        assert wait_for(lambda: run.status().get("slurm_job_id") not in (None, first_job), timeout=60)
        assert follow(run)[-1] == "finished", run.status()
