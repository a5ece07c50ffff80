"""The GPU path, end to end through the product, on a card with nothing downloaded.

What it does (``bench/gpu_check.sh`` runs it; about 4-6 minutes on one H200):
1. builds a random-init Llama (about 1.1B parameters, TinyLlama's shape, a
   32k vocabulary) on the card with transformers from a config, and the demo
   tokenizer (trained from the repository's own text), into a work folder;
2. writes alpaca-style rows of varied length from the repository's text;
3. trains LoRA, then QLoRA (nf4), with our real entry (``ftstudio train`` with a
   config this script writes): bf16, packed blocks of 4096 tokens attended per
   sample (flash-attention varlen when flash-attn is installed, else sdpa, and
   it says which), the LM head's fused linear cross-entropy (liger-kernel when
   installed, else our chunked one);
4. prints tokens/s (steps after the warm-up), peak memory and MFU against the
   card's dense bf16 peak (from its name: H100/H200 989 TFLOPS, A100 312,
   L40S 362; any other card: a timed bf16 matmul);
5. converts the LoRA checkpoint, merges it on the card (``ftstudio convert
   merge``) and asks the merged model one question (``ftstudio chat``).

The builders (model shape, data, config, commands, FLOPs, the summary of a
run's metrics) are plain functions, tested on the CPU by tests/test_gpu_check.py.

    bench/gpu_check.sh [--work DIR] [--steps 40] [--layers 22] [--max-length 4096]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# TinyLlama-1.1B's shape with a 32k vocabulary: big enough to be compute-bound on a GPU,
# small enough to build, train twice, merge and chat within the time box
SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096)
# dense bf16 peak FLOP/s by card name (datasheets; sparsity not counted)
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}
WARMUP_STEPS = 5  # steps whose speed is not counted (CUDA kernels, allocator, autotuning)


def model_shape(layers: int | None = None, max_length: int = 4096) -> dict:
    shape = dict(SHAPE, max_position_embeddings=max(SHAPE["max_position_embeddings"], max_length))
    if layers:
        shape["num_hidden_layers"] = layers
    return shape


def llama_config_kwargs(shape: dict, tokenizer_ids: dict) -> dict:
    """LlamaConfig's arguments: the shape, the tokenizer's special ids, untied head. The vocabulary may be
    larger than the tokenizer's (rows past it are never used), so the head is as big as a real model's."""
    if tokenizer_ids["vocab"] > shape["vocab_size"]:
        raise ValueError(f"the tokenizer has {tokenizer_ids['vocab']} tokens, the model only {shape['vocab_size']}")
    return dict(shape, tie_word_embeddings=False, bos_token_id=None, eos_token_id=tokenizer_ids["eos"],
                pad_token_id=tokenizer_ids["pad"])


def build_model(out_dir: Path, tokenizer_dir: Path, shape: dict, device: str = "cuda") -> Path:
    """A random-init Llama of ``shape`` built on ``device`` in bf16 and saved with the tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(**llama_config_kwargs(shape, {"vocab": len(tok), "eos": tok.eos_token_id,
                                                       "pad": tok.pad_token_id}))
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def words(root: Path = ROOT) -> list[str]:
    """Words of the repository's own text (README, docs, demo data): no download needed."""
    text = []
    for path in [root / "README.md", root / "docs" / "DESIGN.md", root / "assets" / "demo" / "studio_qa.jsonl"]:
        if path.exists():
            text.append(path.read_text(encoding="utf-8", errors="replace"))
    found = " ".join(text).split()
    return found or ["fine", "tune", "studio", "train", "model", "data"]


