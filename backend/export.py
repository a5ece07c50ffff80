"""``convert pth_to_hf`` and ``convert merge``: from a training checkpoint to
files any Hugging Face user can load.

- ``pth_to_hf``: an ``iter_<N>.pth`` -> a peft adapter folder (LoRA/QLoRA) or a
  complete model folder (full fine-tune). The base model is not loaded for
  adapters: the checkpoint already holds peft's key names, and the target
  modules are read off those keys.
- ``merge``: base (unquantized, also for QLoRA adapters; at its own dtype
  unless asked otherwise) + adapter -> one model, saved only after its logits
  on fixed prompts match base+adapter within a tolerance fitted to the dtype.
  One copy of the base is held: the adapter is merged into it in place.

Every output folder carries ``ftstudio.json`` and a tokenizer whose
``chat_template`` is the training format where Jinja can express it
(``backend.core.artifacts`` owns both). Outputs go to a new folder; an
existing one is replaced only if it is our own output of the same kind and
the caller asked to overwrite. The base model a checkpoint names passes the
caller's guard, and its own code runs only if the operator allowed it
(``trust_remote_code`` here is the operator's answer, never the file's).
"""

from __future__ import annotations

import os
from pathlib import Path

from .core.artifacts import (
    ADAPTER_BIN, ADAPTER_CONFIG, ADAPTER_SAFETENSORS, CONVERTED, MERGED, ArtifactError, check_output, check_weights,
    converted_dir, has_tokenizer, is_adapter, is_model, lora_targets, output_dir, output_kind, read_iter, read_meta,
)
from .core.guard import Guard
from .models import TORCH_DTYPES, base_location, fit_embeddings, load_causal_lm

PARITY_PROMPTS = ("Hello! Who are you?", "Give three tips for staying healthy.", "1 + 1 =")
# merge precision: 'auto' keeps the base's own dtype; where it runs: 'auto' is the GPU if there is one
MERGE_DTYPES = ("auto", *TORCH_DTYPES)
MERGE_DEVICES = ("cpu", "cuda", "auto")
MERGE_DTYPE_HELP = "auto: the base's own dtype (its config, else its weights), so the merge is the base's size"
MERGE_DEVICE_HELP = "auto: cuda if a GPU is there, else cpu"


def _save_tokenizer(tokenizer, folder: Path, template_name: str) -> bool:
    """Save the tokenizer with the training format as its chat_template (where expressible)."""
    from .chat_template import export_chat_template
    from .data.templates import get_template

    try:
        exported = export_chat_template(tokenizer, get_template(template_name))
    except Exception:  # noqa: BLE001 - an inexpressible template keeps the tokenizer's own
        exported = False
    tokenizer.save_pretrained(folder)
    return exported


def pth_to_hf(pth: str | os.PathLike, save_path: str | os.PathLike, config: str | None = None, *,
              overwrite: bool = False, trust_remote_code: bool = False, guard: Guard | None = None,
              safe_serialization: bool = True, max_shard_size: str = "2GB", log=print) -> Path:
    """iter_<N>.pth -> adapter folder (LoRA/QLoRA) or model folder (full)."""
    from .config import load_config
    from .data import load_tokenizer, stop_words
    from .data.encode import add_tokens

    guard = guard or Guard.cli()
    ckpt = read_iter(pth)
    target = check_output(guard.output_dir(save_path), CONVERTED, overwrite)
    cfg = load_config(config).to_dict() if config else ckpt.config
    base_name = cfg["model"]["name_or_path"]
    base_path = base_location(base_name, guard, "base model recorded in the checkpoint")
    tok_path = base_location(cfg["model"].get("tokenizer") or base_name, guard, "tokenizer recorded in the checkpoint")
    template = cfg["data"]["template"]
    tokenizer = load_tokenizer(tok_path, trust_remote_code=trust_remote_code)
    add_tokens(tokenizer, ckpt.meta.get("added_tokens") or [])  # the run trained on them
    record = {"kind": ckpt.kind, "base_model": base_name, "template": template,
              "stop_words": stop_words(tokenizer, template), "system": cfg.get("evaluation", {}).get("system", ""),
              "step": ckpt.meta.get("step"), "source": str(Path(pth).resolve())}
    with output_dir(target, CONVERTED, overwrite) as out:
        if ckpt.kind in ("lora", "qlora"):
            _write_adapter(ckpt, cfg, base_name, out.folder, safe_serialization)
        else:
            _write_full(ckpt, base_path, base_name, out.folder, trust_remote_code, safe_serialization, max_shard_size)
        record["chat_template_exported"] = _save_tokenizer(tokenizer, out.folder, template)
        out.finish(record)
    log(f"{'adapter' if ckpt.kind != 'full' else 'model'} saved to {save_path} (base {base_name}, template {template})")
    return Path(save_path)


