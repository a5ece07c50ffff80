"""A template whose markers the tokenizer cannot spell: refused where the data
is checked (preflight, check-dataset, the preview), naming the missing tokens;
and the explicit fix, model.add_template_tokens, run end to end: the tokens are
added, the embeddings grow, the new rows train, and convert, merge and chat
carry them on. stories260K (a real Llama tokenizer without chat markers) on
the real pirate conversations, in Llama-3's format."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from backend.core.artifacts import read_iter
from backend.core.rundir import RunDir
from backend.data import DataError, build_dataset, unspellable_markers
from backend.preview import highlighted
from conftest import DATA, STORIES_MODEL
from train_utils import ftstudio

PIRATE = DATA / "openai" / "pirate_training_set.jsonl"
TRAIN = ["tiny_demo", f"model.name_or_path={STORIES_MODEL}", f"data.path={PIRATE}", "data.map_fn=openai",
         "data.template=llama3_chat", "data.max_length=256", "training.method=lora", "lora.r=8", "lora.alpha=16",
         "training.max_steps=6", "saving.save_steps=6", "evaluation.inputs=[]"]


def test_missing_markers_are_refused_everywhere_with_their_names(stories_tokenizer, tmp_path):
    assert set(unspellable_markers(stories_tokenizer, "llama3_chat")) == {
        "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"}
    with pytest.raises(DataError, match=r"needs .*<\|eot_id\|>.* as single tokens.*model.add_template_tokens"):
        build_dataset(str(PIRATE), tokenizer=stories_tokenizer, template="llama3_chat", max_length=256)
    conv = [{"input": "hi", "output": "arr"}]
    with pytest.raises(DataError, match=r"<\|eot_id\|> -> \d+ tokens"):
        highlighted(conv, stories_tokenizer, "llama3_chat", 256)
    assert unspellable_markers(stories_tokenizer, "llama2_chat") == {}  # [INST] is text by design
    out = ftstudio("check-dataset", PIRATE, "--tokenizer", STORIES_MODEL, "--template", "llama3_chat", cwd=tmp_path)
    assert out.returncode == 2 and "<|eot_id|>" in out.stderr and "Traceback" not in out.stderr
    out = ftstudio("check-dataset", PIRATE, "--tokenizer", STORIES_MODEL, "--template", "llama3_chat",
                   "--add-template-tokens", cwd=tmp_path)
    assert out.returncode == 0 and "added to the tokenizer" in out.stdout, out.stderr
    refused = ftstudio("train", *TRAIN, "--work-dir", tmp_path / "r0", cwd=tmp_path)
    assert refused.returncode == 2 and "model.add_template_tokens" in refused.stderr
    assert not (tmp_path / "r0").exists()


def test_added_tokens_train_export_merge_and_chat(tmp_path, tiny_model):
    run = RunDir(tmp_path / "run")
    out = ftstudio("train", *TRAIN, "model.add_template_tokens=true", "--work-dir", run.path, "--quiet", cwd=tmp_path,
                   timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    ckpt = read_iter(run.iters()[-1][1])
    assert ckpt.meta["added_tokens"] == ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    assert ckpt.meta["vocab_size"] == 515
    rows = [k for k in ckpt.state_dict if "trainable_tokens" in k]
    assert rows, "the new embedding rows were not trained"
    assert any(float(ckpt.state_dict[k].abs().sum()) > 0 for k in rows)  # and they moved
    adapter = tmp_path / "adapter"
    assert ftstudio("convert", "pth_to_hf", run.iters()[-1][1], adapter, cwd=tmp_path).returncode == 0
    tok = AutoTokenizer.from_pretrained(adapter)
    assert unspellable_markers(tok, "llama3_chat") == {} and len(tok) == 515
    assert json.loads((adapter / "adapter_config.json").read_text())["trainable_token_indices"]
    merged = tmp_path / "merged"
    out = ftstudio("convert", "merge", STORIES_MODEL, adapter, merged, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(merged).get_input_embeddings().num_embeddings == 515
    import subprocess

    from train_utils import FTSTUDIO

    for args in ([STORIES_MODEL, "--adapter", adapter], [merged]):
        chat = subprocess.run([FTSTUDIO, "chat", *map(str, args), "--temperature", "0", "--max-new-tokens", "8"],
                              input="Ahoy\n", capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert chat.returncode == 0 and "Traceback" not in chat.stderr, chat.stderr
