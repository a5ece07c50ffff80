"""``convert pth_to_hf`` and ``convert merge``: from a training checkpoint to
files any Hugging Face user can load.

- ``pth_to_hf``: an ``iter_<N>.pth`` -> a peft adapter folder (LoRA/QLoRA) or a
  complete model folder (full fine-tune). The base model is not loaded for
  adapters: the checkpoint already holds peft's key names, and the target
  modules are read off those keys.
- ``merge``: base (in full precision, also for QLoRA adapters) + adapter ->
  one model, saved only after its logits on fixed prompts match base+adapter.

Every output folder carries ``ftstudio.json`` (base model, template, stop
words, system text, kind, step) and a tokenizer whose ``chat_template`` is
the training format where Jinja can express it, so merge and chat need no
flags and plain transformers / vLLM users get the format the model learned.
Outputs are written to a temp folder beside the target, then renamed.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path

from .atomic import atomic_dir

META_FILE = "ftstudio.json"
PARITY_PROMPTS = ("Hello! Who are you?", "Give three tips for staying healthy.", "1 + 1 =")


class ExportError(ValueError):
    """A convert/merge problem, with what to do about it."""


def load_iter(path: str | os.PathLike) -> dict:
    """Read an ``iter_<N>.pth`` safely (``weights_only``: no pickled code runs)."""
    import torch

    from .train.trainer import ITER_FORMAT

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, zipfile.BadZipFile, EOFError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ExportError(
            f"{path}: not a readable Finetune Studio checkpoint (torch.load with weights_only refused or "
            f"failed: {first}). Use an iter_<N>.pth written by ftstudio train."
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != ITER_FORMAT or "state_dict" not in ckpt:
        raise ExportError(f"{path}: a PyTorch file, but not a Finetune Studio checkpoint (no '{ITER_FORMAT}' format tag)")
    return ckpt


def read_meta(folder: str | os.PathLike) -> dict:
    try:
        return json.loads((Path(folder) / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


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


def _lora_targets(state_dict) -> list[str]:
    names = set()
    for key in state_dict:
        if ".lora_A." in key or key.endswith(".lora_A.weight"):
            names.add(key.split(".lora_A")[0].rsplit(".", 1)[-1])
    return sorted(names)


def pth_to_hf(pth: str | os.PathLike, save_path: str | os.PathLike, config: str | None = None,
              safe_serialization: bool = True, max_shard_size: str = "2GB", log=print) -> Path:
    """iter_<N>.pth -> adapter folder (LoRA/QLoRA) or model folder (full)."""
    import torch

    from .config import load_config
    from .data import load_tokenizer, stop_words
    from .demo import resolve_model

    ckpt = load_iter(pth)
    meta = dict(ckpt["meta"])
    cfg = load_config(config).to_dict() if config else meta["config"]
    base_name = cfg["model"]["name_or_path"]
    base_path = resolve_model(base_name)
    template = cfg["data"]["template"]
    tokenizer = load_tokenizer(cfg["model"].get("tokenizer") or base_path,
                               trust_remote_code=cfg["model"].get("trust_remote_code", False))
    state = ckpt["state_dict"]
    kind = meta["kind"]
    record = {
        "kind": kind, "base_model": base_name, "template": template,
        "stop_words": stop_words(tokenizer, template), "system": cfg.get("evaluation", {}).get("system", ""),
        "step": meta.get("step"), "source": str(Path(pth).resolve()),
    }
    with atomic_dir(save_path) as out:
        if kind in ("lora", "qlora"):
            from peft import LoraConfig

            lora = cfg["lora"]
            targets = _lora_targets(state)
            if not targets:
                raise ExportError(f"{pth}: a {kind} checkpoint without LoRA weights")
            LoraConfig(
                r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], bias=lora["bias"],
                target_modules=targets, task_type="CAUSAL_LM", base_model_name_or_path=base_name,
            ).save_pretrained(out)
            if safe_serialization:
                from safetensors.torch import save_file

                save_file({k: v.contiguous() for k, v in state.items()}, out / "adapter_model.safetensors",
                          metadata={"format": "pt"})
            else:
                torch.save(state, out / "adapter_model.bin")
        elif kind == "full":
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32,
                                                         trust_remote_code=cfg["model"].get("trust_remote_code", False))
            missing, unexpected = model.load_state_dict(state, strict=False)
            tied = {k for k in missing if k.endswith("lm_head.weight")} if model.config.tie_word_embeddings else set()
            if unexpected or set(missing) - tied:
                raise ExportError(f"{pth}: weights do not fit {base_name} (missing {sorted(missing)[:3]}, "
                                  f"unexpected {sorted(unexpected)[:3]})")
            model.save_pretrained(out, safe_serialization=safe_serialization, max_shard_size=max_shard_size)
        else:
            raise ExportError(f"{pth}: unknown checkpoint kind {kind!r}")
        record["chat_template_exported"] = _save_tokenizer(tokenizer, out, template)
        (out / META_FILE).write_text(json.dumps(record, indent=1, ensure_ascii=False), encoding="utf-8")
    log(f"{'adapter' if kind != 'full' else 'model'} saved to {save_path} (base {base_name}, template {template})")
    return Path(save_path)


def hf_dir_for(pth: str | os.PathLike) -> Path:
    """Where the studio keeps the converted form of a run's iter_<N>.pth: <run>/hf/iter_<N>."""
    pth = Path(pth)
    return pth.parent / "hf" / pth.stem


