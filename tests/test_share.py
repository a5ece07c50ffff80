"""The studio's /v1 API, its share links and the embeddable chat page, through
real parts: the official ``openai`` client, ``gradio_client`` logged in, the
``ftstudio share`` command, raw HTTP, and headless Chromium showing the page
inside an <iframe> of a page served from another origin. The studio runs with
a login (--auth) and a full API key, as it would when shared; the demo model
is untrained, which is fine: greedy replies are deterministic.

Attacked: a link's token must open its one model and nothing else (no studio
page, Gradio endpoint, file or config, no other model), in no other form (query
string, other Authorization schemes, Gradio's cookie), and not at all once
revoked, expired or used up; share create refuses model specs outside the
studio's roots before storing anything.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest
from gradio_client import Client
from playwright.sync_api import expect, sync_playwright

from backend.chat import GenerationSettings, load_chat_model, reply
from backend.serve.embed import PAGE_SETTINGS
from studio.serving import open_access

from studio_utils import ROOT, running_studio, wait_for

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
KEY = "sk-test-full-key-0123456789"
USER, PASSWORD = "ada", "lovelace-1843"
QUESTION = "What is Finetune Studio?"
TOKEN = re.compile(r"fts_[A-Za-z0-9_-]{20,}")


@pytest.fixture(scope="module")
def studio(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("share")
    work, outside = root / "work", root / "outside"
    work.mkdir()
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    (work / "link_out").symlink_to(outside)
    with running_studio(work, "--auth", f"{USER}:{PASSWORD}", "--api-key", KEY) as (url, _):
        client = Client(url, auth=(USER, PASSWORD), verbose=False)
        yield {"url": url, "work": work, "outside": outside, "client": client}


@pytest.fixture(scope="module")
def expected(tiny_model):
    """backend.chat's own greedy reply on the same model, the template the Chat tab uses for it."""
    chat = load_chat_model(str(tiny_model), template="qwen_chat", device="cpu")
    return lambda text, n, history=(): reply(chat, list(history), text,
                                             GenerationSettings(max_new_tokens=n, temperature=0.0))


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    expect.set_options(timeout=60_000)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=ARGS,
                                     env={**os.environ, "HOME": str(tmp_path_factory.mktemp("home"))})
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def host_site(tmp_path_factory):
    """Another origin (a plain http.server on its own port) that pages embedding a link are put on."""
    folder = tmp_path_factory.mktemp("site")
    quiet = type("Quiet", (SimpleHTTPRequestHandler,), {"log_message": lambda *a: None})
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(quiet, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def put(name: str, body: str) -> str:
        (folder / name).write_text(f"<!doctype html><html><body><h1>A blog</h1>{body}</body></html>")
        return f"http://127.0.0.1:{server.server_port}/{name}"

    yield put
    server.shutdown()


def share_create(studio, model="demo", expiry="never", custom="", requests=None, label=""):
    return studio["client"].predict(model, expiry, custom, requests, label, api_name="/share_create")


def new_link(studio, **kw) -> tuple[str, str]:
    """(link, token) of a link made through the studio's Gradio API, as the Share panel makes it."""
    status, link, snippet, example, _ = share_create(studio, **kw)
    assert link.startswith(studio["url"] + "embed/#fts_"), status
    token = link.split("#", 1)[1]
    assert f'src="{link}"' in snippet and token in example
    return link, token


def cli_share(studio, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "backend.cli", "share", *args, "--work-dir", str(studio["work"])],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def links(studio) -> dict[str, list]:
    table = studio["client"].predict(api_name="/share_list")
    return {row[0]: row for row in table["data"]}


def fetch(url: str, method="GET", headers=None, body: bytes | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def api(studio, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=studio["url"] + "v1", api_key=key, max_retries=0, timeout=120)


# --- the API with a full key ------------------------------------------------------------------


def test_openai_client_against_the_studio(studio, expected):
    client = api(studio, KEY)
    assert "demo" in [m.id for m in client.models.list().data]
    want = expected(QUESTION, 24)
    messages = [{"role": "user", "content": QUESTION}]
    whole = client.chat.completions.create(model="demo", messages=messages, max_tokens=24, temperature=0)
    assert whole.choices[0].message.content == want
    assert whole.usage.completion_tokens > 0 and whole.usage.prompt_tokens > 0
    stream = client.chat.completions.create(model="demo", messages=messages, max_tokens=24, temperature=0,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want
    with pytest.raises(openai.AuthenticationError):
        api(studio, "sk-wrong").models.list()
    with pytest.raises(openai.NotFoundError):  # outside the studio's roots: not a model it has
        client.chat.completions.create(model=str(studio["outside"]), messages=messages, max_tokens=2)
    (studio["work"] / "notes").mkdir()
    (studio["work"] / "notes" / "todo.txt").write_text("not a model")
    with pytest.raises(openai.BadRequestError) as caught:  # one it may read but cannot load: why, in words
        client.chat.completions.create(model="notes", messages=messages, max_tokens=2)
    assert "notes cannot be loaded" in str(caught.value) and "Traceback" not in str(caught.value)


def test_v1_is_open_only_on_a_local_studio_without_login(tmp_path, capsys):
    assert open_access("127.0.0.1", None) and open_access("localhost", None)
    assert not open_access("127.0.0.1", [(USER, PASSWORD)])
    assert not open_access("0.0.0.0", None) and not open_access("192.168.1.5", None)
    from studio.app import main

    assert main(["--api-key-file", str(tmp_path / "none"), "--work-dir", str(tmp_path)]) == 2
    said = capsys.readouterr().err
    assert "--api-key-file" in said and "no such file" in said and "Traceback" not in said


# --- links in the page ------------------------------------------------------------------------


def test_link_in_an_iframe_on_another_site_streams_a_reply(studio, browser, host_site, expected):
    link, token = new_link(studio, label="blog")
    assert new_link(studio, label="unused")[1] != token  # every link its own token
    page = browser.new_page()
    streams = []
    page.on("response", lambda r: streams.append(r) if r.url.endswith("/v1/chat/completions") else None)
    page.goto(host_site("blog.html", f'<iframe src="{link}" width="420" height="600"></iframe>'))
    frame = page.frame_locator("iframe")
    expect(frame.locator("body")).to_have_attribute("data-state", "ready")
    expect(frame.locator("#title")).to_have_text("Chat with demo")
    frame.locator("#input").fill(QUESTION)
    frame.locator("#input").press("Enter")
    expect(frame.locator(".assistant.done")).to_have_count(1)
    expect(frame.locator("body")).to_have_attribute("data-state", "ready")
    response = streams[0]
    assert response.status == 200 and response.headers["content-type"].startswith("text/event-stream")
    sent = "".join((json.loads(line[5:])["choices"] or [{}])[0].get("delta", {}).get("content") or ""
                   for line in response.text().splitlines() if line.startswith("data:") and "[DONE]" not in line)
    first = expected(QUESTION, PAGE_SETTINGS["max_tokens"])  # the page asks with the Chat tab's defaults (greedy)
    assert frame.locator(".assistant.done").inner_text() == sent == first
    frame.locator("#input").fill("And then?")  # a second turn goes with the conversation so far
    frame.locator("#send").click()
    expect(frame.locator(".assistant.done")).to_have_count(2)
    assert len(json.loads(streams[1].request.post_data)["messages"]) == 3
    second = expected("And then?", PAGE_SETTINGS["max_tokens"], [{"input": QUESTION, "output": first}])
    expect(frame.locator(".assistant.done").nth(1)).to_have_text(second)
    page.close()
    row = next(r for r in links(studio).values() if r[2] == "blog")
    assert row[3] == "2" and row[5] == "active"


def test_expired_and_revoked_links_are_refused_in_the_page(studio, browser, host_site):
    made = cli_share(studio, "create", "demo", "--expires", "2s", "--label", "short", "--url", studio["url"])
    assert made.returncode == 0, made.stderr
    expired = TOKEN.search(made.stdout).group(0)
    assert f"{studio['url']}embed/#{expired}" in made.stdout
    _, revoked = new_link(studio, label="to revoke")
    revoked_id = next(r[0] for r in links(studio).values() if r[2] == "to revoke")
    said, _ = studio["client"].predict(revoked_id, api_name="/share_revoke")
    assert "revoked" in said
    short_id = next(r[0] for r in links(studio).values() if r[2] == "short")
    assert wait_for(lambda: links(studio)[short_id][5] == "expired", timeout=30)
    listed = cli_share(studio, "list")
    assert re.search(rf"{short_id}\s+expired", listed.stdout) and re.search(rf"{revoked_id}\s+revoked", listed.stdout)

    page = browser.new_page()
    base = studio["url"] + "embed/#"
    page.goto(host_site("dead.html", f'<iframe id="a" src="{base}{expired}"></iframe>'
                                     f'<iframe id="b" src="{base}{revoked}"></iframe>'
                                     f'<iframe id="c" src="{base}fts_made-up-token-0000000000000"></iframe>'))
    for frame_id, words in (("a", "expired"), ("b", "revoked"), ("c", "invalid API key")):
        frame = page.frame_locator(f"#{frame_id}")
        expect(frame.locator("#error")).to_contain_text(words)
        expect(frame.locator("#form")).to_be_hidden()
        expect(frame.locator("body")).to_have_attribute("data-state", "refused")
    page.close()
    for token in (expired, revoked):
        with pytest.raises(openai.AuthenticationError):
            api(studio, token).chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}])


