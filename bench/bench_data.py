"""Data pipeline throughput: load -> map_fn -> template -> encode [-> pack], examples/s.

Settings from the data-pipeline issue: 2,000 real alpaca records, a byte-level
BPE tokenizer (minimind, ../shared/tokenizers), max_length 512, one process,
cold cache (a fresh datasets cache and a freshly loaded tokenizer, in a
process that has done one untimed run on other data so imports are not
counted), then the same run again (served from the cache), then with num_proc=2. For scale, the
same machine runs XTuner 0.2's own map_fn/template_map_fn/encode_fn the way
its process_hf_dataset does (three datasets.map passes), loaded through the
test oracle.

``--cold`` times what a training run pays once instead: the whole path in a
fresh process per round (imports done first and not counted; a fresh
datasets cache; dataset load, map_fn, template, tokenize and pack all
counted), for an XTuner template (``qwen_chat``) and for ``hf_chat_template``
(the tokenizer's own chat template), with the seconds of each phase, and
then, from one profiled round, where the encode step's time goes. The issue's
floor: >= 1.5x LLaMA-Factory's 2,690 ex/s cold on this machine kind. With
``--llamafactory PYTHON`` (an environment with llamafactory 0.9.5: it pins
older transformers and datasets than ours) LLaMA-Factory's own cold rounds run
interleaved with ours (``peer_llamafactory_data.py``) and the ratios are
against them, which holds on a host whose speed drifts.

    python bench/bench_data.py [--rows 2000] [--repeat 3] [--cold [--llamafactory PYTHON]] [--no-xtuner]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
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


# --- the cold path, end to end, one fresh process per round -----------------------------

COLD_TEMPLATES = ("qwen_chat", "hf_chat_template")
LLAMA_FACTORY_COLD = 2690.0  # ex/s, the figure on this machine kind (LLaMA-Factory 0.9.5, 1 process)
# what the profile is summed into, by the functions' own names (cumulative time inside the encode step)
PROFILE_PARTS = {
    "map_fn (map_row)": ("map_row",),
    "template render (ours)": ("_render_turns", "format_input"),
    "template render (chat template)": ("apply_chat_template", "render_chat_template"),
    "tokenize (Rust, batched)": ("encode_batch_fast", "encode_batch"),
    "Arrow write": ("write_table", "write_batch"),
}


def cold_child(path: Path, template: str, profile: bool) -> dict:
    """One cold round in this (fresh) process: imports first, untimed; then each phase timed."""
    import cProfile
    import pstats

    import datasets
    from transformers import AutoTokenizer  # noqa: F401  (imports are not the pipeline: done before the clock)

    from backend.data import load, load_tokenizer
    from backend.data.packing import pack_dataset
    from backend.data.pipeline import build_dataset

    datasets.disable_progress_bars()
    # the modules datasets and transformers import on first use (the json builder, the Hub client's SSL
    # context, the chat template's jinja) are imports too: one untimed build on other data, with its own
    # tokenizer and cache, loads them; the timed round then has a fresh cache and a fresh tokenizer
    fresh_cache()
    build_dataset(make_input(path.parent, "identity.json", 50), tokenizer=load_tokenizer(
        str(SHARED / "tokenizers" / "minimind_chatml")), template=template, map_fn="alpaca", max_length=512)
    fresh_cache()
    seconds = {}
    t0 = time.perf_counter()
    tok = load_tokenizer(str(SHARED / "tokenizers" / "minimind_chatml"))
    seconds["tokenizer load"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    raw = load(str(path))
    seconds["dataset load (json -> Arrow)"] = time.perf_counter() - t0
    prof = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    samples, report = build_dataset(raw, tokenizer=tok, template=template, map_fn="alpaca", max_length=512,
                                    where=str(path))
    if prof:
        prof.disable()
    seconds["map_fn + template + tokenize + report"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pack_dataset(samples, 512)
    seconds["pack"] = time.perf_counter() - t0
    out = {"seconds": seconds, "rows": report.rows, "kept": report.kept, "tokens": report.tokens}
    if prof:
        out["profile"] = profile_parts(pstats.Stats(prof))
    return out


def profile_parts(stats) -> dict:
    """Shares (%) of the profiled encode step spent in the PROFILE_PARTS functions (cumulative; the
    profiler slows Python more than Rust, so Python's shares read high)."""
    total = max(stats.total_tt, 1e-9)
    parts = {name: 0.0 for name in PROFILE_PARTS}
    for (file, _, func), (_, _, _, cum, _) in stats.stats.items():
        for name, funcs in PROFILE_PARTS.items():
            rust = file == "~"  # built-ins are named "<method 'encode_batch_fast' of 'tokenizers.Tokenizer' objects>"
            if rust == name.startswith("tokenize") and (func in funcs or rust and any(f"'{f}'" in func for f in funcs)):
                parts[name] = max(parts[name], cum)  # the outermost call (nested calls repeat the time)
    parts = {k: 100 * v / total for k, v in parts.items() if v > 0}
    parts["everything else (datasets.map, numpy, Python)"] = max(0.0, 100 - sum(parts.values()))
    return parts


def run_cold_child(path: Path, template: str, profile: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", template, "--data", str(path)] + (["--profile"] if profile else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ,
                                                                              "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_llamafactory_child(python: str, path: Path) -> dict:
    """One cold round of LLaMA-Factory's own preprocessing under its interpreter
    (``peer_llamafactory_data.py``)."""
    cmd = [python, str(ROOT / "bench" / "peer_llamafactory_data.py"), "--data", str(path),
           "--warmup", str(make_input(path.parent, "identity.json", 50)),
           "--tokenizer", str(SHARED / "tokenizers" / "minimind_chatml")]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"LLaMA-Factory's round under {python} failed (exit {out.returncode}):\n"
                         + "\n".join(out.stderr.strip().splitlines()[-8:]))
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_phases(rounds: list[dict]) -> tuple[dict, float]:
    """Each phase's median seconds, and the rate (ex/s) of the pipeline without the tokenizer load."""
    phases = {k: statistics.median(r["seconds"][k] for r in rounds) for k in rounds[0]["seconds"]}
    return phases, rounds[0]["rows"] / sum(v for k, v in phases.items() if k != "tokenizer load")


def print_phases(phases: dict) -> None:
    for name, secs in phases.items():
        print(f"  {name:<40} {secs * 1000:8.1f} ms")


def cold_rounds(args, tmp: Path) -> None:
    """Our cold rounds for each template, interleaved with LLaMA-Factory's when its interpreter is given
    (the host drifts, so a ratio measured side by side is the figure that holds)."""
    path = make_input(tmp, "alpaca_en_demo.json", args.rows)
    print(f"\ncold, end to end, a fresh process per round (imports and first-use set-up not counted; "
          f"tokenizer load shown apart), "
          f"{args.rows} alpaca rows, max_length 512, median of {args.repeat}; load: {os.getloadavg()[0]:.2f}")
    rounds = {name: [] for name in COLD_TEMPLATES + (("LLaMA-Factory",) if args.llamafactory else ())}
    for _ in range(args.repeat):
        for template in COLD_TEMPLATES:
            rounds[template].append(run_cold_child(path, template))
        if args.llamafactory:
            rounds["LLaMA-Factory"].append(run_llamafactory_child(args.llamafactory, path))
    peer, peer_source = LLAMA_FACTORY_COLD, "the issue's figure"
    if args.llamafactory:
        phases, peer = median_phases(rounds["LLaMA-Factory"])
        peer_source = "measured here, interleaved"
        print(f"\nLLaMA-Factory 0.9.5 (its get_dataset, template qwen, no packing): {peer:8.0f} ex/s")
        print_phases(phases)
    for template in COLD_TEMPLATES:
        phases, rate = median_phases(rounds[template])
        kept = rounds[template][0]
        print(f"\n{template}: {rate:8.0f} ex/s load -> pack ({rate / peer:.2f}x LLaMA-Factory's {peer:.0f}, "
              f"{peer_source}; floor 1.5x), {kept['tokens'] / kept['kept']:.0f} tokens/sample")
        print_phases(phases)
        profiled = run_cold_child(path, template, profile=True)["profile"]
        print("  inside the encode step (one profiled round; Python reads high under the profiler):")
        for name, share in sorted(profiled.items(), key=lambda kv: -kv[1]):
            print(f"    {name:<46} {share:5.1f} %")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-xtuner", action="store_true")
    ap.add_argument("--cold", action="store_true", help="only the cold end-to-end rounds, fresh processes")
    ap.add_argument("--llamafactory", metavar="PYTHON", default=None,
                    help="with --cold: an interpreter with llamafactory 0.9.5 installed; its rounds run "
                         "interleaved with ours and the ratios are against them")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one cold round: this template
    ap.add_argument("--data", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(cold_child(Path(args.data), args.child, args.profile)))
        return
    if args.cold:
        cold_rounds(args, Path(tempfile.mkdtemp(prefix="bench_data_")))
        return
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
