"""Every mistake a user can make at the command line: one line naming the
file, row, line or field and what to do, exit code 2, no traceback, and
nothing half-written."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from conftest import DATA, MINIMIND_TOKENIZER
from train_utils import ftstudio


def one_line_error(out, *expected: str) -> str:
    assert out.returncode == 2, (out.returncode, out.stdout[-1000:], out.stderr[-2000:])
    assert "Traceback" not in out.stderr, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip() and "warning" not in line.lower()]
    message = lines[-1]
    assert message.startswith(("ftstudio ", "usage:")) or "error:" in message, out.stderr
    for text in expected:
        assert text in message, (text, out.stderr)
    return message


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a small tmpfs (root, as in CI); yields a function that mounts one with options."""
    mounted = []

    def mount(name: str, options: str):
        where = tmp_path / name
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True,
                              text=True)
        if done.returncode:
            pytest.fail(f"this test needs to mount a tmpfs (root, as in CI): {done.stderr}", pytrace=False)
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_read_only_and_full_file_systems(tmp_path, tmpfs):
    ro = tmpfs("ro", "ro,size=1m")
    one_line_error(ftstudio("copy-cfg", "tiny_demo", ro / "configs", cwd=tmp_path), "read-only file system")
    full = tmpfs("full", "size=64k")
    with open(full / "filler", "wb") as f:
        with pytest.raises(OSError):
            f.write(b"\0" * (1 << 20))
            f.flush()
    one_line_error(ftstudio("copy-cfg", "tiny_demo", full, cwd=tmp_path), "no space left on device")
    assert not [p for p in full.iterdir() if p.name != "filler"], "a half-written file was left"


def test_models_that_are_not_there_or_not_models(tmp_path, tiny_model):
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(ftstudio("chat", empty, "--prompt-template", "qwen_chat", cwd=tmp_path), "not a model folder")
    out = ftstudio("chat", "no-such-org/no-such-model", "--prompt-template", "qwen_chat", cwd=tmp_path,
                   env={"HF_HUB_OFFLINE": "1"})
    one_line_error(out, "no-such-org/no-such-model", "Hub cannot be reached")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    one_line_error(ftstudio("chat", broken, "--prompt-template", "qwen_chat", cwd=tmp_path),
                   "model.safetensors", "not a readable safetensors file")


@pytest.mark.parametrize("override, expected", [
    ("training.lr=.nan", "training.lr is nan; give a finite number"),
    ("training.lr=.inf", "training.lr is inf; give a finite number"),
    ("training.warmup_ratio=1.5", "training.warmup_ratio is 1.5"),
    ("training.warmup_ratio=1", "below 1"),
    ("lora.dropout=1.0", "lora.dropout is 1.0"),
    ("training.betas=[0.9, 1.5]", "training.betas should be two numbers in [0, 1)"),
])
def test_config_numbers_out_of_range(tmp_path, override, expected):
    one_line_error(ftstudio("train", "tiny_demo", override, cwd=tmp_path), expected)
    assert not (tmp_path / "work_dirs").exists()


def test_launch_numbers_out_of_range(tmp_path):
    out = ftstudio("train", "tiny_demo", cwd=tmp_path, env={"NPROC_PER_NODE": "2", "PORT": "70000"})
    one_line_error(out, "PORT=70000 is not a TCP port")
    out = ftstudio("check-dataset", DATA / "alpaca" / "alpaca_en_demo.json", "--tokenizer", MINIMIND_TOKENIZER,
                   "--max-length", "-5", cwd=tmp_path)
    one_line_error(out, "--max-length", "-5 must be at least 1")


def test_data_files_that_do_not_parse_name_their_line_or_files(tmp_path):
    bad = tmp_path / "bad.jsonl"
    rows = [json.dumps({"instruction": "a", "input": "", "output": "b"})] * 4
    rows[2] = rows[2][:-5]
    bad.write_text("\n".join(rows) + "\n")
    args = ["--tokenizer", MINIMIND_TOKENIZER, "--template", "qwen_chat"]
    one_line_error(ftstudio("check-dataset", bad, *args, cwd=tmp_path), "bad.jsonl: line 3", "not valid JSON")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copyfile(DATA / "alpaca" / "alpaca_en_demo.json", mixed / "alpaca.json")
    shutil.copyfile(DATA / "openai" / "pirate_training_set.jsonl", mixed / "pirate.jsonl")
    one_line_error(ftstudio("check-dataset", mixed, *args, cwd=tmp_path),
                   "alpaca.json has input, instruction, output", "pirate.jsonl has messages")


def demo_lora_iter(folder) -> str:
    """A real iter file of a LoRA on the demo model (untrained weights: converting needs no training)."""
    import torch

    from backend.config import load_config
    from backend.core.artifacts import save_iter

    cfg = load_config("tiny_demo", ["training.method=lora"])
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    state = {f"{prefix}.lora_A.weight": torch.randn(16, 128), f"{prefix}.lora_B.weight": torch.zeros(128, 16)}
    return str(save_iter(folder, 1, state, {"kind": "lora", "config": cfg.to_dict(), "lora": {"r": 16}}))


def test_outputs_that_would_destroy_files(tmp_path, tiny_model):
    mine = tmp_path / "here"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    pth = demo_lora_iter(tmp_path)
    one_line_error(ftstudio("convert", "pth_to_hf", pth, ".", cwd=mine), "not written by Finetune Studio")
    one_line_error(ftstudio("convert", "pth_to_hf", pth, ".", "--overwrite", cwd=mine), "not written by Finetune")
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]
    assert ftstudio("convert", "pth_to_hf", pth, "out", cwd=mine).returncode == 0
    one_line_error(ftstudio("convert", "pth_to_hf", pth, "out", cwd=mine), "already holds", "--overwrite")
    assert ftstudio("convert", "pth_to_hf", pth, "out", "--overwrite", cwd=mine).returncode == 0
    one_line_error(ftstudio("convert", "merge", "demo", mine / "out", mine, cwd=tmp_path), "not written by")
    (tmp_path / "copy").mkdir()
    assert ftstudio("copy-cfg", "tiny_demo", tmp_path / "copy", cwd=tmp_path).returncode == 0
    one_line_error(ftstudio("copy-cfg", "tiny_demo", tmp_path / "copy", cwd=tmp_path), "already exists")
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_a_folder_that_holds_a_run_is_refused_for_a_new_run(tmp_path, tiny_model):
    from backend.core.rundir import RunDir

    earlier = RunDir(tmp_path / "work_dirs" / "tiny_demo-127.0.0.1-29555")  # the default two-node folder
    earlier.claim_new()
    earlier.start("running")
    earlier.end("finished", 0)
    earlier.append_metric({"step": 1, "loss": 1.0})
    out = ftstudio("train", "tiny_demo", "--work-dir", earlier.path, cwd=tmp_path)
    one_line_error(out, "holds an earlier run (finished", "--resume")
    env = {"NPROC_PER_NODE": "1", "NNODES": "2", "NODE_RANK": "0", "ADDR": "127.0.0.1", "PORT": "29555"}
    one_line_error(ftstudio("train", "tiny_demo", cwd=tmp_path, env=env), "holds an earlier run", "--work-dir NEW")
    assert earlier.metrics() == [{"step": 1, "loss": 1.0}] and earlier.status()["state"] == "finished"
