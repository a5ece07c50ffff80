"""The ftstudio command line, run as a real subprocess (the installed console script)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from backend.data.map_fns import MAP_FNS
from backend.data.templates import TEMPLATES
from conftest import DATA, MINIMIND_TOKENIZER, ROOT

FTSTUDIO = shutil.which("ftstudio", path=os.path.dirname(sys.executable)) or "ftstudio"


def run(*args, env=None, cwd=None):
    return subprocess.run([FTSTUDIO, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=300)


def test_help_lists_subcommands():
    out = run("--help")
    assert out.returncode == 0
    for cmd in ("list-map-fn", "list-template", "check-dataset"):
        assert cmd in out.stdout


def test_list_map_fn_and_template():
    out = run("list-map-fn")
    assert out.returncode == 0
    names = [line.split()[0] for line in out.stdout.splitlines()]
    assert names == sorted(MAP_FNS)
    assert all(len(line.split(None, 1)) == 2 for line in out.stdout.splitlines())  # a description each
    out = run("list-template")
    assert [line.split()[0] for line in out.stdout.splitlines()] == sorted(TEMPLATES)


def test_check_dataset_plain_output():
    out = run("check-dataset", DATA / "alpaca" / "alpaca_en_demo.json", "--tokenizer", MINIMIND_TOKENIZER,
              "--template", "qwen_chat", "--max-length", "1024")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "rows        999" in text and "truncated" in text and "p50=" in text
    assert "\x1b[" not in text  # not a TTY: no colour codes
    # the trained part is marked in plain text; the prompt is not inside the marks
    sample = text.split("first sample", 1)[1]
    assert "<|im_start|>user\nDescribe a process of making crepes.\n<|im_end|>" in sample
    assert "⟦Making crepes is an easy" in sample and sample.rstrip().endswith("<|im_end|>⟧")


def test_check_dataset_colour_and_json():
    out = run("check-dataset", DATA / "openai" / "pirate_training_set.jsonl", "--tokenizer", MINIMIND_TOKENIZER,
              "--template", "hf_chat_template", "--color", "always")
    assert out.returncode == 0, out.stderr
    assert "\x1b[32mAhoy matey" in out.stdout
    out = run("check-dataset", DATA / "openai" / "pirate_training_set.jsonl", "--tokenizer", MINIMIND_TOKENIZER,
              "--json", "--pack", "--max-length", "512")
    report = json.loads(out.stdout)
    assert report["rows"] == 10 and report["map_fn"] == "openai" and report["packed_blocks"] >= 1


def test_check_dataset_bad_row_exits_nonzero(tmp_path):
    bad = tmp_path / "bad.jsonl"
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}] * 3
    rows.append({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]})
    bad.write_text("\n".join(json.dumps(r) for r in rows))
    out = run("check-dataset", bad, "--tokenizer", MINIMIND_TOKENIZER)
    assert out.returncode != 0
    assert "row 3" in out.stderr and "'messages'" in out.stderr and "robot" in out.stderr
    assert "Traceback" not in out.stderr


def test_check_dataset_unknown_template_and_map_fn():
    out = run("check-dataset", DATA / "alpaca" / "identity.json", "--tokenizer", MINIMIND_TOKENIZER,
              "--template", "qwen_chatt")
    assert out.returncode != 0 and "unknown prompt template 'qwen_chatt'" in out.stderr and "qwen_chat" in out.stderr
    out = run("check-dataset", DATA / "alpaca" / "identity.json", "--tokenizer", MINIMIND_TOKENIZER,
              "--map-fn", "alpacca")
    assert out.returncode != 0 and "unknown map_fn 'alpacca'" in out.stderr and "alpaca" in out.stderr


def test_demo_runs_without_shared(tmp_path):
    """The README's demo: the bundled data and a tokenizer built on the spot (no ../shared, no Hub)."""
    out = run("check-dataset", ROOT / "assets" / "demo" / "studio_qa.jsonl", "--tokenizer", "demo",
              "--template", "qwen_chat", env={"FTSTUDIO_DEMO_DIR": str(tmp_path / "demo")}, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "demo" / "tokenizer" / "tokenizer.json").exists()
    assert "rows        50" in out.stdout and "⟦Finetune Studio is a browser studio" in out.stdout


def test_overrides_may_follow_the_options():
    from backend.cli import build_parser, parse

    args = parse(build_parser(), ["estimate-memory", "tiny_demo", "--world-size", "2", "training.method=lora"])
    assert args.overrides == ["training.method=lora"] and args.world_size == 2
    args = parse(build_parser(), ["train", "tiny_demo", "lora.r=4", "--deepspeed", "deepspeed_zero2", "data.pack=false"])
    assert args.overrides == ["lora.r=4", "data.pack=false"]
    with pytest.raises(SystemExit):
        parse(build_parser(), ["estimate-memory", "tiny_demo", "--bogus"])
    with pytest.raises(SystemExit):
        parse(build_parser(), ["runs", "training.method=lora"])  # takes no overrides
