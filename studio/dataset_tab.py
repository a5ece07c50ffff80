"""Dataset tab: source -> raw rows -> map_fn -> conversations -> one sample
through the template and tokenizer (trained tokens marked) -> token lengths
against max_length. Every handler calls ``backend.preview``."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
import pandas as pd

from backend import preview
from backend.data import MAP_FNS, TEMPLATES, add_template_tokens, load_tokenizer
from backend.demo import resolve_model

from .context import USER_ERRORS as STUDIO_USER_ERRORS
from .context import StudioContext, error_md

PAGE_SIZE = 10
CONV_HEADERS = ["row", "turn", "system", "input", "output"]


def conversation_table(items: list[dict] | None) -> pd.DataFrame | None:
    if items is None:
        return None
    rows = [[it["row"], t, turn.get("system", ""), turn.get("input", ""), turn.get("output", "")]
            for it in items for t, turn in enumerate(it["conversation"])]
    return pd.DataFrame(rows, columns=CONV_HEADERS)
USER_ERRORS = (*STUDIO_USER_ERRORS, ValueError, TypeError)  # TypeError: API callers may send any value


@dataclass
class DatasetTab:
    source: gr.Textbox
    subset: gr.Textbox
    split: gr.Textbox
    map_fn: gr.Dropdown
    template: gr.Dropdown
    max_length: gr.Number
    add_tokens: gr.Checkbox
    use: gr.Button
    load_on_start: object  # (app) -> None: show the current source when a page opens


_tokenizers: dict = {}


def tokenizer_for(ctx: StudioContext, name: str, add_tokens_of: str | None = None):
    """The previewed tokenizer; with ``add_tokens_of`` a template, as training would
    extend it (model.add_template_tokens)."""
    name = ctx.guard.model(name or "demo", "tokenizer")
    key = (name, add_tokens_of)
    if key not in _tokenizers:
        _tokenizers.clear()  # keep one: the one being previewed
        _tokenizers[key] = load_tokenizer(resolve_model(name), trust_remote_code=False)
        if add_tokens_of:
            add_template_tokens(_tokenizers[key], add_tokens_of)
    return _tokenizers[key]


def build(ctx: StudioContext) -> DatasetTab:
    custom = ctx.allow_custom_code
    gr.Markdown("Pick a dataset and see exactly what the model will be trained on. Green text is what the "
                "loss is computed on; the rest is the prompt around it.")
    with gr.Row():
        source = gr.Textbox(value="demo", label="Dataset", scale=4, elem_id="ds-source",
                            info="Hub id (tatsu-lab/alpaca), a file or folder under the work directory, or 'demo'")
        subset = gr.Textbox(value="", label="Config name", scale=1, info="Hub datasets with several configs")
        split = gr.Textbox(value="train", label="Split", scale=1)
        upload = gr.UploadButton("Upload…", scale=1, file_types=[".json", ".jsonl", ".csv", ".tsv", ".parquet",
                                                                ".txt", ".arrow"])
        load_btn = gr.Button("Load", variant="primary", scale=1, elem_id="ds-load")
    status = gr.Markdown(elem_id="ds-status")
    with gr.Row():
        prev_btn = gr.Button("◀ Prev", size="sm", scale=0)
        page = gr.Number(value=1, precision=0, label="Page", minimum=1, scale=0, min_width=90)
        next_btn = gr.Button("Next ▶", size="sm", scale=0)
        page_info = gr.Markdown()
    table = gr.Dataframe(label="Raw rows", interactive=False, wrap=True, max_height=360, elem_id="ds-rows")

    map_names = sorted(MAP_FNS)
    with gr.Row():
        map_fn = gr.Dropdown(choices=map_names, value=None, label="map_fn", allow_custom_value=custom, scale=2,
                             elem_id="ds-mapfn",
                             info="preselected from the columns" + ("; or file.py:function" if custom else ""))
        map_reason = gr.Markdown()
    conversations = gr.Dataframe(headers=CONV_HEADERS, label="These rows after the map_fn, one line per turn",
                                 interactive=False, wrap=True, max_height=360, elem_id="ds-conversations")

    with gr.Row():
        tokenizer = gr.Textbox(value="demo", label="Tokenizer", info="the base model's: Hub id, folder or 'demo'")
        template = gr.Dropdown(choices=sorted(TEMPLATES), value="qwen_chat", label="Template")
        max_length = gr.Number(value=256, precision=0, minimum=8, label="max_length")
        row = gr.Number(value=0, precision=0, minimum=0, label="Sample row")
        add_tokens = gr.Checkbox(value=False, label="Add missing template tokens", elem_id="ds-add-tokens",
                                 info="for a base model without the template's markers (trains the new rows)")
        render_btn = gr.Button("Render", scale=0)
    sample = gr.HighlightedText(label="Sample as the model sees it", color_map={preview.TRAINED: "green"},
                                show_legend=True, combine_adjacent=True, elem_id="ds-sample")
    stats = gr.Markdown(elem_id="ds-stats")
    hist = gr.BarPlot(x="tokens", y="samples", color="part", title="Token length per sample", height=260,
                      color_map={"fits": "#3b82f6", "cut at max_length": "#ef4444"}, y_aggregate="sum",
                      elem_id="ds-hist", x_title="tokens per sample (before the cut)", y_title="samples")
    use = gr.Button("Use this data in Train →", variant="secondary", elem_id="ds-use")

    def dataset(src, sub, spl):
        return preview.load_source(ctx.guard.readable(src, "dataset"), name=sub or None, split=spl or None)

    def page_text(ds, pg, pages):
        return f"page {pg} of {pages} · {len(ds):,} rows · columns: {', '.join(ds.column_names)}"

    def mapped(src, sub, spl, pg, fn):
        if not fn:
            return None
        ds = dataset(src, sub, spl)
        start = (max(1, int(pg or 1)) - 1) * PAGE_SIZE
        return conversation_table(preview.conversations(ds, ctx.guard.map_fn(fn), start, PAGE_SIZE))

    def on_load(src, sub, spl):
        try:
            ds = dataset(src, sub, spl)
            name, reason = preview.detect(ds)
        except USER_ERRORS as exc:
            return None, 1, "", gr.update(), "", None, error_md(exc)
        headers, rows, pg, pages = preview.rows_page(ds, 1, PAGE_SIZE)
        why = (f"detected **{name}**: {reason}" if name else f"! no map_fn fits on its own: {reason}. Pick one.")
        try:
            convs = mapped(src, sub, spl, 1, name) if name else None
            err = ""
        except USER_ERRORS as exc:
            convs, err = None, error_md(exc)
        return (pd.DataFrame(rows, columns=headers), pg, page_text(ds, pg, pages),
                name, why, convs, err)

    def on_map(src, sub, spl, pg, fn):
        try:
            return mapped(src, sub, spl, pg, fn), ""
        except USER_ERRORS as exc:
            return None, error_md(exc)

    def on_render(src, sub, spl, fn, tok_name, tpl, max_len, idx, add_tokens=False):
        if not fn:
            return None, "Pick a map_fn to see the samples.", None
        try:
            ds = dataset(src, sub, spl)
            fn = ctx.guard.map_fn(fn)
            tok = tokenizer_for(ctx, tok_name, tpl if add_tokens else None)
            idx = min(max(0, int(idx or 0)), len(ds) - 1)
            conv = preview.conversations(ds, fn, idx, 1)[0]["conversation"]
            spans, counts = preview.highlighted(conv, tok, tpl, int(max_len))
            lengths = preview.length_report(ds, tokenizer=tok, template=tpl, map_fn=fn, max_length=int(max_len),
                                            where=src)
        except USER_ERRORS as exc:
            return None, error_md(exc), None
        rep = lengths.report
        edges, counts_ = lengths.histogram()
        width = edges[1] - edges[0] if len(edges) > 1 else 1
        df = pd.DataFrame({
            "tokens": edges, "samples": counts_,
            "part": ["cut at max_length" if e + width > rep.max_length else "fits" for e in edges],
        })
        scope = (f"first {lengths.rows_seen:,} of {lengths.rows_total:,} rows" if lengths.rows_seen < lengths.rows_total
                 else f"all {lengths.rows_total:,} rows")
        pct = rep.length_percentiles
        md = (f"Row {idx}: **{counts['tokens']}** tokens, **{counts['trained_tokens']}** trained.  \n"
              f"Over {scope} at max_length **{rep.max_length}**: **{rep.kept:,}** samples kept, "
              f"**{rep.dropped:,}** dropped ({rep.dropped_empty} empty, {rep.dropped_no_loss} with no answer token "
              f"left), **{rep.truncated:,}** truncated. Lengths: median {pct.get(50)}, p95 {pct.get(95)}, "
              f"max {int(lengths.lengths.max()) if len(lengths.lengths) else 0} (before the cut). "
              f"Trained tokens: {rep.trained_tokens:,} of {rep.tokens:,}.")
        return spans, md, gr.update(value=df, x_bin=width, caption=f"max_length {rep.max_length}: red bins are cut")

    loaded = load_btn.click(on_load, [source, subset, split],
                            [table, page, page_info, map_fn, map_reason, conversations, status], api_name="dataset_load")
    render_inputs = [source, subset, split, map_fn, tokenizer, template, max_length, row, add_tokens]
    render_outputs = [sample, stats, hist]
    loaded.then(on_render, render_inputs, render_outputs)
    source.submit(on_load, [source, subset, split],
                  [table, page, page_info, map_fn, map_reason, conversations, status]).then(
        on_render, render_inputs, render_outputs)

    def on_upload(file, request: gr.Request):
        if file is None:
            return gr.skip()
        try:
            ctx.require(request, "write")
        except STUDIO_USER_ERRORS as exc:
            gr.Warning(str(exc))
            return gr.skip()
        return ctx.guard.save_upload(file if isinstance(file, str) else file.name)

    upload.upload(on_upload, upload, source).then(
        on_load, [source, subset, split], [table, page, page_info, map_fn, map_reason, conversations, status]).then(
        on_render, render_inputs, render_outputs)

    def step(delta):
        def fn(src, sub, spl, pg, mfn):
            try:
                ds = dataset(src, sub, spl)
                headers, rows, pg, pages = preview.rows_page(ds, int(pg or 1) + delta, PAGE_SIZE)
                convs = mapped(src, sub, spl, pg, mfn)
            except USER_ERRORS as exc:
                return gr.skip(), gr.skip(), gr.skip(), error_md(exc), None
            return pd.DataFrame(rows, columns=headers), pg, page_text(ds, pg, pages), "", convs
        return fn

    page_outputs = [table, page, page_info, status, conversations]
    page_inputs = [source, subset, split, page, map_fn]
    prev_btn.click(step(-1), page_inputs, page_outputs)
    next_btn.click(step(+1), page_inputs, page_outputs)
    page.submit(step(0), page_inputs, page_outputs)
    map_fn.input(on_map, [source, subset, split, page, map_fn], [conversations, status]).then(
        on_render, render_inputs, render_outputs)
    render_btn.click(on_render, render_inputs, render_outputs, api_name="dataset_render")
    max_length.submit(on_render, render_inputs, render_outputs)
    row.submit(on_render, render_inputs, render_outputs)
    template.input(on_render, render_inputs, render_outputs)
    def load_on_start(app):
        app.load(on_load, [source, subset, split],
                 [table, page, page_info, map_fn, map_reason, conversations, status]).then(
            on_render, render_inputs, render_outputs)

    add_tokens.input(on_render, render_inputs, render_outputs)
    return DatasetTab(source, subset, split, map_fn, template, max_length, add_tokens, use, load_on_start)