def write_data(path: Path, rows: int, vocabulary: list[str], seed: int = 0, longest: int = 1200) -> Path:
    """alpaca rows (instruction, input, output) with answers of 20..``longest`` words, so the packed
    blocks hold samples of many lengths (what varlen attention is for)."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(rows):
            row = {"instruction": " ".join(rng.choices(vocabulary, k=rng.randint(5, 40))),
                   "input": "",
                   "output": " ".join(rng.choices(vocabulary, k=rng.randint(20, longest)))}
            f.write(json.dumps(row) + "\n")
    return path


def train_config(method: str, model_dir: Path, data_path: Path, *, steps: int, max_length: int = 4096,
                 micro_batch: int = 4) -> dict:
    """The run's config (validated through our schema): bf16, packed, attention and loss left on auto
    (flash-attention varlen and liger's fused loss when installed), one save at the end, no samples."""
    from backend.config import from_dict

    cfg = {
        "name": f"gpu_check_{method}",
        "model": {"name_or_path": str(model_dir), "dtype": "bf16", "attn_implementation": "auto"},
        "data": {"path": str(data_path), "map_fn": "alpaca", "template": "qwen_chat", "max_length": max_length,
                 "pack": True},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "training": {"method": method, "lr": 2e-4, "max_steps": steps, "micro_batch_size": micro_batch,
                     "accumulative_counts": 1, "warmup_ratio": 0.0, "lr_scheduler": "constant",
                     "logging_steps": 1, "gradient_checkpointing": method == "qlora"},
        "saving": {"save_steps": steps, "save_total_limit": 1},
        "evaluation": {"inputs": []},
    }
    return from_dict(cfg).to_dict()


def cli(*args) -> list[str]:
    """``ftstudio ARGS`` as an argument list (the module, so an uninstalled checkout works too)."""
    return [sys.executable, "-m", "backend.cli", *map(str, args)]


def train_command(config_path: Path, run_dir: Path) -> list[str]:
    return cli("train", config_path, "--work-dir", run_dir, "--devices", "auto")


def convert_command(iter_path: Path, out: Path) -> list[str]:
    return cli("convert", "pth_to_hf", iter_path, out)


def merge_command(model_dir: Path, adapter: Path, out: Path) -> list[str]:
    return cli("convert", "merge", model_dir, adapter, out, "--device", "cuda", "--dtype", "bf16")


def chat_command(model_dir: Path, max_new_tokens: int = 24) -> list[str]:
    return cli("chat", model_dir, "--device", "cuda", "--no-streamer", "--temperature", "0",
               "--max-new-tokens", max_new_tokens, "--seed", 0)


def count_params(shape: dict) -> dict:
    """Parameters of a Llama of ``shape``: matmul weights per layer, embedding, head; and LoRA's
    (rank 16 on all seven linears)."""
    d, f, layers, v = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    kv = d * shape["num_key_value_heads"] // shape["num_attention_heads"]
    linears = {"q": (d, d), "k": (d, kv), "v": (d, kv), "o": (d, d), "gate": (d, f), "up": (d, f), "down": (f, d)}
    per_layer = sum(a * b for a, b in linears.values())
    lora = layers * sum(16 * (a + b) for a, b in linears.values())
    return {"matmul": layers * per_layer, "head": d * v, "embedding": d * v, "lora": lora}


def flops_per_token(shape: dict, context: float, method: str) -> float:
    """Training FLOPs per token. The frozen base runs forward (2N) and the backward through its activations
    (2N), not its own weight gradients; the adapters take 6 per parameter; attention per layer 2*d*context
    forward (causal: the mean context is half the sample), times 3 with its backward. The head counts on
    every token (the labeled-only head runs it on answers only, so this is the work a peer does)."""
    n = count_params(shape)
    dense = n["matmul"] + n["head"]
    base = (6 if method == "full" else 4) * dense
    adapters = 0 if method == "full" else 6 * n["lora"]
    attention = 3 * 2 * shape["num_hidden_layers"] * shape["hidden_size"] * context
    return base + adapters + attention


def mean_context(lengths: list[int]) -> float:
    """The context a token attends to, averaged over tokens, when each sample attends only to itself
    (varlen): sum(l^2) / (2 * sum(l))."""
    total = sum(lengths)
    return sum(n * n for n in lengths) / (2 * total) if total else 0.0


def bf16_peak(device_name: str) -> float | None:
    """The card's dense bf16 peak from its name, or None for a card not in the table."""
    for key, peak in BF16_PEAK.items():
        if key in device_name.upper():
            return peak
    return None


def measured_peak(n: int = 8192, repeats: int = 20) -> float:
    """A timed bf16 matmul on the card: the peak for a card the table does not know."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - began)


def run_summary(run_dir: Path, warmup: int = WARMUP_STEPS) -> dict:
    """tokens/s (median over the steps after the warm-up), peak memory (MiB, largest step), the loss."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "loss" in r]
    timed = [r["tokens_per_s"] for r in steps[warmup:] if r.get("tokens_per_s")]
    if not timed:
        raise ValueError(f"{run_dir}: no step after the first {warmup} has a speed")
    status = json.loads((run_dir / "status.json").read_text())
    peak = max(r.get("peak_memory_mb") or 0 for r in steps)
    return {"tokens_per_s": statistics.median(timed), "peak_memory_mb": peak,
            "first_loss": steps[0]["loss"], "last_loss": steps[-1]["loss"], "steps": len(steps),
            "phases": status.get("phases"), "state": status.get("state")}


def installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def run(cmd: list[str], timeout: float, stdin: str | None = None, log: Path | None = None) -> str:
    began = time.perf_counter()
    out = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if log is not None:
        log.write_text(out.stdout + out.stderr)
    if out.returncode != 0:
        raise SystemExit(f"failed ({out.returncode}): {' '.join(cmd)}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    print(f"  ({time.perf_counter() - began:.0f} s) ftstudio {' '.join(cmd[3:])}", flush=True)
    return out.stdout


def sample_lengths(data_path: Path, tokenizer_dir: Path, limit: int = 400) -> list[int]:
    """Token counts of the first rows (prompt + answer), for the attention FLOPs."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = [json.loads(line) for line in data_path.read_text().splitlines()[:limit]]
    texts = [r["instruction"] + "\n" + r["output"] for r in rows]
    return [len(ids) + 12 for ids in tok(texts, add_special_tokens=False)["input_ids"]]  # + the template's markers


def report(method: str, summary: dict, flops_token: float, peak: float) -> None:
    mfu = summary["tokens_per_s"] * flops_token / peak
    print(f"{method:6} {summary['tokens_per_s']:>10,.0f} tok/s   peak {summary['peak_memory_mb'] / 1024:6.1f} GiB   "
          f"MFU {100 * mfu:5.1f} %   loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f} "
          f"({summary['steps']} steps)   phases {summary['phases']}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="work_dirs/gpu_check")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--layers", type=int, default=None, help=f"default {SHAPE['num_hidden_layers']}")
    ap.add_argument("--max-length", type=int, default=4096)
    ap.add_argument("--rows", type=int, default=3000)
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here", file=sys.stderr)
        return 2
    began = time.perf_counter()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ["FTSTUDIO_DEMO_DIR"] = str(work / "demo")
    from backend.demo import demo_tokenizer_dir

    name = torch.cuda.get_device_name(0)
    peak = bf16_peak(name) or measured_peak()
    flash, liger = installed("flash_attn"), installed("liger_kernel")
    print(f"device {name}, bf16 peak {peak / 1e12:.0f} TFLOPS ({'datasheet' if bf16_peak(name) else 'timed matmul'}); "
          f"attention: {'flash-attention varlen' if flash else 'sdpa (flash-attn not installed)'}; loss: "
          f"{'liger fused linear cross-entropy' if liger else 'chunked cross-entropy (liger-kernel not installed)'}")
    shape = model_shape(args.layers, args.max_length)
    tokenizer_dir = demo_tokenizer_dir()
    model_dir = build_model(work / "model", tokenizer_dir, shape)
    data = write_data(work / "data.jsonl", args.rows, words())
    context = mean_context(sample_lengths(data, tokenizer_dir))
    n = count_params(shape)
    print(f"model {(n['matmul'] + n['head'] + n['embedding']) / 1e9:.2f}B parameters; mean attended context "
          f"{context:.0f} "
          f"tokens; built in {time.perf_counter() - began:.0f} s", flush=True)
    import yaml

    summaries = {}
    for method in ("lora", "qlora"):
        cfg_path = work / f"{method}.yaml"
        cfg_path.write_text(yaml.safe_dump(train_config(method, model_dir, data, steps=args.steps,
                                                       max_length=args.max_length), sort_keys=False))
        run_dir = work / f"run_{method}_{int(time.time())}"
        run(train_command(cfg_path, run_dir), timeout=300, log=work / f"{method}.log")
        summaries[method] = (run_dir, run_summary(run_dir))
        report(method, summaries[method][1], flops_per_token(shape, context, method), peak)
    lora_run = summaries["lora"][0]
    iters = sorted(lora_run.glob("iter_*.pth"), key=lambda p: int(p.stem.split("_")[1]))
    adapter, merged = work / "adapter", work / "merged"
    run(convert_command(iters[-1], adapter), timeout=120)
    run(merge_command(model_dir, adapter, merged), timeout=180)
    reply = run(chat_command(merged), timeout=120, stdin="What is Finetune Studio?\nEXIT\n")
    print("chat reply:", reply.strip().splitlines()[-3:] if reply.strip() else "(empty)")
    print(f"gpu_check done in {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