def test_a_link_from_the_command_line_works_as_an_api_key(studio):
    made = cli_share(studio, "create", "demo", "--requests", "1", "--label", "cli", "--url", studio["url"])
    assert made.returncode == 0, made.stderr
    client = api(studio, TOKEN.search(made.stdout).group(0))
    messages = [{"role": "user", "content": "hi"}]
    assert client.chat.completions.create(model="demo", messages=messages, max_tokens=2).choices
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="demo", messages=messages, max_tokens=2)
    assert re.search(r"used up\s+uses 1/1 .* demo  \(cli\)", cli_share(studio, "list").stdout)


def test_embed_page_is_framable_and_alone(studio):
    with urllib.request.urlopen(studio["url"] + "embed/") as r:  # no login needed: it holds no secret
        csp, page = r.headers["Content-Security-Policy"], r.read().decode()
    assert "frame-ancestors *" in csp and "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert "<script src" not in page and "<link" not in page  # self-contained
    for path in ("embed/x", "embed/../config", "embed/index.html"):
        status, body = fetch(studio["url"] + path)
        assert status in (401, 404) and "fts_" not in body, (path, status)


# --- what a link's token reaches --------------------------------------------------------------


def test_a_link_opens_one_model_and_nothing_of_the_studio(studio):
    _, token = new_link(studio, label="scoped")
    client = api(studio, token)
    assert [m.id for m in client.models.list().data] == ["demo"]
    messages = [{"role": "user", "content": "hi"}]
    for other in ("demo2", str(studio["outside"]), "../outside", "link_out", "Qwen/Qwen2.5-0.5B"):
        with pytest.raises(openai.NotFoundError) as caught:
            client.chat.completions.create(model=other, messages=messages, max_tokens=2)
        assert other in str(caught.value) and "not found" in str(caught.value)
    bearer = {"Authorization": f"Bearer {token}"}
    call = json.dumps({"data": ["hi", [], [], "demo", "qwen_chat", "", False, 0.0, 0.75, 40, 8, 1.0]}).encode()
    secret = studio["work"] / ".serve" / "credentials.json"
    attempts = [("GET", "", None), ("GET", "config", None), ("GET", "gradio_api/info", None),
                ("POST", "gradio_api/call/chat_send", call), ("POST", "gradio_api/call/train_launch", call),
                ("POST", "gradio_api/call/share_create", call), ("POST", "gradio_api/call/share_revoke", call),
                ("GET", f"gradio_api/file={secret}", None), ("GET", "gradio_api/file=/etc/passwd", None),
                ("POST", "gradio_api/queue/join", call), ("POST", "gradio_api/upload", b"x"),
                ("POST", "gradio_api/run/chat_send", call)]
    for headers in (bearer, {"Cookie": f"access-token={token}"}, {"Authorization": f"Basic {token}"}):
        for method, path, body in attempts:
            status, text = fetch(studio["url"] + path, method, {**headers, "Content-Type": "application/json"}, body)
            if path == "":  # the page: Gradio's login form, as to anyone
                assert status == 200 and '"auth_required":true' in text and "Work directory" not in text
            else:
                assert status in (401, 403, 404, 405), (headers, path, status, text[:200])
            assert "sha256" not in text and "root:x:0" not in text, (path, text[:200])
    # the full key is for /v1 only, too
    status, _ = fetch(studio["url"] + "gradio_api/info", headers={"Authorization": f"Bearer {KEY}"})
    assert status == 401


