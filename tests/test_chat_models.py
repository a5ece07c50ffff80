"""Chat on a GPU box, tested here on CPU: where a model is placed (a pure
function fed made-up cards), the decode loop on transformers' current cache
API (deprecation warnings are errors) equal to greedy ``generate``, side by
side from one base copy (the adapter switched off per step, answers equal to
the base loaded alone), and the model cache's byte bound and unload."""

from __future__ import annotations

import dataclasses
import gc
import shutil
import warnings
import weakref

import pytest
import torch

from backend.chat import (GenerationSettings, ModelCache, cache_kwarg, generate_tokens, load_chat_model, reply,
                          stream_reply)
from backend.core.artifacts import ArtifactError
from backend.models import input_device, model_bytes, placed_on, placement

GiB = 2**30
GREEDY = GenerationSettings(max_new_tokens=24, min_new_tokens=24, temperature=0)


# --- placement ----------------------------------------------------------------------------------------------

def test_placement_on_cpu():
    assert placement("cpu", [80 * GiB], 1 * GiB) == {"dtype": "auto"}
    assert placement("auto", [], 1 * GiB) == {"dtype": "auto"}  # no CUDA: as before, plain CPU
    assert placement("auto", [], 1 * GiB, bits=4) == {"dtype": "auto", "device_map": {"": "cpu"}}
    with pytest.raises(ArtifactError, match="no CUDA device"):
        placement("cuda", [], 1 * GiB)
    with pytest.raises(ArtifactError, match="use auto, cpu or cuda"):
        placement("tpu", [], 1 * GiB)


def test_placement_on_cuda_cards():
    # fits one card: the one with the most free memory (a training run holds card 0)
    assert placement("auto", [6 * GiB, 70 * GiB], 14 * GiB) == {"dtype": "auto", "device_map": {"": 1}}
    assert placement("cuda", [70 * GiB], 14 * GiB) == {"dtype": "auto", "device_map": {"": 0}}
    # too big for any one card (with room for the KV cache): accelerate's dispatch over all of them
    assert placement("auto", [40 * GiB, 40 * GiB], 60 * GiB) == {"dtype": "auto", "device_map": "auto"}
    assert placement("auto", [10 * GiB], 9 * GiB)["device_map"] == "auto"  # 9 GiB x headroom > 10 GiB
    assert placement("auto", [80 * GiB], None)["device_map"] == "auto"  # unknown size (a Hub id)
    # quantized: a 16-bit model of 40 GiB takes about a quarter of that in 4 bits
    assert placement("auto", [16 * GiB], 40 * GiB, bits=4)["device_map"] == {"": 0}
    assert placement("auto", [16 * GiB], 40 * GiB, bits=8)["device_map"] == "auto"


def test_inputs_go_to_the_embeddings_device(tiny_model):
    chat = load_chat_model(str(tiny_model), template="qwen_chat", device="cpu")
    assert input_device(chat.model) == torch.device("cpu") and placed_on(chat.model) == "cpu"
    chat.model.hf_device_map = {"model.embed_tokens": 0, "model.layers.0": 1, "model.layers.1": 1, "lm_head": "cpu"}
    assert placed_on(chat.model) == "cuda:0, cuda:1, cpu"


# --- the decode loop ----------------------------------------------------------------------------------------

class OldStyle(torch.nn.Module):
    """A model whose forward only knows ``past_key_values`` (earlier transformers 5.x, remote code)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, use_cache=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, cache=past_key_values,
                          use_cache=use_cache)


def test_decode_loop_uses_the_current_cache_api_and_equals_generate(tiny_model):
    chat = load_chat_model(str(tiny_model), template="qwen_chat", system="", device="cpu")
    ids = torch.tensor([[5, 17, 42, 7, 99, 3]])
    eos = {chat.tokenizer.eos_token_id}
    want = chat.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                               min_new_tokens=24, do_sample=False, pad_token_id=chat.tokenizer.pad_token_id)
    assert cache_kwarg(chat.model) == "cache"  # this transformers renamed it
    old = OldStyle(chat.model)
    assert cache_kwarg(old) == "past_key_values"
    with warnings.catch_warnings():  # transformers' deprecations (past_key_values -> cache) are errors here
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        got = list(generate_tokens(chat.model, ids, eos, GREEDY))
        got_old = list(generate_tokens(old, ids, eos, GREEDY))
        pieces = list(stream_reply(dataclasses.replace(chat, stop_words=[]), [], "What is LoRA?", GREEDY))
    assert got == want[0, ids.shape[1]:].tolist() == got_old
    assert "".join(pieces)
    paused = generate_tokens(chat.model, ids, eos, GREEDY)
    next(paused)
    assert torch.is_grad_enabled()  # the loop's no_grad does not leak into the caller between tokens
    paused.close()


def sliding_window_model(kind: str):
    """A tiny random model with sliding-window layers (window 4, shorter than prompt + answer)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, Qwen2Config, Qwen2ForCausalLM

    size = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, sliding_window=4)
    torch.manual_seed(0)
    if kind == "gemma2":  # alternating sliding and full layers
        return Gemma2ForCausalLM(Gemma2Config(head_dim=16, **size)).eval()
    return Qwen2ForCausalLM(Qwen2Config(use_sliding_window=True, max_window_layers=2, **size)).eval()


