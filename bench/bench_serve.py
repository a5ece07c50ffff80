"""Serving speed: one stream through ``ftstudio serve``'s OpenAI-compatible API
(the official ``openai`` client, streaming, greedy) against plain
``model.generate`` and ``backend.chat.generate_tokens`` on the same model in
this process: time to first token and tokens/s (floor: the API at >= 0.9x plain
generate), then aggregate tokens/s with 1, 4 and 8 concurrent clients.

    python bench/bench_serve.py [--model PATH] [--new-tokens 200] [--repeat 3] [--clients 1,4,8]

Default model: bench_chat's ~30M-parameter random Llama (random weights never
end early, so every reply is exactly --new-tokens long; the ~4M demo model
answers in a few tokens and is too small for stable timings). ``--model``
takes any local model folder; it is served with --prompt-template qwen_chat.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

TEMPLATE = "qwen_chat"
MESSAGE = "How do I export and merge a LoRA adapter after training?"
FLOOR = 0.9


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def in_process(path: str, new_tokens: int):
    """Two timers on the model loaded here, each -> (time to first token, tokens/s): plain
    ``model.generate`` (greedy, exactly ``new_tokens``) and ``generate_tokens`` (our decode loop)."""
    import torch

    from backend.chat import GenerationSettings, generate_tokens, load_chat_model
    from backend.data import generation_prompt

    chat = load_chat_model(path, template=TEMPLATE, system="", device="cpu")
    model, tok = chat.model, chat.tokenizer
    ids = torch.tensor([generation_prompt([{"input": MESSAGE}], tok, TEMPLATE)])
    settings = GenerationSettings(max_new_tokens=new_tokens, min_new_tokens=new_tokens, temperature=0.0)
    eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()

    def plain():
        puts, t0 = [], time.perf_counter()

        class Clock:  # a streamer that only notes when tokens arrive (the prompt first, then each token)
            def put(self, value):
                puts.append(time.perf_counter())

            def end(self):
                pass

        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                                 streamer=Clock())
        return puts[1] - t0, (out.shape[1] - ids.shape[1]) / (time.perf_counter() - t0)

    def loop():
        t0, ttft, n = time.perf_counter(), None, 0
        for _ in generate_tokens(model, ids, eos, settings):
            ttft = ttft or time.perf_counter() - t0
            n += 1
        return ttft, n / (time.perf_counter() - t0)

    return {"plain generate": plain, "generate_tokens": loop}


class Server:
    """``ftstudio serve`` in its own process group, ready once /v1/models answers."""

    def __init__(self, path: str, log: Path):
        self.port = free_port()
        self.log = open(log, "w")
        cmd = [sys.executable, "-m", "backend.cli", "serve", path, "--prompt-template", TEMPLATE,
               "--port", str(self.port), "--device", "cpu"]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def wait_ready(self, timeout: float = 120.0) -> str:
        import openai

        client = openai.OpenAI(base_url=self.url, api_key="EMPTY", max_retries=0, timeout=5)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"ftstudio serve exited with {self.proc.returncode}; see {self.log.name}")
            try:
                return client.models.list().data[0].id
            except openai.APIConnectionError:
                time.sleep(0.2)
        raise SystemExit(f"ftstudio serve did not answer within {timeout:.0f} s; see {self.log.name}")

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def note(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def one_stream(client, model_id: str, new_tokens: int) -> tuple[float, int, float]:
    """(time to first token, completion tokens, total seconds) of one streamed chat completion."""
    t0, ttft, usage = time.perf_counter(), None, None
    stream = client.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": MESSAGE}], max_tokens=new_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and ttft is None:
            ttft = time.perf_counter() - t0
        if chunk.usage is not None:
            usage = chunk.usage
    total = time.perf_counter() - t0
    if usage is None:
        raise SystemExit("the server sent no usage with stream_options.include_usage")
    return ttft, usage.completion_tokens, total


def concurrent(url: str, model_id: str, clients: int, new_tokens: int) -> tuple[float, float, float, int]:
    """(aggregate tokens/s, mean time to first token, slowest time to first token, tokens) of
    ``clients`` streams started together, each with its own client."""
    import openai

    results, errors = [None] * clients, []
    start = threading.Barrier(clients + 1)

    def run(i):
        client = openai.OpenAI(base_url=url, api_key="EMPTY", max_retries=0, timeout=600)
        start.wait()
        try:
            results[i] = one_stream(client, model_id, new_tokens)
        except openai.APIError as e:
            errors.append(f"client {i}: {e}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise SystemExit("; ".join(errors))
    tokens = sum(r[1] for r in results)
    ttfts = [r[0] for r in results]
    return tokens / wall, statistics.mean(ttfts), max(ttfts), tokens


def single_streams(timers: dict, repeat: int) -> dict:
    """Median (time to first token, tokens/s) of each timer, run interleaved so that a change in
    the machine's load hits all of them alike."""
    for timer in timers.values():
        timer()  # warm-up
    rows = {name: [] for name in timers}
    for r in range(repeat):
        for name, timer in timers.items():
            rows[name].append(timer())
        note(f"single-stream round {r + 1}/{repeat} done")
    return {name: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs))
            for name, rs in rows.items()}


