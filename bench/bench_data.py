"""Data pipeline throughput: load -> map_fn -> template -> encode, examples/s.

Settings from the data-pipeline issue: 2,000 real alpaca records, a byte-level
BPE tokenizer (minimind, ../shared/tokenizers), max_length 512, one process,
cold cache (a fresh datasets cache and a freshly loaded tokenizer, in a
process that has done one untimed run on other data so imports are not
counted), then the same run again (served from the cache), then with num_proc=2. For scale, the
same machine runs XTuner 0.2's own map_fn/template_map_fn/encode_fn the way
its process_hf_dataset does (three datasets.map passes), loaded through the
test oracle.

    python bench/bench_data.py [--rows 2000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FTSTUDIO_SHARED", ROOT.parent / "shared"))
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def make_input(tmp: Path, source: str, rows: int) -> Path:
    records = json.loads((SHARED / "data" / "alpaca" / source).read_text(encoding="utf-8"))
    while len(records) < rows:
        records = records + records
    path = tmp / f"{Path(source).stem}_{rows}.json"
    path.write_text(json.dumps(records[:rows], ensure_ascii=False), encoding="utf-8")
    return path


def fresh_cache():
    import datasets.config

    cache = Path(tempfile.mkdtemp(prefix="bench_hf_cache_"))
    datasets.config.HF_DATASETS_CACHE = cache
    return cache


def ours(path: Path, num_proc=None):
    from backend.data import build_dataset, load_tokenizer

    tok = load_tokenizer(str(SHARED / "tokenizers" / "minimind_chatml"))
    t0 = time.perf_counter()
    samples, report = build_dataset(path, tokenizer=tok, template="qwen_chat", map_fn="alpaca",
                                    max_length=512, num_proc=num_proc)
    return time.perf_counter() - t0, report


def xtuner(path: Path):
    """XTuner 0.2's process_hf_dataset data steps, with its own functions."""
    import datasets
    from transformers import AutoTokenizer
    from xtuner_oracle import _oracle, xtuner_prompt_templates

    oracle = _oracle()
    tok = AutoTokenizer.from_pretrained(str(SHARED / "tokenizers" / "minimind_chatml"))
    template = xtuner_prompt_templates()["qwen_chat"]
    t0 = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=str(path), split="train")
    ds = ds.map(oracle.map_fns["alpaca"])
    ds = ds.map(partial(oracle.template_map_fn, template=template))
    ds = ds.filter(lambda ex: len(ex["conversation"]) > 0)
    ds = ds.map(partial(oracle.encode_fn, tokenizer=tok, max_length=512))
    return time.perf_counter() - t0, len(ds)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-xtuner", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import datasets

    datasets.disable_progress_bars()
    tmp = Path(tempfile.mkdtemp(prefix="bench_data_"))
    print(f"rows {args.rows}, tokenizer minimind (byte-level BPE, vocab 6400), template qwen_chat, "
          f"max_length 512, best and median of {args.repeat}")
    # One untimed run first, on other data: imports and lazy set-up inside
    # datasets/tokenizers happen once per process and are not the pipeline.
    fresh_cache()
    ours(make_input(tmp, "identity.json", 200))
    for source in ("code_alpaca_2k.json", "alpaca_en_demo.json"):
        path = make_input(tmp, source, args.rows)
        cold, cached, multi, xt = [], [], [], []
        for _ in range(args.repeat):
            fresh_cache()
            seconds, report = ours(path)
            cold.append(seconds)
            seconds, report2 = ours(path)
            assert report2.from_cache, "second run was not served from the cache"
            cached.append(seconds)
        for _ in range(args.repeat):  # forked workers last, so they cannot affect the runs above
            fresh_cache()
            multi.append(ours(path, num_proc=2)[0])
            if not args.no_xtuner:
                fresh_cache()
                xt.append(xtuner(path)[0])
        n = args.rows

        def rate(times):
            return f"{n / min(times):8.0f} ex/s best, {n / statistics.median(times):8.0f} median"

        print(f"\n{source} ({report.tokens / report.kept:.0f} tokens/sample, {report.truncated} truncated)")
        print(f"  ours, cold, 1 process     {rate(cold)}")
        print(f"  ours, cold, num_proc=2    {rate(multi)}")
        print(f"  ours, cached              {rate(cached)}")
        if xt:
            print(f"  XTuner 0.2 steps, cold    {rate(xt)}")


if __name__ == "__main__":
    main()
