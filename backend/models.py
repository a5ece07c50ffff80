"""Loading a model the way every step does (export, merge, chat): the location
through the caller's guard ('demo' resolved), the operator's answer to
trust_remote_code, failures in one line, and the embeddings grown to a
fine-tune's vocabulary. For chat also where a model runs (``placement``: one
CUDA card, or accelerate's dispatch over all of them), as a pure function of
the free memory per card, so the GPU decision is tested without a GPU."""

from __future__ import annotations

from pathlib import Path

from .core.artifacts import ALLOW_CODE, ArtifactError, check_model_folder, loading_failure
from .core.guard import Guard, is_hub_id


# the dtype names configs and the CLI use, as torch spells them (from_pretrained takes the strings)
TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def base_location(name: str, guard: Guard, what: str) -> str:
    """A base model named by a user or recorded in an artifact: through the guard, 'demo' resolved."""
    from .demo import resolve_model

    checked = guard.model(name, what)
    if checked is None:
        raise ArtifactError(f"{what}: none given")
    if Path(checked).is_absolute() and not Path(checked).exists():
        raise ArtifactError(f"{what} {name}: no such folder, and not a Hub id like org/name")
    return resolve_model(checked)


def read_model_config(name_or_path: str, *, trust_remote_code: bool, what: str = "model", allow: str = ALLOW_CODE):
    """A model's config (its config.json, no weights; 'demo' is the bundled model),
    as the memory estimate and the launch preflight read it; failures in one line."""
    from transformers import AutoConfig

    from .demo import resolve_model

    path = resolve_model(name_or_path)
    if not Path(path).exists() and not is_hub_id(str(path)):
        raise ArtifactError(f"{what} {name_or_path}: no such folder, and not a Hub id like org/name")
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ArtifactError(loading_failure(what, path, exc, allow)) from None


def load_causal_lm(path: str, *, trust_remote_code: bool, what: str, **kwargs):
    """``AutoModelForCausalLM.from_pretrained`` with its failures in one line
    (a folder that is not a model, an unreachable Hub, a model that needs its own code)."""
    from transformers import AutoModelForCausalLM

    if Path(path).is_dir():
        check_model_folder(path, what)  # not a model, or a broken safetensors file: named, not tripped over
    try:
        return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as exc:
        raise ArtifactError(loading_failure(what, path, exc)) from None


def fit_embeddings(model, vocab_size: int) -> None:
    """Grow a base model's embeddings to a fine-tune's vocabulary (tokens it added, model.add_template_tokens)."""
    if vocab_size > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(vocab_size)


# --- where a model runs (chat): the one GPU seam, a pure function tested with made-up cards ---

HEADROOM = 1.2  # a model goes on one card when weights x this fit: room for the KV cache and activations


def cuda_free_bytes() -> list[int]:
    """Free memory per CUDA card right now (after other processes, a training run included); [] without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]


def weights_bytes(path: str) -> int | None:
    """Bytes of a local model folder's weight files (about its size in memory at dtype 'auto'); None if unknown."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    files = list(folder.glob("*.safetensors")) or list(folder.glob("pytorch_model*.bin"))
    return sum(f.stat().st_size for f in files) or None


def placement(device: str, free: list[int], size: int | None, bits: int | None = None) -> dict:
    """``from_pretrained`` kwargs that put a model where it will run. ``device``: 'auto', 'cpu' or 'cuda';
    ``free``: free bytes per CUDA card ([] = none); ``size``: weight bytes as stored (None = unknown);
    ``bits``: 4/8 when bitsandbytes quantizes (its config is added by the caller).

    On CUDA the model goes whole onto the card with the most free memory when it fits there: one card
    decodes fastest (no hop between cards per layer) and leaves the other cards to a training run.
    Not always ``device_map="auto"``: accelerate *balances* 'auto' over every card, even for a model that
    fits on one. Only a model too big for any one card (or of unknown size) gets 'auto': accelerate's
    dispatch, layers in order over the cards and then CPU memory, 10% of each card kept free."""
    if device not in ("auto", "cpu", "cuda"):
        raise ArtifactError(f"device {device!r}: use auto, cpu or cuda")
    if device == "cuda" and not free:
        raise ArtifactError("device cuda: no CUDA device here (use --device auto or cpu)")
    if device == "cpu" or not free:
        return {"dtype": "auto", **({"device_map": {"": "cpu"}} if bits else {})}
    need = None if size is None else size * (bits / 16 if bits else 1) * HEADROOM  # stored as 16-bit, or less
    card = max(range(len(free)), key=free.__getitem__)
    if need is not None and need <= free[card]:
        return {"dtype": "auto", "device_map": {"": card}}
    return {"dtype": "auto", "device_map": "auto"}


def input_device(model):
    """Where a model's input ids go: its input embeddings' device (the first card under a device map)."""
    import torch

    dev = model.get_input_embeddings().weight.device
    if dev.type != "meta":
        return dev
    cards = [d for d in (getattr(model, "hf_device_map", None) or {}).values() if isinstance(d, int)]
    return torch.device("cuda", cards[0]) if cards else torch.device("cpu")  # offloaded: hooks move it in


def model_bytes(model) -> int:
    """Memory a loaded model holds: its parameters and buffers (tied weights counted once)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


def placed_on(model) -> str:
    """Where a loaded model's weights are, in words: 'cpu', 'cuda:1' or 'cuda:0, cuda:1, cpu' under a device map."""
    mapped = getattr(model, "hf_device_map", None)
    if not mapped:
        return str(input_device(model))
    places = dict.fromkeys(f"cuda:{d}" if isinstance(d, int) else str(d) for d in mapped.values())
    return ", ".join(places)
