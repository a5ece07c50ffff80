"""Chat-template render speed: ours (``encode._fast_template``) against the template exactly as
transformers compiles it for ``apply_chat_template``, on the same messages, interleaved rounds.

``hf_chat_template`` renders every conversation twice (with and without the generation prompt), and
rendering is most of its encode step, so this is where its preprocessing speed is decided. The two
must give the same text; the run stops if any differs.

    python bench/bench_render.py [--rows 2000] [--rounds 9] [--tokenizer PATH]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FTSTUDIO_SHARED", ROOT.parent / "shared"))
sys.path[:0] = [str(ROOT)]

encode = importlib.import_module("backend.data.encode")


def alpaca_messages(rows: int) -> list[list[dict]]:
    records = json.loads((SHARED / "data" / "alpaca" / "alpaca_en_demo.json").read_text(encoding="utf-8"))
    while len(records) < rows:
        records = records + records
    return [encode.to_messages([{"input": f"{r['instruction']}\n{r['input']}".strip(), "output": r["output"]}])
            for r in records[:rows]]


def render_all(template, chats: list[list[dict]], variables: dict) -> list[str]:
    """What ``_chat_texts`` asks of a template for single-turn rows: the whole conversation, then the
    prompt with the generation prompt."""
    whole = [template.render(messages=m, tools=None, documents=None, add_generation_prompt=False, **variables)
             for m in chats]
    return whole + [template.render(messages=m[:-1], tools=None, documents=None, add_generation_prompt=True,
                                    **variables) for m in chats]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--tokenizer", default=str(SHARED / "tokenizers" / "minimind_chatml"))
    args = parser.parse_args()
    from transformers import AutoTokenizer
    from transformers.utils.chat_template_utils import _compile_jinja_template

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    source = tokenizer.get_chat_template()
    candidates = {"transformers": _compile_jinja_template(source), "ours": encode._fast_template(source)}
    chats, variables = alpaca_messages(args.rows), dict(tokenizer.special_tokens_map)
    texts = {name: render_all(t, chats, variables) for name, t in candidates.items()}
    if texts["ours"] != texts["transformers"]:
        raise SystemExit("the two renders differ: ours is not the same template")
    seconds = {name: [] for name in candidates}
    for _ in range(args.rounds):
        for name, template in candidates.items():
            start = time.perf_counter()
            render_all(template, chats, variables)
            seconds[name].append(time.perf_counter() - start)
    renders = 2 * args.rows
    for name, times in seconds.items():
        print(f"{name:>12}: {renders / statistics.median(times):8.0f} renders/s "
              f"(median of {args.rounds}; best {renders / min(times):.0f})")
    ratio = statistics.median(seconds["transformers"]) / statistics.median(seconds["ours"])
    print(f"ours renders {ratio:.2f}x as fast as the template transformers compiles, same text for all {renders}")


if __name__ == "__main__":
    main()
