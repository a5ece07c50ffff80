"""Evaluation inside a run: the eval loss, and the answers written to samples.jsonl.

Eval loss. Trainer's own ``evaluation_loop`` averages one loss per batch
(each repeated once per sample), so a batch with few labeled tokens weighs as
much as one with many, and the same rows packed into blocks or padded into
rows give different numbers. Here every batch yields, per dataset item (a
sample, or a packed block), the sum of its token losses and the count of its
labeled tokens, over exactly the positions training trains (labels != -100,
through the same labeled-only head); accelerate's ``gather_for_metrics``
collects them from every rank (dropping the items it repeated to even out the
last batch), and the loss is the total sum over the total count. Packed blocks
keep their samples isolated, as in training, so packed and padded give the
same loss for the same rows. Every rank takes part, with the same number of
batches (accelerate evens them out; ZeRO-3 needs every rank in each forward).
Trainer's schedule (eval_steps, eval_on_start), its sharded dataloader and its
logging (metrics.jsonl through our callback, the trackers) are used as they are;
this is called while training runs (Trainer has prepared the model by then).

Samples. The evaluation prompts, and optionally the first rows of the eval
data with their reference answers, answered greedily.
"""

from __future__ import annotations

import time

import torch

from .collate import IGNORE_INDEX


def labeled_logits(trainer, model, inputs: dict):
    """(logits, target labels, selection): the logits of the positions whose next
    label is trained (position t predicts label t+1), in row-major order."""
    labels = inputs.pop("labels")
    select = torch.zeros_like(labels, dtype=torch.bool)
    select[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    targets = labels[:, 1:][select[:, :-1]]
    if trainer.labeled_only:
        trainer._select = select  # the head's pre-hook keeps these positions only
        try:
            logits = model(**inputs, use_cache=False).logits
        finally:
            trainer._select = None
    else:
        logits = model(**inputs, use_cache=False).logits[select]
    return logits, targets, select


def labeled_sums(trainer, model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per dataset item of the batch: (sum of token losses, number of labeled tokens), float64."""
    inputs = dict(inputs)
    inputs.pop("num_tokens", None)
    item_lens = inputs.pop("item_lens", None)  # flash-attention packing: the items are one flattened row
    losses, _, select = trainer.labeled_losses(model, inputs, reduction="none")  # chunked where large
    losses = losses.double()
    rows, cols = select.nonzero(as_tuple=True)
    if item_lens is None:
        item, size = rows, select.shape[0]
    else:
        item, size = torch.searchsorted(item_lens.cumsum(0), cols, right=True), len(item_lens)
    sums = torch.zeros(size, dtype=torch.float64, device=losses.device).index_add_(0, item, losses)
    counts = torch.zeros(size, dtype=torch.float64, device=losses.device).index_add_(0, item, torch.ones_like(losses))
    return sums, counts


def token_weighted_loss(trainer, dataloader) -> tuple[float, int, int]:
    """(eval loss, labeled tokens, items) over the whole eval set, on every rank."""
    model = trainer._wrap_model(trainer.model, training=False)
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    items = 0
    try:
        for inputs in dataloader:
            inputs = trainer._prepare_inputs(inputs)
            with torch.no_grad(), trainer.compute_loss_context_manager():
                sums, counts = labeled_sums(trainer, model, inputs)
            sums, counts = trainer.accelerator.gather_for_metrics((sums, counts))
            total += torch.stack([sums.sum(), counts.sum()]).cpu()
            items += len(counts)
    finally:
        if was_training:
            model.train()
    tokens = int(total[1])
    return (float(total[0] / tokens) if tokens else float("nan")), tokens, items


# --- samples ---------------------------------------------------------------------------


def sample_prompts(cfg, heldout: list[list[dict]]) -> list[dict]:
    """What each sampling answers: the evaluation prompts, then the held-out
    conversations (their last answer is the reference)."""
    system = {"system": cfg.evaluation.system} if cfg.evaluation.system else {}
    out = [{"turns": [{"input": text, **system}], "input": text, "kind": "prompt", "reference": None}
           for text in cfg.evaluation.inputs]
    for conversation in heldout:
        last = conversation[-1]
        turns = conversation[:-1] + [{k: v for k, v in last.items() if k != "output"}]
        out.append({"turns": turns, "input": last.get("input") or "", "kind": "heldout",
                    "reference": last.get("output")})
    return out


def answer_prompts(net, tokenizer, template: str, prompts: list[dict], step: int, *, device, max_new_tokens: int,
                   synced_gpus: bool) -> list[dict]:
    """Greedy answers as samples.jsonl rows."""
    from ..data import generation_prompt, stop_words

    stops = stop_words(tokenizer, template)
    rows = []
    for p in prompts:
        ids = torch.tensor([generation_prompt(p["turns"], tokenizer, template)], device=device)
        with torch.no_grad():
            out = net.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=tokenizer.pad_token_id, synced_gpus=synced_gpus,
                eos_token_id=tokenizer.eos_token_id, use_cache=True,
            )
        answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=False)
        for word in stops:
            answer = answer.split(word)[0]
        rows.append({"step": step, "input": p["input"], "output": answer, "time": time.time(), "kind": p["kind"],
                     "reference": p["reference"]})
    return rows
