"""Merge cost: ``backend.export.merge`` (what `ftstudio convert merge` and the
studio run) on a bf16 base of about a billion parameters: size on disk of the
base and of the merged folder, peak memory of the merging process against
the base's size, wall time, and the parity figures the merge checked.

The base is a random Llama of TinyLlama-1.1B's shape (hidden 2048, 22 layers,
GQA 32/4 heads, intermediate 5632, vocab 32000) saved in bf16, with the demo
tokenizer; the adapter is peft LoRA r=64 alpha=16 on every linear layer (the
QLoRA recipes' settings) with random B, so merging changes every weight. Both
are built in a process of their own, and each merge runs in a fresh process,
so its peaks are the merge's own. Two peaks:

- peak RSS (``ru_maxrss``): everything resident, including the pages of the
  base's safetensors files, which transformers maps into memory rather than
  copying (clean file pages: the kernel drops them under pressure and reads
  them again);
- peak anonymous memory (``RssAnon`` of /proc/self/status, sampled every
  10 ms), less what Python, torch and transformers hold before the merge
  starts: the memory the merge itself cannot give back. One copy of the base
  is about 1.0x.

    python bench/bench_merge.py [--dtypes auto,fp32] [--layers 22] [--keep]

``--dtypes auto`` is the default merge (the base's bf16); ``fp32`` shows what
an fp32 merge costs (the previous behaviour). About 2.2 GB of disk per bf16
folder; the files are removed at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
             vocab_size=32000, max_position_embeddings=2048)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


class AnonPeak:
    """The largest RssAnon seen while it runs (Linux), sampled in a thread."""

    def __init__(self, every: float = 0.01):
        import threading

        self.peak, self.every, self._stop = self.now(), every, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    @staticmethod
    def now() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

    def _watch(self):
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, self.now())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self.now())


def weights_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def build(workdir: Path, layers: int) -> dict:
    """The bf16 base (random init, built in bf16: no fp32 copy) and a LoRA adapter with random B."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from backend.demo import demo_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(demo_tokenizer_dir())
    cfg = LlamaConfig(**SHAPE, num_hidden_layers=layers, tie_word_embeddings=False, bos_token_id=None,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, dtype="bfloat16")
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    model = LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(workdir / "base")
    tok.save_pretrained(workdir / "base")
    lora = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    lora.save_pretrained(workdir / "adapter")
    return {"params": params, "adapter_params": sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)}


def merge_once(workdir: Path, dtype: str) -> dict:
    # imported before the baseline is taken: libraries are not the merge's cost
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    from backend.data import load_tokenizer  # noqa: F401
    from backend.export import merge

    out = workdir / f"merged_{dtype}"
    anon_before = AnonPeak.now()
    anon = AnonPeak()
    t0 = time.perf_counter()
    record = merge(str(workdir / "base"), workdir / "adapter", out, dtype=dtype, overwrite=True, log=lambda *_: None)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_rss": peak_rss(), "anon_peak": anon.stop(), "anon_before": anon_before,
            "merged_size": weights_size(out),
            "dtype": record["dtype"], "shards": len(list(out.glob("*.safetensors"))),
            **{k: record[k] for k in ("parity_max_abs_diff", "parity_tolerance", "parity_logit_scale",
                                      "adapter_max_logit_effect")}}


def child(*args) -> dict:
    out = subprocess.run([sys.executable, __file__, *map(str, args)], capture_output=True, text=True)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{' '.join(map(str, args))} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[7:])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="auto", help="merge dtypes to run, comma-separated (auto,bf16,fp16,fp32)")
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--keep", action="store_true", help="keep the base, adapter and merged folders")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        res = build(Path(args.workdir), args.layers) if args.one == "build" else merge_once(Path(args.workdir), args.one)
        print("RESULT " + json.dumps(res))
        return
    workdir = Path(tempfile.mkdtemp(prefix="bench_merge_"))
    os.environ.setdefault("FTSTUDIO_DEMO_DIR", str(workdir / "demo"))
    try:
        t0 = time.perf_counter()
        built = child("--one", "build", "--workdir", workdir, "--layers", args.layers)
        base = weights_size(workdir / "base")
        gb = 1e9
        print(f"base: random Llama {built['params'] / 1e9:.2f}B params, bf16, {base / gb:.2f} GB on disk "
              f"(built in {time.perf_counter() - t0:.0f} s); adapter: LoRA r=64 all-linear, "
              f"{built['adapter_params'] / 1e6:.0f}M params, {weights_size(workdir / 'adapter') / gb:.2f} GB")
        print(f"{'dtype':<6}{'merged':<9}{'GB':>6}{'x base':>8}{'shards':>7}{'peak RSS GB':>12}{'x base':>8}"
              f"{'anon GB':>9}{'x base':>8}{'time s':>8}   parity: max diff / tolerance (logit scale; "
              "adapter effect)")
        for dtype in args.dtypes.split(","):
            r = child("--one", dtype, "--workdir", workdir)
            extra = r["anon_peak"] - r["anon_before"]  # what the merge itself holds, past the imports
            print(f"{dtype:<6}{r['dtype']:<9}{r['merged_size'] / gb:6.2f}{r['merged_size'] / base:7.2f}x"
                  f"{r['shards']:7d}{r['peak_rss'] / gb:12.2f}{r['peak_rss'] / base:7.2f}x{extra / gb:9.2f}"
                  f"{extra / base:7.2f}x{r['seconds']:8.1f}   {r['parity_max_abs_diff']:.3g} / "
                  f"{r['parity_tolerance']:.3g} ({r['parity_logit_scale']:.3g}; {r['adapter_max_logit_effect']:.3g})",
                  flush=True)
            if not args.keep:
                shutil.rmtree(workdir / f"merged_{dtype}", ignore_errors=True)
    finally:
        if args.keep:
            print(f"files kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
