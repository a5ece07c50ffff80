"""Batches for training: packed blocks with an exact block-diagonal mask, or
padded samples.

Packed blocks carry per-sample ``position_ids`` and ``seq_lens``. Position ids
alone do not stop eager/SDPA attention from crossing sample borders, so for
those kernels the collator builds a 4-D additive mask (0 where a token may
attend, the dtype's minimum elsewhere): causal within each sample, nothing
across samples, nothing to padding. For flash-attention (CUDA) and our
per-sample SDPA (``attention.py``, CPU) the batch is flattened into one row
with no padding and no mask, and the samples' borders travel as
``cu_seq_lens_q/k`` (what ``DataCollatorWithFlattening`` builds, with the
``return_flash_attn_kwargs`` option), so attention costs Σ nᵢ², not T².
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def _pad(rows, value, length):
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


class PackedCollator:
    """Packed blocks -> input_ids, labels, position_ids and the isolating mask.

    ``mask``: "bool" (True = may attend; for SDPA, whatever the compute
    dtype), "float" (additive 0 / -inf-like; for eager attention, which adds
    the mask to the scores), or None (one flattened row with cu_seq_lens,
    for flash-attention varlen or ``attention.SEGMENT_SDPA``).
    """

    def __init__(self, pad_token_id: int, mask: str | None = "bool"):
        self.pad_token_id = pad_token_id
        self.mask = mask

    def __call__(self, features):
        if self.mask is None:
            return self.flattened(features)
        length = max(len(f["input_ids"]) for f in features)
        allowed = torch.zeros((len(features), 1, length, length), dtype=torch.bool)
        causal = torch.tril(torch.ones(length, length, dtype=torch.bool))
        for b, f in enumerate(features):
            start = 0
            for n in f["seq_lens"]:
                allowed[b, 0, start : start + n, start : start + n] = causal[:n, :n]
                start += n
            if start < length:  # padding rows attend to themselves only, so softmax stays finite
                idx = torch.arange(start, length)
                allowed[b, 0, idx, idx] = True
        if self.mask == "float":
            mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill_(~allowed, torch.finfo(torch.float32).min)
        else:
            mask = allowed
        return {
            "input_ids": _pad([f["input_ids"] for f in features], self.pad_token_id, length),
            "labels": _pad([f["labels"] for f in features], IGNORE_INDEX, length),
            "position_ids": _pad([f["position_ids"] for f in features], 0, length),
            "attention_mask": mask,
            "num_tokens": torch.tensor(sum(len(f["input_ids"]) for f in features)),
        }


    @staticmethod
    def flattened(features) -> dict:
        """The blocks as one row with no padding, and the samples' borders as
        ``cu_seq_lens_q/k`` (int32 starts, then the total) and ``max_length_q/k``:
        the keyword arguments flash-attention's varlen kernel and our
        per-sample SDPA (``attention.py``) read, passed through the model's
        forward to every attention layer. Given explicitly, they spare the
        kernel deriving them from the position ids at every layer."""
        ids, labels, pos, lens = [], [], [], []
        for f in features:
            ids += f["input_ids"]
            labels += f["labels"]
            pos += f["position_ids"]
            lens += f["seq_lens"]
        starts = torch.zeros(len(lens) + 1, dtype=torch.int32)
        starts[1:] = torch.tensor(lens, dtype=torch.int32).cumsum(0)
        if int(starts[-1]) != len(ids):
            raise ValueError(f"seq_lens sum to {int(starts[-1])}, the blocks hold {len(ids)} tokens")
        longest = max(lens)
        return {
            "input_ids": torch.tensor([ids]),
            "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([pos]),
            "cu_seq_lens_q": starts, "cu_seq_lens_k": starts,
            "max_length_q": longest, "max_length_k": longest,
            "num_tokens": torch.tensor(len(ids)),
            # where each block ends in the flat row (the eval loss is summed per block)
            "item_lens": torch.tensor([len(f["input_ids"]) for f in features]),
        }


class PaddedCollator:
    """Unpacked samples -> right-padded batch with a 2-D attention mask."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.multiple = pad_to_multiple_of

    def __call__(self, features):
        length = max(len(f["input_ids"]) for f in features)
        if self.multiple:
            length = -(-length // self.multiple) * self.multiple
        attn = torch.zeros((len(features), length), dtype=torch.long)
        for i, f in enumerate(features):
            attn[i, : len(f["input_ids"])] = 1
        return {
            "input_ids": _pad([f["input_ids"] for f in features], self.pad_token_id, length),
            "labels": _pad([f["labels"] for f in features], IGNORE_INDEX, length),
            "attention_mask": attn,
            "num_tokens": attn.sum(),
        }
