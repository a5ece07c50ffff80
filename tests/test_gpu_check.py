"""What bench/gpu_check.py builds, checked on the CPU (no CUDA is touched): the model's shape and
config, the data, the training config (through our own schema), the commands, the FLOPs and MFU
inputs, and the summary it reads back from a run folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import gpu_check  # noqa: E402

from backend.config import from_dict  # noqa: E402


def test_llama_config_builds_the_shape_on_meta():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = gpu_check.model_shape(layers=2, max_length=8192)
    kwargs = gpu_check.llama_config_kwargs(shape, {"vocab": 1024, "eos": 2, "pad": 0})
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**kwargs))
    n = gpu_check.count_params(shape)
    assert sum(p.numel() for p in model.parameters()) == n["matmul"] + n["head"] + n["embedding"] + \
        shape["hidden_size"] * (2 * shape["num_hidden_layers"] + 1)  # + the RMSNorm weights
    assert model.config.max_position_embeddings == 8192 and not model.config.tie_word_embeddings
    with pytest.raises(ValueError, match="only"):
        gpu_check.llama_config_kwargs(shape, {"vocab": 10**6, "eos": 2, "pad": 0})


def test_full_shape_is_about_a_billion():
    n = gpu_check.count_params(gpu_check.model_shape())
    assert 1.0e9 < n["matmul"] + n["head"] + n["embedding"] < 1.3e9
    assert n["lora"] == 22 * 16 * sum(a + b for a, b in [(2048, 2048), (2048, 256), (2048, 256), (2048, 2048),
                                                         (2048, 5632), (2048, 5632), (5632, 2048)])


def test_config_goes_through_our_schema(tmp_path):
    for method in ("lora", "qlora"):
        cfg = gpu_check.train_config(method, tmp_path / "model", tmp_path / "data.jsonl", steps=40)
        again = from_dict(yaml.safe_load(yaml.safe_dump(cfg)))  # what `ftstudio train` reads back
        assert again.training.method == method and again.training.max_steps == 40
        assert again.model.dtype == "bf16" and again.model.attn_implementation == "auto"
        assert again.data.pack and again.data.max_length == 4096 and again.data.map_fn == "alpaca"
        assert again.saving.save_steps == 40 and again.evaluation.inputs == []
        assert again.training.gradient_checkpointing == (method == "qlora")


def test_data_rows_vary_in_length(tmp_path):
    path = gpu_check.write_data(tmp_path / "d.jsonl", 50, ["a", "b", "c"], longest=300)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 50 and all(set(r) == {"instruction", "input", "output"} for r in rows)
    lengths = [len(r["output"].split()) for r in rows]
    assert min(lengths) >= 20 and max(lengths) <= 300 and len(set(lengths)) > 10
    assert gpu_check.words()  # the repository's own text


def test_commands_are_argument_lists(tmp_path):
    train = gpu_check.train_command(tmp_path / "c.yaml", tmp_path / "run")
    assert train[:3] == [sys.executable, "-m", "backend.cli"] and train[3] == "train"
    assert train[-4:] == ["--work-dir", str(tmp_path / "run"), "--devices", "auto"]
    merge = gpu_check.merge_command(tmp_path / "m", tmp_path / "a", tmp_path / "out")
    assert merge[3:6] == ["convert", "merge", str(tmp_path / "m")] and merge[-4:] == ["--device", "cuda",
                                                                                       "--dtype", "bf16"]
    chat = gpu_check.chat_command(tmp_path / "merged")
    assert chat[3] == "chat" and "--no-streamer" in chat and all(isinstance(a, str) for a in chat)
    from backend.cli import build_parser

    for cmd in (train, merge, chat, gpu_check.convert_command(tmp_path / "iter_1.pth", tmp_path / "hf")):
        build_parser().parse_args(cmd[3:])  # our own CLI takes them


def test_peak_by_card_name():
    assert gpu_check.bf16_peak("NVIDIA H200") == 989e12 == gpu_check.bf16_peak("NVIDIA H100 80GB HBM3")
    assert gpu_check.bf16_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_check.bf16_peak("NVIDIA L40S") == 362e12
    assert gpu_check.bf16_peak("NVIDIA GeForce RTX 4090") is None  # -> a timed matmul on the card


def test_flops_per_token_and_context():
    shape = gpu_check.model_shape()
    n = gpu_check.count_params(shape)
    lora = gpu_check.flops_per_token(shape, 0, "lora")
    assert lora == 4 * (n["matmul"] + n["head"]) + 6 * n["lora"]
    full = gpu_check.flops_per_token(shape, 0, "full")
    assert full == 6 * (n["matmul"] + n["head"])
    assert gpu_check.flops_per_token(shape, 100, "lora") - lora == 3 * 2 * 22 * 2048 * 100
    assert gpu_check.mean_context([4, 4]) == 2.0 and gpu_check.mean_context([]) == 0.0


def test_run_summary_skips_the_warmup(tmp_path):
    rows = [{"step": i, "loss": 5.0 - i / 10, "tokens_per_s": 100.0 if i <= 5 else 1000.0 + i,
             "peak_memory_mb": 2048.0 + i} for i in range(1, 11)]
    rows.insert(3, {"step": 3, "eval_loss": 4.0})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "status.json").write_text(json.dumps({"state": "finished", "phases": {"steps": 3.0}}))
    s = gpu_check.run_summary(tmp_path)
    assert s["tokens_per_s"] == 1008.0 and s["peak_memory_mb"] == 2058.0 and s["steps"] == 10
    assert s["first_loss"] == 4.9 and s["phases"] == {"steps": 3.0} and s["state"] == "finished"
    with pytest.raises(ValueError, match="no step"):
        gpu_check.run_summary(tmp_path, warmup=10)
