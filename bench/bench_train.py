"""Training throughput: packed vs padded batches vs a plain-Trainer baseline.

Settings from the training issue: LoRA r=8 on every linear layer, max_length
512, micro-batch 4, one process, fp32 and bf16, on (a) a 4.2M-parameter Llama
(hidden 256, 4 layers, intermediate 688, vocab 2000) and (b) a ~30M one,
trained on real alpaca data (../shared/data) with a 2,000-token byte-level
BPE tokenizer trained on that data. Each configuration runs in its own
process (so peak RSS is its own) and prints:

- tokens/s of real (non-padding) tokens, measured over steps after warm-up;
- padding fraction of the batches;
- peak RSS;
- MFU: model FLOPs per real token x tokens/s, over this CPU's matmul peak
  measured in the same run (2048x2048 matmul, same precision, same threads).

The baseline is what a user writes by hand: ``transformers.Trainer`` on
unpacked samples with ``DataCollatorForSeq2Seq`` (padding), the model's own
loss over all positions. "ours padded" adds length grouping and the
labeled-only LM head; "ours packed" packs samples into 512-token blocks with
the block-diagonal mask (no attention across samples).

    python bench/bench_train.py [--steps 12] [--models a,b] [--precisions fp32,bf16] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FTSTUDIO_SHARED", ROOT.parent / "shared"))
sys.path.insert(0, str(ROOT))

MODELS = {
    "a": dict(hidden_size=256, num_hidden_layers=4, intermediate_size=688, num_attention_heads=4,
              num_key_value_heads=4),
    "b": dict(hidden_size=512, num_hidden_layers=8, intermediate_size=1376, num_attention_heads=8,
              num_key_value_heads=8),
}
VARIANTS = ("baseline", "ours_padded", "ours_packed")


def build_tokenizer(folder: Path, vocab: int = 2000):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rows = json.loads((SHARED / "data" / "alpaca" / "alpaca_en_demo.json").read_text())
    texts = [r[k] for r in rows for k in ("instruction", "input", "output") if r[k]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.save_pretrained(folder)
    return fast


def matmul_peak(dtype, n=2048, reps=10) -> float:
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


def flops_per_token(cfg, seq_len: int) -> float:
    """LoRA training FLOPs per token: forward 2N + backward through activations 2N
    for the linear layers (frozen weights get no weight gradient; LoRA's own
    is negligible), plus attention scores and values (fwd + bwd = 3x fwd,
    causal = half)."""
    h, L, i, v = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size
    kv = h // cfg.num_attention_heads * cfg.num_key_value_heads
    linear = L * (h * h * 2 + h * kv * 2 + 3 * h * i) + h * v  # q,o + k,v + mlp + head
    attn = L * 3 * (2 * 2 * seq_len * h) / 2
    return 4 * linear + attn


def one(model_key: str, variant: str, precision: str, steps: int, warmup: int, workdir: Path, profile: bool):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoTokenizer, DataCollatorForSeq2Seq, LlamaConfig, LlamaForCausalLM, Trainer,
                              TrainerCallback, TrainingArguments)

    from backend.data import build_dataset
    from backend.train.collate import PackedCollator, PaddedCollator
    from backend.train.trainer import StudioTrainer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(workdir / "tokenizer")
    packed = variant == "ours_packed"
    data, report = build_dataset(SHARED / "data" / "alpaca" / "alpaca_en_demo.json", tokenizer=tok,
                                 template="qwen_chat", max_length=512, pack=packed, seed=0)
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=1024, tie_word_embeddings=False,
                      pad_token_id=tok.pad_token_id, **MODELS[model_key])
    model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    model.config._attn_implementation = "sdpa"
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    bf16 = precision == "bf16"
    args = TrainingArguments(
        output_dir=str(workdir / "out"), per_device_train_batch_size=4, max_steps=steps + warmup,
        learning_rate=1e-4, logging_steps=10**6, save_strategy="no", report_to=[], disable_tqdm=True,
        use_cpu=True, bf16=bf16, remove_unused_columns=False, dataloader_num_workers=0, seed=0,
        train_sampling_strategy="group_by_length" if variant == "ours_padded" else "random",
        length_column_name="length",
    )
    counts = {"real": 0, "total": 0}

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if state.global_step == warmup:
                counts.update(real=0, total=0)
                counts["t0"] = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            counts["t1"] = time.perf_counter()

    if variant == "baseline":
        plain = data.remove_columns([c for c in data.column_names if c not in ("input_ids", "labels")])
        seq2seq = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)

        def collate(features):
            batch = seq2seq(features)
            counts["real"] += int(batch["attention_mask"].sum())
            counts["total"] += batch["input_ids"].numel()
            return batch

        trainer = Trainer(model=model, args=args, train_dataset=plain, data_collator=collate)
    else:
        inner = PackedCollator(tok.pad_token_id, mask="bool") if packed else PaddedCollator(tok.pad_token_id)

        def collate(features):
            batch = inner(features)
            counts["real"] += int(batch["num_tokens"])
            counts["total"] += batch["input_ids"].numel()
            return batch

        trainer = StudioTrainer(model=model, args=args, train_dataset=data, data_collator=collate, labeled_only=True)
    trainer.add_callback(Clock())
    if profile:
        from torch.profiler import ProfilerActivity, profile as prof

        with prof(activities=[ProfilerActivity.CPU]) as p:
            trainer.train()
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), file=sys.stderr)
    else:
        trainer.train()
    seconds = counts["t1"] - counts["t0"]
    dtype = torch.bfloat16 if bf16 else torch.float32
    tps = counts["real"] / seconds
    peak = matmul_peak(dtype)
    return {
        "model": model_key, "params": n_params, "variant": variant, "precision": precision,
        "tokens_per_s": tps, "padding": 1 - counts["real"] / counts["total"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "mfu": flops_per_token(cfg, 512 if packed else 256) * tps / peak, "peak_gflops": peak / 1e9,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--models", default="a,b")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--profile", action="store_true", help="print where the time goes (torch.profiler)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        model_key, variant, precision = args.one.split(":")
        res = one(model_key, variant, precision, args.steps, args.warmup, Path(args.workdir), args.profile)
        print("RESULT " + json.dumps(res))
        return
    workdir = Path(tempfile.mkdtemp(prefix="bench_train_"))
    build_tokenizer(workdir / "tokenizer")
    env = {**os.environ, "HF_DATASETS_CACHE": str(workdir / "hf"), "TOKENIZERS_PARALLELISM": "false"}
    print(f"LoRA r=8 all-linear, max_length 512, micro-batch 4, 1 process, {args.steps} timed steps "
          f"after {args.warmup} warm-up, alpaca_en_demo, 2000-token BPE")
    print(f"{'model':<6}{'prec':<6}{'variant':<13}{'tok/s':>9}{'vs base':>9}{'padding':>9}{'RSS MB':>9}{'MFU':>8}")
    for model_key in args.models.split(","):
        for precision in args.precisions.split(","):
            base = None
            for variant in args.variants.split(","):
                cmd = [sys.executable, __file__, "--one", f"{model_key}:{variant}:{precision}", "--workdir",
                       str(workdir), "--steps", str(args.steps), "--warmup", str(args.warmup)]
                if args.profile and variant == "ours_packed":
                    cmd.append("--profile")
                out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
                if line is None:
                    print(f"{model_key:<6}{precision:<6}{variant:<13} failed:\n{out.stderr[-2000:]}")
                    continue
                if args.profile and variant == "ours_packed":
                    print(out.stderr[-6000:])
                r = json.loads(line[7:])
                base = r["tokens_per_s"] if variant == "baseline" else base
                ratio = f"{r['tokens_per_s'] / base:8.2f}x" if base else "       -"
                print(f"{model_key + ' ' + str(round(r['params'] / 1e6, 1)) + 'M':<6}{precision:<6}{variant:<13}"
                      f"{r['tokens_per_s']:9.0f}{ratio:>9}{100 * r['padding']:8.1f}%{r['peak_rss_mb']:9.0f}"
                      f"{100 * r['mfu']:7.1f}%", flush=True)
    print("(MFU: model FLOPs per real token = 4 x linear params + attention, over the measured matmul peak)")


if __name__ == "__main__":
    main()
