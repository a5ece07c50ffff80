"""Start-up and the phases of a run (``backend/train/phases.py``): the phase clock and
its line, and a worker that keeps bitsandbytes / DeepSpeed out unless the run uses them
(checked in a fresh interpreter, since this test process has imported everything)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from backend.config import from_dict
from backend.core.rundir import RunDir
from backend.train.phases import Phases, format_phases

# The worker's own import path, then what a LoRA run does that could pull them in:
# peft's LoRA dispatch asks whether bitsandbytes has 4-bit layers, and accelerate's
# unwrap asks for DeepSpeed's engine, whenever the packages are installed.
WORKER_IMPORTS = """
import json, sys
from pathlib import Path
from backend.core.rundir import RunDir
from backend.train.worker import hide_unused_stacks
run = RunDir(Path(sys.argv[1]))
hidden = hide_unused_stacks(run, sys.argv[2] or None)
from backend.train.trainer import train  # noqa: F401  (what main() imports next)
import torch
from accelerate.utils import extract_model_from_parallel
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=2))
model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
extract_model_from_parallel(model)
from backend.train.phases import loaded
print(json.dumps({"hidden": hidden, "loaded": loaded()}))
"""


def worker_imports(tmp_path, method: str, deepspeed: str = "") -> dict:
    run = RunDir(tmp_path / method)
    run.path.mkdir()
    run.write_config(from_dict({"training": {"method": method}}).to_yaml())
    out = subprocess.run([sys.executable, "-c", WORKER_IMPORTS, str(run.path), deepspeed], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_lora_worker_never_imports_bitsandbytes_or_deepspeed(tmp_path):
    seen = worker_imports(tmp_path, "lora")
    assert seen == {"hidden": ["bitsandbytes", "deepspeed"], "loaded": []}


@pytest.mark.parametrize("method", ["qlora"])
def test_qlora_worker_keeps_bitsandbytes(tmp_path, method):
    seen = worker_imports(tmp_path, method)
    assert seen["hidden"] == ["deepspeed"] and seen["loaded"] == ["bitsandbytes"]


def test_phases_follow_one_another_and_carve():
    clock = Phases("imports")
    clock.begin("data")
    clock.begin("steps")
    clock.end()
    clock.seconds["steps"] = 10.0  # a known figure to carve from
    clock.carve("steps", {"save": 2.5, "samples": 20.0})  # never more than the phase held
    assert list(clock.seconds) == ["imports", "data", "steps", "save", "samples"]
    assert clock.seconds["steps"] == 0.0 and clock.seconds["save"] == 2.5 and clock.seconds["samples"] == 7.5
    record = clock.to_dict()
    assert record["total"] == pytest.approx(sum(clock.seconds.values()), abs=1e-3)
    assert isinstance(record["optional_imports"], list)


def test_phases_line():
    line = format_phases({"imports": 8.14, "data": 0.4, "model_load": 0.93, "steps": 30.2, "save": 0.31,
                          "total": 39.98, "optional_imports": []})
    assert line == ("phases: imports 8.1 s, data 0.4 s, model load 0.9 s, steps 30.2 s, save 0.3 s "
                    "(total 40.0 s; bitsandbytes, deepspeed not imported)")
    assert format_phases({"preflight": 2.0, "data_preflight": 1.0, "total": 3.0}, prefix="launcher phases") == \
        "launcher phases: preflight 2.0 s, data 1.0 s (total 3.0 s)"
