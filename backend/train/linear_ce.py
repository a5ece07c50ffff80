"""The LM head and cross-entropy in token chunks, so the loss's memory does not
grow with vocab x tokens.

Why this exists. The labeled-only head (``trainer.py``) already runs the head
on the trained positions only, but it still makes one (tokens x vocab) logits
tensor, an fp32 copy of it for the loss, and autograd keeps the softmax of it
for the backward: with a 150k vocabulary and 4k trained tokens that is ~7 GB.
``torch.nn.functional.cross_entropy`` takes logits, so it cannot help, and
transformers has no chunked loss. Here the head and the loss run over chunks
of tokens; each chunk is checkpointed, so the forward keeps no logits at all
and the backward recomputes them one chunk at a time (one extra head matmul,
peak memory one chunk's logits). The head is called as a module, so peft's
wrappers of it (added-token rows, a LoRA on lm_head) work unchanged.

On CUDA, where liger-kernel is installed and the head is a plain
``nn.Linear``, its fused linear cross-entropy (Triton; it computes the
gradients during the forward, chunk by chunk) is used instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# logits elements one chunk may hold (fp32: 128 MiB); a batch under this runs in one piece
CHUNK_ELEMENTS = 2**25


def liger_available() -> bool:
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss  # noqa: F401
    except ImportError:
        return False
    return True


def vocab_size(head: torch.nn.Module) -> int:
    """The head's output rows, also through peft's wrappers (the first 2-D weight inside)."""
    for m in head.modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 2:
            return w.shape[0]
    raise ValueError(f"no 2-D weight in the head {type(head).__name__}")


def choose_kernel(head: torch.nn.Module, tokens: int, device: torch.device, *, zero3: bool = False,
                  chunk_elements: int | None = None) -> str:
    """"liger", "chunked" or "plain" for ``tokens`` labeled positions through ``head``.
    Under ZeRO-3 the head's weight is a partition that DeepSpeed gathers inside the
    model's forward: the head stays there ("plain")."""
    if zero3 or tokens * vocab_size(head) <= (chunk_elements or CHUNK_ELEMENTS):
        return "plain"
    if device.type == "cuda" and type(head) is torch.nn.Linear and liger_available():
        return "liger"
    return "chunked"


def _chunk_loss(head, hidden, targets, reduction):
    return F.cross_entropy(head(hidden).float(), targets, reduction=reduction)


def linear_cross_entropy(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, *,
                         kernel: str = "chunked", reduction: str = "sum",
                         chunk_elements: int | None = None) -> torch.Tensor:
    """cross_entropy(head(hidden), targets) for (tokens, hidden) ``hidden``: the sum
    (``reduction="sum"``) or one loss per token ("none"), computed chunk by chunk."""
    if reduction not in ("sum", "none"):
        raise ValueError(f"reduction must be 'sum' or 'none', not {reduction!r}")
    if kernel == "liger" and reduction == "sum":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        return LigerFusedLinearCrossEntropyLoss(reduction="sum")(head.weight, hidden, targets, head.bias)
    if kernel == "plain":
        return _chunk_loss(head, hidden, targets, reduction)
    step = max(1, (chunk_elements or CHUNK_ELEMENTS) // vocab_size(head))
    grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    parts = []
    for h, t in zip(hidden.split(step), targets.split(step)):
        if grad:  # keep only the chunk's input; its logits are recomputed in the backward
            parts.append(checkpoint(_chunk_loss, head, h, t, reduction, use_reentrant=False))
        else:
            parts.append(_chunk_loss(head, h, t, reduction))
    if not parts:
        return hidden.new_zeros((), dtype=torch.float32) if reduction == "sum" else hidden.new_zeros(0)
    return torch.stack(parts).sum() if reduction == "sum" else torch.cat(parts)
