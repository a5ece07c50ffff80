"""`ftstudio serve` for real: a subprocess with uvicorn, asked by the official
`openai` client (and raw httpx where a client would not send the request).

The served set: the demo model fine-tuned until it answers two rows of the
demo data (a run checkpoint spec, converted on first use), and the demo base
with two LoRA adapters on it (one PeftModel). The adapters have random weights
(peft's ``init_lora_weights=False``): LoRA does not move the random demo base
in a few steps, and switching adapters per request only needs two adapters
that answer differently; each is checked against its own reply from
``backend.chat`` loaded on its own."""

from __future__ import annotations

import dataclasses
import json
import queue
import shlex
import signal
import subprocess
import threading
import time

import httpx
import openai
import pytest

from backend.chat import GenerationSettings, ReplyStats, load_chat_model, prompt_ids, stream_text
from backend.core.artifacts import converted_dir
from backend.core.rundir import RunDir
from backend.demo import DEMO_DATA
from backend.serve.credentials import CredentialStore
from train_utils import FTSTUDIO, ftstudio

KEY = "sk-test-serve-0123456789"
ROWS = [json.loads(line) for line in DEMO_DATA.read_text(encoding="utf-8").splitlines()[:2]]
(Q1, A1), (Q2, A2) = [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in ROWS]
GREEDY = {"temperature": 0, "max_tokens": 80}


def until(condition, what: str, timeout: float = 120):
    """Wait for ``condition()`` to be true (the timeout only turns a hang into a failure)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model):
    """The demo model, fully fine-tuned on one question alone and a two-turn conversation, until it answers."""
    root = tmp_path_factory.mktemp("serve")
    data = root / "qa.jsonl"
    two_turns = {"messages": ROWS[0]["messages"] + ROWS[1]["messages"]}
    data.write_text("\n".join(json.dumps(r) for r in (ROWS[0], two_turns)) + "\n")
    ftstudio("train", "tiny_demo", f"data.path={data}", "training.epochs=100", "saving.save_steps=1000",
             "evaluation.inputs=[]", "--work-dir", root / "wd" / "qa", "--quiet", cwd=root, timeout=600, check=True)
    step, _ = RunDir(root / "wd" / "qa").iters()[-1]
    return root, f"qa/iter_{step}.pth"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model):
    """Two LoRA adapters (random weights) on the demo base, as peft saves them."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for seed, name in ((1, "a"), (2, "b")):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(tiny_model)
        config = LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"],
                            init_lora_weights=False)
        get_peft_model(base, config).save_pretrained(root / name)
        out[name] = root / name
    return out


