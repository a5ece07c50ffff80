"""The two contracts and the guard, piece by piece, without training: outputs
that never destroy what we did not write (and survive a crash mid-swap),
run folders that refuse a second run, checkpoints verified on read, process
records that a reused or forged pid cannot match, and a test that nobody but
the owners spells the file names."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from backend.core import atomic, procs
from backend.core.artifacts import CONVERTED, ArtifactError, output_dir, read_iter, save_iter
from backend.core.atomic import OutputError
from backend.core.rundir import RunDir, RunFolderError, effective_status
from backend.launch import LaunchError, LaunchSpec, resume_shape

ROOT = Path(__file__).resolve().parents[1]


def export_to(target: Path, text: str, overwrite: bool = False) -> None:
    with output_dir(target, CONVERTED, overwrite) as out:
        (out.folder / "weights.txt").write_text(text)
        out.finish({"kind": "lora"})


# --- outputs ----------------------------------------------------------------------------


def test_outputs_replace_only_our_own_of_the_same_kind_when_asked(tmp_path):
    target = tmp_path / "out"
    export_to(target, "one")
    with pytest.raises(OutputError, match="already holds a converted checkpoint"):
        export_to(target, "two")
    export_to(target, "two", overwrite=True)
    assert (target / "weights.txt").read_text() == "two"
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputError, match="not written by Finetune Studio"):
        export_to(theirs, "x", overwrite=True)
    assert (theirs / "thesis.tex").read_text() == "years of work"
    with pytest.raises(OutputError, match="a merged model|not written"):
        with output_dir(target, "merged", overwrite=True) as out:  # another kind of ours: still refused
            out.finish({"kind": "merged"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "theirs"]  # no temp folder left
    # a name of the shape of our temp folders would be taken for a leftover and cleaned: never an output
    with pytest.raises(OutputError, match="kept for our temporary writes"):
        export_to(tmp_path / ".out.ftstudio-new-mine", "x")


def test_a_failed_write_leaves_the_old_output(tmp_path):
    target = tmp_path / "out"
    export_to(target, "old")
    with pytest.raises(RuntimeError):
        with output_dir(target, CONVERTED, overwrite=True) as out:
            (out.folder / "weights.txt").write_text("half")
            raise RuntimeError("killed mid-write")
    assert (target / "weights.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_interrupted_writes_are_cleaned_or_undone(tmp_path, monkeypatch):
    target = tmp_path / "out"
    export_to(target, "old")
    # a write killed before its swap: a temp folder with our partial mark
    crashed = tmp_path / ".out.ftstudio-new-abc"
    crashed.mkdir()
    (crashed / atomic.PARTIAL_MARK).touch()
    # a swap (without renameat2) killed between its two renames: only the backup of the old output is left
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    calls = []
    real_rename = atomic.os.rename

    def rename_then_die(src, dst):
        calls.append((src, dst))
        real_rename(src, dst)
        if len(calls) == 1:
            raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(atomic.os, "rename", rename_then_die)
    with pytest.raises(KeyboardInterrupt):
        export_to(target, "new", overwrite=True)
    monkeypatch.setattr(atomic.os, "rename", real_rename)
    assert not target.exists() and list(tmp_path.glob(".out.ftstudio-old-*"))
    is_ours = lambda p: (p / "ftstudio.json").exists()  # noqa: E731
    done = atomic.recover(target, is_ours)
    assert (target / "weights.txt").read_text() == "old", done
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_atomic_exchange_keeps_old_or_new_at_every_moment(tmp_path):
    target = tmp_path / "out"
    export_to(target, "old")
    a, b = tmp_path / "a", target
    a.mkdir()
    (a / "weights.txt").write_text("new")
    assert atomic._exchange(a, b)  # renameat2(RENAME_EXCHANGE) on this file system
    assert (target / "weights.txt").read_text() == "new" and (a / "weights.txt").read_text() == "old"


def test_write_new_file_refuses_to_replace(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("mine")
    with pytest.raises(OutputError, match="already exists"):
        atomic.write_new_file(path, "other")
    assert path.read_text() == "mine"


# --- run folders ------------------------------------------------------------------------


def test_a_run_folder_takes_one_run(tmp_path):
    run = RunDir(tmp_path / "run")
    run.claim_new()
    run.start("running")
    run.end("finished", 0)
    with pytest.raises(RunFolderError, match="holds an earlier run .*--resume"):
        RunDir(tmp_path / "run").claim_new()
    other = tmp_path / "notes"
    other.mkdir()
    (other / "a.txt").write_text("x")
    with pytest.raises(RunFolderError, match="not empty"):
        RunDir(other).claim_new()
    RunDir(tmp_path / "empty").claim_new()  # a new or empty folder is fine


def test_state_is_true_after_faults(tmp_path):
    run = RunDir(tmp_path / "run")
    run.claim_new()
    gone = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    record = procs.capture(gone.pid).to_dict()
    gone.kill()
    gone.wait()
    # launcher and workers gone, the ranks said they aborted: aborted, with their code
    run.start("running", launcher=record, workers=record)
    run.write_result("aborted", None, 143)
    st = effective_status(run)
    assert (st["state"], st["exit_code"]) == ("aborted", 143) and run.status()["state"] == "aborted"
    # a reboot: the records are of another boot, nothing is alive, nothing said how it ended
    run.clear_result()
    rebooted = {**procs.self_record().to_dict(), "boot": "another-boot"}
    run.start("running", launcher=rebooted, workers=rebooted)
    st = effective_status(run)
    assert st["state"] == "failed" and "restarted" in st["error"]
    # the launcher killed, the workers still training: running, followed through the workers
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-m", "backend.train.worker",
                               str(run.path)])
    try:
        wrec = procs.capture(worker.pid).to_dict()
        run.start("running", launcher=record, workers=wrec)
        st = effective_status(run)
        assert st["state"] == "running" and "following the workers" in st["note"]
        # the same live process recorded for another run folder is not this run's
        run.write_status(workers={**wrec, "argv": [a.replace(str(run.path), "/elsewhere") for a in wrec["argv"]]})
        assert effective_status(run)["state"] == "failed"
    finally:
        worker.kill()


def test_a_process_record_is_not_fooled_by_a_reused_pid():
    me = procs.self_record()
    assert me.matches()
    assert not procs.ProcessRecord(me.host, me.boot, me.pid, me.start + 1, me.argv).matches()
    assert not procs.ProcessRecord(me.host, me.boot, me.pid, me.start, ("other",)).matches()
    assert not procs.ProcessRecord("another-host", me.boot, me.pid, me.start, me.argv).matches()
    assert procs.ProcessRecord.from_dict({"pid": "1; rm -rf /"}) is None


def test_resume_reproduces_the_recorded_launch_shape(tmp_path):
    run = RunDir(tmp_path / "run")
    run.claim_new()
    shape = LaunchSpec(nproc_per_node=2, nnodes=2, addr="10.0.0.1", port=29512)
    (run.path / "deepspeed.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    run.write_launch(shape.record(run.deepspeed_file))
    spec, ds = resume_shape(run, LaunchSpec(node_rank=1, nnodes=2, port=29512), None,
                            env={"NODE_RANK": "1"})
    assert (spec.nproc_per_node, spec.nnodes, spec.addr, spec.port, spec.node_rank) == (2, 2, "10.0.0.1", 29512, 1)
    assert ds == run.deepspeed_file
    with pytest.raises(LaunchError, match="NPROC_PER_NODE=2"):
        resume_shape(run, LaunchSpec(nproc_per_node=4), None, env={"NPROC_PER_NODE": "4"})
    other = tmp_path / "zero3.json"
    other.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(LaunchError, match="same config"):
        resume_shape(run, LaunchSpec(), other, env={})


def test_launch_shape_rejects_ports_out_of_range():
    with pytest.raises(LaunchError, match="not a TCP port"):
        LaunchSpec.from_env({"NPROC_PER_NODE": "2", "PORT": "70000"})


# --- checkpoints ------------------------------------------------------------------------


def saved_iter(tmp_path) -> Path:
    state = {"base_model.model.q_proj.lora_A.weight": torch.randn(4, 64),
             "base_model.model.q_proj.lora_B.weight": torch.randn(64, 4)}
    cfg = {"model": {"name_or_path": "demo"}, "data": {"template": "qwen_chat"}}
    return save_iter(tmp_path, 3, state, {"kind": "lora", "config": cfg, "lora": {"r": 4}})


def test_checkpoints_are_verified_on_read(tmp_path):
    path = saved_iter(tmp_path)
    assert read_iter(path).kind == "lora"
    # one flipped byte in a tensor's storage: torch.load itself would not notice
    with zipfile.ZipFile(path) as z:
        member = next(i for i in z.infolist() if "/data/" in i.filename)
    data = bytearray(path.read_bytes())
    head = member.header_offset  # the local header's own name and extra lengths (torch pads the extra)
    start = head + 30 + int.from_bytes(data[head + 26:head + 28], "little") + int.from_bytes(data[head + 28:head + 30], "little")
    data[start + 8] ^= 0xFF
    damaged = tmp_path / "iter_4.pth"
    damaged.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=f"member {member.filename} fails its check"):
        read_iter(damaged)
    truncated = tmp_path / "iter_5.pth"
    truncated.write_bytes(path.read_bytes()[:400])
    with pytest.raises(ArtifactError, match="not a torch.save zip archive: truncated"):
        read_iter(truncated)


def test_checkpoint_shapes_and_lora_pairs_must_fit(tmp_path):
    ckpt = torch.load(saved_iter(tmp_path), weights_only=True)
    ckpt["state_dict"]["base_model.model.q_proj.lora_B.weight"] = torch.randn(64, 8)
    torch.save(ckpt, tmp_path / "iter_6.pth")
    with pytest.raises(ArtifactError, match="lora_B.weight' has shape \\[64, 8\\], recorded \\[64, 4\\]"):
        read_iter(tmp_path / "iter_6.pth")
    del ckpt["meta"]["shapes"]
    torch.save(ckpt, tmp_path / "iter_7.pth")
    with pytest.raises(ArtifactError, match="does not fit rank 4"):
        read_iter(tmp_path / "iter_7.pth")


# --- one owner for the names ------------------------------------------------------------

OWNED_NAMES = {"config.yaml", "requested.yaml", "launch.json", "deepspeed.json", "status.json", "result.json",
               "stop.json", "train.log", "launcher.log", "metrics.jsonl", "samples.jsonl", "checkpoints", "COMPLETE",
               ".space-reserve", "ftstudio.json", "adapter_config.json", "tokenizer_config.json", "uploads", "configs",
               "trackers", "evals"}
OWNERS = {"backend/core/rundir.py", "backend/core/artifacts.py"}


def spelled_names(path: Path) -> list[tuple[int, str]]:
    """String constants in a module that spell an owned name (docstrings and messages aside)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            text = node.value
            if text in OWNED_NAMES or re.fullmatch(r"(iter_\d*(\.pth)?|checkpoint-\d*|\.pth)", text):
                found.append((node.lineno, text))
    return found


def test_only_the_two_owners_spell_the_run_folder_and_artifact_names():
    offenders = {}
    for path in sorted((ROOT / "backend").rglob("*.py")) + sorted((ROOT / "studio").rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        if rel not in OWNERS and spelled_names(path):
            offenders[rel] = spelled_names(path)
    assert not offenders, offenders
    assert spelled_names(ROOT / "backend/core/rundir.py") and spelled_names(ROOT / "backend/core/artifacts.py")


def test_the_core_imports_nothing_above_it():
    for path in sorted((ROOT / "backend" / "core").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1, f"{path.name} imports {'.' * node.level}{node.module}"
            if isinstance(node, ast.ImportFrom) and not node.level and node.module:
                assert not node.module.startswith("backend") or node.module.startswith("backend.core"), path.name


def test_a_child_just_started_is_recorded_with_its_own_command_line():
    """Right after Popen returns, /proc often still shows an empty command line
    (the child is inside execve): the record waits for the real one."""
    for _ in range(30):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)", "marker"], start_new_session=True)
        try:
            record = procs.capture(child.pid)
            assert record is not None and record.argv[-1] == "marker" and record.matches()
        finally:
            child.kill()
            child.wait()
