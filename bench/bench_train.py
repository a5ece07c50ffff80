"""Training throughput: ours (packed, padded) against plain Trainer and against a
hand-written loop on the same batches.

Settings from the training issue: LoRA r=8 on every linear layer, max_length
512 (``--max-length``), micro-batch 4, one process, fp32 and bf16, on (a) a
4.2M-parameter Llama (hidden 256, 4 layers, intermediate 688, vocab 2000), (b)
a ~30M one, or ``--hidden 1024`` (4 layers; compute-bound), trained on real
alpaca data (../shared/data) with a 2,000-token byte-level BPE tokenizer
trained on that data. Each configuration runs in its own process (so peak RSS
is its own) and prints:

- tokens/s of real (non-padding) tokens and ms per step, after warm-up;
- the ratio to plain Trainer ("vs base") and to the hand-written loop ("vs
  loop": the framework-overhead ceiling, checkable on any machine);
- padding fraction of the batches; peak RSS;
- the matmul peak measured in the same process (2048x2048, same precision,
  same threads) and MFU against it: model FLOPs of the real tokens (linear
  layers + the causal attention each sample really needs) per second.

Variants. baseline: ``transformers.Trainer`` on unpacked samples with
``DataCollatorForSeq2Seq``, the model's own loss over all positions.
ours_padded: length grouping and the labeled-only LM head. ours_packed_mask:
samples packed into blocks, kept apart by a 4-D block-diagonal mask (sdpa:
T² attention per block). ours_packed: the same blocks flattened, attention
per sample (backend/train/attention.py: Σ nᵢ²). hand_loop: ours_packed's
batches (from the same dataloader) and math in a bare PyTorch loop.

    python bench/bench_train.py [--steps 12] [--models a,b | --hidden 1024] [--max-length 512]
        [--precisions fp32,bf16] [--variants ...] [--profile] [--rounds N] [--llamafactory PYTHON]

``--llamafactory PYTHON`` (an environment with llamafactory 0.9.5) adds LLaMA-Factory's own fp32 runs
through its ``run_exp`` (``peer_llamafactory_train.py``: padded, packed, neat packing, each with its
default activation checkpointing and without) to the table, in the same session, and prints the
issue's floors as ratios to them. Our variants run with bitsandbytes and DeepSpeed hidden, as the
training worker runs a LoRA job (peft imports bitsandbytes whenever it is installed: ~120 MB of RSS).
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
# baseline: plain Trainer + DataCollatorForSeq2Seq; ours_padded: length grouping + labeled-only head;
# ours_packed_mask: packed blocks, 4-D block-diagonal mask, sdpa; ours_packed: packed, flattened,
# per-sample SDPA (backend/train/attention.py); hand_loop: ours_packed's batches and math in a bare loop
VARIANTS = ("baseline", "ours_padded", "ours_packed_mask", "ours_packed", "hand_loop")
# LLaMA-Factory's own runs (peer_llamafactory_train.py), fp32 as in the issue's table: its defaults (activation
# checkpointing on) and, "_no_gc", without checkpointing (faster, more memory: like ours)
PEER_VARIANTS = {f"lf_{kind}{suffix}": flags + more for kind, flags in
                 (("unpacked", []), ("packed", ["--packing"]), ("neat_packing", ["--neat-packing"]))
                 for suffix, more in (("", []), ("_no_gc", ["--no-gradient-checkpointing"]))}
PACKED = ("ours_packed_mask", "ours_packed", "hand_loop")


def model_dims(key: str) -> dict:
    """A named model, or "h<N>": hidden N, 4 layers, heads of 64, a Llama-shaped MLP."""
    if key in MODELS:
        return MODELS[key]
    hidden = int(key.lstrip("h"))
    return dict(hidden_size=hidden, num_hidden_layers=4, intermediate_size=(hidden * 8 // 3 + 63) // 64 * 64,
                num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64))


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


def linear_flops_per_token(cfg) -> float:
    """LoRA training FLOPs per token in the linear layers: forward 2N + backward through
    the activations 2N (frozen weights get no weight gradient; LoRA's own is negligible)."""
    h, L, i, v = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size
    kv = h // cfg.num_attention_heads * cfg.num_key_value_heads
    return 4 * (L * (h * h * 2 + h * kv * 2 + 3 * h * i) + h * v)  # q,o + k,v + mlp + head


def attention_flops(cfg, pairs: int) -> float:
    """Useful attention FLOPs for ``pairs`` (query, key) pairs a causal sample attends
    (n(n+1)/2 per sample): scores and values, 2 x 2 x hidden each, fwd + bwd = 3 x fwd.
    Masked-out pairs of a 4-D block mask are work, not useful FLOPs."""
    return cfg.num_hidden_layers * 3 * 2 * 2 * cfg.hidden_size * pairs


class Counter:
    """Real tokens, all tokens and causal attention pairs of the batches that steps
    trained on. Counted where a step takes its batch (``count``), not in the
    collator: accelerate's dataloader collates one batch ahead, so a count in
    the collator reset at a step's start misses a batch (a 1/steps error)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.real = self.total = self.pairs = 0
        self.losses = []

    def final_loss(self) -> float:
        """The mean training loss of the last 10 timed steps (the same batches for every packed variant)."""
        tail = self.losses[-10:]
        return sum(tail) / max(len(tail), 1)

    def count(self, batch):
        mask = batch.get("attention_mask")
        total = batch["input_ids"].numel()
        real = int(batch["num_tokens"]) if "num_tokens" in batch else int(mask.sum())
        if "cu_seq_lens_q" in batch:  # flattened packed row
            cu = batch["cu_seq_lens_q"].tolist()
            pairs = sum((b - a) * (b - a + 1) // 2 for a, b in zip(cu, cu[1:]))
        elif mask.dim() == 4:  # block mask: allowed pairs, less the padding rows' self-attention
            pairs = int(mask.sum()) - (total - real)
        else:  # padded rows
            pairs = sum(n * (n + 1) // 2 for n in mask.sum(1).tolist())
        self.real, self.total, self.pairs = self.real + real, self.total + total, self.pairs + pairs


def build(model_key: str, variant: str, max_length: int, workdir: Path, dropout: float = 0.0, bf16: bool = False):
    """(tokenizer, dataset, LoRA model, collator, parameter count) for one variant. ``dropout``: LoRA dropout,
    peft's own for the baseline, ours (``lora_dropout.install``: on the rank-r activation) for the rest.
    ``bf16``: ours hold the frozen base in bf16 as ``trainer.load_model`` does (adapters stay fp32); the
    baseline keeps fp32 weights under autocast, as plain Trainer with ``bf16=True`` does."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, LlamaConfig, LlamaForCausalLM

    from backend.data import build_dataset
    from backend.train.attention import register
    from backend.train.collate import PackedCollator, PaddedCollator

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(workdir / "tokenizer")
    packed = variant in PACKED
    data, _ = build_dataset(SHARED / "data" / "alpaca" / "alpaca_en_demo.json", tokenizer=tok,
                            template="qwen_chat", max_length=max_length, pack=packed, seed=0)
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=max(1024, max_length), tie_word_embeddings=False,
                      pad_token_id=tok.pad_token_id, **model_dims(model_key))
    model = LlamaForCausalLM(cfg)
    if bf16 and variant != "baseline":
        model = model.to(torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    flat = variant in ("ours_packed", "hand_loop")
    model.config._attn_implementation = register() if flat else "sdpa"
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    if variant != "baseline":
        from backend.train.lora_dropout import install

        install(model, dropout)
    if variant == "baseline":
        data = data.remove_columns([c for c in data.column_names if c not in ("input_ids", "labels")])
        inner = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    elif packed:
        inner = PackedCollator(tok.pad_token_id, mask=None if flat else "bool")
    else:
        inner = PaddedCollator(tok.pad_token_id)
    return tok, data, model, inner, n_params


def loop_step(model, decoder, batch: dict, optimizer, params, bf16: bool) -> float:
    """One step of StudioTrainer's math in a bare loop (labeled-only head, summed CE over the
    trained tokens, AdamW, clip at 1.0, bf16 autocast), the decoder given (eager or compiled);
    returns the loss. ``batch`` is left as it was."""
    import torch
    import torch.nn.functional as F

    base = model.get_base_model()
    labels = batch["labels"]
    select = torch.zeros_like(labels, dtype=torch.bool)
    select[:, :-1] = labels[:, 1:] != -100
    targets = labels[:, 1:][select[:, :-1]]
    keep = {k: v for k, v in batch.items() if k not in ("labels", "num_tokens", "item_lens")}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        hidden = decoder(**keep, use_cache=False).last_hidden_state
        logits = base.lm_head(hidden[select])
    loss = F.cross_entropy(logits.float(), targets, reduction="sum") / max(targets.numel(), 1)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def hand_loop(model, batches, counter: Counter, steps: int, warmup: int, bf16: bool, lr: float) -> float:
    """The framework-overhead ceiling: the same batches and math as StudioTrainer in a bare
    loop (``loop_step``). Returns the seconds of the timed steps."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    decoder = model.get_base_model().model
    model.train()
    t0 = None
    for step in range(warmup + steps):
        batch = next(batches)
        if step == warmup:
            counter.reset()
            t0 = time.perf_counter()
        counter.count(batch)
        counter.losses.append(loop_step(model, decoder, batch, opt, params, bf16))
    return time.perf_counter() - t0


def one(model_key: str, variant: str, precision: str, steps: int, warmup: int, workdir: Path, profile: bool,
        max_length: int = 512, dropout: float = 0.0):
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from backend.train.trainer import StudioTrainer

    bf16 = precision == "bf16"
    if variant != "baseline":  # what the training worker does first (plain Trainer keeps glibc's and oneDNN's defaults)
        from backend.train.allocator import prepare_training_process

        prepare_training_process()
    tok, data, model, collator, n_params = build(model_key, variant, max_length, workdir, dropout, bf16)
    counter = Counter()
    args = TrainingArguments(
        output_dir=str(workdir / "out"), per_device_train_batch_size=4, max_steps=steps + warmup,
        learning_rate=1e-4, logging_steps=10**6, save_strategy="no", report_to=[], disable_tqdm=True,
        use_cpu=True, bf16=bf16, remove_unused_columns=False, dataloader_num_workers=0, seed=0,
        train_sampling_strategy="group_by_length" if variant == "ours_padded" else "random",
        length_column_name="length",
    )
    clock = {}

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if state.global_step == warmup:
                counter.reset()
                clock["t0"] = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            clock["t1"] = time.perf_counter()

    if variant == "baseline":
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator)
    else:
        trainer = StudioTrainer(model=model, args=args, train_dataset=data, data_collator=collator, labeled_only=True)
    trainer.add_callback(Clock())
    training_step = trainer.training_step

    def counted_step(model, inputs, *a, **kw):
        counter.count(inputs)
        loss = training_step(model, inputs, *a, **kw)
        counter.losses.append(float(loss))
        return loss

    trainer.training_step = counted_step
    if variant == "hand_loop":  # Trainer only hands out its batches: the same order as ours_packed's
        seconds = hand_loop(model, iter(trainer.get_train_dataloader()), counter, steps, warmup, bf16, 1e-4)
    elif profile:
        from torch.profiler import ProfilerActivity, profile as prof

        with prof(activities=[ProfilerActivity.CPU]) as p:
            trainer.train()
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=20), file=sys.stderr)
        seconds = clock["t1"] - clock["t0"]
    else:
        trainer.train()
        seconds = clock["t1"] - clock["t0"]
    tps = counter.real / seconds
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the run's, before the matmul probe's
    peak = matmul_peak(torch.bfloat16 if bf16 else torch.float32)
    flops = linear_flops_per_token(model.get_base_model().config) * counter.real \
        + attention_flops(model.get_base_model().config, counter.pairs)
    return {
        "model": model_key, "params": n_params, "variant": variant, "precision": precision,
        "tokens_per_s": tps, "ms_per_step": 1000 * seconds / steps, "padding": 1 - counter.real / counter.total,
        "peak_rss_mb": rss_mb,
        "mfu": flops / seconds / peak, "peak_gflops": peak / 1e9, "loss": counter.final_loss(),
    }


def row(r: dict, base: float | None, loop: float | None) -> str:
    ratio = lambda ref: f"{r['tokens_per_s'] / ref:7.2f}x" if ref else "       -"  # noqa: E731
    name = f"{r['model']} {r['params'] / 1e6:.1f}M"
    measured = (f"{r['peak_gflops']:9.0f}{100 * r['mfu']:7.1f}%" if "mfu" in r else f"{'-':>9}{'-':>8}")
    return (f"{name:<12}{r['precision']:<6}{r['variant']:<17}{r['tokens_per_s']:9.0f}{r['ms_per_step']:9.0f}"
            f"{ratio(base):>9}{ratio(loop):>9}{100 * r['padding']:8.1f}%{r['peak_rss_mb']:8.0f}"
            f"{measured}{r['loss']:8.3f}")


def run_child(cmd: list[str], env: dict, label: str) -> tuple[dict | None, str]:
    """A bench child's ``RESULT`` line as a dict (None, and its error printed under ``label``, if it
    printed none), with its stderr."""
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        print(f"{label} failed:\n{out.stderr[-2000:]}")
        return None, out.stderr
    return json.loads(line[7:]), out.stderr


def run_ours(model_key: str, variant: str, precision: str, args, env: dict, workdir: Path, profile: bool) -> dict | None:
    """One of our variants in a process of its own; None (and the error printed) if it failed."""
    cmd = [sys.executable, __file__, "--one", f"{model_key}:{variant}:{precision}", "--workdir", str(workdir),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--max-length", str(args.max_length),
           "--lora-dropout", str(args.lora_dropout)]
    profile = profile and args.profile and variant == args.profile_variant
    result, stderr = run_child(cmd + (["--profile"] if profile else []), env, f"{model_key:<12}{precision:<6}{variant:<17}")
    if result and profile:
        print(stderr[-6000:])
    return result


def median_run(runs: list[dict]) -> dict:
    """The run with the median tokens/s (the upper middle of an even count), its other figures with it."""
    return sorted(runs, key=lambda r: r["tokens_per_s"])[len(runs) // 2]


def run_peer(python: str, model_key: str, variant: str, args, env: dict, workdir: Path) -> dict | None:
    """One LLaMA-Factory run (fp32) under its interpreter, as a row of the table; None if it failed. It
    runs with its own default LoRA dropout, 0, whatever ``--lora-dropout`` says: its fastest setting."""
    cmd = [python, str(ROOT / "bench" / "peer_llamafactory_train.py"), "--dims", json.dumps(model_dims(model_key)),
           "--tokenizer", str(workdir / "tokenizer"), "--data", str(SHARED / "data" / "alpaca" / "alpaca_en_demo.json"),
           "--steps", str(args.steps), "--warmup", str(args.warmup), *PEER_VARIANTS[variant]]
    result, _ = run_child(cmd, env, f"{model_key:<12}{'fp32':<6}{variant:<17}")
    return result and {"model": model_key, "variant": variant, "precision": "fp32", **result}


def print_floors(results: dict, model_key: str) -> None:
    """The issue's floors as ratios to LLaMA-Factory's runs measured in this session: its defaults (what the
    issue's table measured) and, stricter, its faster run without activation checkpointing. The issue's
    best peer for fp32 packing, XTuner, was 1.09x LLaMA-Factory's packing there; it is not installed here.
    "Our defaults" is what ``auto`` picks on this CPU: bf16 with a block mask at 512 where bf16 matmuls
    are measured fast enough (backend/train/precision.py), else fp32 per sample."""
    from backend.train.precision import cpu_precision

    run = lambda precision, variant: results.get((precision, variant), {})  # noqa: E731
    tps = lambda variant: run("fp32", variant).get("tokens_per_s", 0)  # noqa: E731
    fastest = lambda suffix, *kinds: max(tps(f"lf_{k}{suffix}") for k in kinds)  # noqa: E731
    defaults = ("bf16", "ours_packed_mask") if cpu_precision().bf16 else ("fp32", "ours_packed")
    print(f"{model_key}: our defaults here: {defaults[1]} {defaults[0]} (model.dtype auto: {cpu_precision().reason})")
    checks = [("unpacked: ours_padded fp32 / LLaMA-Factory unpacked", run("fp32", "ours_padded"), ("unpacked",), 1.2),
              ("packed, samples isolated: ours_packed fp32 / LLaMA-Factory neat packing", run("fp32", "ours_packed"),
               ("neat_packing",), 1.3),
              (f"our defaults: {defaults[1]} {defaults[0]} / LLaMA-Factory's fastest fp32", run(*defaults),
               ("unpacked", "packed", "neat_packing"), 2.0)]
    for name, ours, kinds, floor in checks:
        default, no_gc = fastest("", *kinds), fastest("_no_gc", *kinds)
        if ours.get("tokens_per_s") and default and no_gc:
            print(f"{model_key}: {name}: {ours['tokens_per_s'] / default:.2f}x its defaults, "
                  f"{ours['tokens_per_s'] / no_gc:.2f}x without checkpointing (floor {floor}x)")
    ours = run(*defaults).get("peak_rss_mb")
    for peer in ("lf_packed", "lf_packed_no_gc"):
        if ours and run("fp32", peer).get("peak_rss_mb"):
            print(f"{model_key}: peak RSS, {defaults[1]} {defaults[0]} / {peer}: "
                  f"{ours / run('fp32', peer)['peak_rss_mb']:.2f}x (floor 1.05x)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--models", default="a,b", help="a, b, or h<N> (hidden N, 4 layers)")
    ap.add_argument("--hidden", type=int, default=None,
                    help="run one model of this hidden size instead of --models (1024: compute-bound)")
    ap.add_argument("--max-length", type=int, default=512, help="block / truncation length")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--profile", action="store_true", help="print where the time goes (torch.profiler)")
    ap.add_argument("--profile-variant", default="ours_packed", help="the variant --profile profiles")
    ap.add_argument("--lora-dropout", type=float, default=0.0,
                    help="LoRA dropout (peft's for the baseline, ours for the rest; the recipes' default is 0.1)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every variant this many times, interleaved, and report each one's median run")
    ap.add_argument("--llamafactory", metavar="PYTHON", default=None,
                    help="an interpreter with llamafactory 0.9.5: its fp32 runs (unpacked, packed, neat packing; "
                         "with and without its activation checkpointing) join the table and the floors are "
                         "printed as ratios to them")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    unknown = [v for v in (args.one.split(":")[1:2] if args.one else args.variants.split(",")) if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant {', '.join(unknown)}: choose from {', '.join(VARIANTS)}")
    if args.one:
        model_key, variant, precision = args.one.split(":")
        if variant != "baseline":  # as the training worker does for a LoRA run without --deepspeed: peft
            from backend.train.phases import OPTIONAL_STACKS, hide  # imports bitsandbytes when installed

            hide(OPTIONAL_STACKS)
        res = one(model_key, variant, precision, args.steps, args.warmup, Path(args.workdir), args.profile,
                  args.max_length, args.lora_dropout)
        print("RESULT " + json.dumps(res))
        return
    models = [f"h{args.hidden}"] if args.hidden else args.models.split(",")
    workdir = Path(tempfile.mkdtemp(prefix="bench_train_"))
    build_tokenizer(workdir / "tokenizer")
    env = {**os.environ, "HF_DATASETS_CACHE": str(workdir / "hf"), "TOKENIZERS_PARALLELISM": "false"}
    print(f"LoRA r=8 all-linear, dropout {args.lora_dropout}, max_length {args.max_length}, micro-batch 4, 1 process, {args.steps} timed steps "
          f"after {args.warmup} warm-up, alpaca_en_demo, 2000-token BPE; load average "
          + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(f"{'model':<12}{'prec':<6}{'variant':<17}{'tok/s':>9}{'ms/step':>9}{'vs base':>9}{'vs loop':>9}"
          f"{'padding':>9}{'RSS MB':>8}{'peak GF':>9}{'MFU':>8}{'loss':>8}")
    for model_key in models:
        measured = {}
        for precision in args.precisions.split(","):
            names = args.variants.split(",") + (list(PEER_VARIANTS) if args.llamafactory and precision == "fp32" else [])
            runs = {name: [] for name in names}
            for round_ in range(args.rounds):  # interleaved: every variant once a round, on the same host state
                for name in names:
                    run = (run_peer(args.llamafactory, model_key, name, args, env, workdir) if name in PEER_VARIANTS
                           else run_ours(model_key, name, precision, args, env, workdir, profile=round_ == 0))
                    if run:
                        runs[name].append(run)
            results = {name: median_run(rs) for name, rs in runs.items() if rs}
            base = results.get("baseline", {}).get("tokens_per_s")
            loop = results.get("hand_loop", {}).get("tokens_per_s")
            for r in results.values():
                print(row(r, base, loop), flush=True)
            measured.update({(precision, v): r for v, r in results.items()})
        if args.llamafactory:
            print_floors(measured, model_key)
    print("(vs base: over plain Trainer + DataCollatorForSeq2Seq; vs loop: over hand_loop, the same batches in a "
          "bare loop. MFU: 4 x linear params per real token + useful causal attention, over 'peak GF', a "
          "2048x2048 matmul timed in the same process at the same precision; loss: mean training loss of the "
          "last 10 steps (the packed variants train on the same batches); load average at the end "
          + " ".join(f"{x:.2f}" for x in os.getloadavg()) + ")")


if __name__ == "__main__":
    main()