class Server:
    """A running `ftstudio serve`: its URL (from the line it prints) and its log lines as they come."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.url, self.log = proc, None, []
        lines: queue.Queue = queue.Queue()

        def read_stdout():
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        def read_stderr():
            for line in proc.stderr:
                self.log.append(line)

        for reader in (read_stdout, read_stderr):
            threading.Thread(target=reader, daemon=True).start()
        while self.url is None:
            line = lines.get(timeout=600)
            if line is None:
                proc.wait()
                raise AssertionError(f"ftstudio serve exited {proc.returncode}:\n{''.join(self.log)[-4000:]}")
            if line.startswith("serving "):
                self.url = line.split(" at ")[1].split()[0]

    def client(self, key: str | None = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=key, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def server(trained, adapters):
    root, spec = trained
    proc = subprocess.Popen(
        [FTSTUDIO, "serve", "demo", spec, "--adapter", f"a={adapters['a']}", "--adapter", f"b={adapters['b']}",
         "--prompt-template", "qwen_chat", "--api-key", KEY, "--work-dir", root / "wd", "--port", "0",
         "--parallel", "2", "--max-queue", "6"],
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield Server(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def local(server, trained, adapters):
    """The same models loaded here by backend.chat, for the replies the server must equal."""
    root, spec = trained
    folder = converted_dir(root / "wd" / spec)  # converted by the server at start
    return {spec: load_chat_model(str(folder)), "demo": load_chat_model("demo", template="qwen_chat"),
            **{n: load_chat_model("demo", adapter=str(p), template="qwen_chat") for n, p in adapters.items()}}


def local_reply(chat, turns, max_new_tokens=80):
    stats = ReplyStats()
    text = "".join(stream_text(chat, prompt_ids(chat, turns), GenerationSettings(max_new_tokens=max_new_tokens,
                                                                                  temperature=0), stats=stats))
    return text, stats


def test_models_listed(server, trained):
    _, spec = trained
    client = server.client()
    assert {m.id for m in client.models.list()} == {"demo", spec, "a", "b"}
    assert client.models.retrieve(spec).id == spec


def test_trained_answer_whole_and_streamed_with_token_usage(server, trained, local):
    _, spec = trained
    client = server.client()
    r = client.chat.completions.create(model=spec, messages=[{"role": "user", "content": Q1}], **GREEDY)
    assert r.object == "chat.completion" and r.model == spec
    assert r.choices[0].message.content == A1 and r.choices[0].finish_reason == "stop"
    _, stats = local_reply(local[spec], [{"input": Q1}])
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (stats.prompt_tokens, stats.completion_tokens)
    assert r.usage.total_tokens == stats.prompt_tokens + stats.completion_tokens

    chunks = list(client.chat.completions.create(model=spec, messages=[{"role": "user", "content": Q1}], stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == A1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == stats.completion_tokens and not chunks[-1].choices


def test_stop_words_multi_turn_system_and_raw_completions(server, trained, local):
    _, spec = trained
    client = server.client()
    cut = A1[:A1.index("browser")]
    r = client.chat.completions.create(model=spec, messages=[{"role": "user", "content": Q1}], stop="browser",
                                       **GREEDY)
    assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model=spec, messages=[{"role": "user", "content": Q1}],
                                              stop=["nothing like it", "browser"], stream=True, **GREEDY)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == cut
    short = client.chat.completions.create(model=spec, messages=[{"role": "user", "content": Q1}], temperature=0,
                                           max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3

    turns = [{"role": "user", "content": Q1}, {"role": "assistant", "content": A1}, {"role": "user", "content": Q2}]
    assert client.chat.completions.create(model=spec, messages=turns, **GREEDY).choices[0].message.content == A2
    # a system message replaces the recorded system text: the prompt is the one chat builds with it
    system = [{"role": "system", "content": "Answer briefly."}, *turns[:1]]
    r = client.chat.completions.create(model=spec, messages=system, **GREEDY)
    chat = local[spec]
    _, stats = local_reply(dataclasses.replace(chat, system="Answer briefly."), [{"input": Q1}])
    assert r.usage.prompt_tokens == stats.prompt_tokens > local_reply(chat, [{"input": Q1}])[1].prompt_tokens

    prompt = chat.tokenizer.decode(prompt_ids(chat, [{"input": Q1}]))  # the training format, as raw text
    raw = client.completions.create(model=spec, prompt=prompt, **GREEDY)
    assert raw.object == "text_completion" and raw.choices[0].text == A1
    assert "".join(c.choices[0].text for c in client.completions.create(model=spec, prompt=prompt, stream=True,
                                                                       **GREEDY)) == A1


def test_adapters_switched_per_request_on_one_base(server, local):
    client = server.client()

    def ask(name):
        r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], temperature=0,
                                           max_tokens=16)
        return r.choices[0].message.content

    answers = {name: ask(name) for name in ("a", "b", "demo", "a")}
    for name, answer in answers.items():
        assert answer == local_reply(local[name], [{"input": "hi"}], 16)[0], name
    assert len(set(answers.values())) == 3  # each adapter (and the base) answers its own way
    # at the same time, in two slots, stepping in turns on the one model: still each its own answer
    got = {}
    threads = [threading.Thread(target=lambda n=n: got.__setitem__(n, ask(n))) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == {n: answers[n] for n in ("a", "b")}


def expect_error(status: int, call, param=None, code=None):
    with pytest.raises(openai.APIStatusError) as info:
        call()
    err = info.value
    assert err.status_code == status, err.body
    assert set(err.body) >= {"message", "type", "param", "code"}  # OpenAI's error shape
    if param is not None:
        assert err.param == param and param in err.message, err.body
    if code is not None:
        assert err.code == code, err.body
    return err


def test_error_statuses(server, trained):
    _, spec = trained
    client = server.client()

    def chat(messages=({"role": "user", "content": Q1},), **kw):
        return lambda: client.chat.completions.create(model=kw.pop("model", spec), messages=list(messages),
                                                      **{"max_tokens": 4, **kw})

    expect_error(404, chat(model="no/such-model"), code="model_not_found")
    for param, bad in [("temperature", 2.5), ("top_p", 0), ("max_tokens", 0), ("n", 2), ("stop", 5), ("seed", "x"),
                       ("stop", [""]), ("temperature", "hot")]:
        expect_error(400, chat(**{param: bad}), param=param)
    expect_error(400, chat(messages=[{"role": "robot", "content": "hi"}]), param="messages")
    expect_error(400, chat(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]),
                 param="messages")
    expect_error(400, chat(messages=[]), param="messages")
    expect_error(400, lambda: client.completions.create(model=spec, prompt=["one", "two"]), param="prompt")
    expect_error(400, chat(messages=[{"role": "user", "content": "hello " * 2000}]), code="context_length_exceeded")
    expect_error(400, chat(max_tokens=5000), code="context_length_exceeded")
    expect_error(401, lambda: server.client("sk-wrong").models.list(), code="invalid_api_key")
    bare = httpx.post(f"{server.url}/chat/completions", json={"model": spec, "messages": [{"role": "user",
                                                                                             "content": "hi"}]})
    assert bare.status_code == 401 and bare.json()["error"]["type"] == "authentication_error"
    junk = httpx.post(f"{server.url}/chat/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"})
    assert junk.status_code == 400 and junk.json()["error"]["message"]


def test_a_scoped_link_reaches_its_model_only_and_its_request_limit(server, trained):
    root, spec = trained
    _, token = CredentialStore(root / "wd").create(model=spec, label="test", request_limit=2)
    client = server.client(token)
    assert [m.id for m in client.models.list()] == [spec]
    other = expect_error(404, lambda: client.chat.completions.create(model="demo", messages=[
        {"role": "user", "content": "hi"}], max_tokens=2), code="model_not_found")
    unknown = expect_error(404, lambda: server.client().chat.completions.create(model="nope", messages=[
        {"role": "user", "content": "hi"}], max_tokens=2))
    assert other.message == unknown.message.replace("nope", "demo")  # nothing says the model exists
    for _ in range(2):
        client.chat.completions.create(model=spec, messages=[{"role": "user", "content": Q1}], max_tokens=2)
    expect_error(429, lambda: client.chat.completions.create(model=spec, messages=[{"role": "user", "content": Q1}],
                                                             max_tokens=2), code="insufficient_quota")


def test_eight_clients_stream_at_once(server, trained):
    _, spec = trained
    client, start, got = server.client(), threading.Barrier(8), []

    def one():
        start.wait()
        try:
            stream = client.chat.completions.create(model=spec, messages=[{"role": "user", "content": Q1}],
                                                    stream=True, **GREEDY)
            got.append("".join(c.choices[0].delta.content or "" for c in stream))
        except openai.APIError as exc:  # shown in the assertion, not lost as a thread's warning
            got.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [A1] * 8


def long_stream(client, wait_for_text: bool = True):
    """(stream, reply id) of a completion of 900 tokens with no end before (min_tokens): far longer than
    anything the tests wait for. With ``wait_for_text``, once its first text arrived (it holds a slot)."""
    stream = client.completions.create(model="demo", prompt="Hello", max_tokens=900, temperature=0, stream=True,
                                       extra_body={"min_tokens": 900})
    if not wait_for_text:
        return stream, None
    chunks = iter(stream)
    first = next(chunks)
    while not first.choices[0].text:
        first = next(chunks)
    return stream, first.id


def test_full_queue_is_429_and_waiting_clients_that_leave_free_their_places(server, trained):
    _, spec = trained
    client = server.client()
    streams = [long_stream(client, wait_for_text=False)[0] for _ in range(8)]  # 2 slots + 6 places: each call
    expect_error(429, lambda: client.chat.completions.create(  # returns once the server has queued it
        model=spec, messages=[{"role": "user", "content": Q1}], max_tokens=2), code="rate_limit_exceeded")
    for stream in streams:
        stream.close()

    def accepted():
        try:
            client.completions.create(model="demo", prompt="Hi", max_tokens=1, stream=True).close()
            return True
        except openai.RateLimitError:
            return False

    until(accepted, "a queue place once the clients left")


def test_a_client_that_leaves_mid_stream_frees_its_slot(server, trained):
    """Both slots run twin long replies and one client leaves: the next request gets its slot and finishes
    while the twin still runs. The server's notes say so: the twin, closed only after the next request
    finished, was cut short, so the left one (started with it, as long) could not have finished either."""
    _, spec = trained
    client = server.client()
    (gone, gone_id), (twin, twin_id) = long_stream(client), long_stream(client)
    gone.close()
    nxt = client.chat.completions.create(model=spec, messages=[{"role": "user", "content": Q1}], stream=True,
                                         **GREEDY)
    assert "".join(c.choices[0].delta.content or "" for c in nxt) == A1
    twin.close()

    def stopped_after(reply_id):
        note = f"{reply_id} (demo): cancelled, the client left; stopped after "
        until(lambda: any(note in x for x in server.log), f"the server's note that {reply_id} was cancelled")
        return next(int(x.split(note)[1].split()[0]) for x in server.log if note in x)

    assert stopped_after(gone_id) < 900 and stopped_after(twin_id) < 900


def test_refusals_are_one_line(tmp_path, tiny_model):
    """Bad input before anything is served: exit 2, one line naming the problem, no traceback."""
    cases = {
        ("demo", "--prompt-template", "qwen_chat", "--host", "0.0.0.0"): "refusing to listen on 0.0.0.0 without a key",
        (str(tmp_path / "missing"), "--prompt-template", "qwen_chat"): "no such folder",
        ("demo",): "no prompt template recorded with demo",
        ("demo", "--api-key-file", str(tmp_path / "nokeys")): "--api-key-file",
        ("nobody/no-such-model", "--prompt-template", "qwen_chat"): "nobody/no-such-model",
        ("demo", "demo", "--prompt-template", "qwen_chat"): "given twice",
    }
    procs = {args: subprocess.Popen([FTSTUDIO, "serve", *args, "--port", "0", "--work-dir", tmp_path / "wd"],
                                    cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for args in cases}
    for args, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (args, out, err)
        assert "Traceback" not in err and not out, (args, err)
        last = err.strip().splitlines()[-1]
        assert last.startswith("ftstudio serve: error: ") and cases[args] in last, (args, err)


def test_sigterm_stops_the_server_cleanly(server):
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=60) == 0
    assert not any("Traceback" in line for line in server.log), "".join(server.log)


def test_vllm_engine_builds_its_command_from_the_same_specs(adapters, tmp_path, tiny_model):
    """--engine vllm: the base, its adapters and the training chat template become `vllm serve`'s arguments
    (printed before it starts); vLLM cannot run here, which is one line too."""
    proc = subprocess.run([FTSTUDIO, "serve", "demo", "--adapter", f"a={adapters['a']}", "--adapter",
                           f"b={adapters['b']}", "--engine", "vllm", "--port", "8123", "--work-dir", tmp_path],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "ftstudio serve: error: vllm is not installed here: pip install " \
        "vllm on a GPU box (or use --engine transformers)"
    started = next(line for line in proc.stdout.splitlines() if line.startswith("starting "))
    cmd = shlex.split(started.removeprefix("starting "))
    assert cmd[:3] == ["vllm", "serve", str(tiny_model)]
    assert cmd[cmd.index("--served-model-name") + 1] == "demo" and cmd[cmd.index("--port") + 1] == "8123"
    assert cmd[cmd.index("--chat-template") + 1].endswith("chat_template.jinja")
    modules = [json.loads(m) for m in cmd[cmd.index("--lora-modules") + 1:]]
    assert [(m["name"], m["path"]) for m in modules] == [("a", str(adapters["a"])), ("b", str(adapters["b"]))]
