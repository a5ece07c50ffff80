"""Chat tab: talk to the base model, a run's checkpoint, an exported adapter
or a merged model, in the template it was trained with; optionally side by
side with its base model on the same prompt. Replies stream from
``backend.chat.stream_reply``; models stay loaded in ``ctx.models`` (bounded
by bytes) until Unload gives their memory back, e.g. to a training run the
status line says is sharing the machine. Handlers are module level, taking
plain values, so they are tested without a browser."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gradio as gr

from backend.chat import ChatModel, GenerationSettings, stream_reply
from backend.core.artifacts import model_source, recorded_base
from backend.core.guard import GuardError
from backend.data import TEMPLATES
from backend.models import placed_on
from backend.runs import active_runs
from backend.serve import catalog

from .context import USER_ERRORS, StudioContext, StudioError, bind, error_md
from .export_tab import GPU
from .serving import model_lock
from .train_tab import size

RECORDED = "(as trained)"


def model_choices(ctx: StudioContext) -> list[str]:
    """'demo', every run checkpoint (run/iter_N.pth) and every exported folder (run/hf/x, run/merged/x)."""
    return catalog.model_choices(ctx.work_dir)


def _run_item(ctx: StudioContext, choice: str):
    """(run, checkpoint or exported folder) for a run/iter_N.pth or run/{hf,merged}/x choice; None otherwise."""
    return catalog.run_item(ctx.guard, choice)


def resolve(ctx: StudioContext, choice: str, may_convert: bool = True) -> str:
    """A choice -> a model folder, 'demo' or a Hub id (``catalog.resolve``: checkpoints convert once, by a
    caller who may write)."""
    return catalog.resolve(ctx.guard, choice, may_convert=may_convert)


def may_write(ctx: StudioContext, request) -> bool:
    """Whether the caller's role may write files (converting a checkpoint for chat writes into its run)."""
    try:
        ctx.require(request, "write")
    except GuardError:
        return False
    return True


def recorded(ctx: StudioContext, choice: str) -> tuple[str | None, str]:
    """(template, system) a model was trained with, read without loading it; (None, '') when unknown."""
    try:
        return catalog.recorded(ctx.guard, choice)
    except USER_ERRORS:
        return None, ""


def base_of(folder: str) -> str:
    """The base model a fine-tuned folder came from (for side-by-side)."""
    base = recorded_base(folder) if Path(folder).is_dir() else None
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
    for m in history if isinstance(history, list) else []:
        if not isinstance(m, dict):
            continue
        if m.get("role") == "user":
            pending = _text(m.get("content"))
        elif m.get("role") == "assistant" and pending is not None:
            turns.append({"input": pending, "output": _text(m.get("content"))})
            pending = None
    return turns


def on_model(ctx: StudioContext, choice):
    tpl, sys_text = recorded(ctx, choice)
    return (gr.update(value=RECORDED) if tpl else gr.skip()), sys_text or ""


def on_refresh(ctx: StudioContext, current):
    return gr.update(choices=model_choices(ctx), value=current)


def sharing_note(active: list[dict], where: str) -> str:
    """What the status line says about a training run on this machine, given where the chat model sits."""
    if not active:
        return ""
    names = ", ".join(r.get("name", "?") for r in active)
    runs = f"a training run ({names}) is" if len(active) == 1 else f"training runs ({names}) are"
    what = "its GPU memory" if "cuda" in where else "its CPU cores and memory"
    return f"{runs} running on this machine: the chat model shares {what}; Unload gives it back"


def status_line(ctx: StudioContext, tuned: ChatModel, base: ChatModel | None, base_name: str | None) -> str:
    where = placed_on(tuned.model)
    note = f"template {tuned.template} · on {where}"
    if base is not None:
        same = base.model is tuned.model
        note += f" · base {base_name}" + (" (the same model, adapter off)" if same else f" on {placed_on(base.model)}")
    shared_run = sharing_note(active_runs(ctx.work_dir), where)
    return note + (f"  \n**Note:** {shared_run}" if shared_run else "")


def load_models(ctx: StudioContext, choice, tpl, sys_text, both,
                may_convert: bool = True) -> tuple[ChatModel, ChatModel | None, str]:
    """(fine-tuned, base or None, status line) for a choice; the base shares the tuned model when it is an adapter."""
    folder = resolve(ctx, choice, may_convert)
    llm, adapter = model_source(folder)
    trust = ctx.allow_custom_code
    tuned = ctx.models.get(llm, adapter, template=None if tpl == RECORDED else tpl, guard=ctx.guard,
                           trust_remote_code=trust)
    base, base_name = None, None
    if both:
        base_name = base_of(folder)
        base = ctx.models.base_for(tuned, base_name, guard=ctx.guard, trust_remote_code=trust)
        base = dataclasses.replace(base, system=sys_text or "")
    note = f"{llm}{' + ' + adapter if adapter else ''} · " + status_line(ctx, tuned, base, base_name)
    return dataclasses.replace(tuned, system=sys_text or ""), base, note


