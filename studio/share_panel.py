"""The Chat tab's Share panel: scoped links to the model the tab has selected.

A link lets whoever holds it chat with that one model, in the embeddable
page (``/embed/#<token>``) or through the OpenAI-compatible ``/v1`` with the
same token as its API key, until it expires, runs out of requests or is
revoked. It opens nothing else of the studio. The handlers are module level
and take plain values (the studio's address is read off the request by a
thin wrapper in ``build``); ``ftstudio share`` calls the same backend
functions (``backend.serve.embed.create_link``, the credential store).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

import gradio as gr

from backend.serve.credentials import format_time
from backend.serve.embed import api_example, create_link, iframe_snippet, link_url

from .context import USER_ERRORS, StudioContext, error_md

EXPIRY_CHOICES = [("never", "never"), ("1 hour", "1h"), ("1 day", "1d"), ("7 days", "7d"), ("custom…", "custom")]
TABLE_HEADERS = ["id", "model", "label", "uses", "expires", "state"]
_HOST = re.compile(r"^[A-Za-z0-9.\-]+(:\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](:\d{1,5})?$")


@dataclass
class SharePanel:
    expiry: gr.Dropdown
    custom: gr.Textbox
    requests: gr.Number
    label: gr.Textbox
    create: gr.Button
    status: gr.Markdown
    link: gr.Textbox
    snippet: gr.Code
    example: gr.Code
    table: gr.Dataframe
    link_id: gr.Textbox
    revoke: gr.Button


def studio_url(headers: dict, url: str = "") -> str:
    """The address this browser reached the studio at (a proxy's forwarded host and scheme first)."""
    low = {str(k).lower(): str(v) for k, v in dict(headers or {}).items()}
    first = lambda name: low.get(name, "").split(",")[0].strip()  # noqa: E731
    parts = urlsplit(str(url or ""))
    host = first("x-forwarded-host") or first("host") or parts.netloc
    if not _HOST.match(host):
        host = "127.0.0.1:7860"  # a Host header no browser sends: a link to this machine instead
    scheme = "https" if first("x-forwarded-proto") == "https" or parts.scheme == "https" else "http"
    return f"{scheme}://{host}"


def _limit(value) -> int | None:
    """The request limit box: empty or 0 is no limit; else a whole number of at least 1."""
    if value in (None, "") or value == 0:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"request limit {value!r}: give a whole number (empty: no limit)") from None
    if not number.is_integer() or number < 1:
        raise ValueError(f"request limit {value!r}: give a whole number of at least 1 (empty: no limit)")
    return int(number)


def links_table(ctx: StudioContext) -> list[list]:
    """One row per link of this work directory, newest first."""
    try:
        links = ctx.credentials.list()
    except ValueError:  # a damaged store: the create/revoke message says so
        return []
    rows = []
    for c in sorted(links, key=lambda c: c.created, reverse=True):
        uses = f"{c.uses}/{c.request_limit}" if c.request_limit is not None else str(c.uses)
        rows.append([c.id, c.model, c.label, uses, format_time(c.expires), c.state()])
    return rows


def create(ctx: StudioContext, model, expiry, custom, requests, label, base_url: str):
    """Create a link for ``model``: (status, link, iframe snippet, API example, table). Nothing is stored
    unless the model spec passes the studio's guard."""
    try:
        duration = custom if expiry == "custom" else expiry
        cred, token = create_link(ctx.guard, ctx.credentials, str(model or ""), expires=duration,
                                  requests=_limit(requests), label=str(label or ""))
    except (*USER_ERRORS, ValueError) as exc:
        return error_md(exc), "", "", "", links_table(ctx)
    link = link_url(base_url, token)
    limit = f"{cred.request_limit} requests" if cred.request_limit else "no request limit"
    status = (f"Link **{cred.id}** for `{cred.model}`: expires {format_time(cred.expires)}, {limit}. "
              "Anyone holding it can chat with this model (and only this model) until it expires or you revoke "
              "it. **Copy it now: the token is shown only once.**")
    return (status, link, iframe_snippet(link, f"Chat with {cred.model}"), api_example(base_url, token, cred.model),
            links_table(ctx))


