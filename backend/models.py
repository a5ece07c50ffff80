"""Loading a model the way every step does (export, merge, chat): the location
through the caller's guard ('demo' resolved), the operator's answer to
trust_remote_code, failures in one line, and the embeddings grown to a
fine-tune's vocabulary."""

from __future__ import annotations

from pathlib import Path

from .core.artifacts import ArtifactError, check_model_folder, loading_failure
from .core.guard import Guard


def base_location(name: str, guard: Guard, what: str) -> str:
    """A base model named by a user or recorded in an artifact: through the guard, 'demo' resolved."""
    from .demo import resolve_model

    checked = guard.model(name, what)
    if checked is None:
        raise ArtifactError(f"{what}: none given")
    if Path(checked).is_absolute() and not Path(checked).exists():
        raise ArtifactError(f"{what} {name}: no such folder, and not a Hub id like org/name")
    return resolve_model(checked)


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