@pytest.mark.parametrize("kind", ["gemma2", "qwen2"])
def test_decode_loop_with_sliding_window_layers_equals_generate(kind):
    """DynamicCache(config=...) gives sliding layers their kind of cache: still exactly generate's answer."""
    model = sliding_window_model(kind)
    ids = torch.randint(3, 300, (1, 9), generator=torch.Generator().manual_seed(1))
    want = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, min_new_tokens=20,
                          do_sample=False, pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        got = list(generate_tokens(model, ids, set(), GenerationSettings(max_new_tokens=20, temperature=0)))
    assert got == want[0, ids.shape[1]:].tolist()


# --- side by side from one base copy ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory):
    """A LoRA adapter on the tiny model with random (non-zero) weights: it changes the answers. It carries
    a tokenizer, as every export does."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("adapter") / "lora"
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    cfg = LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(base, cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(folder)
    return folder


def interleaved(*chats, message="What is LoRA?"):
    """The answers of several models streamed in turns, one piece each, as the Chat tab does."""
    streams = [stream_reply(c, [], message, GREEDY) for c in chats]
    out, live = ["" for _ in chats], set(range(len(chats)))
    while live:
        for i in sorted(live):
            try:
                out[i] += next(streams[i])
            except StopIteration:
                live.discard(i)
    return out


def test_side_by_side_shares_one_base(tiny_model, adapter):
    cache = ModelCache()
    tuned = cache.get(str(tiny_model), str(adapter), template="qwen_chat")
    base = cache.base_for(tuned, str(tiny_model))
    assert base.model is tuned.model and base.adapter_off and not tuned.adapter_off
    assert len(cache) == 1 and cache.resident_bytes() == model_bytes(tuned.model)
    assert cache.base_for(tuned, str(tiny_model)) is base  # made once per loaded model
    tuned, base = (dataclasses.replace(c, stop_words=[]) for c in (tuned, base))

    alone = dataclasses.replace(load_chat_model(str(tiny_model), template="qwen_chat"), stop_words=[])
    tuned_text, base_text = interleaved(tuned, base)
    assert base_text == reply(alone, [], "What is LoRA?", GREEDY)  # the base, as if loaded on its own
    assert tuned_text == reply(tuned, [], "What is LoRA?", GREEDY)  # its adapter stayed on between base steps
    assert tuned_text != base_text  # the adapter does change the answer
    assert tuned.model.base_model.model.model.layers[0].self_attn.q_proj.disable_adapters is False


def test_side_by_side_of_a_full_model_loads_the_base(tiny_model, tmp_path):
    full = shutil.copytree(tiny_model, tmp_path / "full")  # a merged or full fine-tune of the tiny model
    cache = ModelCache(size=2, max_bytes=1)  # no room for two: the tuned one in use still stays
    tuned = cache.get(str(full), None, template="qwen_chat")
    base = cache.base_for(tuned, str(tiny_model))
    assert base.model is not tuned.model and not base.adapter_off and len(cache) == 2


# --- the cache: bounded by bytes and count, unload frees ----------------------------------------------------

def test_cache_is_bounded_by_bytes_and_count_and_unloads(tiny_model):
    one = model_bytes(load_chat_model(str(tiny_model), template="qwen_chat").model)
    cache = ModelCache(size=4, max_bytes=int(1.5 * one))
    first = cache.get(str(tiny_model), None, template="qwen_chat")
    evicted = weakref.ref(first.model)
    assert cache.get(str(tiny_model), None, template="qwen_chat") is first  # cached
    cache.get(str(tiny_model), None, template="llama2_chat")  # another model: no room for both
    assert len(cache) == 1 and cache.loaded() == [(str(tiny_model), one)]
    del first
    gc.collect()
    assert evicted() is None

    cache = ModelCache(size=1)
    cache.get(str(tiny_model), None, template="qwen_chat")
    cache.get(str(tiny_model), None, template="vicuna")
    assert len(cache) == 1

    cache = ModelCache()
    chat = cache.get(str(tiny_model), None, template="qwen_chat")
    cache.get(str(tiny_model), None, template="vicuna")
    assert cache.unload(chat) == one and len(cache) == 1 and cache.unload(chat) == 0
    chat = cache.get(str(tiny_model), None, template="qwen_chat")
    held = weakref.ref(chat.model)
    del chat
    assert cache.unload_all() == [(str(tiny_model), one), (str(tiny_model), one)]
    assert held() is None  # really gone, not just out of the cache
    assert len(cache) == 0 and cache.resident_bytes() == 0 and cache.unload_all() == []


# --- the Chat tab's handlers, called as the browser would ----------------------------------------------------

def test_chat_tab_side_by_side_unload_and_a_training_run_note(tiny_model, adapter, tmp_path):
    import subprocess
    import sys

    from backend.core import procs
    from backend.core.rundir import RunDir
    from studio import chat_tab
    from studio.context import StudioContext

    ctx = StudioContext(tmp_path / "work", allowed_paths=[tiny_model.parent, adapter.parent])
    args = ("What is LoRA?", [], [], str(adapter), "qwen_chat", "", True, 0.0, 0.75, 40, 16, 1.0)
    updates = list(chat_tab.respond(ctx, *args))
    tuned, base, _, note = updates[0]
    assert "(the same model, adapter off)" in note and "on cpu" in note and "training run" not in note
    assert len(ctx.models) == 1 and len(updates) > 2
    tuned, base = updates[-1][:2]
    assert tuned[-1]["content"] and base[-1]["content"] and tuned[-1]["content"] != base[-1]["content"]

    run = RunDir(ctx.work_dir / "sft-1")  # a run training on this machine (its launcher alive)
    run.claim_new()
    launcher = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "backend.cli", "train"])
    try:
        run.start("queued", launcher=procs.capture(launcher.pid).to_dict())
        note = list(chat_tab.respond(ctx, *args[:6], False, *args[7:]))[0][3]
    finally:
        launcher.kill()
        launcher.wait()
    assert "a training run (sft-1) is running on this machine: the chat model shares its CPU cores" in note
    assert "GPU memory" in chat_tab.sharing_note([{"name": "a"}, {"name": "b"}], "cuda:0")
    assert chat_tab.sharing_note([], "cuda:0") == ""

    said = chat_tab.unload(ctx)
    assert said.startswith(f"Unloaded {tiny_model} + {adapter}: ") and "MiB of weights freed" in said
    assert len(ctx.models) == 0 and chat_tab.unload(ctx) == "No chat model is loaded."


def test_a_viewer_cannot_make_the_chat_convert_a_checkpoint(tmp_path):
    """Chatting with a run's iter_N.pth converts it once into <run>/hf/iter_N: a write. A viewer's chat is
    refused in words before anything is written; a trainer's goes on to the conversion (here it fails on
    the junk checkpoint, also without leaving anything behind)."""
    from types import SimpleNamespace

    from backend.core.rundir import RunDir
    from studio import chat_tab
    from studio.context import StudioContext

    ctx = StudioContext(tmp_path / "work", roles={"vic": "viewer", "tim": "trainer"})
    run = RunDir(ctx.work_dir / "sft-1")
    run.claim_new()
    run.write_status(state="finished", user="tim")
    (run.path / "iter_5.pth").write_bytes(b"not a checkpoint")
    args = ("Hi", [], [], "sft-1/iter_5.pth", "(as trained)", "", False, 0.0, 0.75, 40, 8, 1.0)

    def note_for(user):
        return list(chat_tab.respond(ctx, *args, request=SimpleNamespace(username=user)))[-1][3]

    said = note_for("vic")
    assert "not converted yet" in said and "which you may not" in said, said
    assert not (run.path / "hf").exists()
    said = note_for("tim")
    assert "not converted yet" not in said and "iter_5.pth" in said, said  # the conversion ran, and said why it failed
    assert not (run.path / "hf" / "iter_5").exists()
