"""convert pth_to_hf, convert merge and chat, for real on CPU: a model trained
until it reproduces answers from a real dataset, then exported, merged and
asked through `ftstudio chat` over a pipe."""

from __future__ import annotations

import json
import pickle
import subprocess

import pytest
import torch

from backend.core.rundir import RunDir
from conftest import DATA, STORIES_MODEL
from train_utils import FTSTUDIO, ftstudio

# Three real identity rows with distinct answers. Their {{name}}/{{author}}
# placeholders are filled in (as LLaMA-Factory's docs tell users to do) with
# names stories260K knows: its tied embeddings are frozen under LoRA, and
# braces are byte tokens it never learned to emit.
ROWS = [json.loads(json.dumps(r).replace("{{name}}", "Tim").replace("{{author}}", "Lily"))
        for r in (json.loads((DATA / "alpaca" / "identity.json").read_text())[i] for i in (0, 3, 4))]
ANSWER = ROWS[0]["output"]  # the answer to "hi"


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """stories260K + LoRA on the real identity rows, until it answers them."""
    root = tmp_path_factory.mktemp("lora")
    data = root / "identity3.json"
    data.write_text(json.dumps(ROWS))
    out = ftstudio("train", "tiny_demo", f"model.name_or_path={STORIES_MODEL}", f"data.path={data}",
                   "data.map_fn=alpaca", "data.template=llama2_chat", "data.pack=false", "training.method=lora",
                   "lora.r=64", "lora.alpha=128", "training.lr=3e-3", "training.epochs=100",
                   "training.micro_batch_size=1", "saving.save_steps=1000", "evaluation.inputs=[]",
                   "--work-dir", root / "run", "--quiet", cwd=root, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return root, RunDir(root / "run").iters()[-1][1]


def chat(*args, stdin: str, cwd):
    return subprocess.run([FTSTUDIO, "chat", *map(str, args), "--temperature", "0", "--max-new-tokens", "60"],
                          input=stdin, capture_output=True, text=True, cwd=cwd, timeout=300)


def test_lora_convert_merge_chat(lora_run):
    root, pth = lora_run
    adapter = root / "adapter"
    out = ftstudio("convert", "pth_to_hf", pth, adapter, cwd=root)
    assert out.returncode == 0, out.stderr
    assert {"adapter_config.json", "adapter_model.safetensors", "ftstudio.json", "tokenizer.json"} <= \
        {p.name for p in adapter.iterdir()}
    meta = json.loads((adapter / "ftstudio.json").read_text())
    assert meta["base_model"] == str(STORIES_MODEL) and meta["template"] == "llama2_chat"
    assert "</s>" in meta["stop_words"]

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(adapter)
    assert tok.chat_template and "[INST]" in tok.chat_template  # the training format, for plain transformers users
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(STORIES_MODEL), adapter)

    merged = root / "merged"
    out = ftstudio("convert", "merge", STORIES_MODEL, adapter, merged, cwd=root)
    assert out.returncode == 0, out.stderr
    assert "parity: max |logit difference|" in out.stdout
    assert AutoModelForCausalLM.from_pretrained(merged) is not None

    # base + adapter, through a pipe: one line = one turn, RESET clears history
    got = chat(STORIES_MODEL, "--adapter", adapter, stdin=f"hi\nRESET\n{ROWS[1]['instruction']}\n", cwd=root)
    assert got.returncode == 0, got.stderr
    assert got.stdout.startswith(ANSWER), got.stdout
    assert ROWS[1]["output"] in got.stdout
    base = chat(STORIES_MODEL, "--prompt-template", "llama2_chat", stdin="hi\n", cwd=root)
    assert ANSWER not in base.stdout  # the answer comes from the adapter
    # the merged model answers the same, with no flags (template recorded in ftstudio.json)
    merged_reply = chat(merged, stdin="hi\n", cwd=root)
    assert merged_reply.returncode == 0, merged_reply.stderr
    assert merged_reply.stdout.startswith(ANSWER)
    assert merged_reply.stdout.splitlines()[0] == got.stdout.splitlines()[0]