def print_single(res: dict, path: str, args, n_api: list[int], load_before: float) -> None:
    print(f"model {path}, {args.new_tokens} new tokens (API replies: {min(n_api)}-{max(n_api)} tokens), greedy, "
          f"{args.repeat} interleaved runs, median; load average {load_before:.1f} -> {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    plain_tps = res["plain generate"][1]
    for name, (ttft, tps) in res.items():
        print(f"  {name:<16} time to first token {1000 * ttft:7.1f} ms   {tps:7.1f} tokens/s   "
              f"({tps / plain_tps:.2f}x plain)")
    ratio = res["API stream"][1] / plain_tps
    print(f"  API / plain generate: {ratio:.2f}x (floor {FLOOR}x): {'ok' if ratio >= FLOOR else 'BELOW THE FLOOR'}")
    print("concurrent clients (each one stream, started together):", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--clients", default="1,4,8")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the server on a kill too
    import openai

    from bench_chat import build_model

    t_start, load_before = time.perf_counter(), os.getloadavg()[0]
    scratch = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    path = args.model or str(build_model(scratch / "model"))
    server = Server(path, scratch / "serve.log")  # loads while this process loads its own copy
    try:
        timers = in_process(path, args.new_tokens)
        model_id = server.wait_ready()
        note(f"serving {model_id} at {server.url}")
        client = openai.OpenAI(base_url=server.url, api_key="EMPTY", max_retries=0, timeout=600)
        n_api = []

        def api():
            ttft, n, total = one_stream(client, model_id, args.new_tokens)
            n_api.append(n)
            return ttft, n / total

        print_single(single_streams({**timers, "API stream": api}, args.repeat), path, args, n_api, load_before)
        one = None
        for c in (int(x) for x in args.clients.split(",")):
            agg, ttft_mean, ttft_max, tokens = concurrent(server.url, model_id, c, args.new_tokens)
            one = one or agg
            print(f"  {c} client{'s' if c > 1 else ' '}  aggregate {agg:7.1f} tokens/s ({agg / one:.2f}x one client)"
                  f"   time to first token mean {ttft_mean:6.2f} s, last {ttft_max:6.2f} s   ({tokens} tokens)",
                  flush=True)
    finally:
        server.stop()
    print("batched: no. The transformers engine runs one generation at a time per slot (--parallel 1 here);\n"
          "  concurrent requests wait in a fair FIFO queue, so aggregate tokens/s stays at one stream's rate\n"
          "  and time to first token grows with the queue. On a GPU, --engine vllm batches them.")
    print(f"bench took {time.perf_counter() - t_start:.0f} s; load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
