"""build_dataset end to end: counts, dropping, truncation, cache reuse, num_proc, packing."""

import json

import numpy as np
import pytest

from backend.data import DataError, IGNORE_INDEX, build_dataset, encode, get_map_fn, pack_dataset, plan_bins
from conftest import DATA

ALPACA = DATA / "alpaca" / "alpaca_en_demo.json"
CODE_ALPACA = DATA / "alpaca" / "code_alpaca_2k.json"


def test_counts_truncation_and_masks(minimind_tokenizer):
    samples, report = build_dataset(ALPACA, tokenizer=minimind_tokenizer, template="qwen_chat", max_length=256)
    assert report.map_fn == "alpaca" and "auto-detected" in report.map_fn_reason
    assert report.rows == 999 and report.kept == len(samples) == 999 - report.dropped
    assert 0 < report.truncated < report.kept
    lengths = np.array(samples["length"][:])
    assert lengths.max() == 256 and report.length_percentiles[100] == 256
    assert report.tokens == lengths.sum()
    # every kept sample trains something and its labels agree with input_ids where trained
    for row in samples.select(range(50)):
        ids, labels = row["input_ids"], row["labels"]
        assert len(ids) == len(labels) == row["length"]
        trained = [i for i, l in enumerate(labels) if l != IGNORE_INDEX]
        assert trained and all(labels[i] == ids[i] for i in trained)
    # the same as encoding row by row through the public encode()
    rows = json.loads(ALPACA.read_text())
    for i in (0, 5, 17):
        conv = get_map_fn("alpaca")(rows[i])["conversation"]
        assert encode(conv, minimind_tokenizer, "qwen_chat", max_length=256) == {
            "input_ids": samples[i]["input_ids"], "labels": samples[i]["labels"]}


def test_samples_without_trainable_tokens_are_dropped_and_counted(tmp_path, minimind_tokenizer):
    rows = [
        {"instruction": "short question", "input": "", "output": "short answer"},
        {"instruction": "word " * 300, "input": "", "output": "answer cut away by max_length"},
        {"instruction": "no output row", "input": "", "output": "<nooutput>"},
        {"instruction": "another", "input": "x", "output": "kept"},
    ]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows))
    samples, report = build_dataset(path, tokenizer=minimind_tokenizer, template="qwen_chat", max_length=64)
    assert (report.rows, report.kept, report.dropped_no_loss, report.dropped_empty) == (4, 2, 1, 1)
    assert len(samples) == 2
    assert report.truncated == 0  # the truncated row was dropped, not kept


def test_zero_trainable_samples_is_an_error(tmp_path, minimind_tokenizer):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": "q " * 200, "input": "", "output": "a"}] * 3))
    with pytest.raises(DataError, match=r"no trainable sample: 3 rows.*max_length 32"):
        build_dataset(path, tokenizer=minimind_tokenizer, template="qwen_chat", max_length=32)


def test_second_run_is_served_from_cache(tmp_path, minimind_tokenizer):
    """A custom map_fn that logs each call shows the second run never maps a row."""
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"q": f"question {i}", "a": f"answer {i}"} for i in range(40)]))
    log = tmp_path / "calls.log"
    fn_file = tmp_path / "fn.py"
    fn_file.write_text(
        "def qa_map_fn(example):\n"
        f"    open({str(log)!r}, 'a').write('x')\n"
        "    return {'conversation': [{'input': example['q'], 'output': example['a']}]}\n"
    )
    spec = f"{fn_file}:qa_map_fn"
    kw = dict(tokenizer=minimind_tokenizer, template="qwen_chat", map_fn=spec, max_length=64)
    first, r1 = build_dataset(data, **kw)
    assert log.read_text() == "x" * 40 and not r1.from_cache
    second, r2 = build_dataset(data, **kw)
    assert log.read_text() == "x" * 40, "the second run mapped rows again"
    assert r2.from_cache and second["input_ids"][:] == first["input_ids"][:]
    # a different setting is a different cache entry
    build_dataset(data, **{**kw, "max_length": 32})
    assert log.read_text() == "x" * 80
    build_dataset(data, **{**kw, "template": "internlm2_chat"})
    assert log.read_text() == "x" * 120


