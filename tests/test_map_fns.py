"""map_fns: ours against XTuner 0.2's real functions on real rows, plus the
errors, custom map_fns, ShareGPT and auto-detection.

Where /work/shared has no real file in a map_fn's format (see MANIFEST.md),
real records of another dataset are re-keyed into that format; each such test
says which records it uses.
"""

from __future__ import annotations

import copy
import json
import textwrap

import pytest

from backend.data import MAP_FNS, DataError, RowError, build_dataset, detect_map_fn, get_map_fn
from conftest import DATA
from xtuner_oracle import xtuner_map_fns


def _json(path):
    return json.loads((DATA / path).read_text(encoding="utf-8"))


def _jsonl(path):
    return [json.loads(line) for line in (DATA / path).read_text(encoding="utf-8").splitlines() if line.strip()]


ALPACA_EN = _json("alpaca/alpaca_en_demo.json")
ALPACA_ZH = _json("alpaca/alpaca_zh_demo.json")
CODE_ALPACA = _json("alpaca/code_alpaca_2k.json")
PIRATE = _jsonl("openai/pirate_training_set.jsonl")
MLLM = _jsonl("openai/mllm_sft_text_example_data.jsonl")
MEDICAL_SFT = _jsonl("sharegpt/medical_sft_1K_format.jsonl")
GLAIVE = _json("sharegpt/glaive_toolcall_en_demo.json")
C4 = _jsonl("text/c4_demo.jsonl")


def _oasst_rows():
    """'### Human: ... ### Assistant: ...' texts built from the real multi-turn
    mllm openai rows (no real guanaco file is available), some ending with an
    unanswered Human turn."""
    rows = []
    for i, row in enumerate(MLLM[:120]):
        parts = [
            f"### {'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}"
            for m in row["messages"]
        ]
        if i % 3 == 0:
            parts.append("### Human: " + row["messages"][0]["content"][:40])
        rows.append({"text": " ".join(parts)})
    return rows


def _colors_rows():
    """colors: 'prefix: description' built from real alpaca instructions; some
    with extra colons, one with no colon at all (XTuner then gives '')."""
    rows = [{"description": f"Color {i}: {r['instruction']}", "color": f"#{i * 7919 % 0xFFFFFF:06x}"}
            for i, r in enumerate(ALPACA_EN[:200])]
    rows.append({"description": "a: b: c :d", "color": "#000000"})
    rows.append({"description": ALPACA_EN[0]["instruction"].replace(":", ""), "color": "#ffffff"})
    return rows


# name -> rows (real, or real records re-keyed into that map_fn's columns)
CASES = {
    # all 999 rows; 587 have an empty `input`, which XTuner renders as instruction + "\n"
    "alpaca": ALPACA_EN,
    # real alpaca_zh_demo records re-keyed to silk-road's *_zh columns
    "alpaca_zh": [{"instruction_zh": r["instruction"], "input_zh": r["input"], "output_zh": r["output"]}
                  for r in ALPACA_ZH],
    # shibing624/medical has alpaca columns: real Chinese alpaca records stand in
    "medical": ALPACA_ZH,
    # CodeAlpaca_20K prompt/completion from the real code_alpaca_2k records
    "code_alpaca": [{"prompt": f"{r['instruction']}\n{r['input']}".strip(), "completion": r["output"]}
                    for r in CODE_ALPACA],
    # tiny-codes prompt/response from the real code_alpaca_2k records
    "tiny_codes": [{"prompt": r["instruction"], "response": r["output"]} for r in CODE_ALPACA],
    "openai": PIRATE + MLLM,
    "wizardlm": MEDICAL_SFT,
    "oasst1": _oasst_rows(),
    "pretrain": C4,
    # the following re-key real alpaca records into each dataset's columns
    "default": [{"input": r["instruction"], "output": r["output"]} for r in ALPACA_EN],
    "crime_kg_assitant": [{"input": r["instruction"], "output": r["output"]} for r in ALPACA_ZH],
    "stack_exchange": [{"question": r["instruction"], "response": r["output"]} for r in ALPACA_EN],
    "law_reference": [{"question": r["instruction"], "answer": r["output"]} for r in ALPACA_ZH],
    "openorca": [{"system_prompt": ("" if i % 2 else "You are a helpful assistant."),
                  "question": r["instruction"], "response": r["output"]} for i, r in enumerate(ALPACA_EN)],
    "sql": [{"context": r["input"], "question": r["instruction"], "answer": r["output"]} for r in CODE_ALPACA],
    "arxiv": [{"abstract": r["output"], "title": r["instruction"]} for r in ALPACA_EN],
    "colors": _colors_rows(),
}