def _write_adapter(ckpt, cfg: dict, base_name: str, folder: Path, safe_serialization: bool) -> None:
    import torch
    from peft import LoraConfig

    lora = cfg["lora"]
    LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], bias=lora["bias"],
               target_modules=lora_targets(ckpt.state_dict), task_type="CAUSAL_LM",
               base_model_name_or_path=base_name,
               trainable_token_indices=ckpt.meta.get("trainable_token_indices")).save_pretrained(folder)
    if safe_serialization:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in ckpt.state_dict.items()}, folder / ADAPTER_SAFETENSORS,
                  metadata={"format": "pt"})
    else:
        torch.save(ckpt.state_dict, folder / ADAPTER_BIN)


def _write_full(ckpt, base_path: str, base_name: str, folder: Path, trust_remote_code: bool,
                safe_serialization: bool, max_shard_size: str) -> None:
    import torch

    model = load_causal_lm(base_path, trust_remote_code=trust_remote_code, what="base model", dtype=torch.float32)
    fit_embeddings(model, int(ckpt.meta.get("vocab_size") or 0))
    try:
        missing, unexpected = model.load_state_dict(ckpt.state_dict, strict=False)
    except RuntimeError as exc:  # a shape mismatch
        raise ArtifactError(f"{ckpt.path}: weights do not fit {base_name}: {str(exc).splitlines()[-1][:300]}") from None
    tied = {k for k in missing if k.endswith("lm_head.weight")} if model.config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise ArtifactError(f"{ckpt.path}: weights do not fit {base_name} (missing {sorted(missing)[:3]}, "
                            f"unexpected {sorted(unexpected)[:3]})")
    model.save_pretrained(folder, safe_serialization=safe_serialization, max_shard_size=max_shard_size)


def is_converted(pth: str | os.PathLike) -> bool:
    """Whether a run's ``pth`` already has its converted folder (``ensure_hf`` would write nothing)."""
    return output_kind(converted_dir(pth)) == CONVERTED


def ensure_hf(pth: str | os.PathLike, guard: Guard | None = None, log=print) -> Path:
    """The converted folder of a run's ``pth`` (converting it the first time)."""
    out = converted_dir(pth)
    if not is_converted(pth):
        pth_to_hf(pth, out, guard=guard, log=log)
    return out


def _logits(model, tokenizer, prompts=PARITY_PROMPTS):
    import torch

    outs = []
    with torch.no_grad():
        for text in prompts:
            ids = tokenizer(text, return_tensors="pt").to(model.device)
            outs.append(model(**ids).logits.float().cpu())
    return outs


def merge_device(device: str, cuda_available: bool | None = None) -> str:
    """Where the merge runs: 'auto' is the GPU if there is one, else the CPU;
    'cuda' without a GPU is refused in words, before anything is loaded."""
    if device not in MERGE_DEVICES:
        raise ArtifactError(f"merge device {device!r}: choose one of {', '.join(MERGE_DEVICES)}")
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    if device == "auto":
        return "cuda" if cuda_available else "cpu"
    if device == "cuda" and not cuda_available:
        raise ArtifactError("merge device cuda: no CUDA GPU here (torch.cuda.is_available() is False); "
                            "use --device cpu or auto")
    return device


def merge_load_kwargs(dtype: str, device: str) -> dict:
    """``from_pretrained`` arguments that load the base once, at the merge's
    precision, straight where it is merged: 'auto' keeps the base's own dtype
    (its config's ``dtype``/``torch_dtype``, else its weights'), and a GPU
    merge places the weights on the GPU as they are read (``device_map``), so
    no CPU copy is made first. (transformers 5 always builds the model empty
    and fills it from the files: what ``low_cpu_mem_usage`` used to ask for.)"""
    if dtype not in MERGE_DTYPES:
        raise ArtifactError(f"merge dtype {dtype!r}: choose one of {', '.join(MERGE_DTYPES)}")
    kwargs = {"dtype": "auto" if dtype == "auto" else TORCH_DTYPES[dtype]}
    if device != "cpu":
        kwargs["device_map"] = {"": device}
    return kwargs


def parity_rtol(dtype) -> float:
    """The parity tolerance, relative to max(1, the largest |logit|) of base+adapter.

    The merged weights are W + BA rounded once to the merge's dtype, while
    base+adapter adds the LoRA branch to W's output; the two differ by that
    rounding, carried through every layer. Measured (max |logit difference| on
    the parity prompts, LoRA on all linear layers with random B; random Llamas
    of 1M-1.1B parameters, 4-48 layers, vocab 2k-32k, and the real stories260K):
    fp32 1e-6-3e-6 relative; bf16 1.5-3.3% and fp16 0.2-0.4%, i.e. 2-4.2
    machine epsilons (bf16 eps 1/128, fp16 1/1024) in both, growing slowly with
    depth and vocabulary (1.1B, 22 layers, vocab 32000: bf16 3.3%, 4.2 eps).
    So fp32 keeps 1e-3 and half precision allows 16 epsilons (bf16 1/8, fp16
    1/64): about 4x the largest error measured. A merge that lost or doubled
    the adapter is off by the adapter's whole effect, which the log shows
    next to the tolerance."""
    import torch

    return max(1e-3, 16 * torch.finfo(dtype).eps)