def ensure_hf(pth: str | os.PathLike, log=print) -> Path:
    """The converted folder of ``pth`` (converting it the first time)."""
    out = hf_dir_for(pth)
    if not (out / META_FILE).exists():
        pth_to_hf(pth, out, log=log)
    return out


def check_llm(llm: str) -> str:
    """The local path of ``llm`` ('demo' resolved), or ``llm`` itself for a Hub id; raises if neither."""
    from .demo import resolve_model
    from .launch import _looks_like_hub_id

    path = resolve_model(str(llm))
    if not Path(path).exists() and not _looks_like_hub_id(str(llm)):
        raise ExportError(f"LLM {llm}: no such folder, and not a Hub id like org/name")
    return path


def _is_adapter(folder: Path) -> bool:
    return (folder / "adapter_config.json").exists()


def _logits(model, tokenizer, prompts=PARITY_PROMPTS):
    import torch

    outs = []
    with torch.no_grad():
        for text in prompts:
            ids = tokenizer(text, return_tensors="pt")
            outs.append(model(**ids).logits.float())
    return outs


def merge(llm: str, adapter: str | os.PathLike, save_path: str | os.PathLike, max_shard_size: str = "2GB",
          safe_serialization: bool = True, device: str = "cpu", tolerance: float = 1e-3, log=print) -> dict:
    """Base + adapter -> one model folder; refuses to save if logits disagree."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from .data import load_tokenizer

    adapter = Path(adapter)
    if not adapter.exists():
        raise ExportError(f"adapter {adapter}: no such folder")
    if not _is_adapter(adapter):
        what = "a complete (already merged or fully fine-tuned) model" if (adapter / "config.json").exists() else "not an adapter"
        raise ExportError(f"{adapter} is {what}: it has no adapter_config.json, so there is nothing to merge")
    llm_path = check_llm(llm)
    llm_meta = read_meta(llm_path) if Path(llm_path).exists() else {}
    if llm_meta.get("merged_adapter") == str(adapter.resolve()):
        raise ExportError(f"{llm} already has {adapter} merged into it; merging it again would apply it twice")
    meta = read_meta(adapter)
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    base = AutoModelForCausalLM.from_pretrained(llm_path, dtype=torch.float32).to(dev)
    try:
        model = PeftModel.from_pretrained(base, str(adapter))
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ExportError(
            f"adapter {adapter} does not fit {llm}: {str(exc).splitlines()[0][:300]}. "
            f"It was trained on {meta.get('base_model', 'another model')}."
        ) from None
    model.eval()
    tokenizer = load_tokenizer(str(adapter) if (adapter / "tokenizer_config.json").exists() else llm_path)
    before = _logits(model, tokenizer)
    merged = model.merge_and_unload()
    after = _logits(merged, tokenizer)
    diff = max(float((a - b).abs().max()) for a, b in zip(before, after))
    scale = max(float(a.abs().max()) for a in before)
    log(f"parity: max |logit difference| merged vs base+adapter = {diff:.3g} (logits up to {scale:.3g})")
    if diff > tolerance * max(1.0, scale):
        raise ExportError(f"merged model disagrees with base+adapter (max logit difference {diff:.3g}); not saved")
    record = {**meta, "kind": "merged", "base_model": llm, "merged_adapter": str(adapter.resolve()),
              "parity_max_abs_diff": diff}
    with atomic_dir(save_path) as out:
        merged.save_pretrained(out, safe_serialization=safe_serialization, max_shard_size=max_shard_size)
        if meta.get("template"):
            record["chat_template_exported"] = _save_tokenizer(tokenizer, out, meta["template"])
        else:
            tokenizer.save_pretrained(out)
        (out / META_FILE).write_text(json.dumps(record, indent=1, ensure_ascii=False), encoding="utf-8")
    log(f"merged model saved to {save_path}")
    return record
