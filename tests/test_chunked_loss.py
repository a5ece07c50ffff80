"""Chunked linear cross-entropy (backend/train/linear_ce.py): equal to the plain
head + cross_entropy in loss and gradients, with no (tokens x vocab) tensor
kept for the backward; the kernel choice (plain / chunked / liger); and
StudioTrainer's loss through it equal to the plain path on a LoRA model.

Tolerances: fp32; losses rel 1e-6, gradients atol 1e-6 / rtol 1e-5 (the
chunked sum adds the same terms in another order).
"""

import pytest
import torch
import torch.nn.functional as F

from backend.train import linear_ce
from backend.train.linear_ce import choose_kernel, linear_cross_entropy


def _problem(tokens=300, hidden=32, vocab=500, seed=0):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(hidden, vocab, bias=True)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=g) * 0.2)
        head.bias.copy_(torch.randn(vocab, generator=g) * 0.1)
    h = (torch.randn(tokens, hidden, generator=g)).requires_grad_()
    t = torch.randint(0, vocab, (tokens,), generator=g)
    return head, h, t


def _grads(head, h):
    out = (h.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone())
    h.grad = head.weight.grad = head.bias.grad = None
    return out


def test_chunked_equals_plain_loss_and_gradients():
    head, h, t = _problem()
    plain = F.cross_entropy(head(h).float(), t, reduction="sum")
    plain.backward()
    want = _grads(head, h)
    # 500 * 64 elements per chunk: chunks of 64 tokens, the last one 44
    chunked = linear_cross_entropy(h, head, t, kernel="chunked", chunk_elements=500 * 64)
    chunked.backward()
    got = _grads(head, h)
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        per_token = linear_cross_entropy(h, head, t, kernel="chunked", reduction="none", chunk_elements=500 * 64)
    torch.testing.assert_close(per_token, F.cross_entropy(head(h), t, reduction="none"), atol=1e-6, rtol=1e-6)


def test_chunked_keeps_no_full_logits_for_backward():
    """What autograd saves for the backward: the plain loss keeps (tokens x vocab)
    tensors, the chunked one nothing larger than its inputs."""
    head, h, t = _problem(tokens=256, hidden=16, vocab=1000)
    largest = {}

    def run(name, fn):
        largest[name] = 0

        def pack(x):
            largest[name] = max(largest[name], x.numel())
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            loss = fn()
        loss.backward()

    run("plain", lambda: F.cross_entropy(head(h), t, reduction="sum"))
    run("chunked", lambda: linear_cross_entropy(h, head, t, kernel="chunked", chunk_elements=1000 * 32))
    assert largest["plain"] >= 256 * 1000
    assert largest["chunked"] <= max(h.numel(), head.weight.numel())


def test_rejects_other_reductions():
    head, h, t = _problem(tokens=4)
    with pytest.raises(ValueError, match="reduction must be 'sum' or 'none', not 'mean'"):
        linear_cross_entropy(h, head, t, reduction="mean")


def test_kernel_choice(monkeypatch):
    head = torch.nn.Linear(8, 1000)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_kernel(head, 10, cpu, chunk_elements=10_000) == "plain"  # 10 x 1000 fits one chunk
    assert choose_kernel(head, 11, cpu, chunk_elements=10_000) == "chunked"
    assert choose_kernel(head, 11, cpu, zero3=True, chunk_elements=10_000) == "plain"
    monkeypatch.setattr(linear_ce, "liger_available", lambda: False)
    assert choose_kernel(head, 11, cuda, chunk_elements=10_000) == "chunked"
    monkeypatch.setattr(linear_ce, "liger_available", lambda: True)
    assert choose_kernel(head, 11, cuda, chunk_elements=10_000) == "liger"
    assert choose_kernel(head, 11, cpu, chunk_elements=10_000) == "chunked"  # liger is CUDA-only

    class Wrapped(torch.nn.Module):  # e.g. peft's wrapper around the head: not liger's plain weight
        def __init__(self):
            super().__init__()
            self.base_layer = head

        def forward(self, x):
            return self.base_layer(x)

    assert linear_ce.vocab_size(Wrapped()) == 1000
    assert choose_kernel(Wrapped(), 11, cuda, chunk_elements=10_000) == "chunked"