# XTuner map_fns we do not provide (multimodal / agent formats).
NOT_PROVIDED = {"llava", "llava_image_only", "msagent_react"}


def test_every_xtuner_map_fn_is_covered():
    xtuner = set(xtuner_map_fns()) - NOT_PROVIDED
    assert xtuner <= set(MAP_FNS), f"missing map_fns: {sorted(xtuner - set(MAP_FNS))}"
    assert xtuner == set(CASES), "every XTuner map_fn needs rows in CASES"


@pytest.mark.parametrize("name", sorted(CASES))
def test_map_fn_equals_xtuner(name):
    ours, theirs = get_map_fn(name), xtuner_map_fns()[name]
    rows = CASES[name]
    assert len(rows) >= 10
    for i, row in enumerate(rows):
        expected = theirs(copy.deepcopy(row))
        got = ours(copy.deepcopy(row))
        assert got == expected, f"{name} row {i}: {row!r:.200}"


def test_alpaca_empty_input_keeps_newline():
    row = next(r for r in ALPACA_EN if r["input"] == "")
    assert get_map_fn("alpaca")(row)["conversation"][0]["input"] == row["instruction"] + "\n"


def test_alpaca_nooutput_rows():
    # real alpaca records with their output replaced by alpaca's '<nooutput>' marker
    for row in ALPACA_EN[:20]:
        row = {**row, "output": "<nooutput>"}
        assert get_map_fn("alpaca")(row) == xtuner_map_fns()["alpaca"](row) == {"conversation": []}


def test_openai_loss_flag_and_leading_assistant():
    # real mllm rows: a leading assistant message is skipped, loss=False masks an answer
    row = copy.deepcopy(MLLM[0])
    row["messages"].insert(0, {"role": "assistant", "content": "opening"})
    row["messages"][-1]["loss"] = False
    got = get_map_fn("openai")(row)
    assert got == xtuner_map_fns()["openai"](row)
    assert got["conversation"][-1]["output_with_loss"] is False
    assert all(t["output"] != "opening" for t in got["conversation"])


def test_oasst1_trailing_question_is_dropped():
    text = "### Human: Hi there ### Assistant: Hello! ### Human: And then?"
    got = get_map_fn("oasst1")({"text": text})
    assert got == {"conversation": [{"input": "Hi there", "output": "Hello!"}]}
    assert got == xtuner_map_fns()["oasst1"]({"text": text})


# --- names ---------------------------------------------------------------------------


def test_names_and_aliases_resolve():
    assert get_map_fn("alpaca") is get_map_fn("alpaca_map_fn") is MAP_FNS["alpaca"].fn
    # XTuner's DATASET_FORMAT_MAPPING spells it 'crime_kg_assitan'
    assert get_map_fn("crime_kg_assitan") is get_map_fn("crime_kg_assitant")
    assert get_map_fn("crime_kg_assitant_map_fn") is MAP_FNS["crime_kg_assitant"].fn
    for name in ("sharegpt", "conversation"):
        assert callable(get_map_fn(name))
    fn = lambda ex: {"conversation": []}  # noqa: E731
    assert get_map_fn(fn) is fn


def test_unknown_name_suggests():
    with pytest.raises(DataError) as err:
        get_map_fn("alpacca")
    msg = str(err.value)
    assert "alpacca" in msg and "Did you mean" in msg and "alpaca" in msg.split("Did you mean")[1]
    assert "openai" in msg  # the known names are listed
    assert "file.py:function" in msg


# --- malformed rows through build_dataset ---------------------------------------------