def test_convert_with_config_wins(lora_run, tmp_path):
    root, pth = lora_run
    cfg = tmp_path / "c.yaml"
    cfg.write_text((root / "run" / "config.yaml").read_text().replace("template: llama2_chat", "template: vicuna"))
    out = ftstudio("convert", "pth_to_hf", cfg, pth, tmp_path / "adapter", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "adapter" / "ftstudio.json").read_text())["template"] == "vicuna"


def test_full_finetune_converts_to_a_loadable_model(tmp_path, tiny_model):
    out = ftstudio("train", "tiny_demo", "training.epochs=2", "evaluation.inputs=[]", "--work-dir", tmp_path / "run",
                   "--quiet", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    step, pth = RunDir(tmp_path / "run").iters()[-1]
    out = ftstudio("convert", "pth_to_hf", pth, tmp_path / "model", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    trained = torch.load(pth, weights_only=True)["state_dict"]
    name = next(k for k in trained if k.endswith("layers.0.self_attn.q_proj.weight"))
    torch.testing.assert_close(model.state_dict()[name], trained[name])
    # merging a complete model is refused
    out = ftstudio("convert", "merge", tiny_model, tmp_path / "model", tmp_path / "merged", cwd=tmp_path)
    assert out.returncode != 0 and "no adapter_config.json" in out.stderr
    assert not (tmp_path / "merged").exists()


def test_qlora_adapter_merges_onto_full_precision_base(tmp_path, tiny_model):
    out = ftstudio("train", "tiny_demo", "training.method=qlora", "training.epochs=2", "evaluation.inputs=[]",
                   "--work-dir", tmp_path / "run", "--quiet", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    pth = RunDir(tmp_path / "run").iters()[-1][1]
    assert ftstudio("convert", "pth_to_hf", pth, tmp_path / "adapter", cwd=tmp_path).returncode == 0
    out = ftstudio("convert", "merge", "demo", tmp_path / "adapter", tmp_path / "merged", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "parity" in out.stdout
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config  # a plain full-precision model
    # merging the same adapter into the merged model again is refused
    out = ftstudio("convert", "merge", tmp_path / "merged", tmp_path / "adapter", tmp_path / "again", cwd=tmp_path)
    assert out.returncode != 0 and "already has" in out.stderr and not (tmp_path / "again").exists()


def test_corrupt_or_foreign_pth_is_refused_without_running_code(tmp_path):
    bad = tmp_path / "iter_1.pth"
    bad.write_bytes(b"\x00garbage" * 10)
    out = ftstudio("convert", "pth_to_hf", bad, tmp_path / "out", cwd=tmp_path)
    assert out.returncode != 0 and "not a readable Finetune Studio checkpoint" in out.stderr
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "iter_2.pth"
    torch.save({"state_dict": Evil()}, evil, _use_new_zipfile_serialization=True, pickle_module=pickle)
    out = ftstudio("convert", "pth_to_hf", evil, tmp_path / "out", cwd=tmp_path)
    assert out.returncode != 0 and "weights_only" in out.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()
    foreign = tmp_path / "iter_3.pth"
    torch.save({"weights": torch.zeros(2)}, foreign)
    out = ftstudio("convert", "pth_to_hf", foreign, tmp_path / "out", cwd=tmp_path)
    assert out.returncode != 0 and "not a Finetune Studio checkpoint" in out.stderr


def test_errors(lora_run, tmp_path, tiny_model):
    root, pth = lora_run
    adapter = root / "adapter_for_errors"
    assert ftstudio("convert", "pth_to_hf", pth, adapter, cwd=root).returncode == 0
    out = ftstudio("convert", "pth_to_hf", tmp_path / "nope.pth", tmp_path / "o", cwd=tmp_path)
    assert out.returncode != 0 and "no such checkpoint file" in out.stderr
    # an adapter whose base model is another one
    out = ftstudio("convert", "merge", tiny_model, adapter, tmp_path / "m", cwd=tmp_path)
    assert out.returncode != 0 and "does not fit" in out.stderr and not (tmp_path / "m").exists()
    out = chat(tiny_model, "--adapter", adapter, stdin="hi\n", cwd=tmp_path)
    assert out.returncode != 0 and "does not fit" in out.stderr
    out = chat(STORIES_MODEL, "--adapter", adapter, "--prompt-template", "llama9", stdin="hi\n", cwd=tmp_path)
    assert out.returncode != 0 and "unknown prompt template 'llama9'" in out.stderr and "llama2_chat" in out.stderr
    out = chat(tmp_path / "missing_model", stdin="hi\n", cwd=tmp_path)
    assert out.returncode != 0 and "no such folder" in out.stderr
    shadow = tmp_path / "shadow" / "bitsandbytes"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('no bitsandbytes here')\n")
    got = subprocess.run([FTSTUDIO, "chat", str(STORIES_MODEL), "--adapter", str(adapter), "--bits", "4"],
                         input="hi\n", capture_output=True, text=True, cwd=tmp_path, timeout=300,
                         env={**__import__("os").environ, "PYTHONPATH": str(shadow.parent)})
    assert got.returncode != 0 and "--bits 4 needs bitsandbytes" in got.stderr
    assert "Traceback" not in out.stderr


def test_stream_reply_equals_generate():
    """The streaming loop gives exactly what model.generate gives (greedy), in
    pieces; stop words end the reply and never show. On stories260K, a real
    pretrained model, whose replies are text: a random model's can be bytes
    that never form a character, which are (rightly) held back to the end."""
    from transformers import AutoModelForCausalLM

    from backend.chat import GenerationSettings, load_chat_model, reply, stream_reply
    from backend.data import generation_prompt

    chat = load_chat_model(str(STORIES_MODEL), template="llama2_chat", system="", device="cpu")
    chat.stop_words = []
    settings = GenerationSettings(max_new_tokens=30, min_new_tokens=30, temperature=0)
    pieces = list(stream_reply(chat, [{"input": "Hi", "output": "Hello"}], "What is LoRA?", settings))
    assert len(pieces) > 1
    ids = torch.tensor([generation_prompt([{"input": "Hi", "output": "Hello"}, {"input": "What is LoRA?"}],
                                          chat.tokenizer, "llama2_chat")])
    model = AutoModelForCausalLM.from_pretrained(STORIES_MODEL).eval()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, min_new_tokens=30,
                         do_sample=False, pad_token_id=chat.tokenizer.pad_token_id)
    assert "".join(pieces) == chat.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=False)
    # a stop word cuts the reply where it starts
    full = "".join(pieces)
    word = full[10:14]
    chat.stop_words = [word]
    assert reply(chat, [{"input": "Hi", "output": "Hello"}], "What is LoRA?", settings) == full[:full.find(word)]
    # sampling with a seed repeats
    chat.stop_words = []
    sampled = GenerationSettings(max_new_tokens=20, temperature=0.8, seed=3)
    assert reply(chat, [], "Hi", sampled) == reply(chat, [], "Hi", sampled)


# --- merge at the base's precision -------------------------------------------------------------


def _weights(folder) -> dict:
    from safetensors.torch import load_file

    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def _weights_size(folder) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


@pytest.fixture(scope="module")
def bf16_base(tmp_path_factory, tiny_model):
    """The tiny model saved in bf16 (config dtype bfloat16), and a LoRA adapter
    for it with random B on every linear layer, so merging changes the weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("bf16")
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16)
    model.save_pretrained(root / "base")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(root / "base")
    torch.manual_seed(0)
    lora = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    lora.save_pretrained(root / "adapter")
    return root


def test_bf16_base_merges_in_bf16_at_its_size(bf16_base, tmp_path):
    import hashlib

    base, adapter = bf16_base / "base", bf16_base / "adapter"
    assert json.loads((base / "config.json").read_text())["dtype"] == "bfloat16"
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(base.glob("*.safetensors")))).hexdigest()
    out = ftstudio("convert", "merge", base, adapter, tmp_path / "merged", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "parity: max |logit difference|" in out.stdout and "tolerance" in out.stdout and "bfloat16" in out.stdout
    merged = tmp_path / "merged"
    record = json.loads((merged / "ftstudio.json").read_text())
    assert record["dtype"] == "bfloat16" and record["parity_rtol"] == 1 / 8
    assert 0 < record["parity_max_abs_diff"] <= record["parity_tolerance"]
    assert record["adapter_max_logit_effect"] > record["parity_tolerance"]  # the check could tell a lost adapter
    assert json.loads((merged / "config.json").read_text())["dtype"] == "bfloat16"
    got = _weights(merged)
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    assert abs(_weights_size(merged) - _weights_size(base)) <= 0.01 * _weights_size(base)
    # W + scaling * B @ A, rounded once to bf16: the merge applied the adapter, and only it
    lora = _weights(adapter)
    name = next(k for k in got if k.endswith("layers.1.mlp.down_proj.weight"))
    a, b = (next(v for k, v in lora.items() if k.endswith(f"layers.1.mlp.down_proj.lora_{x}.weight")) for x in "AB")
    w = _weights(base)[name]
    want = (w.float() + 2.0 * b.float() @ a.float()).to(torch.bfloat16)  # scaling = alpha / r = 16 / 8
    assert not torch.equal(got[name], w)
    torch.testing.assert_close(got[name].float(), want.float(), rtol=2 ** -7, atol=1e-6)
    # merged in place on the loaded base: the base's files are as they were
    assert hashlib.sha256(b"".join(p.read_bytes() for p in sorted(base.glob("*.safetensors")))).hexdigest() == digest


def test_auto_dtype_reads_the_weights_when_the_config_has_none(bf16_base, tmp_path):
    import shutil

    from backend.export import merge

    base = tmp_path / "base"
    shutil.copytree(bf16_base / "base", base)
    config = json.loads((base / "config.json").read_text())
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    (base / "config.json").write_text(json.dumps(config))
    record = merge(str(base), bf16_base / "adapter", tmp_path / "merged", log=lambda *_: None)
    assert record["dtype"] == "bfloat16"
    assert {t.dtype for t in _weights(tmp_path / "merged").values()} == {torch.bfloat16}


def test_merge_dtype_fp32_and_a_bad_dtype(bf16_base, tmp_path):
    base, adapter = bf16_base / "base", bf16_base / "adapter"
    out = ftstudio("convert", "merge", base, adapter, tmp_path / "fp32", "--dtype", "fp32", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    record = json.loads((tmp_path / "fp32" / "ftstudio.json").read_text())
    assert record["dtype"] == "float32" and record["parity_rtol"] == 1e-3
    assert record["parity_max_abs_diff"] < 1e-3
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["dtype"] == "float32"
    assert {t.dtype for t in _weights(tmp_path / "fp32").values()} == {torch.float32}
    assert _weights_size(tmp_path / "fp32") > 1.9 * _weights_size(base)

    out = ftstudio("convert", "merge", base, adapter, tmp_path / "bad", "--dtype", "bf17", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ftstudio convert merge: error:") and "--dtype" in last and "'bf17'" in last, out.stderr
    assert "bf16" in last and not (tmp_path / "bad").exists()


def test_bf16_parity_still_refuses_a_wrong_merge(bf16_base, tmp_path, monkeypatch):
    """At bf16's looser tolerance a merge that drops the adapter is still caught, and nothing is saved."""
    from peft.tuners.lora import LoraModel

    from backend.core.artifacts import ArtifactError
    from backend.export import merge

    monkeypatch.setattr(LoraModel, "merge_and_unload", LoraModel.unload)  # the adapter removed, not merged
    lines = []
    with pytest.raises(ArtifactError, match=r"disagrees with base\+adapter .*tolerance .* in bfloat16.*not saved"):
        merge(str(bf16_base / "base"), bf16_base / "adapter", tmp_path / "merged", log=lines.append)
    assert any("parity: max |logit difference|" in line for line in lines)
    assert not (tmp_path / "merged").exists()


def test_merge_device_and_load_arguments():
    from backend.core.artifacts import ArtifactError
    from backend.export import merge_device, merge_load_kwargs, parity_rtol

    assert merge_device("auto", cuda_available=True) == "cuda"
    assert merge_device("auto", cuda_available=False) == "cpu"
    assert merge_device("cuda", cuda_available=True) == "cuda"
    assert merge_device("cpu", cuda_available=True) == "cpu"
    with pytest.raises(ArtifactError, match="no CUDA GPU here"):
        merge_device("cuda", cuda_available=False)
    with pytest.raises(ArtifactError, match="choose one of cpu, cuda, auto"):
        merge_device("tpu", cuda_available=True)
    # one load, at the merge's precision, straight onto the GPU (no CPU copy first) when it runs there
    assert merge_load_kwargs("auto", "cpu") == {"dtype": "auto"}
    assert merge_load_kwargs("fp32", "cpu") == {"dtype": "float32"}
    assert merge_load_kwargs("bf16", "cuda") == {"dtype": "bfloat16", "device_map": {"": "cuda"}}
    assert merge_load_kwargs("fp16", "cuda") == {"dtype": "float16", "device_map": {"": "cuda"}}
    with pytest.raises(ArtifactError, match="merge dtype 'float8': choose one of auto, bf16, fp16, fp32"):
        merge_load_kwargs("float8", "cpu")
    assert (parity_rtol(torch.float32), parity_rtol(torch.bfloat16), parity_rtol(torch.float16)) == (1e-3, 1 / 8, 1 / 64)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_merge_on_cuda_without_a_gpu_is_refused_before_loading(bf16_base, tmp_path):
    out = ftstudio("convert", "merge", bf16_base / "base", bf16_base / "adapter", tmp_path / "m", "--device", "cuda",
                   cwd=tmp_path)
    assert out.returncode == 2 and "no CUDA GPU here" in out.stderr.strip().splitlines()[-1]
    assert "Traceback" not in out.stderr and not (tmp_path / "m").exists()


def test_export_tab_merges_at_the_chosen_dtype(bf16_base, tmp_path):
    import shutil

    from studio.context import StudioContext
    from studio.export_tab import do_merge

    ctx = StudioContext(tmp_path / "work")
    for name in ("base", "adapter"):
        shutil.copytree(bf16_base / name, ctx.work_dir / name)
    msg = do_merge(ctx, str(ctx.work_dir / "adapter"), str(ctx.work_dir / "base"), "merged", False, "fp16", "cpu")
    assert msg.startswith("OK: Merged into") and "(float16)" in msg and "tolerance" in msg, msg
    assert json.loads((ctx.work_dir / "merged" / "config.json").read_text())["dtype"] == "float16"
    msg = do_merge(ctx, str(ctx.work_dir / "adapter"), str(ctx.work_dir / "base"), "m2", False, "bf17", "cpu")
    assert msg.startswith("**Error:**") and "merge dtype 'bf17'" in msg and not (ctx.work_dir / "m2").exists()
    msg = do_merge(ctx, str(ctx.work_dir / "adapter"), str(bf16_base / "base"), "m3", False, "auto", "cpu")
    assert msg.startswith("**Error:**") and "outside the folders" in msg  # the guard still holds
