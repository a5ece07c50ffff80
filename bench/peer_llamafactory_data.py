"""One cold preprocessing round of LLaMA-Factory, for ``bench/bench_data.py --llamafactory PYTHON``.

Runs under LLaMA-Factory's own interpreter (a separate environment: it pins older transformers and
datasets than ours), in a fresh process per round, the way its ``sft`` stage prepares data: its
``get_dataset`` (json load, alpaca conversion, its ``qwen`` template -- the ChatML our ``qwen_chat``
and the fixture's chat template write -- tokenize, cutoff 512, one process, no packing). Imports and a
first build on other data are done before the clock, with a fresh datasets cache for the timed build,
as ``bench_data.cold_child`` does for ours. Prints one JSON line.

    PYTHON bench/peer_llamafactory_data.py --data ALPACA.json --warmup IDENTITY.json --tokenizer DIR
"""

from __future__ import annotations

import argparse
import importlib.machinery
import json
import os
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path


def stub_media_modules() -> None:
    """LLaMA-Factory's multimodal plugin imports torchaudio at module level, which has no build for this
    torch (text data never reaches it). torchvision is left alone: transformers would take a stub for the
    real package; uninstall the broken build instead (the README's Benchmarks section)."""
    if "torchaudio" not in sys.modules:
        module = types.ModuleType("torchaudio")
        module.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)
        sys.modules["torchaudio"] = module


def model_folder(tokenizer: str) -> str:
    """The tokenizer's files with a tiny Llama config beside them: LLaMA-Factory reads a model's config
    while it loads the tokenizer (a bare tokenizer folder is refused by some transformers releases)."""
    folder = Path(tempfile.mkdtemp(prefix="lf_model_"))
    for file in Path(tokenizer).iterdir():
        if file.is_file():
            shutil.copy(file, folder / file.name)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 6400}))
    return str(folder)


def arguments(data: Path, tokenizer: str, out: Path) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="lf_data_"))
    (folder / "dataset_info.json").write_text(json.dumps({"bench": {"file_name": str(data)}}))
    return {"model_name_or_path": tokenizer, "stage": "sft", "do_train": True, "finetuning_type": "lora",
            "dataset": "bench", "dataset_dir": str(folder), "template": "qwen", "cutoff_len": 512,
            "overwrite_cache": True, "output_dir": str(out), "report_to": "none"}


def build(data: Path, tokenizer: str) -> tuple[dict, int]:
    import datasets.config
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    datasets.config.HF_DATASETS_CACHE = Path(tempfile.mkdtemp(prefix="lf_cache_"))
    seconds = {}
    model_args, data_args, training_args, _, _ = get_train_args(
        arguments(data, tokenizer, Path(tempfile.mkdtemp(prefix="lf_out_"))))
    start = time.perf_counter()
    module = load_tokenizer(model_args)
    seconds["tokenizer load"] = time.perf_counter() - start
    start = time.perf_counter()
    template = get_template_and_fix_tokenizer(module["tokenizer"], data_args)
    rows = len(get_dataset(template, model_args, data_args, training_args, stage="sft", **module)["train_dataset"])
    seconds["load + convert + template + tokenize"] = time.perf_counter() - start
    return seconds, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--warmup", required=True)
    parser.add_argument("--tokenizer", required=True)
    args = parser.parse_args()
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    stub_media_modules()
    model = model_folder(args.tokenizer)
    build(Path(args.warmup), model)
    seconds, rows = build(Path(args.data), model)
    print(json.dumps({"seconds": seconds, "rows": rows}))


if __name__ == "__main__":
    main()