def _locked(pieces, lock):
    """A reply stream whose every step holds the model's lock: /v1 may use the same model object at the same
    time, and side by side switches its adapter off around a step (``serving.model_lock``)."""
    while True:
        with lock:
            piece = next(pieces, None)
        if piece is None:
            return
        yield piece


def _round_robin(streams):
    """Advance each (history, reply stream) by one piece in turn, so both answers grow together."""
    live = list(streams)
    while live:
        for item in list(live):
            hist, gen = item
            try:
                piece = next(gen)
            except StopIteration:
                live.remove(item)
                continue
            hist[-1] = {"role": "assistant", "content": _text(hist[-1]["content"]) + piece}
        yield


def respond(ctx: StudioContext, msg, hist_t, hist_b, choice, tpl, sys_text, both, temp, tp, tk, mx, rep,
            request: gr.Request = None):
    """Send: append the message at once, then stream the reply (and the base's, side by side). Anyone who
    may read chats; a checkpoint not yet converted needs a caller who may write."""
    if not isinstance(msg, str) or not msg.strip():
        yield gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return
    try:
        settings = GenerationSettings(max_new_tokens=int(mx), temperature=float(temp), top_p=float(tp),
                                      top_k=int(tk), repetition_penalty=float(rep)).checked()
        tuned, base, note = load_models(ctx, choice, tpl, sys_text, both, may_convert=may_write(ctx, request))
    except USER_ERRORS as exc:
        yield gr.skip(), gr.skip(), "", error_md(exc)
        return
    new_turn = [{"role": "user", "content": msg}, {"role": "assistant", "content": ""}]
    hist_t = list(hist_t if isinstance(hist_t, list) else []) + new_turn
    hist_b = list(hist_b if isinstance(hist_b, list) else []) + [dict(m) for m in new_turn]
    lock = model_lock(tuned.model)  # base is the same model (adapter off) or one of its own
    streams = [(hist_t, _locked(stream_reply(tuned, turns_of(hist_t[:-2]), msg, settings), lock))]
    if base is not None:
        streams.append((hist_b, _locked(stream_reply(base, turns_of(hist_b[:-2]), msg, settings),
                                        model_lock(base.model))))
    yield hist_t, hist_b if base is not None else gr.skip(), "", note
    for _ in _round_robin(streams):
        yield hist_t, hist_b if base is not None else gr.skip(), gr.skip(), gr.skip()


def unload(ctx: StudioContext, request: gr.Request = None) -> str:
    """Unload every chat model; say what that freed. It frees models other users may be chatting
    with, so it is a "control" action: a viewer may not."""
    try:
        ctx.require(request, "control")
    except USER_ERRORS as exc:
        return error_md(exc)
    gone = ctx.models.unload_all()
    if not gone:
        return "No chat model is loaded."
    names = ", ".join(name for name, _ in gone)
    freed = size(sum(b for _, b in gone) / 2**30)
    return f"Unloaded {names}: {freed} of weights freed. The next message loads the model again."


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
        unload_btn = gr.Button("Unload", scale=0, elem_id="chat-unload")

    inputs = [message, tuned_box, base_box, model, template, system, side, temperature, top_p, top_k, max_new,
              repetition]
    outputs = [tuned_box, base_box, message, status]
    gpu = {"concurrency_id": GPU, "concurrency_limit": 1}
    sent = send.click(bind(respond, ctx), inputs, outputs, api_name="chat_send", **gpu)
    submitted = message.submit(bind(respond, ctx), inputs, outputs, **gpu)
    stop.click(None, None, None, cancels=[sent, submitted])
    clear.click(lambda: ([], [], ""), None, [tuned_box, base_box, status], api_name="chat_clear")
    unload_btn.click(bind(unload, ctx), None, status, api_name="chat_unload", **gpu)  # waits for a reply in flight
    side.change(lambda v: gr.update(visible=v), side, base_box)
    model.input(bind(on_model, ctx), model, [template, system])
    refresh.click(bind(on_refresh, ctx), model, model)
    from . import share_panel  # scoped links to the model picked here
    share_panel.build(ctx, model)
    return model
