"""The ``vllm serve`` command line (backend.serve.vllm). vLLM cannot run on these
machines, so the argument list is checked as vLLM's parser reads it, and
``run_vllm`` is run for real against a stand-in ``vllm`` executable."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from backend.serve import vllm as V
from backend.serve.vllm import VllmError, vllm_serve_command
from conftest import MINIMIND_TOKENIZER


def adapter(folder: Path, r: int, rank_pattern: dict | None = None) -> str:
    folder.mkdir(parents=True)
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "base_model_name_or_path": "/models/base"}
    if rank_pattern:
        config["rank_pattern"] = rank_pattern
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return str(folder)


def flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_base_only():
    cmd = vllm_serve_command("/models/base model", {}, host="127.0.0.1", port=8001, served_name="demo")
    assert cmd == ["vllm", "serve", "/models/base model", "--host", "127.0.0.1", "--port", "8001",
                   "--served-model-name", "demo"]
    with_template = vllm_serve_command("/m", {}, host="0.0.0.0", port=80, served_name="m",
                                       chat_template="/tmp/t.jinja", extra_args=["--dtype", "bfloat16"])
    assert with_template[-4:] == ["--chat-template", "/tmp/t.jinja", "--dtype", "bfloat16"]
    assert "--enable-lora" not in with_template


def test_base_and_two_adapters(tmp_path):
    adapters = {"tuned": adapter(tmp_path / "run" / "hf" / "iter_10", 8),
                "odd=name,path": adapter(tmp_path / "a,b=c", 16)}
    cmd = vllm_serve_command("/models/base", adapters, host="127.0.0.1", port=8000, served_name="base")
    assert cmd[:9] == ["vllm", "serve", "/models/base", "--host", "127.0.0.1", "--port", "8000",
                       "--served-model-name", "base"]
    assert "--enable-lora" in cmd and flag(cmd, "--max-loras") == "2" and flag(cmd, "--max-lora-rank") == "16"
    at = cmd.index("--lora-modules")
    entries = cmd[at + 1:]
    assert len(entries) == 2  # one flag, all entries after it (vLLM's action replaces the list per flag)
    for entry, (name, path) in zip(entries, adapters.items()):
        # vLLM reads an entry as JSON when it holds a ',' (else as name=path): ours always do
        assert "," in entry
        assert json.loads(entry) == {"name": name, "path": path, "base_model_name": "base"}


def test_rank_above_the_default(tmp_path):
    big = {"big": adapter(tmp_path / "big", 64)}
    cmd = vllm_serve_command("/m", big, host="h", port=1, served_name="m")
    assert flag(cmd, "--max-lora-rank") == "64"
    odd = {"odd": adapter(tmp_path / "odd", 8, rank_pattern={"q_proj": 24})}
    assert V.max_lora_rank_of(odd) == 24
    assert flag(vllm_serve_command("/m", odd, host="h", port=1, served_name="m"), "--max-lora-rank") == "32"
    assert flag(vllm_serve_command("/m", big, host="h", port=1, served_name="m", max_lora_rank=128),
                "--max-lora-rank") == "128"
    with pytest.raises(VllmError, match="adapter big has LoRA rank 64, above --max-lora-rank 32"):
        vllm_serve_command("/m", big, host="h", port=1, served_name="m", max_lora_rank=32)
    with pytest.raises(VllmError, match="vLLM accepts 1, 8, 16"):
        vllm_serve_command("/m", big, host="h", port=1, served_name="m", max_lora_rank=100)
    with pytest.raises(VllmError, match="merge the adapter"):
        vllm_serve_command("/m", {"huge": adapter(tmp_path / "huge", 1024)}, host="h", port=1, served_name="m")
    assert V.max_lora_rank_of({}) is None


def test_bad_adapters_and_names(tmp_path):
    (tmp_path / "full").mkdir()
    with pytest.raises(VllmError, match="no adapter_config.json"):
        vllm_serve_command("/m", {"a": str(tmp_path / "full")}, host="h", port=1, served_name="m")
    with pytest.raises(VllmError, match="differ"):
        vllm_serve_command("/m", {"m": adapter(tmp_path / "x", 8)}, host="h", port=1, served_name="m")
    with pytest.raises(VllmError, match="without spaces"):
        vllm_serve_command("/m", {}, host="h", port=1, served_name="my model")


def test_chat_template_file(tmp_path):
    from transformers import AutoTokenizer

    from backend.chat_template import export_chat_template

    tok = AutoTokenizer.from_pretrained(MINIMIND_TOKENIZER)  # our own copy: the template is set on it
    assert export_chat_template(tok, "qwen_chat")
    tok.save_pretrained(tmp_path / "tok")  # as an export leaves it
    path = V.chat_template_file(tmp_path / "tok", tmp_path / "serve")
    assert path == tmp_path / "serve" / "chat_template.jinja"
    assert path.read_text() == tok.chat_template and "<|im_start|>" in tok.chat_template

    old_style = tmp_path / "old"
    old_style.mkdir()
    (old_style / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}))
    assert V.chat_template_file(old_style, tmp_path / "o").read_text() == "D"
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "tokenizer_config.json").write_text("{}")
    assert V.chat_template_file(tmp_path / "none", tmp_path / "n") is None
    assert not (tmp_path / "n").exists()


def test_run_vllm_without_vllm(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    with pytest.raises(VllmError) as info:
        V.run_vllm(["vllm", "serve", "/m"], "sk-key")
    message = str(info.value)
    assert "\n" not in message and "pip install vllm on a GPU box" in message


def test_run_vllm_passes_the_key_in_the_environment_only(monkeypatch, tmp_path):
    """A stand-in vllm records its own command line (as ps shows it) and environment."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "vllm"
    stub.write_text(f"#!{sys.executable}\n"
                    "import json, os, sys\n"
                    "cmdline = open('/proc/self/cmdline', 'rb').read().decode()\n"
                    f"json.dump({{'cmdline': cmdline, 'argv': sys.argv[1:], 'key': os.environ.get('VLLM_API_KEY')}},"
                    f" open({str(tmp_path / 'seen.json')!r}, 'w'))\n"
                    "sys.exit(3)\n")
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("VLLM_API_KEY", "stale-key-from-the-shell")
    key = "fts_secret-key-123"
    cmd = vllm_serve_command("/m", {}, host="127.0.0.1", port=8000, served_name="m")
    assert V.run_vllm(cmd, key) == 3
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert seen["argv"] == cmd[1:] and seen["key"] == key
    assert key not in seen["cmdline"] and key not in " ".join(cmd)

    assert V.run_vllm(cmd, None) == 3
    assert json.loads((tmp_path / "seen.json").read_text())["key"] is None  # no key: none at all, not the shell's
    with pytest.raises(VllmError, match="one API key"):
        V.run_vllm(cmd, ["k1", "k2"])