def _write(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    else:
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


def _build(path, map_fn, stories_tokenizer, **kw):
    return build_dataset(str(path), tokenizer=stories_tokenizer, template="default", map_fn=map_fn,
                         max_length=512, cache=False, **kw)


def _good_alpaca(n):
    return [dict(r) for r in ALPACA_EN[:n]]


def _good_openai(n):
    return copy.deepcopy(MLLM[:n])


def _bad_rows():
    """(map_fn, file name, rows with a fault at row 2, column)."""
    alpaca_null = _good_alpaca(5)
    alpaca_null[2]["output"] = None
    alpaca_missing = _good_alpaca(5)
    del alpaca_missing[2]["instruction"]  # a key absent in one JSON row reads as null
    alpaca_int = _good_alpaca(5)
    alpaca_int[2]["output"] = 42
    openai_int = _good_openai(5)
    openai_int[2]["messages"][0]["content"] = 7
    openai_role = _good_openai(5)
    openai_role[2]["messages"][0]["role"] = "narrator"
    wiz_role = copy.deepcopy(MEDICAL_SFT[:5])
    wiz_role[2]["conversations"][0]["from"] = "system"
    share_role = copy.deepcopy(MEDICAL_SFT[:5])
    share_role[2]["conversations"][1]["from"] = "bot"
    share_list = copy.deepcopy(MEDICAL_SFT[:5])
    share_list[2]["conversations"][1]["value"] = ["not", "text"]
    return {
        "alpaca-null": ("alpaca", "a.json", alpaca_null, "output"),
        "alpaca-missing-key": ("alpaca", "a.jsonl", alpaca_missing, "instruction"),
        "alpaca-int": ("alpaca", "a.json", alpaca_int, "output"),
        "openai-int": ("openai", "o.jsonl", openai_int, "messages"),
        "openai-role": ("openai", "o.jsonl", openai_role, "messages"),
        "wizardlm-role": ("wizardlm", "w.jsonl", wiz_role, "conversations"),
        "sharegpt-role": ("sharegpt", "s.jsonl", share_role, "conversations"),
        "sharegpt-list": ("sharegpt", "s.jsonl", share_list, "conversations"),
    }


@pytest.mark.parametrize("case", sorted(_bad_rows()))
def test_malformed_row_names_row_column_and_map_fn(case, tmp_path, stories_tokenizer):
    map_fn, name, rows, column = _bad_rows()[case]
    path = _write(tmp_path, rows, name)
    with pytest.raises(DataError) as err:
        _build(path, map_fn, stories_tokenizer)
    msg = str(err.value)
    assert "row 2" in msg, msg
    assert repr(column) in msg or column in msg, msg
    assert map_fn in msg, msg
    assert str(path) in msg, msg


def test_unknown_role_message_says_which_role(tmp_path, stories_tokenizer):
    _, name, rows, _ = _bad_rows()["openai-role"]
    with pytest.raises(DataError, match="narrator"):
        _build(_write(tmp_path, rows, name), "openai", stories_tokenizer)


def test_column_missing_from_whole_dataset(tmp_path, stories_tokenizer):
    rows = [{"instruction": r["instruction"], "response": r["output"]} for r in ALPACA_EN[:4]]
    with pytest.raises(DataError) as err:
        _build(_write(tmp_path, rows), "alpaca", stories_tokenizer)
    msg = str(err.value)
    assert "row 0" in msg and "'output'" in msg and "alpaca" in msg
    assert "response" in msg  # the columns that are present are listed


def test_bad_row_found_with_num_proc(tmp_path, stories_tokenizer):
    rows = _good_alpaca(400)
    rows[333]["output"] = None  # in the second worker's shard
    with pytest.raises(DataError) as err:
        _build(_write(tmp_path, rows), "alpaca", stories_tokenizer, num_proc=2)
    msg = str(err.value)
    assert "row 333" in msg and "'output'" in msg and "alpaca" in msg, msg


# --- custom map_fns ------------------------------------------------------------------

XTUNER_STYLE_FN = textwrap.dedent(
    '''
    # An XTuner custom map_fn, unchanged: plain dict access, XTuner's contract.
    def my_map_fn(example):
        return {
            "conversation": [
                {"input": example["instruction"].upper(), "output": example["output"]}
            ]
        }
    '''
)


def test_custom_map_fn_from_file(tmp_path, stories_tokenizer):
    (tmp_path / "my_fn.py").write_text(XTUNER_STYLE_FN)
    spec = f"{tmp_path / 'my_fn.py'}:my_map_fn"
    fn = get_map_fn(spec)
    assert fn(ALPACA_EN[0]) == {"conversation": [{"input": ALPACA_EN[0]["instruction"].upper(),
                                                  "output": ALPACA_EN[0]["output"]}]}
    data = _write(tmp_path, _good_alpaca(12), "a.json")
    ds, report = _build(data, spec, stories_tokenizer)
    assert report.rows == 12 and report.kept == 12
    prompt_ids = stories_tokenizer.encode("<|User|>:" + ALPACA_EN[0]["instruction"].upper(), add_special_tokens=False)
    assert ds[0]["input_ids"][1: 1 + len(prompt_ids)] == prompt_ids


def test_custom_map_fn_keyerror_is_reported(tmp_path, stories_tokenizer):
    (tmp_path / "my_fn.py").write_text(XTUNER_STYLE_FN)
    rows = [{"question": r["instruction"], "output": r["output"]} for r in ALPACA_EN[:3]]
    with pytest.raises(DataError) as err:
        _build(_write(tmp_path, rows), f"{tmp_path / 'my_fn.py'}:my_map_fn", stories_tokenizer)
    assert "row 0" in str(err.value) and "instruction" in str(err.value)


def test_custom_map_fn_from_module():
    fn = get_map_fn("backend.data.map_fns:default_map_fn")
    assert fn is MAP_FNS["default"].fn
    assert fn({"input": "a", "output": "b"}) == {"conversation": [{"input": "a", "output": "b"}]}


def test_custom_map_fn_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        get_map_fn(f"{tmp_path / 'nope.py'}:my_map_fn")
    (tmp_path / "my_fn.py").write_text(XTUNER_STYLE_FN)
    with pytest.raises(DataError) as err:
        get_map_fn(f"{tmp_path / 'my_fn.py'}:other_fn")
    assert "other_fn" in str(err.value)
    (tmp_path / "broken.py").write_text("def f(:\n")
    with pytest.raises(DataError, match="failed to import"):
        get_map_fn(f"{tmp_path / 'broken.py'}:f")
    with pytest.raises(DataError, match="cannot be imported"):
        get_map_fn("no_such_package_xyz.mod:fn")
    with pytest.raises(DataError, match="no function"):
        get_map_fn("backend.data.map_fns:no_such_fn")


# --- sharegpt ------------------------------------------------------------------------

_PROMPT_ROLES, _ANSWER_ROLES = {"human", "observation"}, {"gpt", "function_call"}


def test_sharegpt_glaive_toolcalls():
    assert len(GLAIVE) == 300
    for i, row in enumerate(GLAIVE):
        _check_glaive_row(i, row)


def _check_glaive_row(i, row):
    conv = get_map_fn("sharegpt")(copy.deepcopy(row))["conversation"]
    msgs = row["conversations"]
    assert {m["from"] for m in msgs} <= _PROMPT_ROLES | _ANSWER_ROLES
    # every gpt / function_call message is a trained output, in order
    assert [t["output"] for t in conv] == [m["value"] for m in msgs if m["from"] in _ANSWER_ROLES], i
    # each turn's input: the human / observation messages since the last answer
    expected_inputs, pending = [], []
    for m in msgs:
        if m["from"] in _PROMPT_ROLES:
            pending.append(m["value"])
        else:
            expected_inputs.append("\n".join(pending))
            pending = []
    assert [t["input"] for t in conv] == expected_inputs, i
    # the tools text lands in the first turn's system, and only there
    if row["tools"] not in ("", "[]"):
        assert row["tools"] in conv[0]["system"], i
    else:
        assert "system" not in conv[0], i
    assert all("system" not in t for t in conv[1:]), i


def test_sharegpt_glaive_observation_is_prompt_function_call_is_trained(stories_tokenizer):
    from backend.data import encode

    row = next(r for r in GLAIVE if any(m["from"] == "observation" for m in r["conversations"]))
    call = next(m["value"] for m in row["conversations"] if m["from"] == "function_call")
    obs = next(m["value"] for m in row["conversations"] if m["from"] == "observation")
    conv = get_map_fn("sharegpt")(row)["conversation"]
    out = encode(conv, stories_tokenizer, "default")
    trained = stories_tokenizer.decode([t for t in out["labels"] if t != -100])
    assert call in trained and obs not in trained
    assert obs in stories_tokenizer.decode(out["input_ids"])


def test_sharegpt_medical_equals_xtuner_wizardlm():
    # human/gpt only: ShareGPT must read it exactly as XTuner's wizardlm_map_fn does
    theirs = xtuner_map_fns()["wizardlm"]
    for row in MEDICAL_SFT:
        assert get_map_fn("sharegpt")(copy.deepcopy(row)) == theirs(copy.deepcopy(row))


def test_sharegpt_system_turn_and_column():
    base = copy.deepcopy(MEDICAL_SFT[0]["conversations"])
    conv = get_map_fn("sharegpt")({"conversations": [{"from": "system", "value": "Be brief."}] + base})
    assert conv["conversation"][0]["system"] == "Be brief."
    conv = get_map_fn("sharegpt")({"conversations": base, "system": "Be kind."})
    assert conv["conversation"][0]["system"] == "Be kind."
    with pytest.raises(RowError) as err:
        get_map_fn("sharegpt")({"conversations": base + [{"from": "system", "value": "late"}]})
    assert err.value.column == "conversations"


# --- detect_map_fn -------------------------------------------------------------------


def _cols(rows):
    return list(rows[0])


@pytest.mark.parametrize(
    "rows, expected",
    [
        (ALPACA_EN, "alpaca"),
        (CODE_ALPACA, "alpaca"),
        (CASES["alpaca_zh"], "alpaca_zh"),
        (PIRATE, "openai"),
        (MLLM, "openai"),
        (MEDICAL_SFT, "sharegpt"),
        (GLAIVE, "sharegpt"),
        (C4, "pretrain"),
        (CASES["oasst1"], "oasst1"),
        (CASES["code_alpaca"], "code_alpaca"),
        (CASES["tiny_codes"], "tiny_codes"),
        (CASES["openorca"], "openorca"),
        (CASES["sql"], "sql"),
        (CASES["arxiv"], "arxiv"),
        (CASES["colors"], "colors"),
        (CASES["default"], "default"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_detect_map_fn(rows, expected):
    name, reason = detect_map_fn(_cols(rows), rows[:5])
    assert name == expected, reason
    assert reason


def test_detect_text_column_peeks_at_rows():
    assert detect_map_fn(["text"], CASES["oasst1"][:5])[0] == "oasst1"
    assert detect_map_fn(["text"], C4[:5])[0] == "pretrain"
    # one plain row among dialogues: not all guanaco-shaped -> pretrain
    assert detect_map_fn(["text"], CASES["oasst1"][:4] + C4[:1])[0] == "pretrain"


def test_detect_unknown_columns():
    name, reason = detect_map_fn(["foo", "bar"], [{"foo": "x", "bar": "y"}])
    assert name is None
    assert "foo" in reason and "bar" in reason
    assert "map_fn" in reason and ".py:function" in reason  # says what to do


def test_build_dataset_auto_detects(tmp_path, stories_tokenizer):
    _, report = build_dataset(str(DATA / "openai/pirate_training_set.jsonl"), tokenizer=stories_tokenizer,
                              template="default", max_length=None, cache=False)
    assert report.map_fn == "openai" and "auto-detected" in report.map_fn_reason
    path = _write(tmp_path, [{"foo": "x"}] * 3)
    with pytest.raises(DataError, match="cannot tell"):
        build_dataset(str(path), tokenizer=stories_tokenizer, template="default", cache=False)