def merge(llm: str, adapter: str | os.PathLike, save_path: str | os.PathLike, *, overwrite: bool = False,
          trust_remote_code: bool = False, guard: Guard | None = None, max_shard_size: str = "2GB",
          safe_serialization: bool = True, dtype: str = "auto", device: str = "cpu",
          tolerance: float | None = None, log=print) -> dict:
    """Base + adapter -> one model folder at ``dtype`` ('auto': the base's own,
    so the merged folder is about the base's size); refuses to save if logits
    disagree beyond ``tolerance`` (relative; default ``parity_rtol(dtype)``).

    Memory: one copy of the base plus the adapter. The base is loaded once at
    the merge's dtype on ``device``, base+adapter logits are computed before
    merging, and ``merge_and_unload`` adds the LoRA weights into the loaded
    base in place."""
    from peft import PeftModel

    from .data import load_tokenizer

    guard = guard or Guard.cli()
    adapter = Path(adapter)
    load_kwargs = merge_load_kwargs(dtype, merge_device(device))  # a wrong choice is named before any loading
    if not adapter.exists():
        raise ArtifactError(f"adapter {adapter}: no such folder")
    if not is_adapter(adapter):
        what = "a complete (already merged or fully fine-tuned) model" if is_model(adapter) else "not an adapter"
        raise ArtifactError(f"{adapter} is {what}: it has no {ADAPTER_CONFIG}, so there is nothing to merge")
    llm_path = base_location(llm, guard, "base model")
    if Path(llm_path).exists() and read_meta(llm_path).get("merged_adapter") == str(adapter.resolve()):
        raise ArtifactError(f"{llm} already has {adapter} merged into it; merging it again would apply it twice")
    target = check_output(guard.output_dir(save_path), MERGED, overwrite)
    meta = read_meta(adapter)
    base = load_causal_lm(llm_path, trust_remote_code=trust_remote_code, what="base model", **load_kwargs)
    tokenizer = load_tokenizer(str(adapter) if has_tokenizer(adapter) else llm_path,
                               trust_remote_code=trust_remote_code)
    fit_embeddings(base, len(tokenizer))
    try:
        check_weights(adapter)
        model = PeftModel.from_pretrained(base, str(adapter))
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        raise ArtifactError(f"adapter {adapter} does not fit {llm}: {str(exc).splitlines()[0][:300]}. "
                            f"It was trained on {meta.get('base_model', 'another model')}.") from None
    model.eval()
    merged_dtype = base.dtype
    rtol = parity_rtol(merged_dtype) if tolerance is None else tolerance
    merged, parity = _merge_checked(model, tokenizer, rtol, log)
    record = {**meta, "kind": MERGED, "base_model": llm, "merged_adapter": str(adapter.resolve()),
              "dtype": str(merged_dtype).removeprefix("torch."), **parity}
    with output_dir(target, MERGED, overwrite) as out:
        merged.save_pretrained(out.folder, safe_serialization=safe_serialization, max_shard_size=max_shard_size)
        if meta.get("template"):
            record["chat_template_exported"] = _save_tokenizer(tokenizer, out.folder, meta["template"])
        else:
            tokenizer.save_pretrained(out.folder)
        out.finish(record)
    log(f"merged model ({record['dtype']}) saved to {save_path}")
    return record


def _merge_checked(model, tokenizer, rtol: float, log):
    """Merge in place, after base+adapter's logits are taken; the parity figures, or a refusal."""
    import math

    before = _logits(model, tokenizer)
    with model.disable_adapter():
        plain = _logits(model, tokenizer)
    merged = model.merge_and_unload()  # in place: the LoRA weights are added into the loaded base
    after = _logits(merged, tokenizer)
    diff = max(float((a - b).abs().max()) for a, b in zip(before, after))
    effect = max(float((a - b).abs().max()) for a, b in zip(before, plain))
    scale = max(float(a.abs().max()) for a in before)
    allowed = rtol * max(1.0, scale)
    dtype = str(merged.dtype).removeprefix("torch.")
    log(f"parity: max |logit difference| merged vs base+adapter = {diff:.3g}, tolerance {allowed:.3g} "
        f"({rtol:.3g} x max(1, logit scale {scale:.3g}), {dtype}); the adapter moves logits by up to {effect:.3g}")
    if effect <= allowed and rtol > 1e-3:
        log(f"parity: the adapter moves logits by no more than the {dtype} tolerance, so this check cannot tell "
            "the merged model from the base; merge at fp32 for a check that can")
    if not math.isfinite(diff) or not math.isfinite(scale) or diff > allowed:
        hint = " (merging at fp32 rounds less)" if rtol > 1e-3 else ""
        raise ArtifactError(f"merged model disagrees with base+adapter (max logit difference {diff:.3g}, "
                            f"tolerance {allowed:.3g} in {dtype}){hint}; not saved")
    return merged, {"parity_max_abs_diff": diff, "parity_tolerance": allowed, "parity_rtol": rtol,
                    "parity_logit_scale": scale, "adapter_max_logit_effect": effect}
