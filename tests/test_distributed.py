"""Many ranks for real: torchrun with DeepSpeed ZeRO-2 and ZeRO-3, two "nodes"
on loopback, and a real one-node Slurm cluster."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest
import torch

from backend.core.rundir import RunDir
from train_utils import FTSTUDIO, ftstudio, metrics, status

QUICK = ["training.epochs=4", "saving.save_steps=8", "evaluation.every=8", "evaluation.max_new_tokens=6",
         "training.micro_batch_size=1"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_run(run_dir, world_size, min_drop=0.3):
    st = status(run_dir)
    assert st["state"] == "finished" and st["exit_code"] == 0, st
    assert st["world_size"] == world_size
    rows = metrics(run_dir)
    assert rows, "rank 0 wrote no metrics"
    assert len({r["step"] for r in rows}) == len(rows), "metrics written by more than one rank"
    assert rows[-1]["loss"] < rows[0]["loss"] - min_drop
    log = (run_dir / "train.log").read_text()
    for rank in range(world_size):
        assert f"[rank {rank}/{world_size}]" in log  # every rank wrote its own lines into train.log
    step, path = RunDir(run_dir).iters()[-1]
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["state_dict"] and all(v.numel() > 0 for v in ckpt["state_dict"].values())
    return rows


def test_torchrun_two_ranks_ddp(tmp_path, tiny_model):
    """Plain DDP over gloo, with bf16 mixed precision (this CPU has AVX-512 BF16)
    and activation checkpointing on."""
    run_dir = tmp_path / "run"
    out = ftstudio("train", "tiny_demo", *QUICK, "model.dtype=bf16", "training.gradient_checkpointing=true",
                   "--work-dir", run_dir, cwd=tmp_path, env={"NPROC_PER_NODE": "2"})
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:]
    assert "torchrun" in out.stdout.split("command:", 1)[1].splitlines()[0]
    check_run(run_dir, 2)


@pytest.mark.parametrize("stage", ["deepspeed_zero2", "deepspeed_zero3"])
def test_torchrun_deepspeed(tmp_path, tiny_model, stage):
    run_dir = tmp_path / "run"
    out = ftstudio("train", "tiny_demo", *QUICK, "--deepspeed", stage, "--work-dir", run_dir, cwd=tmp_path,
                   env={"NPROC_PER_NODE": "2"}, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:]
    assert status(run_dir)["deepspeed"] == stage
    check_run(run_dir, 2)


@pytest.mark.parametrize("stage", ["deepspeed_zero3", "deepspeed_zero3_offload"])
def test_torchrun_qlora_zero3(tmp_path, tiny_model, stage):
    """QLoRA under ZeRO-3: no per-rank device_map, the packed 4-bit weights stored
    in the model dtype so DeepSpeed partitions them with the rest; evaluation
    samples (bitsandbytes' CPU inference path) and the gathered adapter checkpoint."""
    run_dir = tmp_path / "run"
    out = ftstudio("train", "tiny_demo", *QUICK, "training.epochs=2", "training.method=qlora", "--deepspeed", stage,
                   "--work-dir", run_dir, cwd=tmp_path, env={"NPROC_PER_NODE": "2"}, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:]
    assert status(run_dir)["deepspeed"] == stage and status(run_dir)["method"] == "qlora"
    check_run(run_dir, 2, min_drop=0.1)
    ckpt = torch.load(RunDir(run_dir).iters()[-1][1], weights_only=True)
    assert ckpt["meta"]["kind"] == "qlora" and all("lora_" in k for k in ckpt["state_dict"])
    assert {v.shape[0] for k, v in ckpt["state_dict"].items() if "lora_A" in k} == {ckpt["meta"]["lora"]["r"]}
    assert "evaluation samples at step" not in (run_dir / "train.log").read_text()
    assert (run_dir / "samples.jsonl").read_text().strip()


def test_two_nodes_on_loopback(tmp_path, tiny_model):
    """Two `ftstudio train` processes, as on two machines: NNODES=2, NODE_RANK=0/1."""
    port = free_port()
    run_dir = tmp_path / "run"
    procs = []
    for node in (0, 1):
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
               "NPROC_PER_NODE": "1", "NNODES": "2", "NODE_RANK": str(node), "ADDR": "127.0.0.1", "PORT": str(port)}
        procs.append(subprocess.Popen([FTSTUDIO, "train", "tiny_demo", *QUICK, "--work-dir", str(run_dir)],
                                      cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n-----\n".join(o[-3000:] for o in outs)
    check_run(run_dir, 2)


def test_studio_launches_node_0_and_its_node_1_command_works_as_printed(tmp_path, tiny_model):
    """The Train tab's Launch with 2 nodes starts node 0 and prints node 1's command;
    that line, run verbatim in a shell elsewhere (the venv activated, as a user's),
    joins the run, and both nodes finish it."""
    from gradio_client import Client

    from backend.config import load_config
    from backend.core.procs import ProcessRecord
    from backend.core.rundir import effective_status
    from studio.train_tab import config_values
    from studio_utils import running_studio, wait_for

    port, work, elsewhere = free_port(), tmp_path / "shared fs" / "work", tmp_path / "node1"  # a space: quoted
    elsewhere.mkdir()
    work.parent.mkdir()
    cfg = load_config("tiny_demo", QUICK)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("NPROC_PER_NODE", "NNODES", "NODE_RANK", "ADDR", "PORT")}
    env["PATH"] = os.path.dirname(FTSTUDIO) + os.pathsep + env.get("PATH", "")  # an activated venv
    with running_studio(work) as (url, _):
        client = Client(url, verbose=False)
        msg, run_name = client.predict("nodes", "none", 1, 2, "127.0.0.1", port, *config_values(cfg),
                                       api_name="/train_launch")
        assert run_name, msg
        waited = client.predict(run_name, msg, api_name="/wait_start")  # what the tab shows once node 0 is up
        assert waited.startswith(f"OK: **{run_name}** is running"), waited
        commands = [line for line in waited.split("```")[1].strip().splitlines() if not line.startswith("#")]
        assert waited.split("```")[1] == msg.split("```")[1] and len(commands) == 2, (msg, waited)
        node1 = commands[1]
        assert "NODE_RANK=1" in node1 and f"PORT={port}" in node1 and "--work-dir" in node1, node1
        out = subprocess.run(["bash", "-c", node1], cwd=elsewhere, env=env, capture_output=True, text=True,
                             stdin=subprocess.DEVNULL, timeout=900)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        run = RunDir(work / run_name)
        launcher = ProcessRecord.from_dict(run.status().get("launcher"))
        assert wait_for(lambda: not launcher.matches(), timeout=120), "node 0's launcher did not exit"
        assert effective_status(run)["state"] == "finished", (run.launcher_log.read_text()[-3000:])
    check_run(run.path, 2)


def test_slurm_two_tasks_deepspeed(tmp_path, tiny_model, slurm_conf):
    """srun -N1 --ntasks-per-node=2 ftstudio train ... --launcher slurm: each task is one rank."""
    run_dir = tmp_path / "run"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, "SLURM_CONF": str(slurm_conf)}
    for k in ("NPROC_PER_NODE", "NNODES", "NODE_RANK", "ADDR", "PORT"):
        env.pop(k, None)
    cmd = ["srun", "-N1", "--ntasks-per-node=2", "--kill-on-bad-exit=1", f"--chdir={tmp_path}", "--export=ALL",
           FTSTUDIO, "train", "tiny_demo", *QUICK, "--launcher", "slurm", "--deepspeed", "deepspeed_zero2",
           "--work-dir", str(run_dir)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:]
    check_run(run_dir, 2)
    log = (run_dir / "train.log").read_text()
    assert "--slurm" in log and "torch.distributed.run" not in log and "torchrun" not in log