def test_tokens_count_only_as_bearer_headers(studio):
    _, token = new_link(studio, label="forms")
    models = studio["url"] + "v1/models"
    assert fetch(models, headers={"Authorization": f"Bearer {token}"})[0] == 200
    basic = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()  # the studio's login
    for url, headers in ((f"{models}?api_key={token}", {}), (f"{models}?token={token}", {}),
                         (f"{models}?key={token}", {}),
                         (models, {"Authorization": basic}),
                         (models, {"Authorization": f"Token {token}"}), (models, {"Authorization": token}),
                         (models, {"Authorization": f"Bearer {token}x"}), (models, {"X-Api-Key": token}),
                         (models, {"Cookie": f"token={token}"})):
        status, text = fetch(url, headers=headers)
        assert status == 401, (url, headers, status, text)
        assert json.loads(text)["error"]["type"] == "authentication_error"
    # logged in to the studio (Gradio's cookie) is not a key for /v1
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
    form = f"username={USER}&password={PASSWORD}".encode()
    opener.open(urllib.request.Request(studio["url"] + "login", data=form), timeout=30)
    with pytest.raises(urllib.error.HTTPError) as refused:
        opener.open(models, timeout=30)
    assert refused.value.code == 401


def test_request_limit_gives_429_and_counts_uses(studio):
    _, token = new_link(studio, requests=2, label="limited")
    client = api(studio, token)
    messages = [{"role": "user", "content": "hi"}]
    for _ in range(2):
        assert client.chat.completions.create(model="demo", messages=messages, max_tokens=3).choices
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="demo", messages=messages, max_tokens=3)
    assert "2 requests" in str(caught.value)
    row = next(r for r in links(studio).values() if r[2] == "limited")
    assert row[3] == "2/2" and row[5] == "used up"
    with pytest.raises(openai.RateLimitError):  # listing counts no use, but a used-up link is refused there too
        client.models.list()


