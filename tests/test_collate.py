"""Packed batches: a packed sample's logits equal the same sample run alone
(so samples never attend to each other), for eager and SDPA attention; and
the labeled-only loss equals the full-logits loss."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from backend.data import build_dataset, load_tokenizer
from backend.train.collate import PackedCollator, PaddedCollator
from conftest import DATA


@pytest.fixture(scope="module")
def packed(tiny_model):
    tok = load_tokenizer(str(tiny_model))
    samples, _ = build_dataset(DATA / "alpaca" / "alpaca_en_demo.json", tokenizer=tok, template="qwen_chat",
                               max_length=256, max_rows=60, pack=True)
    return tok, samples


@pytest.mark.parametrize("attn,mask", [("eager", "float"), ("sdpa", "bool")])
def test_packed_sample_equals_sample_alone(tiny_model, packed, attn, mask):
    tok, samples = packed
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attn, dtype=torch.float32).eval()
    blocks = [b for b in samples if len(b["seq_lens"]) >= 3][:2]
    assert blocks, "expected blocks holding several samples"
    batch = PackedCollator(tok.pad_token_id, mask=mask)(blocks)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits
        plain_mask_logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    crossed = False
    for b, block in enumerate(blocks):
        start = 0
        for n in block["seq_lens"]:
            ids = torch.tensor([block["input_ids"][start:start + n]])
            with torch.no_grad():
                alone = model(input_ids=ids).logits[0]
            torch.testing.assert_close(logits[b, start:start + n], alone, atol=1e-5, rtol=1e-5)
            if start > 0 and not torch.allclose(plain_mask_logits[b, start:start + n], alone, atol=1e-4):
                crossed = True
            start += n
    # the check has teeth: without the block mask, later samples do see earlier ones
    assert crossed


def test_labeled_only_loss_matches_full_loss(tiny_model, packed):
    """StudioTrainer's loss (LM head only where a label is trained) equals the
    model's own loss over full logits."""
    from backend.train.trainer import StudioTrainer
    from transformers import TrainingArguments

    tok, samples = packed
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa", dtype=torch.float32)
    batch = PackedCollator(tok.pad_token_id, mask="bool")([samples[0], samples[1]])
    args = TrainingArguments(output_dir="/tmp/unused", use_cpu=True, report_to=[], per_device_train_batch_size=2)
    trainer = StudioTrainer(model=model, args=args, train_dataset=samples, labeled_only=True)
    with torch.no_grad():
        ours = trainer.compute_loss(model, dict(batch))
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     position_ids=batch["position_ids"], labels=batch["labels"]).loss
        # the head really ran on fewer positions
        seen = {}
        hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: seen.update(shape=o.shape))
        trainer.compute_loss(model, dict(batch))
        hook.remove()
    torch.testing.assert_close(ours, full, atol=1e-5, rtol=1e-5)
    trained = int((batch["labels"][:, 1:] != -100).sum())
    assert seen["shape"][0] == trained < batch["input_ids"].numel()


def test_padded_collator():
    batch = PaddedCollator(0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]] and int(batch["num_tokens"]) == 4