def test_num_proc_gives_the_same_samples(minimind_tokenizer):
    one, _ = build_dataset(CODE_ALPACA, tokenizer=minimind_tokenizer, template="qwen_chat",
                           max_length=128, max_rows=400)
    two, _ = build_dataset(CODE_ALPACA, tokenizer=minimind_tokenizer, template="qwen_chat",
                           max_length=128, max_rows=400, num_proc=2)
    assert one["input_ids"][:] == two["input_ids"][:] and one["labels"][:] == two["labels"][:]


def test_bad_row_with_num_proc_names_the_row(tmp_path, minimind_tokenizer):
    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(60)]
    rows[47]["output"] = 12
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"row 47, column 'output'.*alpaca"):
        build_dataset(path, tokenizer=minimind_tokenizer, template="qwen_chat", map_fn="alpaca",
                      max_length=64, num_proc=2)


def test_packing_keeps_every_token_and_isolates_positions(minimind_tokenizer):
    samples, report = build_dataset(ALPACA, tokenizer=minimind_tokenizer, template="qwen_chat", max_length=512)
    packed, preport = build_dataset(ALPACA, tokenizer=minimind_tokenizer, template="qwen_chat",
                                    max_length=512, pack=True)
    assert preport.packed_blocks == len(packed) < len(samples)
    assert preport.pack_fill > 0.95
    assert sum(packed["length"][:]) == report.tokens  # no token lost (XTuner drops the tail)
    originals = {tuple(ids): labels for ids, labels in zip(samples["input_ids"][:], samples["labels"][:])}
    seen = 0
    for block in packed:
        assert block["length"] <= 512 and sum(block["seq_lens"]) == block["length"]
        start = 0
        for n in block["seq_lens"]:
            ids = block["input_ids"][start:start + n]
            assert block["position_ids"][start:start + n] == list(range(n))
            labels = originals[tuple(ids)]  # a whole original sample, not a piece of one
            assert block["labels"][start:start + n] == [IGNORE_INDEX] + labels[1:]
            start += n
            seen += 1
    assert seen == len(samples)


def test_packing_is_deterministic_per_seed(minimind_tokenizer):
    samples, _ = build_dataset(CODE_ALPACA, tokenizer=minimind_tokenizer, template="qwen_chat",
                               max_length=256, max_rows=300)
    a, b, c = pack_dataset(samples, 256, seed=1), pack_dataset(samples, 256, seed=1), pack_dataset(samples, 256, seed=2)
    assert a["input_ids"][:] == b["input_ids"][:] and a["input_ids"][:] != c["input_ids"][:]
    # the blocks' fingerprint names what they are made of (datasets keys its caches on it)
    assert a._fingerprint == b._fingerprint != c._fingerprint != pack_dataset(samples, 512, seed=2)._fingerprint
    assert pack_dataset(samples.select(range(100)), 256, seed=1)._fingerprint != a._fingerprint


def test_plan_bins_best_fit():
    bins = plan_bins(np.array([6, 5, 4, 3, 2, 1, 9]), 10, seed=None)
    # 30 tokens into bins of 10: best fit decreasing finds the optimum {9,1} {6,4} {5,3,2}
    assert sorted(sorted(b) for b in bins) == [[0, 2], [1, 3, 4], [5, 6]]
    with pytest.raises(ValueError, match="over max_length"):
        plan_bins(np.array([11]), 10)


def test_pretrain_text_with_template_none(minimind_tokenizer):
    samples, report = build_dataset(DATA / "text" / "c4_demo.jsonl", tokenizer=minimind_tokenizer,
                                    template="none", max_length=128)
    assert report.map_fn == "pretrain"
    first = samples[0]
    # everything trained, no EOS appended (need_eos_token False), no BOS (tokenizer adds none)
    assert first["labels"] == first["input_ids"]
    assert minimind_tokenizer.eos_token_id not in first["input_ids"]