def test_liger_available_is_an_import_check(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "liger_kernel", None)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", None)
    assert linear_ce.liger_available() is False


def test_trainer_loss_chunked_equals_plain(tiny_model, monkeypatch):
    """StudioTrainer.compute_loss on a LoRA model and a packed batch: the chunked head
    (forced by a small CHUNK_ELEMENTS) gives the plain path's loss and LoRA gradients,
    and the model's own head call computes nothing."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, TrainingArguments

    from backend.data import build_dataset, load_tokenizer
    from backend.train.attention import register
    from backend.train.collate import PackedCollator
    from backend.train.trainer import StudioTrainer
    from conftest import DATA

    tok = load_tokenizer(str(tiny_model))
    samples, _ = build_dataset(DATA / "alpaca" / "alpaca_en_demo.json", tokenizer=tok, template="qwen_chat",
                               max_length=256, max_rows=20, pack=True)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=register(), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                            init_lora_weights=False))
    args = TrainingArguments(output_dir="/tmp/unused", use_cpu=True, report_to=[], per_device_train_batch_size=2)
    trainer = StudioTrainer(model=model, args=args, train_dataset=samples, labeled_only=True)
    batch = PackedCollator(tok.pad_token_id, mask=None)([samples[0], samples[1]])
    rows = []
    hook = trainer.head.register_forward_hook(lambda m, i, o: rows.append(o.shape[0]))
    results = {}
    for name, elements in (("plain", 2**30), ("chunked", 1024 * 50)):
        monkeypatch.setattr(linear_ce, "CHUNK_ELEMENTS", elements)
        rows.clear()
        loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
        results[name] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        model.zero_grad()
        results[name + "_rows"] = list(rows)
    hook.remove()
    trained = int((batch["labels"][:, 1:] != -100).sum())
    assert results["plain_rows"] == [trained]
    # the model's own call: 0 rows; then chunks of <= 50 tokens, each run in the forward and
    # once more in the backward (the checkpoint recomputes its logits)
    assert results["chunked_rows"][0] == 0 and sum(results["chunked_rows"][1:]) == 2 * trained
    assert max(results["chunked_rows"]) == 50 and len(results["chunked_rows"]) > 3
    torch.testing.assert_close(results["chunked"][0], results["plain"][0], rtol=1e-6, atol=0)
    assert results["plain"][1].keys() == results["chunked"][1].keys() and results["plain"][1]
    for n, g in results["plain"][1].items():
        torch.testing.assert_close(results["chunked"][1][n], g, atol=1e-6, rtol=1e-5, msg=n)

    # the eval loss (token-weighted, one loss per token) through the same two paths
    from backend.train.evaluation import token_weighted_loss

    evals = {}
    for name, elements in (("plain", 2**30), ("chunked", 1024 * 50)):
        monkeypatch.setattr(linear_ce, "CHUNK_ELEMENTS", elements)
        rows.clear()
        hook = trainer.head.register_forward_hook(lambda m, i, o: rows.append(o.shape[0]))
        evals[name] = token_weighted_loss(trainer, [dict(batch)])
        hook.remove()
        evals[name + "_rows"] = list(rows)
    assert evals["plain"][1:] == evals["chunked"][1:] == (trained, 2)
    assert evals["chunked"][0] == pytest.approx(evals["plain"][0], rel=1e-6)
    assert evals["chunked_rows"][0] == 0 and max(evals["chunked_rows"]) == 50  # no full logits, no recompute
    assert sum(evals["chunked_rows"]) == trained
