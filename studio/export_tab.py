"""Export tab: a run's iter_<N>.pth -> Hugging Face adapter (or model) ->
merged model, with the merge's logit parity shown. Calls
``backend.export.pth_to_hf`` / ``merge``; both write to a temp folder and
rename, so a failed export leaves nothing behind."""

from __future__ import annotations

import gradio as gr

from backend.export import ExportError, hf_dir_for, merge, pth_to_hf, read_meta
from backend.runs import iter_files, list_runs

from .context import StudioContext, StudioError

GPU = "gpu"  # concurrency group of the handlers that load models


def _quiet(*_):
    """The backend's progress lines: the tab reports the outcome instead."""


def runs_with_checkpoints(ctx: StudioContext) -> list[str]:
    return [r["name"] for r in list_runs(ctx.work_dir) if iter_files(r["run_dir"])]


def checkpoint_choices(ctx: StudioContext, run: str | None) -> list[str]:
    if not run:
        return []
    return [p.name for _, p in reversed(iter_files(ctx.work_dir / run))]  # newest first


def build(ctx: StudioContext):
    gr.Markdown("Turn a checkpoint into a Hugging Face folder (a peft adapter for LoRA/QLoRA, a full model "
                "otherwise), then merge an adapter into its base. Merging checks that the merged model gives "
                "the same logits as base + adapter before it writes anything.")
    with gr.Row():
        run = gr.Dropdown(choices=runs_with_checkpoints(ctx), label="Run", allow_custom_value=True, scale=3, elem_id="export-run")
        ckpt = gr.Dropdown(choices=[], label="Checkpoint", allow_custom_value=True, scale=2, elem_id="export-ckpt")
        refresh = gr.Button("↻", scale=0, elem_id="export-refresh")
    with gr.Row():
        hf_out = gr.Textbox(label="Convert to", scale=4, elem_id="export-hf-out",
                            info="a folder under the work directory")
        convert_btn = gr.Button("Convert to HF", variant="primary", scale=1, elem_id="export-convert")
    convert_msg = gr.Markdown(elem_id="export-convert-msg")
    with gr.Row():
        base = gr.Textbox(label="Base model", scale=2, elem_id="export-base",
                          info="defaults to the base the adapter was trained on")
        merged_out = gr.Textbox(label="Merge into", scale=3, elem_id="export-merged-out")
        merge_btn = gr.Button("Merge", variant="primary", scale=1, elem_id="export-merge")
    merge_msg = gr.Markdown(elem_id="export-merge-msg")

    def on_refresh(current):
        names = runs_with_checkpoints(ctx)
        return gr.update(choices=names, value=current if current in names else (names[0] if names else None))

    def on_run(name):
        choices = checkpoint_choices(ctx, name)
        return gr.update(choices=choices, value=choices[0] if choices else None)

    def on_ckpt(name, pth):
        if not name or not pth:
            return "", ""
        hf = hf_dir_for(ctx.work_dir / name / pth)
        return str(hf), str(hf.parent.parent / "merged" / hf.name)

    def do_convert(name, pth, out, progress=gr.Progress()):
        if not name or not pth:
            return "Pick a run and a checkpoint.", gr.skip()
        try:
            out = ctx.check_output(out, "output folder")
            progress(0.2, desc="converting")
            pth_to_hf(ctx.work_dir / name / pth, out, log=_quiet)
            meta = read_meta(out)
        except (ExportError, StudioError, ValueError, OSError, KeyError) as exc:
            return f"**Error:** {exc}", gr.skip()
        if meta.get("kind") == "full":
            return (f"OK: Saved the full model to `{out}` (template {meta['template']}). It is a complete model: "
                    "nothing to merge; chat with it in **Chat**."), gr.skip()
        return (f"OK: Saved the {meta['kind']} adapter to `{out}` (base {meta['base_model']}, template "
                f"{meta['template']})."), meta.get("base_model", "")

    def do_merge(adapter, base_name, out, progress=gr.Progress()):
        try:
            adapter = ctx.check_path(adapter, "adapter", must_exist=True)
            out = ctx.check_output(out, "output folder")
            base_name = ctx.check_path(base_name or read_meta(adapter).get("base_model") or "", "base model")
            if not base_name:
                raise StudioError("give the base model the adapter was trained on")
            progress(0.2, desc="loading base + adapter, checking parity")
            record = merge(base_name, adapter, out, log=_quiet)
        except (ExportError, StudioError, ValueError, OSError) as exc:
            return f"**Error:** {exc}"
        return (f"OK: Merged into `{out}`.  \nParity: max |logit difference| merged vs base + adapter = "
                f"**{record['parity_max_abs_diff']:.3g}** (tolerance 1e-3 relative)")

    refresh.click(on_refresh, run, run)
    run.change(on_run, run, ckpt)
    ckpt.change(on_ckpt, [run, ckpt], [hf_out, merged_out])
    convert_btn.click(do_convert, [run, ckpt, hf_out], [convert_msg, base], api_name="export_convert",
                      concurrency_id=GPU, concurrency_limit=1)
    merge_btn.click(do_merge, [hf_out, base, merged_out], merge_msg, api_name="export_merge",
                    concurrency_id=GPU, concurrency_limit=1)
    return run, on_refresh