def test_slurm_failure_exits_nonzero(tmp_path, tiny_model, slurm_conf):
    """A rank that fails makes srun, and so the job, fail; the run says failed."""
    run_dir = tmp_path / "run"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, "SLURM_CONF": str(slurm_conf)}
    cmd = ["srun", "-N1", "--ntasks-per-node=2", "--kill-on-bad-exit=1", f"--chdir={tmp_path}", "--export=ALL",
           FTSTUDIO, "train", "tiny_demo", *QUICK, "model.attn_implementation=flash_attention_2",
           "--launcher", "slurm", "--work-dir", str(run_dir)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert out.returncode != 0
    st = status(run_dir)
    assert st["state"] == "failed" and st["error"], st


def slurm_env(slurm_conf) -> dict:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, "SLURM_CONF": str(slurm_conf)}
    for k in ("NPROC_PER_NODE", "NNODES", "NODE_RANK", "ADDR", "PORT"):
        env.pop(k, None)
    return env


def test_slurm_run_on_another_host_is_stopped_through_scancel(tmp_path, tiny_model, slurm_conf, monkeypatch):
    """Abort of a run whose launcher is on another machine (as the shared run folder shows it):
    no local signal, but the stop request plus ``scancel --signal=TERM`` of its job, once the
    job is proven to be a Finetune Studio job of ours; a job that is not ours is left alone."""
    from backend.core.rundir import RunDir, read_jsonl
    from backend.runs import abort

    monkeypatch.setenv("SLURM_CONF", str(slurm_conf))
    env = slurm_env(slurm_conf)
    run = RunDir(tmp_path / "run")
    cmd = ["srun", "-N1", "--ntasks-per-node=1", f"--chdir={tmp_path}", "--export=ALL", FTSTUDIO, "train",
           "tiny_demo", "training.max_steps=3000", "saving.save_steps=25", "evaluation.inputs=[]",
           "--launcher", "slurm", "--work-dir", str(run.path), "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL)
    deadline = time.time() + 300
    while len(read_jsonl(run.metrics_file)) < 5:
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.1)
    st = run.status()
    assert st["slurm_job_id"], st
    run.write_status(launcher={**st["launcher"], "host": "gpu-node-17"})  # as another machine sees it
    asked, said = abort(run, by="test")
    assert asked and "gpu-node-17" in said and f"scancel --signal=TERM {st['slurm_job_id']}: sent" in said, said
    out, _ = proc.communicate(timeout=300)
    stop = json.loads((run.path / "stop.json").read_text())
    assert stop["by"] == "signal 15 to the launcher", stop  # Slurm's SIGTERM reached the job's task
    assert run.status()["state"] == "aborted", out[-3000:]

    sleeper = subprocess.Popen(["srun", "-N1", "sleep", "300"], env=env, stdin=subprocess.DEVNULL)
    try:
        jobs = ""
        while not jobs.strip():
            jobs = subprocess.run(["squeue", "-h", "-n", "sleep", "-o", "%i"], env=env, capture_output=True, text=True).stdout
            time.sleep(0.2)
        forged = RunDir(tmp_path / "forged")
        forged.claim_new()
        forged.start("running", launcher={**st["launcher"], "host": "gpu-node-17"}, slurm_job_id=jobs.split()[0])
        asked, said = abort(forged, by="test")
        assert "is not a Finetune Studio job" in said, said
        assert sleeper.poll() is None  # the foreign job lives on
    finally:
        sleeper.kill()
