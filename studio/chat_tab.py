"""Chat tab: talk to the base model, a run's checkpoint, an exported adapter
or a merged model, in the template it was trained with; optionally side by
side with its base model on the same prompt. Replies stream from
``backend.chat.stream_reply``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gradio as gr

from backend.chat import GenerationSettings, chat_source, stream_reply
from backend.config import load_config
from backend.data import TEMPLATES
from backend.export import ExportError, ensure_hf, read_meta
from backend.runs import iter_files, list_runs

from .context import StudioContext, StudioError
from .export_tab import GPU

RECORDED = "(as trained)"


def model_choices(ctx: StudioContext) -> list[str]:
    """'demo', every run checkpoint (run/iter_N.pth) and every exported folder."""
    out = ["demo"]
    for r in list_runs(ctx.work_dir):
        run_dir = Path(r["run_dir"])
        for kind in ("merged", "hf"):
            if (run_dir / kind).is_dir():
                out += [f"{r['name']}/{kind}/{p.name}" for p in sorted((run_dir / kind).iterdir())
                        if (p / "ftstudio.json").exists()]
        out += [f"{r['name']}/{p.name}" for _, p in reversed(iter_files(run_dir))]
    return out


def resolve(ctx: StudioContext, choice: str) -> str:
    """A choice -> a model folder, 'demo' or a Hub id (a checkpoint is converted once, on first use)."""
    if not choice:
        raise StudioError("pick a model")
    candidate = ctx.work_dir / choice
    if candidate.suffix == ".pth" and candidate.is_file():
        return str(ensure_hf(candidate, log=lambda *_: None))
    if candidate.exists():
        return str(candidate)
    return ctx.check_path(choice, "model")


def recorded(ctx: StudioContext, choice: str) -> tuple[str | None, str]:
    """(template, system) a model was trained with, read without loading it."""
    try:
        candidate = ctx.work_dir / choice
        if candidate.suffix == ".pth":
            cfg = load_config(candidate.parent / "config.yaml")
            return cfg.data.template, cfg.evaluation.system
        meta = read_meta(candidate) if candidate.is_dir() else {}
        return meta.get("template"), meta.get("system", "")
    except (OSError, ValueError):
        return None, ""


def base_of(folder: str) -> str:
    """The base model a fine-tuned folder came from (for side-by-side)."""
    llm, adapter = chat_source(folder)
    if adapter:
        return llm
    base = read_meta(folder).get("base_model") if Path(folder).is_dir() else None
    if not base:
        raise StudioError(f"{folder} does not record its base model; untick side by side")
    return base


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(c.get("text", "") for c in content if isinstance(c, dict))
    return str(content or "")


def turns_of(history: list[dict]) -> list[dict]:
    """Chatbot messages -> finished {"input", "output"} turns."""
    turns, pending = [], None
    for m in history or []:
        if m["role"] == "user":
            pending = _text(m["content"])
        elif m["role"] == "assistant" and pending is not None:
            turns.append({"input": pending, "output": _text(m["content"])})
            pending = None
    return turns


def build(ctx: StudioContext):
    gr.Markdown("Chat in the format the model was trained on. Side by side answers the same prompt with the "
                "base model and the fine-tuned one.")
    with gr.Row():
        model = gr.Dropdown(choices=model_choices(ctx), value="demo", label="Model", allow_custom_value=True,
                            scale=4, elem_id="chat-model",
                            info="a run checkpoint, an exported/merged folder, 'demo', or a Hub id / folder")
        refresh = gr.Button("↻", scale=0, elem_id="chat-refresh")
        template = gr.Dropdown(choices=[RECORDED, *sorted(TEMPLATES)], value="qwen_chat", label="Template",
                               scale=2, elem_id="chat-template")
        side = gr.Checkbox(value=False, label="Side by side with the base model", scale=1, elem_id="chat-side")
    system = gr.Textbox(label="System prompt", lines=1, elem_id="chat-system")
    with gr.Accordion("Sampling", open=False):
        with gr.Row():
            temperature = gr.Slider(0, 2, value=0.0, step=0.05, label="temperature", info="0 = greedy")
            top_p = gr.Slider(0.05, 1, value=0.75, step=0.05, label="top_p")
            top_k = gr.Slider(0, 200, value=40, step=1, label="top_k")
            max_new = gr.Slider(8, 2048, value=128, step=8, label="max_new_tokens")
            repetition = gr.Slider(1.0, 2.0, value=1.0, step=0.05, label="repetition_penalty")
    status = gr.Markdown(elem_id="chat-status")
    with gr.Row():
        tuned_box = gr.Chatbot(label="Fine-tuned", height=380, elem_id="chat-tuned")
        base_box = gr.Chatbot(label="Base model", height=380, visible=False, elem_id="chat-base")
    with gr.Row():
        message = gr.Textbox(placeholder="Ask something…", show_label=False, scale=5, elem_id="chat-message")
        send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
        stop = gr.Button("Stop", variant="stop", scale=0, elem_id="chat-stop")
        clear = gr.Button("Clear", scale=0, elem_id="chat-clear")

    def on_model(choice):
        tpl, sys_text = recorded(ctx, choice)
        return (gr.update(value=RECORDED) if tpl else gr.skip()), sys_text or ""

    def respond(msg, hist_t, hist_b, choice, tpl, sys_text, both, temp, tp, tk, mx, rep):
        if not msg or not msg.strip():
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        settings = GenerationSettings(max_new_tokens=int(mx), temperature=float(temp), top_p=float(tp),
                                      top_k=int(tk), repetition_penalty=float(rep))
        try:
            folder = resolve(ctx, choice)
            llm, adapter = chat_source(folder)
            template_name = None if tpl == RECORDED else tpl
            tuned = ctx.models.get(llm, adapter, template=template_name)
            tuned = dataclasses.replace(tuned, system=sys_text or "")
            base, base_name = None, None
            if both:
                base_name = base_of(folder)
                base = ctx.models.get(base_name, None, template=tuned.template)
                base = dataclasses.replace(base, system=sys_text or "")
        except (ExportError, StudioError, ValueError, OSError, KeyError) as exc:
            yield gr.skip(), gr.skip(), "", f"**Error:** {exc}"
            return
        hist_t = list(hist_t or []) + [{"role": "user", "content": msg}, {"role": "assistant", "content": ""}]
        hist_b = list(hist_b or []) + [{"role": "user", "content": msg}, {"role": "assistant", "content": ""}]
        note = f"{llm}{' + ' + adapter if adapter else ''} · template {tuned.template}"
        streams = [(hist_t, stream_reply(tuned, turns_of(hist_t[:-2]), msg, settings))]
        if base is not None:
            streams.append((hist_b, stream_reply(base, turns_of(hist_b[:-2]), msg, settings)))
            note += f" · base {base_name}"
        yield hist_t, hist_b if base is not None else gr.skip(), "", note
        live = list(streams)
        while live:  # round robin: both answers grow together
            for item in list(live):
                hist, gen = item
                try:
                    piece = next(gen)
                except StopIteration:
                    live.remove(item)
                    continue
                hist[-1] = {"role": "assistant", "content": _text(hist[-1]["content"]) + piece}
            yield hist_t, hist_b if base is not None else gr.skip(), gr.skip(), gr.skip()

    inputs = [message, tuned_box, base_box, model, template, system, side, temperature, top_p, top_k, max_new,
              repetition]
    outputs = [tuned_box, base_box, message, status]
    sent = send.click(respond, inputs, outputs, api_name="chat_send", concurrency_id=GPU, concurrency_limit=1)
    submitted = message.submit(respond, inputs, outputs, concurrency_id=GPU, concurrency_limit=1)
    stop.click(None, None, None, cancels=[sent, submitted])
    clear.click(lambda: ([], [], ""), None, [tuned_box, base_box, status], api_name="chat_clear")
    side.change(lambda v: gr.update(visible=v), side, base_box)
    model.input(on_model, model, [template, system])
    refresh.click(lambda cur: gr.update(choices=model_choices(ctx), value=cur), model, model)
    return model

