"""Would ``torch.compile`` pay for our bf16 defaults on the CPU? An in-process A/B.

The bf16 packed step is at the bare loop's speed (``bench_train.py``'s hand_loop),
so what is left is the kernels themselves; inductor's CPU code could fuse the
elementwise work around them (RMSNorm, SiLU-times-gate, rotary, the LoRA dropout
masks). This builds bench_train's model a with the 4-D block-diagonal mask
(static shapes at a fixed block length, so one graph), compiles the decoder once,
and alternates blocks of steps, eager and compiled, on the same model, optimizer
and batches, so the host's drift hits both alike. It prints the first compiled
step's seconds (the compile, or inductor's cache on a second run) and ms/step of
each block. Not used by training: a measurement to decide by.

    python bench/bench_compile.py [--rounds 8] [--steps-per-block 5]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train  # noqa: E402  (its model, tokenizer and data builders; it puts the project on sys.path)


def make_step(model, optimizer, params):
    """One training step through ``inner`` (the eager or the compiled decoder): bench_train.hand_loop's math."""
    import torch
    import torch.nn.functional as F

    base = model.get_base_model()

    def step(batch, inner) -> float:
        batch = dict(batch)
        labels = batch.pop("labels")
        select = torch.zeros_like(labels, dtype=torch.bool)
        select[:, :-1] = labels[:, 1:] != -100
        targets = labels[:, 1:][select[:, :-1]]
        keep = {k: v for k, v in batch.items() if k not in ("num_tokens", "item_lens")}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = inner(**keep, use_cache=False).last_hidden_state
            logits = base.lm_head(hidden[select])
        loss = F.cross_entropy(logits.float(), targets, reduction="sum") / max(targets.numel(), 1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps-per-block", type=int, default=5)
    args = ap.parse_args()
    import torch
    from torch.utils.data import DataLoader

    from backend.train.allocator import keep_freed_memory

    keep_freed_memory()  # as the worker does
    workdir = Path(tempfile.mkdtemp(prefix="bench_compile_"))
    bench_train.build_tokenizer(workdir / "tokenizer")
    _, data, model, collator, _ = bench_train.build("a", "ours_packed_mask", 512, workdir, dropout=0.1, bf16=True)
    loader = DataLoader(data, batch_size=4, shuffle=True, collate_fn=collator,
                        generator=torch.Generator().manual_seed(0))
    batches = list(itertools.islice(itertools.cycle(loader), 40))
    params = [p for p in model.parameters() if p.requires_grad]
    step = make_step(model, torch.optim.AdamW(params, lr=1e-4), params)
    model.train()
    eager = model.get_base_model().model
    compiled = torch.compile(eager, dynamic=False)
    t0 = time.perf_counter()
    step(batches[0], compiled)
    print(f"first compiled step: {time.perf_counter() - t0:.1f} s (compile, or inductor's cache)")
    step(batches[1], eager)
    blocks = {"eager": [], "compiled": []}
    for i in range(args.rounds):
        for name, inner in (("eager", eager), ("compiled", compiled)):
            t0 = time.perf_counter()
            for k in range(args.steps_per_block):
                step(batches[(2 + (2 * i + (name == "compiled")) * args.steps_per_block + k) % len(batches)], inner)
            blocks[name].append(1000 * (time.perf_counter() - t0) / args.steps_per_block)
    for name, ms in blocks.items():
        print(f"{name:<9} ms/step per block: {' '.join(f'{m:.0f}' for m in ms)}  median {statistics.median(ms):.0f}")
    print(f"compiled/eager (medians): {statistics.median(blocks['compiled']) / statistics.median(blocks['eager']):.2f}")


if __name__ == "__main__":
    main()
