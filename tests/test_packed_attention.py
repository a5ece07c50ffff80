"""Per-sample attention for packed blocks (backend/train/attention.py): a packed
sample's logits equal the same sample run alone and the 4-D block-mask path,
gradients equal the mask path's, the borders really matter, calls that are not
packed rows behave as plain SDPA, and the flattened collator builds the
flash-attention varlen kwargs transformers would derive itself.

Tolerances: fp32, 1e-5 absolute and relative on logits (the mask path's own
isolation test uses the same); 1e-4 relative on gradients summed over a block.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from backend.data import build_dataset, load_tokenizer
from backend.train.attention import SEGMENT_SDPA, register, segment_lengths
from backend.train.collate import PackedCollator
from conftest import DATA


@pytest.fixture(scope="module")
def blocks(tiny_model):
    tok = load_tokenizer(str(tiny_model))
    samples, _ = build_dataset(DATA / "alpaca" / "alpaca_en_demo.json", tokenizer=tok, template="qwen_chat",
                               max_length=256, max_rows=60, pack=True)
    chosen = [b for b in samples if len(b["seq_lens"]) >= 3][:2]
    assert len(chosen) == 2, "expected blocks holding several samples"
    return tok, chosen


def _model(path, attn):
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=torch.float32).eval()


def _model_inputs(batch):
    return {k: v for k, v in batch.items() if k not in ("labels", "num_tokens", "item_lens")}


def test_segment_sdpa_equals_sample_alone_and_mask_path(tiny_model, blocks):
    tok, chosen = blocks
    ours, ref = _model(tiny_model, register()), _model(tiny_model, "sdpa")
    flat = PackedCollator(tok.pad_token_id, mask=None)(chosen)
    masked = PackedCollator(tok.pad_token_id, mask="bool")(chosen)
    with torch.no_grad():
        logits = ours(**_model_inputs(flat), use_cache=False).logits[0]
        mask_logits = ref(**_model_inputs(masked), use_cache=False).logits
        # the same row with the borders erased: one segment, samples see each other
        crossed = ours(input_ids=flat["input_ids"], position_ids=flat["position_ids"], use_cache=False,
                       cu_seq_lens_q=flat["cu_seq_lens_q"][[0, -1]], cu_seq_lens_k=flat["cu_seq_lens_k"][[0, -1]],
                       max_length_q=flat["input_ids"].shape[1], max_length_k=flat["input_ids"].shape[1]).logits[0]
    at, differs = 0, False
    for b, block in enumerate(chosen):
        start = 0
        for n in block["seq_lens"]:
            with torch.no_grad():
                alone = ref(input_ids=torch.tensor([block["input_ids"][start:start + n]])).logits[0]
            torch.testing.assert_close(logits[at:at + n], alone, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(logits[at:at + n], mask_logits[b, start:start + n], atol=1e-5, rtol=1e-5)
            differs |= at > 0 and not torch.allclose(crossed[at:at + n], alone, atol=1e-4)
            start += n
            at += n
    assert at == flat["input_ids"].shape[1]
    assert differs, "erasing the borders should change the later samples' logits"


def test_borders_from_position_ids_alone(tiny_model, blocks):
    """Without cu_seq_lens (a caller that passes only position ids) the borders come
    from where the positions restart, as flash-attention does."""
    tok, chosen = blocks
    ours = _model(tiny_model, register())
    flat = PackedCollator(tok.pad_token_id, mask=None)(chosen)
    with torch.no_grad():
        given = ours(**_model_inputs(flat), use_cache=False).logits
        derived = ours(input_ids=flat["input_ids"], position_ids=flat["position_ids"], use_cache=False).logits
    torch.testing.assert_close(derived, given, atol=1e-6, rtol=1e-6)


def test_gradients_equal_mask_path(tiny_model, blocks):
    tok, chosen = blocks
    grads = {}
    for name, attn, mask in (("segments", register(), None), ("mask", "sdpa", "bool")):
        torch.manual_seed(0)
        model = _model(tiny_model, attn).train()
        batch = PackedCollator(tok.pad_token_id, mask=mask)(chosen)
        out = model(**_model_inputs(batch), labels=batch["labels"], use_cache=False)
        out.loss.backward()
        grads[name] = (out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                           if "self_attn" in n})
    torch.testing.assert_close(grads["segments"][0], grads["mask"][0], atol=1e-5, rtol=1e-5)
    for n, g in grads["mask"][1].items():
        torch.testing.assert_close(grads["segments"][1][n], g, atol=1e-6, rtol=1e-4, msg=n)


def test_bf16_rows_attend_per_sample_in_fp32():
    """In a bf16 run on a CPU the samples' attention runs in fp32 (attention.py says why): the
    output is bf16, equal to each slice's fp32 SDPA rounded once, even under autocast, and
    gradients flow back in bf16."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    from backend.train.attention import segment_sdpa_forward

    torch.manual_seed(0)
    lengths = [5, 9, 2]
    cu = torch.tensor([0, 5, 14, 16], dtype=torch.int32)
    q, k, v = (torch.randn(1, 2, 16, 8, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    module = SimpleNamespace(is_causal=True, num_key_value_groups=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = segment_sdpa_forward(module, q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    assert out.dtype == torch.bfloat16 and out.shape == (1, 16, 2, 8)
    want = torch.cat([F.scaled_dot_product_attention(a.float(), b.float(), c.float(), is_causal=True)
                      for a, b, c in zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2))], dim=2)
    assert torch.equal(out, want.transpose(1, 2).to(torch.bfloat16))
    out.float().sum().backward()
    assert q.grad.dtype == torch.bfloat16 and q.grad.abs().sum() > 0


def test_unpacked_calls_are_plain_sdpa(tiny_model):
    """A padded batch and cached generation run as transformers' sdpa would."""
    ours, ref = _model(tiny_model, register()), _model(tiny_model, "sdpa")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 0, 0, 0]])
    mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0]])
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits,
                                   ref(input_ids=ids, attention_mask=mask).logits, atol=1e-6, rtol=1e-6)
        prompt = ids[:1]
        kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert ours.generate(prompt, **kw).tolist() == ref.generate(prompt, **kw).tolist()


