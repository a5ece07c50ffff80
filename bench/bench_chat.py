"""Chat generation speed: ``backend.chat.stream_reply`` (what `ftstudio chat`
and the studio use) against plain ``model.generate`` on the same model,
prompt and greedy settings: time to first token and tokens/s.

    python bench/bench_chat.py [--model PATH] [--new-tokens 200] [--repeat 5]

Default model: a ~30M-parameter random Llama built on the spot (the ~4M demo
model is too small for stable timings); ``--model`` takes any local model.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_model(folder: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from backend.demo import demo_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(demo_tokenizer_dir())
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    import torch

    from backend.chat import GenerationSettings, load_chat_model, stream_reply
    from backend.data import generation_prompt

    path = args.model or str(build_model(Path(tempfile.mkdtemp(prefix="bench_chat_")) / "model"))
    chat = load_chat_model(path, template="qwen_chat", system="")
    chat.stop_words = []  # random weights: never stop early, so both sides make the same number of tokens
    model, tok = chat.model, chat.tokenizer
    message = "How do I export and merge a LoRA adapter after training?"
    ids = torch.tensor([generation_prompt([{"input": message}], tok, "qwen_chat")])
    settings = GenerationSettings(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, temperature=0.0)

    def plain():
        t0 = time.perf_counter()
        puts = []

        class Clock:  # a streamer that only notes when tokens arrive
            def put(self, value):
                puts.append(time.perf_counter())

            def end(self):
                pass

        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                                 min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                                 streamer=Clock())
        n = out.shape[1] - ids.shape[1]
        # generate() first puts the prompt, then each new token
        return puts[1] - t0, n / (time.perf_counter() - t0)

    def ours():
        t0 = time.perf_counter()
        ttft = None
        for _ in stream_reply(chat, [], message, settings):
            if ttft is None:
                ttft = time.perf_counter() - t0
        # min_new_tokens = max_new_tokens and no stop words: exactly that many tokens, as in plain()
        return ttft, args.new_tokens / (time.perf_counter() - t0)

    plain(), ours()  # warm-up
    res = {"plain generate": [plain() for _ in range(args.repeat)], "stream_reply": [ours() for _ in range(args.repeat)]}
    print(f"model {path}, {args.new_tokens} new tokens, greedy, {args.repeat} runs, median")
    base = statistics.median(r[1] for r in res["plain generate"])
    for name, rows in res.items():
        ttft = statistics.median(r[0] for r in rows)
        tps = statistics.median(r[1] for r in rows)
        print(f"  {name:<15} time to first token {1000 * ttft:7.1f} ms   {tps:7.1f} tokens/s   ({tps / base:.2f}x plain)")


if __name__ == "__main__":
    main()