def test_share_create_refuses_models_outside_the_roots(studio):
    before = links(studio)
    outside = studio["outside"]
    (studio["work"] / "uploads" / "evil").mkdir(parents=True)
    (studio["work"] / "uploads" / "evil" / "config.json").write_text("{}")
    for spec in (str(outside), "../outside", "link_out", "/etc", "nope/iter_1.pth", f"{outside}/../outside",
                 "uploads/evil", ""):
        status, link, snippet, example, _ = share_create(studio, model=spec, label="evil")
        assert status.startswith("**Error:**") and link == snippet == example == "", (spec, status)
    for spec in (str(outside), "../outside", "link_out"):  # the command line applies the studio's rule
        made = cli_share(studio, "create", spec)
        assert made.returncode == 2 and "outside the folders" in made.stderr and not TOKEN.search(made.stdout), made
    for bad in ({"expiry": "custom", "custom": "soon"}, {"expiry": "custom", "custom": "-1h"},
                {"requests": -3}):
        status, link, *_ = share_create(studio, label="bad", **bad)
        assert status.startswith("**Error:**") and not link, (bad, status)
    assert links(studio) == before, "a refused link was stored"
    gone = cli_share(studio, "revoke", "lk_00000000")
    assert gone.returncode == 2 and "no link with id" in gone.stderr