def test_flattened_collator_builds_varlen_kwargs(blocks):
    """What flash-attention varlen gets: int32 sample starts and the longest sample,
    equal to what transformers derives from the position ids itself."""
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    tok, chosen = blocks
    flat = PackedCollator(tok.pad_token_id, mask=None)(chosen)
    lens = [n for b in chosen for n in b["seq_lens"]]
    assert flat["cu_seq_lens_q"].dtype == torch.int32
    assert flat["cu_seq_lens_q"].tolist() == [0] + torch.tensor(lens).cumsum(0).tolist()
    assert flat["cu_seq_lens_k"] is flat["cu_seq_lens_q"]
    assert flat["max_length_q"] == flat["max_length_k"] == max(lens)
    assert segment_lengths(flat["cu_seq_lens_q"]) == lens
    (cu, _), (longest, _) = prepare_fa_kwargs_from_position_ids(flat["position_ids"])
    assert cu.tolist() == flat["cu_seq_lens_q"].tolist() and int(longest) == flat["max_length_q"]
    assert flat["input_ids"].shape == flat["labels"].shape == flat["position_ids"].shape == (1, sum(lens))
    assert "attention_mask" not in flat


def test_flattened_collator_rejects_wrong_borders():
    block = {"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "position_ids": [0, 1, 0], "seq_lens": [2, 2]}
    with pytest.raises(ValueError, match="seq_lens sum to 4, the blocks hold 3 tokens"):
        PackedCollator(0, mask=None)([block])


def test_resolve_attention_choice(monkeypatch):
    import sys

    from backend.train.trainer import resolve_attention

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_attention("auto", packed=True) == SEGMENT_SDPA
    assert resolve_attention("auto", packed=False) == "sdpa"
    assert resolve_attention("auto", packed=True, max_length=2048) == SEGMENT_SDPA
    assert resolve_attention("auto", packed=True, max_length=256) == "sdpa"  # short blocks: the mask is cheaper
    assert resolve_attention("auto", packed=True, max_length=512, dtype=torch.float32) == SEGMENT_SDPA
    assert resolve_attention("auto", packed=True, max_length=512, dtype=torch.bfloat16) == "sdpa"  # bf16: from 1024
    assert resolve_attention("eager", packed=True) == "eager"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import flash_attn raises ImportError
    assert resolve_attention("auto", packed=True) == "sdpa"
    monkeypatch.setitem(sys.modules, "flash_attn", type(sys)("flash_attn"))
    assert resolve_attention("auto", packed=True) == "flash_attention_2"
