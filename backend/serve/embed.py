"""The embeddable chat page a share link opens, and the link itself.

A share link is ``<studio>/embed/#<token>``: the token sits in the URL
fragment, which browsers never send to a server, so it stays out of access
logs, proxies and Referer headers. The page is one self-contained HTML file
(no external script, style or font: it must work inside any site's iframe and
offline). Its script reads the token from ``location.hash``, asks ``/v1/models``
which one model the link opens, and streams ``/v1/chat/completions`` over
fetch (server-sent events) with the conversation so far, with the Chat tab's
default settings (greedy, 128 new tokens: a link answers as the Chat tab
does). A refusal (401 expired or revoked, 429 used up) is shown in words in
place of the chat.

Headers: any site may frame the page (``frame-ancestors *``, the point of an
embed); everything else is locked down (only this page's own inline script
and style, by hash; requests only to its own origin; no forms, no base URL).
Nothing else is served under ``/embed``.

``create_link`` is what the studio's Share panel and ``ftstudio share create``
both call: the model spec passes the caller's guard (``catalog.resolve``)
before anything is stored.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import shlex

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

EMBED_PATH = "/embed"
PAGE_SETTINGS = {"temperature": 0, "max_tokens": 128}  # the Chat tab's defaults (temperature 0 = greedy)

_STYLE = """
:root { color-scheme: light dark; font: 15px/1.45 system-ui, sans-serif; }
body { margin: 0; display: flex; flex-direction: column; height: 100vh; }
header { padding: 8px 12px; font-weight: 600; border-bottom: 1px solid #8884; overflow: hidden;
  text-overflow: ellipsis; white-space: nowrap; }
#log { flex: 1; overflow-y: auto; padding: 12px; display: flex; flex-direction: column; gap: 8px; }
.msg { max-width: 85%; padding: 6px 10px; border-radius: 10px; white-space: pre-wrap; overflow-wrap: anywhere; }
.user { align-self: flex-end; background: #3b82f633; }
.assistant { align-self: flex-start; background: #8882; }
.assistant:empty::after { content: "\\2026"; opacity: .6; }
#error { margin: 12px; padding: 10px 12px; border-radius: 8px; background: #ef444433; }
form { display: flex; gap: 6px; padding: 8px; border-top: 1px solid #8884; }
textarea { flex: 1; resize: none; font: inherit; padding: 6px; }
button { font: inherit; padding: 6px 14px; }
[hidden] { display: none !important; }
"""

_SCRIPT = r"""
"use strict";
const $ = (id) => document.getElementById(id);
const api = new URL("../v1/", location.href);
const token = decodeURIComponent(location.hash.slice(1));
const settings = __SETTINGS__;
const messages = [];
let model = null, running = null;

function setState(state) { document.body.dataset.state = state; }

function refuse(text, fatal) {
  $("error").textContent = text;
  $("error").hidden = false;
  if (fatal) { $("log").hidden = true; $("form").hidden = true; setState("refused"); }
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (e) { /* not JSON */ }
  return "the server answered " + response.status;
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("log").appendChild(div);
  div.scrollIntoView({block: "end"});
  return div;
}

function headers() {
  return {"Authorization": "Bearer " + token, "Content-Type": "application/json"};
}

async function start() {
  if (!token) { refuse("This link is incomplete: the access token after '#' is missing.", true); return; }
  let response;
  try {
    response = await fetch(new URL("models", api), {headers: headers()});
  } catch (e) { refuse("The server cannot be reached.", true); return; }
  if (!response.ok) { refuse(await errorText(response), true); return; }
  const listed = (await response.json()).data || [];
  if (!listed.length) { refuse("This link opens no model.", true); return; }
  model = listed[0].id;
  $("title").textContent = "Chat with " + model;
  $("input").disabled = false;
  $("send").disabled = false;
  $("input").focus();
  setState("ready");
}

async function readStream(response, out) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", reply = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return reply;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, end).replace(/\r$/, "");
      buffer = buffer.slice(end + 1);
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") return reply;
      const event = JSON.parse(data);
      if (event.error) throw new Error(event.error.message || "the reply failed");
      const delta = event.choices && event.choices[0] && event.choices[0].delta;
      if (delta && delta.content) { reply += delta.content; out.textContent = reply; }
    }
  }
}

