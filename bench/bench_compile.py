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

    python bench/bench_compile.py [--rounds 8] [--steps-per-block 5] [--precision bf16|fp32]

(fp32: what ``auto`` trains in where bf16 matmuls are not faster; measured 0.87x
the eager step time there, the first compile 47 s.)
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
import bench_train  # noqa: E402  (its builders and loop_step; it puts the project on sys.path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps-per-block", type=int, default=5)
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    args = ap.parse_args()
    bf16 = args.precision == "bf16"
    import torch
    from torch.utils.data import DataLoader

    from backend.train.allocator import prepare_training_process

    prepare_training_process()  # as the worker does
    workdir = Path(tempfile.mkdtemp(prefix="bench_compile_"))
    bench_train.build_tokenizer(workdir / "tokenizer")
    _, data, model, collator, _ = bench_train.build("a", "ours_packed_mask", 512, workdir, dropout=0.1, bf16=bf16)
    loader = DataLoader(data, batch_size=4, shuffle=True, collate_fn=collator,
                        generator=torch.Generator().manual_seed(0))
    batches = list(itertools.islice(itertools.cycle(loader), 40))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    eager = model.get_base_model().model
    compiled = torch.compile(eager, dynamic=False)
    stream = itertools.cycle(batches)

    def step(decoder) -> None:
        bench_train.loop_step(model, decoder, next(stream), optimizer, params, bf16=bf16)

    t0 = time.perf_counter()
    step(compiled)
    print(f"first compiled step: {time.perf_counter() - t0:.1f} s (compile, or inductor's cache)")
    step(eager)
    blocks = {"eager": [], "compiled": []}
    for _ in range(args.rounds):
        for name, decoder in (("eager", eager), ("compiled", compiled)):
            t0 = time.perf_counter()
            for _ in range(args.steps_per_block):
                step(decoder)
            blocks[name].append(1000 * (time.perf_counter() - t0) / args.steps_per_block)
    for name, ms in blocks.items():
        print(f"{name:<9} ms/step per block: {' '.join(f'{m:.0f}' for m in ms)}  median {statistics.median(ms):.0f}")
    print(f"compiled/eager (medians): {statistics.median(blocks['compiled']) / statistics.median(blocks['eager']):.2f}")


if __name__ == "__main__":
    main()
