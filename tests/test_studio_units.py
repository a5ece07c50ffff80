"""The studio's pieces that need no server: the incremental metrics reader,
the path policy, the schema-built form, the queued-run status."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from backend.config import list_recipes, load_config
from backend.core.guard import GuardError
from backend.core.rundir import JsonlTail, RunDir, effective_status, tail_text
from studio.context import StudioContext
from studio.train_tab import FIELDS, config_values, form_to_config


def test_jsonl_tail_reads_only_whole_new_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    tail = JsonlTail(path)
    assert tail.read() == ([], False)
    path.write_text(json.dumps({"step": 1}) + "\n" + '{"step": 2')  # the second line is half-written
    rows, changed = tail.read()
    assert rows == [{"step": 1}] and changed
    assert tail.read() == ([{"step": 1}], False)
    with open(path, "a") as f:
        f.write("}\n")
    assert tail.read() == ([{"step": 1}, {"step": 2}], True)
    tmp = tmp_path / "new"
    tmp.write_text(json.dumps({"step": 9}) + "\n")
    os.replace(tmp, path)  # a run folder reused: the file is replaced, reading starts over
    assert tail.read() == ([{"step": 9}], True)


def test_tail_text_keeps_whole_lines(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("".join(f"line {i}\n" for i in range(1000)))
    text = tail_text(log, max_bytes=100)
    assert text.endswith("line 999\n") and text.startswith("line ") and len(text) <= 100
    assert tail_text(tmp_path / "missing") == ""


def test_paths_are_confined(tmp_path):
    ctx = StudioContext(tmp_path / "work", allowed_paths=[tmp_path / "shared"])
    guard = ctx.guard
    inside = ctx.work_dir / "data.jsonl"
    assert guard.readable(str(inside), "dataset") == str(inside)
    assert guard.readable("demo", "dataset") == "demo"
    assert guard.readable("tatsu-lab/alpaca", "dataset") == "tatsu-lab/alpaca"  # a Hub id
    assert guard.readable(str(tmp_path / "shared" / "x.json"), "dataset")
    for bad in ("/etc/passwd", str(ctx.work_dir / ".." / "elsewhere.json"), "~/.ssh/id_rsa", "../x.json"):
        with pytest.raises(GuardError, match="outside the folders"):
            guard.readable(bad, "dataset")
    with pytest.raises(GuardError, match="only inside the work directory"):
        guard.output_dir("/tmp/out", "output folder")
    assert guard.output_dir("exports/a", "output folder") == ctx.work_dir / "exports" / "a"
    with pytest.raises(GuardError, match="--allow-custom-code"):
        guard.map_fn(str(ctx.work_dir / "my_map.py") + ":fn")
    assert guard.map_fn("alpaca") == "alpaca"


@pytest.mark.parametrize("recipe", list_recipes())
def test_form_round_trips_every_recipe(recipe, tmp_path):
    ctx = StudioContext(tmp_path / "work", allow_custom_code=True)  # internlm2 needs trust_remote_code
    cfg = load_config(recipe)
    back, errors, general = form_to_config(ctx, cfg.name, config_values(cfg))
    assert not errors and not general
    assert back.to_dict() == cfg.to_dict()


def test_form_errors_name_the_field(tmp_path):
    ctx = StudioContext(tmp_path / "work")
    values = config_values(load_config("tiny_demo"))
    keys = [f["key"] for f in FIELDS]
    values[keys.index("training.lr")] = -1
    values[keys.index("data.num_proc")] = "two"
    values[keys.index("training.betas")] = "[0.9"
    values[keys.index("data.path")] = "/etc/shadow"
    cfg, errors, _ = form_to_config(ctx, "x", values)
    assert cfg is None
    assert "at least 0" in errors["training.lr"]
    assert "number" in errors["data.num_proc"]
    assert "list" in errors["training.betas"]
    assert "outside the folders" in errors["data.path"]
    values = config_values(load_config("tiny_demo"))
    values[keys.index("model.trust_remote_code")] = True
    _, errors, _ = form_to_config(ctx, "x", values)
    assert "--allow-custom-code" in errors["model.trust_remote_code"]
    _, _, general = form_to_config(ctx, "bad name/..", config_values(load_config("tiny_demo")))
    assert "run name" in general


def test_queued_run_whose_launcher_died_reads_as_failed_with_its_error(tmp_path):
    from backend.core import procs

    run = RunDir(tmp_path / "run")
    run.claim_new()
    run.launcher_log.write_text("ftstudio train: error: data.path 'x.jsonl' does not exist\n")
    dead = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    record = procs.capture(dead.pid).to_dict()
    dead.kill()
    dead.wait()
    run.start("queued", launcher=record)
    st = effective_status(run)
    assert st["state"] == "failed" and "x.jsonl' does not exist" in st["error"]
    assert run.status()["state"] == "failed"  # the correction is written back for everyone
    launcher = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "backend.cli", "train"])
    try:
        run.start("queued", launcher=procs.capture(launcher.pid).to_dict())  # alive: still queued
        assert effective_status(run)["state"] == "queued"
    finally:
        launcher.kill()
