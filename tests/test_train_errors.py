"""Every error a user meets at `ftstudio train`: a clear message, a non-zero
exit, and no run folder left behind."""

import json
import socket

from train_utils import ftstudio


def check_fails(tmp_path, *args, env=None, expect):
    out = ftstudio("train", *args, cwd=tmp_path, env=env, timeout=300)
    assert out.returncode != 0, out.stdout
    assert expect in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "work_dirs").exists(), "a run folder was left behind"
    return out


def test_unknown_recipe(tmp_path):
    check_fails(tmp_path, "tiny_dmeo", expect="Did you mean tiny_demo")


def test_bad_field(tmp_path):
    check_fails(tmp_path, "tiny_demo", "training.lr=-1", expect="training.lr is -1.0; it must be at least 0.0")


def test_missing_model_path(tmp_path):
    check_fails(tmp_path, "tiny_demo", "model.name_or_path=./no/such/model",
                expect="model.name_or_path './no/such/model': no such folder")


def test_map_fn_does_not_match_columns(tmp_path, tiny_model):
    # the demo data is OpenAI-format `messages`; the alpaca map_fn wants other columns
    check_fails(tmp_path, "tiny_demo", "data.map_fn=alpaca", expect="row 0, column 'output': missing column 'output'")


def test_qlora_without_bitsandbytes(tmp_path, tiny_model):
    """A machine without a usable bitsandbytes, made by shadowing the package."""
    shadow = tmp_path / "shadow" / "bitsandbytes"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('libbitsandbytes_cpu.so: cannot open shared object file')\n")
    check_fails(tmp_path, "tiny_demo", "training.method=qlora", env={"PYTHONPATH": str(shadow.parent)},
                expect="training.method is qlora, but bitsandbytes is not usable here")


def test_too_many_processes(tmp_path, tiny_model):
    check_fails(tmp_path, "tiny_demo", env={"NPROC_PER_NODE": "4096"}, expect="NPROC_PER_NODE=4096, but this machine has")


def test_port_in_use(tmp_path, tiny_model):
    with socket.socket() as s:
        s.bind(("", 0))
        s.listen()
        port = s.getsockname()[1]
        check_fails(tmp_path, "tiny_demo", env={"NPROC_PER_NODE": "2", "PORT": str(port)},
                    expect=f"PORT={port} is already in use")


def test_zero_trainable_samples(tmp_path, tiny_model):
    data = tmp_path / "long.json"
    data.write_text(json.dumps([{"instruction": "word " * 400, "input": "", "output": "x"}] * 4))
    check_fails(tmp_path, "tiny_demo", f"data.path={data}", "data.map_fn=alpaca", "data.max_length=64",
                expect="no trainable sample")


def test_unknown_deepspeed_config(tmp_path):
    check_fails(tmp_path, "tiny_demo", "--deepspeed", "zero9", expect="not one of deepspeed_zero1")


def test_resume_without_checkpoint(tmp_path):
    check_fails(tmp_path, "tiny_demo", "--resume", expect="no earlier run of 'tiny_demo'")
