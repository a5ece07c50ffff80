"""Eval data and eval loss, for real: a run with a held-out fraction writes eval
rows at the set steps and never trains on a held-out row (every training batch
recorded and matched to its rows); the eval loss counts exactly the trained
positions and is the same for packed and padded batches of the same rows, and
for two ranks under DeepSpeed ZeRO-3; eval_split and eval_path read the right
rows; bad eval configs are one clear error."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from backend.config import ConfigError, load_config
from backend.core.rundir import RunDir
from train_utils import ftstudio, metrics, status

STEPS = ["training.max_steps=8", "saving.save_steps=4", "evaluation.eval_steps=3", "evaluation.every=100",
         "evaluation.max_new_tokens=2", "evaluation.heldout_samples=1"]
HELD_OUT = ["data.eval_fraction=0.2"]

# Loaded into every Python process of a run (PYTHONPATH): when the trainer module is
# imported, every batch the training dataloader hands out is written, sample by sample.
RECORDER = '''
import importlib.abc, importlib.util, json, os, sys

class _Recorder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "backend.train.trainer":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run_module = spec.loader.exec_module
        def exec_module(module):
            run_module(module)
            _patch(module.StudioTrainer)
        spec.loader.exec_module = exec_module
        return spec

def _patch(cls):
    make = cls.get_train_dataloader
    def get_train_dataloader(self):
        collate = self.data_collator
        def recording(features):
            with open(os.environ["RECORD_BATCHES"], "a") as f:
                for feat in features:
                    ids, start = feat["input_ids"], 0
                    for n in feat.get("seq_lens") or [len(ids)]:
                        f.write(json.dumps(ids[start:start + n]) + "\\n")
                        start += n
            return collate(features)
        self.data_collator = recording
        try:
            return make(self)
        finally:
            self.data_collator = collate
    cls.get_train_dataloader = get_train_dataloader

sys.meta_path.insert(0, _Recorder())
'''


def eval_rows(run_dir) -> list[dict]:
    return [r for r in metrics(run_dir) if "eval_loss" in r]


@pytest.fixture(scope="module")
def fraction_run(tmp_path_factory, tiny_model):
    """tiny_demo with 20% of its rows held out, every training batch recorded."""
    tmp = tmp_path_factory.mktemp("fraction")
    (tmp / "hook").mkdir()
    (tmp / "hook" / "sitecustomize.py").write_text(RECORDER)
    record = tmp / "batches.jsonl"
    run_dir = tmp / "run"
    out = ftstudio("train", "tiny_demo", *HELD_OUT, *STEPS, "--work-dir", run_dir, cwd=tmp,
                   env={"PYTHONPATH": os.pathsep.join([str(tmp / "hook"), os.environ.get("PYTHONPATH", "")]),
                        "RECORD_BATCHES": str(record)})
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:]
    return run_dir, [tuple(json.loads(line)) for line in record.read_text().splitlines()]


def encoded_rows(cfg, tokenizer, rows):
    """input_ids and labels of each raw row, exactly as the pipeline encodes it (unpacked)."""
    from backend.data import build_dataset

    samples, report = build_dataset(rows, tokenizer=tokenizer, template=cfg.data.template, map_fn=cfg.data.map_fn,
                                    max_length=cfg.data.max_length, pack=False, where="test")
    assert report.kept == len(rows)
    return samples


def test_held_out_rows_are_never_trained_on(fraction_run):
    from backend.data import load
    from backend.demo import resolve_data
    from backend.train.data import eval_rows as held_out_rows, training_tokenizer

    run_dir, trained = fraction_run
    cfg = load_config(RunDir(run_dir).config_file)
    tokenizer = training_tokenizer(cfg)
    raw = load(resolve_data(cfg.data.path))
    texts = [json.dumps(r, sort_keys=True) for r in raw.to_list()]
    assert len(set(texts)) == len(texts), "each row must be unique to be told apart"
    held_raw = held_out_rows(cfg)[0].to_list()
    held = {texts.index(json.dumps(r, sort_keys=True)) for r in held_raw}
    assert len(held) == round(0.2 * len(raw)) == 10
    ids = [tuple(s) for s in encoded_rows(cfg, tokenizer, raw)["input_ids"]]
    assert len(set(ids)) == len(ids)
    row_of = {s: i for i, s in enumerate(ids)}
    assert all(s in row_of for s in trained), "a trained sample that is no row of the data"
    seen = {row_of[s] for s in trained}
    assert not seen & held, f"held-out rows {sorted(seen & held)} were trained on"
    assert seen == set(range(len(raw))) - held  # 8 steps x 2 blocks cover every training block
    # the eval loss counts exactly the trained positions of the held-out rows
    labels = encoded_rows(cfg, tokenizer, held_out_rows(cfg)[0])["labels"]
    assert {r["eval_tokens"] for r in eval_rows(run_dir)} == {sum(sum(1 for t in l[1:] if t != -100) for l in labels)}


def test_eval_rows_at_the_set_steps(fraction_run):
    run_dir, _ = fraction_run
    rows = eval_rows(run_dir)
    assert [r["step"] for r in rows] == [0, 3, 6, 8]  # start, every 3 steps, the end
    assert all(set(r) == {"step", "eval_loss", "eval_tokens", "tokens_seen", "elapsed_s"} for r in rows)
    assert all(math.isfinite(r["eval_loss"]) for r in rows) and rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    train = [r for r in metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 9))
    seen = [r["tokens_seen"] for r in train]
    assert seen == sorted(seen) and seen[0] > 0
    assert {r["step"]: r["tokens_seen"] for r in train}[6] == next(r for r in rows if r["step"] == 6)["tokens_seen"]
    log = (run_dir / "train.log").read_text()
    assert "eval at step 3: eval_loss" in log and "rows held out by data.eval_fraction" in log
    samples = RunDir(run_dir).samples()
    assert sorted({s["step"] for s in samples}) == [0, 4, 8]  # the base model and every save
    for step in (0, 4, 8):
        kinds = [(s["kind"], s["reference"] is None) for s in samples if s["step"] == step]
        assert kinds == [("prompt", True), ("prompt", True), ("heldout", False)]


def evaluate(cfg, checkpoint, *, pack: bool, out, mask: str | None = "bool") -> dict:
    """Trainer.evaluate() of one checkpoint on the run's eval rows, packed or padded.
    ``mask=None``: the flattened batch of flash-attention (transformers tells the
    samples apart by their position ids on the CPU too)."""
    from transformers import AutoModelForCausalLM, TrainingArguments

    from backend.train.collate import PackedCollator, PaddedCollator
    from backend.train.data import eval_data, training_tokenizer
    from backend.train.trainer import StudioTrainer

    tokenizer = training_tokenizer(cfg)
    samples, _, _ = eval_data(cfg, tokenizer, pack=pack)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="sdpa")
    collator = PackedCollator(tokenizer.pad_token_id, mask=mask) if pack else PaddedCollator(tokenizer.pad_token_id)
    args = TrainingArguments(output_dir=str(out), use_cpu=True, report_to=[], per_device_eval_batch_size=3,
                             remove_unused_columns=False, disable_tqdm=True)
    trainer = StudioTrainer(model=model, args=args, eval_dataset=samples, data_collator=collator, labeled_only=True)
    return trainer.evaluate()


def test_packed_and_padded_eval_loss_agree(fraction_run, tmp_path):
    """The run's last checkpoint evaluated both ways on the same rows: the same loss,
    and the one the run logged at that step."""
    run_dir, _ = fraction_run
    cfg = load_config(RunDir(run_dir).config_file)
    packed = evaluate(cfg, RunDir(run_dir).checkpoint_dir(8), pack=True, out=tmp_path)
    padded = evaluate(cfg, RunDir(run_dir).checkpoint_dir(8), pack=False, out=tmp_path)
    flat = evaluate(cfg, RunDir(run_dir).checkpoint_dir(8), pack=True, mask=None, out=tmp_path)
    logged = eval_rows(run_dir)[-1]
    assert packed["eval_tokens"] == padded["eval_tokens"] == flat["eval_tokens"] == logged["eval_tokens"]
    assert packed["eval_loss"] == pytest.approx(padded["eval_loss"], rel=1e-6)
    assert flat["eval_loss"] == pytest.approx(padded["eval_loss"], rel=1e-6)
    assert packed["eval_loss"] == pytest.approx(logged["eval_loss"], rel=1e-6)


def test_two_ranks_under_zero3_give_the_same_eval_loss(fraction_run, tmp_path):
    """torchrun, 2 ranks, ZeRO-3: every rank evaluates its share (3 packed blocks in
    batches of 2: the second rank's last batch repeats one, which must not count);
    rank 0 alone writes the rows and reports to TensorBoard."""
    run_dir = tmp_path / "run"
    out = ftstudio("train", "tiny_demo", *HELD_OUT, "training.max_steps=1", "evaluation.inputs=[]",
                   "evaluation.heldout_samples=1", "evaluation.max_new_tokens=2", "training.report_to=[tensorboard]",
                   "--deepspeed", "deepspeed_zero3", "--work-dir", run_dir, cwd=tmp_path,
                   env={"NPROC_PER_NODE": "2"}, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:]
    assert status(run_dir)["world_size"] == 2
    one, two = eval_rows(fraction_run[0])[0], eval_rows(run_dir)[0]
    assert two["step"] == 0 and [r["step"] for r in eval_rows(run_dir)] == [0, 1]
    assert two["eval_tokens"] == one["eval_tokens"]
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-5)
    assert [s["kind"] for s in RunDir(run_dir).samples()] == ["heldout", "heldout"]  # step 0 and the save at 1
    assert len(list((run_dir / "trackers" / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_eval_split_and_eval_path_read_their_rows(tmp_path, tiny_model):
    from backend.demo import DEMO_DATA
    from backend.train.data import eval_data, training_data, training_tokenizer

    lines = DEMO_DATA.read_text(encoding="utf-8").splitlines()
    folder = tmp_path / "qa"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(lines[:40]) + "\n")
    (folder / "test.jsonl").write_text("\n".join(lines[40:]) + "\n")
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(lines[45:]) + "\n")
    base = ["data.map_fn=openai", "evaluation.heldout_samples=2"]
    split = load_config("tiny_demo", [f"data.path={folder}", "data.eval_split=test", *base])
    tokenizer = training_tokenizer(split)
    samples, report, raw = eval_data(split, tokenizer, pack=False)
    assert report.rows == len(raw) == 10 and raw.to_list() == [json.loads(x) for x in lines[40:]]
    assert training_data(split, tokenizer, pack=False)[1].rows == 40
    path = load_config("tiny_demo", [f"data.path={folder}", f"data.eval_path={other}", "data.eval_max_rows=3", *base])
    samples, report, raw = eval_data(path, tokenizer, pack=True)
    assert report.rows == 3 and raw.to_list() == [json.loads(x) for x in lines[45:48]]
    assert report.packed_blocks == len(samples) >= 1


@pytest.mark.parametrize("overrides, message", [
    (["data.eval_fraction=0.1", "data.eval_split=test"], "data.eval_split and data.eval_fraction are both set"),
    (["data.eval_path=a.jsonl", "data.eval_split=test", "data.eval_fraction=0.1"], "are all set"),
    (["data.eval_fraction=1"], "data.eval_fraction is 1.0; it is the fraction"),
    (["data.eval_split=train"], "the split trained on"),
    (["data.eval_map_fn=alpaca"], "data.eval_map_fn is the map_fn of data.eval_path"),
    (["evaluation.eval_steps=10"], "evaluation.eval_steps is 10, but there is no evaluation data"),
    (["evaluation.heldout_samples=2"], "evaluation.heldout_samples is 2, but there is no evaluation data"),
    (["data.eval_fraction=-0.5"], "data.eval_fraction is -0.5; it must be at least 0"),
])
def test_eval_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config("tiny_demo", overrides)


def test_a_bad_eval_config_is_one_line_at_the_command_line(tmp_path):
    out = ftstudio("train", "tiny_demo", "data.eval_fraction=0.1", "data.eval_split=test", "--work-dir",
                   tmp_path / "run", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "data.eval_split and data.eval_fraction are both set" in out.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()
