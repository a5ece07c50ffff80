"""Export tab: a run's iter_<N>.pth -> Hugging Face adapter (or model) ->
merged model (at the base's precision unless another is picked), with the
merge's logit parity shown. Calls ``backend.export.pth_to_hf`` / ``merge``;
both write to a temp folder and rename, so a failed export leaves nothing
behind, and neither replaces a folder it did not write (Overwrite replaces
only our own earlier export).

Every name a caller gives (run, checkpoint, folders) passes the guard: the
API is callable directly, so the dropdowns' choices are not a limit."""

from __future__ import annotations

import gradio as gr

from backend.core.artifacts import converted_dir, merged_dir, read_meta, recorded_base
from backend.core.rundir import RunDir
from backend.export import MERGE_DEVICE_HELP, MERGE_DEVICES, MERGE_DTYPE_HELP, MERGE_DTYPES, merge, pth_to_hf
from backend.runs import list_runs

from .context import USER_ERRORS, StudioContext, StudioError, bind, error_md

GPU = "gpu"  # concurrency group of the handlers that load models


def _quiet(*_):
    """The backend's progress lines: the tab reports the outcome instead."""


def runs_with_checkpoints(ctx: StudioContext) -> list[str]:
    return [r["name"] for r in list_runs(ctx.work_dir) if RunDir(r["run_dir"]).iters()]


def checkpoint_choices(ctx: StudioContext, run: str | None) -> list[str]:
    try:
        return [p.name for _, p in reversed(ctx.guard.run(run).iters())]  # newest first
    except USER_ERRORS:
        return []


def on_refresh(ctx: StudioContext, current):
    names = runs_with_checkpoints(ctx)
    return gr.update(choices=names, value=current if current in names else (names[0] if names else None))


def on_run(ctx: StudioContext, name):
    choices = checkpoint_choices(ctx, name)
    return gr.update(choices=choices, value=choices[0] if choices else None)


def on_ckpt(ctx: StudioContext, name, pth):
    try:
        path = ctx.guard.checkpoint(ctx.guard.run(name), pth)
    except USER_ERRORS:
        return "", ""
    return str(converted_dir(path)), str(merged_dir(path))


def do_convert(ctx: StudioContext, name, pth, out, overwrite=False, request: gr.Request = None,
               progress=gr.Progress()):
    if not name or not pth:
        return "Pick a run and a checkpoint.", gr.skip()
    try:
        ctx.require(request, "write")
        path = ctx.guard.checkpoint(ctx.guard.run(name), pth)
        target = ctx.guard.output_dir(out)
        progress(0.2, desc="converting")
        pth_to_hf(path, target, overwrite=bool(overwrite), trust_remote_code=ctx.allow_custom_code, guard=ctx.guard,
                  log=_quiet)
        meta = read_meta(target)
    except USER_ERRORS as exc:
        return error_md(exc), gr.skip()
    if meta.get("kind") == "full":
        return (f"OK: Saved the full model to `{target}` (template {meta['template']}). It is a complete model: "
                "nothing to merge; chat with it in **Chat**."), gr.skip()
    return (f"OK: Saved the {meta['kind']} adapter to `{target}` (base {meta['base_model']}, template "
            f"{meta['template']})."), meta.get("base_model", "")


def do_merge(ctx: StudioContext, adapter, base_name, out, overwrite=False, dtype="auto", device="cpu",
             request: gr.Request = None, progress=gr.Progress()):
    try:
        ctx.require(request, "write")
        adapter = ctx.guard.model(adapter, "adapter")
        if not adapter:
            raise StudioError("convert a checkpoint first: merge takes the adapter folder it wrote")
        target = ctx.guard.output_dir(out)
        base_name = base_name or recorded_base(adapter) or ""
        if not base_name:
            raise StudioError("give the base model the adapter was trained on")
        progress(0.2, desc="loading base + adapter, checking parity")
        record = merge(base_name, adapter, target, overwrite=bool(overwrite), trust_remote_code=ctx.allow_custom_code,
                       guard=ctx.guard, dtype=dtype or "auto", device=device or "cpu", log=_quiet)
    except USER_ERRORS as exc:
        return error_md(exc)
    return (f"OK: Merged into `{target}` ({record['dtype']}).  \nParity: max |logit difference| merged vs base + "
            f"adapter = **{record['parity_max_abs_diff']:.3g}**, tolerance {record['parity_tolerance']:.3g} "
            f"({record['parity_rtol']:.3g} of the logit scale {record['parity_logit_scale']:.3g}); the adapter moves "
            f"logits by up to {record['adapter_max_logit_effect']:.3g}")


def build(ctx: StudioContext):
    gr.Markdown("Turn a checkpoint into a Hugging Face folder (a peft adapter for LoRA/QLoRA, a full model "
                "otherwise), then merge an adapter into its base. Merging checks that the merged model gives "
                "the same logits as base + adapter before it writes anything.")
    with gr.Row():
        run = gr.Dropdown(choices=runs_with_checkpoints(ctx), label="Run", allow_custom_value=True, scale=3,
                          elem_id="export-run")
        ckpt = gr.Dropdown(choices=[], label="Checkpoint", allow_custom_value=True, scale=2, elem_id="export-ckpt")
        refresh = gr.Button("↻", scale=0, elem_id="export-refresh")
    with gr.Row():
        hf_out = gr.Textbox(label="Convert to", scale=4, elem_id="export-hf-out",
                            info="a new folder under the work directory")
        overwrite = gr.Checkbox(value=False, label="Overwrite", scale=0, elem_id="export-overwrite",
                                info="replace our own earlier export there")
        convert_btn = gr.Button("Convert to HF", variant="primary", scale=1, elem_id="export-convert")
    convert_msg = gr.Markdown(elem_id="export-convert-msg")
    with gr.Row():
        base = gr.Textbox(label="Base model", scale=2, elem_id="export-base",
                          info="defaults to the base the adapter was trained on")
        merged_out = gr.Textbox(label="Merge into", scale=3, elem_id="export-merged-out")
        dtype = gr.Dropdown(choices=list(MERGE_DTYPES), value="auto", label="Precision", info=MERGE_DTYPE_HELP,
                            scale=1, elem_id="export-dtype")
        device = gr.Dropdown(choices=list(MERGE_DEVICES), value="cpu", label="Device", info=MERGE_DEVICE_HELP,
                             scale=1, elem_id="export-device")
        merge_btn = gr.Button("Merge", variant="primary", scale=1, elem_id="export-merge")
    merge_msg = gr.Markdown(elem_id="export-merge-msg")

    refresh.click(bind(on_refresh, ctx), run, run)
    run.change(bind(on_run, ctx), run, ckpt)
    ckpt.change(bind(on_ckpt, ctx), [run, ckpt], [hf_out, merged_out])
    convert_btn.click(bind(do_convert, ctx), [run, ckpt, hf_out, overwrite], [convert_msg, base],
                      api_name="export_convert", concurrency_id=GPU, concurrency_limit=1)
    merge_btn.click(bind(do_merge, ctx), [hf_out, base, merged_out, overwrite, dtype, device], merge_msg,
                    api_name="export_merge", concurrency_id=GPU, concurrency_limit=1)
    return run, bind(on_refresh, ctx)
