"""Per-sample attention for packed blocks on CPU: SDPA run once per sample.

Why this exists. A packed block holds several samples that must not see each
other. transformers offers two ways on a CPU and both pay for the whole block:
``sdpa``/``eager`` with a block-diagonal 4-D mask (T² scores for a T-token
block, most of them masked away, and a masked SDPA cannot use the causal fast
path), and ``flex_attention``, which crashed the process on this machine kind.
flash-attention's varlen kernel, which does exactly what is needed (attention
within each of the segments named by ``cu_seq_lens``), exists only on CUDA.

So here the block is flattened into one row (the collator does that, with
``cu_seq_lens_q/k`` = where each sample starts, the same keyword arguments
flash-attention varlen reads), and the attention function registered below as
``SEGMENT_SDPA`` runs ``scaled_dot_product_attention(is_causal=True)`` on
each sample's slice: the cost is Σ nᵢ² instead of T², no mask is built, and
each sample's logits equal the sample run alone (same kernel, same shapes).

Every other call (generation with a cache, padded batches, a row without
sample borders) goes to transformers' own ``sdpa`` unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SEGMENT_SDPA = "ftstudio_segment_sdpa"


def segment_lengths(cu_seq_lens: torch.Tensor) -> list[int]:
    """[start_0=0, start_1, ..., total] -> the samples' lengths (empty segments dropped)."""
    starts = cu_seq_lens.tolist()
    return [b - a for a, b in zip(starts, starts[1:]) if b > a]


def _borders(query, key, attention_mask, kwargs) -> list[int] | None:
    """The samples' lengths of a flattened packed row, or None when this call is not one."""
    if query.shape[0] != 1 or attention_mask is not None or query.shape[2] != key.shape[2]:
        return None  # padded batch, decoding with a cache, or a mask to honour: plain SDPA
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            return None
        # the same border rule as flash-attention's varlen path: a sample starts where positions restart
        from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

        (cu, _), _ = prepare_fa_kwargs_from_position_ids(position_ids[:1])
    lengths = segment_lengths(cu)
    if sum(lengths) != query.shape[2]:
        raise ValueError(f"cu_seq_lens cover {sum(lengths)} tokens, the row has {query.shape[2]}")
    return lengths


def segment_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                         scaling: float | None = None, **kwargs):
    """transformers' attention-function signature: (batch, heads, T, dim) in,
    ((batch, T, heads, dim), None) out."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    lengths = _borders(query, key, attention_mask, kwargs) if causal else None
    if lengths is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    dtype = query.dtype
    if query.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", enabled=False):  # autocast would cast the fp32 copies straight back
            out, _ = _per_sample(query.float(), key.float(), value.float(), lengths, dropout, scaling)
        return out.to(dtype), None
    return _per_sample(query, key, value, lengths, dropout, scaling)


def _per_sample(query, key, value, lengths: list[int], dropout: float, scaling: float | None):
    """Causal SDPA on each sample's slice; (batch, T, heads, dim) out.

    On a CPU the samples run in fp32 even in a bf16 run: torch's CPU flash-attention
    backward in bf16 was slower than in fp32 on these many short slices and held
    ~0.75 GB more (4.2M model, blocks of 512, micro-batch 4: peak RSS 1.95 GB vs
    1.2 GB, 350-420 vs 320-375 ms per step). The attention is a small share of a
    LoRA step's FLOPs, and fp32 scores are the more exact of the two."""
    # torch.split, not slicing: the backward of a slice writes a full-size zero gradient for
    # every sample (quadratic in the number of samples); split's backward concatenates once
    outs = [F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True).transpose(1, 2)
            for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))]
    # one copy into the (batch, T, heads, dim) layout the caller wants, not a cat and then a transpose copy
    return (outs[0].contiguous() if len(outs) == 1 else torch.cat(outs, dim=1)), None


def _segment_mask(*args, **kwargs):
    """The mask builder for SEGMENT_SDPA: none for a flattened packed row (batch 1, no
    padding mask; the borders come from cu_seq_lens), transformers' SDPA mask otherwise."""
    from transformers.masking_utils import sdpa_mask

    if kwargs.get("batch_size") == 1 and kwargs.get("attention_mask") is None:
        # transformers would build a dense T x T block mask from the position ids here
        return None
    return sdpa_mask(*args, **kwargs)


def register() -> str:
    """Make SEGMENT_SDPA a valid ``attn_implementation`` (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(SEGMENT_SDPA, segment_sdpa_forward)
    AttentionMaskInterface.register(SEGMENT_SDPA, _segment_mask)
    return SEGMENT_SDPA