async function send(text) {
  $("error").hidden = true;
  messages.push({role: "user", content: text});
  bubble("user", text);
  const out = bubble("assistant", "");
  running = new AbortController();
  $("send").textContent = "Stop";
  setState("busy");
  try {
    const response = await fetch(new URL("chat/completions", api), {
      method: "POST", headers: headers(), signal: running.signal,
      body: JSON.stringify(Object.assign({model: model, messages: messages, stream: true}, settings))});
    if (!response.ok) {
      messages.pop(); out.remove();
      refuse(await errorText(response), response.status === 401);
      return;
    }
    const reply = await readStream(response, out);
    messages.push({role: "assistant", content: reply});
    out.classList.add("done");
  } catch (e) {
    if (e.name === "AbortError") {
      messages.push({role: "assistant", content: out.textContent});
      out.classList.add("done");
    } else {
      messages.pop(); out.remove();
      refuse(e.message || String(e), false);
    }
  } finally {
    running = null;
    $("send").textContent = "Send";
    if (document.body.dataset.state === "busy") setState("ready");
  }
}

$("form").addEventListener("submit", (event) => {
  event.preventDefault();
  if (running) { running.abort(); return; }
  const text = $("input").value.trim();
  if (!text || !model) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("form").requestSubmit(); }
});
start();
""".replace("__SETTINGS__", json.dumps(PAGE_SETTINGS))

_PAGE = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>Chat</title>
<style>{_STYLE}</style>
</head>
<body data-state="loading">
<header id="title">Chat</header>
<div id="error" role="alert" hidden></div>
<main id="log" aria-live="polite"></main>
<form id="form">
<textarea id="input" rows="2" placeholder="Ask something…" aria-label="Message" disabled></textarea>
<button id="send" type="submit" disabled>Send</button>
</form>
<script>{_SCRIPT}</script>
</body>
</html>
"""


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode() + "'"


HEADERS = {
    "Content-Security-Policy": (f"default-src 'none'; script-src {_csp_hash(_SCRIPT)}; style-src {_csp_hash(_STYLE)}; "
                                "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors *"),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


async def _page(request: Request) -> HTMLResponse:
    return HTMLResponse(_PAGE, headers=HEADERS)


def create_embed_app() -> Starlette:
    """The page at ``/`` of this app (mount it at ``/embed``); every other path is a 404."""
    return Starlette(routes=[Route("/", _page, methods=["GET", "HEAD"])])


# --- links -------------------------------------------------------------------------------


def link_url(studio_url: str, token: str) -> str:
    """The share link: the embed page with the token in the fragment."""
    return f"{studio_url.rstrip('/')}{EMBED_PATH}/#{token}"


def iframe_snippet(link: str, title: str = "Chat") -> str:
    """HTML to paste into a page that shows the chat."""
    return (f'<iframe src="{html.escape(link, quote=True)}" title="{html.escape(title, quote=True)}" '
            'width="420" height="600" style="border: 1px solid #ccc; border-radius: 8px"></iframe>')


def api_example(studio_url: str, token: str, model: str) -> str:
    """The same token as an API key: the official openai client, and curl."""
    base = f"{studio_url.rstrip('/')}/v1"
    body = shlex.quote(json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello"}]}))
    return (f"from openai import OpenAI\n\n"
            f"client = OpenAI(base_url={base!r}, api_key={token!r})\n"
            f"reply = client.chat.completions.create(model={model!r},\n"
            f"                                       messages=[{{'role': 'user', 'content': 'Hello'}}])\n"
            f"print(reply.choices[0].message.content)\n\n"
            f"# or: curl {base}/chat/completions -H 'Authorization: Bearer {token}' \\\n"
            f"#       -H 'Content-Type: application/json' -d {body}\n")


def create_link(guard, store, model: str, *, expires: str | None = None, requests: int | None = None,
                label: str = ""):
    """A new scoped link for ``model`` (a Chat tab model spec), checked through ``guard`` first:
    (credential, token). Raises what the guard, the catalog or the store raise for a bad value."""
    from . import catalog
    from .credentials import parse_duration

    spec = str(model or "").strip()
    if not spec:
        raise ValueError("model: pick the model this link may chat with")
    expires_in = parse_duration(expires)
    catalog.resolve(guard, spec)  # refused here: outside the roots, not our run, no such export
    return store.create(model=spec, label=label, expires_in=expires_in, request_limit=requests)