def revoke(ctx: StudioContext, link_id):
    """Revoke a link by id: (status, table)."""
    try:
        cred = ctx.credentials.revoke(str(link_id or "").strip())
    except ValueError as exc:
        return error_md(exc), links_table(ctx)
    return f"Link **{cred.id}** (`{cred.model}`) is revoked: its page and API key are refused from now on.", \
        links_table(ctx)


def build(ctx: StudioContext, model: gr.Dropdown) -> SharePanel:
    """The panel, under the chat; ``model`` is the Chat tab's model picker (the model a link opens)."""
    with gr.Accordion("Share: a link to chat with this model", open=False, elem_id="share"):
        gr.Markdown("A scoped link opens an embeddable chat page with the model selected above, and works as an "
                    "API key for `/v1` (OpenAI-compatible) with that model only. It reaches nothing else of the "
                    "studio. Links are kept hashed in the work directory; revoke one any time.")
        with gr.Row():
            expiry = gr.Dropdown(EXPIRY_CHOICES, value="never", label="Expires", scale=1, elem_id="share-expiry")
            custom = gr.Textbox(label="Expires after", placeholder="30m, 12h, 3d", visible=False, scale=1,
                                elem_id="share-custom")
            requests = gr.Number(value=None, precision=0, label="Request limit", info="empty: no limit", scale=1,
                                 elem_id="share-requests")
            label = gr.Textbox(label="Label", placeholder="who or what it is for", scale=2, elem_id="share-label")
            create_btn = gr.Button("Create link", variant="primary", scale=0, elem_id="share-create")
        status = gr.Markdown(elem_id="share-status")
        with gr.Column(visible=False) as shown:  # once a link is made
            link = gr.Textbox(label="Link", interactive=False, buttons=["copy"], elem_id="share-link")
            snippet = gr.Code(label="Embed it in a page", language="html", interactive=False, wrap_lines=True,
                              elem_id="share-snippet")
            example = gr.Code(label="Or use the same token as an API key", language="python", interactive=False,
                              elem_id="share-example")
        table = gr.Dataframe(value=lambda: links_table(ctx), headers=TABLE_HEADERS, interactive=False,
                             label="Links", elem_id="share-table")
        with gr.Row():
            link_id = gr.Textbox(label="Link id", placeholder="lk_…", scale=3, elem_id="share-id")
            revoke_btn = gr.Button("Revoke", variant="stop", scale=0, elem_id="share-revoke")
            refresh = gr.Button("↻", scale=0, elem_id="share-refresh")

    def share_create(model_spec, expires, custom_expiry, limit, text, request: gr.Request):
        try:
            ctx.require(request, "share")
        except USER_ERRORS as exc:
            return error_md(exc), "", "", "", links_table(ctx)
        return create(ctx, model_spec, expires, custom_expiry, limit, text,
                      studio_url(request.headers, getattr(request, "url", "")))

    def share_revoke(link_id, request: gr.Request):
        try:
            ctx.require(request, "share")
        except USER_ERRORS as exc:
            return error_md(exc), links_table(ctx)
        return revoke(ctx, link_id)

    expiry.change(lambda v: gr.update(visible=v == "custom"), expiry, custom)
    create_btn.click(share_create, [model, expiry, custom, requests, label],
                     [status, link, snippet, example, table], api_name="share_create") \
        .then(lambda made: gr.Column(visible=bool(made)), link, shown, api_visibility="private")
    revoke_btn.click(share_revoke, link_id, [status, table], api_name="share_revoke")
    refresh.click(lambda: links_table(ctx), None, table, api_name="share_list")
    return SharePanel(expiry, custom, requests, label, create_btn, status, link, snippet, example, table,
                      link_id, revoke_btn)
