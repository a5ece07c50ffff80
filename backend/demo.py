"""The bundled demo: data written for the project and a tokenizer built from it.

Nothing here downloads anything, so a fresh clone can show the whole workflow
offline. The tokenizer is a small byte-level BPE trained (in about a second)
on the demo data and the project's README, with a ChatML chat template, and is
written once under the demo folder (atomically: temp folder, then rename).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .core.atomic import atomic_dir

ROOT = Path(__file__).resolve().parents[1]
DEMO_DATA = ROOT / "assets" / "demo" / "studio_qa.jsonl"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def demo_dir() -> Path:
    return Path(os.environ.get("FTSTUDIO_DEMO_DIR", "work_dirs/demo")).resolve()


def _in_demo_dir(path: Path) -> bool:
    """A half-built demo folder is ours to rebuild; nothing outside the demo folder is."""
    return demo_dir() in Path(path).resolve().parents


def _training_text() -> list[str]:
    texts = []
    for line in DEMO_DATA.read_text(encoding="utf-8").splitlines():
        texts.extend(m["content"] for m in json.loads(line)["messages"])
    readme = ROOT / "README.md"
    if readme.exists():
        texts.extend(readme.read_text(encoding="utf-8").splitlines())
    return [t for t in texts if t]


def build_demo_tokenizer(out_dir: Path, vocab_size: int = 1024):
    """Train the demo tokenizer and save it to ``out_dir`` (replaced atomically)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    with atomic_dir(out_dir, is_ours=_in_demo_dir, what="the demo tokenizer", overwrite=True) as tmp:
        fast.save_pretrained(tmp)
    return fast


def demo_tokenizer_dir() -> Path:
    """The demo tokenizer's folder, built on first use."""
    path = demo_dir() / "tokenizer"
    if not (path / "tokenizer.json").exists():
        build_demo_tokenizer(path)
    return path


def build_demo_model(out_dir: Path, seed: int = 0):
    """A tiny random Llama (about 0.9M parameters) with the demo tokenizer, saved to ``out_dir``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(demo_tokenizer_dir())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,  # bitsandbytes CPU 4-bit needs rows % 32 == 0 and columns % 64 == 0
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with atomic_dir(out_dir, is_ours=_in_demo_dir, what="the demo model", overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def demo_model_dir() -> Path:
    """The demo model's folder, built on first use."""
    path = demo_dir() / "model"
    if not (path / "config.json").exists():
        build_demo_model(path)
    return path


def resolve_model(name_or_path: str) -> str:
    """'demo' -> the bundled tiny model (built on first use); anything else unchanged."""
    return str(demo_model_dir()) if name_or_path == "demo" else name_or_path


def resolve_data(path: str) -> str:
    """'demo' -> the bundled Q&A file; anything else unchanged."""
    return str(DEMO_DATA) if path == "demo" else path
