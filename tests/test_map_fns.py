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


# --- MSAgent-Bench rows ------------------------------------------------------------------
# /work/shared has no MSAgent-Bench file: these rows are built in its format (the
# ModelScope plugin tools, the system preamble, <|startofthink|>```JSON {api_name,
# parameters}```<|endofthink|> calls and <|startofexec|> results, conversations
# stored as text), with every case XTuner's msagent_react_map_fn branches on.

_MSAGENT_PREAMBLE = (
    "当前对话可以使用的插件信息如下，请自行判断是否需要调用插件来解决当前用户问题。若需要调用插件，则需要将插件调用请求按照"
    "json格式给出，必须包含api_name、parameters字段，并在其前后使用<|startofthink|>和<|endofthink|>作为标志。"
    "然后你需要根据插件API调用结果生成合理的答复； 若无需调用插件，则直接给出对应回复即可。\n\n"
)


def _tool(name, description, params=None):
    tool = {"name": name, "description": description, "url": "http://90.49.118.175:2603/"}
    if params is not None:
        tool["paths"] = [{"name": name, "model_id": f"/damo/{name}", "method": "post", "description": description,
                          "parameters": [{"name": k, "description": v, "required": "True"} for k, v in params.items()]}]
    return tool


_TTS = _tool("modelscope_speech-generation", "针对回复的内容，用语音表示，同时可以选择是男声或者女声",
             {"text": "要转成语音的文本", "gender": "用户身份"})
_IE = _tool("modelscope_text-ie", "针对中文的文本，根据schema要抽取的内容，找出其中对应信息，并用json格式展示",
            {"input": "用户输入的文本", "schema": "要抽取信息的json表示"})
_ADDRESS = _tool("modelscope_text-address", "针对中文的地址信息，识别出里面的元素，包括省、市、区、镇、社区、道路、路号等",
                 {"inputs": "输入地址信息"})
_TRANSLATE = _tool("modelscope_text-translation-zh2en", "将输入的中文文本翻译成英文", {"text": "用户输入的中文文本"})


def _system(*tools):
    return {"from": "system", "value": _MSAGENT_PREAMBLE + "\n\n".join(
        f"{i}. {json.dumps(t, ensure_ascii=False)}" for i, t in enumerate(tools, 1))}


def _user(text):
    return {"from": "user", "value": text}


def _assistant(text):
    return {"from": "assistant", "value": text}


def _call(api_name, parameters, fence=True):
    body = json.dumps({"api_name": api_name, "url": f"http://90.49.118.175:2603/damo/{api_name}",
                       "parameters": parameters}, ensure_ascii=False)
    return "<|startofthink|>" + (f"```JSON\n{body}\n```" if fence else body) + "<|endofthink|>"


def _result(value=None, fence=True, raw=None):
    body = json.dumps(value, ensure_ascii=False) if raw is None else raw
    return "<|startofexec|>" + (f"```JSON\n{body}\n```" if fence else body) + "<|endofexec|>"


_AUDIO = "<audio id=audio controls= preload=none> <source id=wav src=http://xdp/5c68265546564117.wav> </audio>"
_POEM = "秋天，是一个美丽的季节，金黄的落叶铺满大地。"


def _msagent_rows():
    tts = [_system(_TTS, _IE, _ADDRESS), _user("生成一首诗歌，主题为“秋天的美景”，读出来这段话"),
           _assistant(f"{_POEM}{_call(_TTS['name'], {'text': _POEM, 'gender': 'woman'})}\n\n"
                      f"{_result({'result': _AUDIO})}\n{_AUDIO}")]
    ie = [_system(_IE, _TRANSLATE), _user("从下面的句子中抽取人物和地点：张三昨天去了杭州西湖。"),
          _assistant(_call(_IE["name"], {"input": "张三昨天去了杭州西湖。", "schema": {"人物": None, "地点": None}})
                     + "\n\n" + _result({"result": {"人物": ["张三"], "地点": ["杭州西湖"]}})
                     + "\n人物：张三；地点：杭州西湖。")]
    address = [_system(_ADDRESS), _user("浙江省杭州市余杭区文一西路969号 这个地址的区是哪里？"),
               _assistant("我来识别这个地址。" + _call(_ADDRESS["name"], {"inputs": "浙江省杭州市余杭区文一西路969号"})
                          + _result({"prov": "浙江省", "city": "杭州市", "district": "余杭区"}))]
    chat = [_system(_TTS, _TRANSLATE), _user("你好，你是谁？"), _assistant("我是一个可以调用外部工具的助手。")]
    no_system = [_user("1+1等于几？"), _assistant("等于2。"), _user("再加3呢？"), _assistant("等于5。")]
    two_rounds = [_system(_TRANSLATE, _TTS), _user("把“今天天气很好”翻译成英文"),
                  _assistant(_call(_TRANSLATE["name"], {"text": "今天天气很好"})
                             + _result({"result": "The weather is nice today."}) + "The weather is nice today."),
                  _user("用男声读出来"),
                  _assistant("好的，" + _call(_TTS["name"], {"text": "The weather is nice today.", "gender": "man"})
                             + _result({"result": _AUDIO}) + _AUDIO)]
    two_calls = [_system(_TRANSLATE, _TTS), _user("翻译“你好”并读出来"),
                 _assistant("先翻译。" + _call(_TRANSLATE["name"], {"text": "你好"}) + "\n\n再朗读。"
                            + _call(_TTS["name"], {"text": "Hello", "gender": "woman"}, fence=False)
                            + _result({"result": _AUDIO}) + "\n" + _AUDIO)]
    bad_call = [_system(_TTS), _user("读一下“早上好”"),
                _assistant("<|startofthink|>```JSON\n{\"api_name\": \"modelscope_speech-generation\", "
                           "\"parameters\": {\"text\": \"早上好\"</|endofthink|><|endofthink|>")]
    no_parameters = [_system(_TTS), _user("读一下“晚上好”"),
                     _assistant("<|startofthink|>```JSON\n{\"api_name\": \"modelscope_speech-generation\"}"
                                "\n```<|endofthink|>")]
    list_call = [_system(_TTS), _user("读一下“你好”"), _assistant("<|startofthink|>[1, 2]<|endofthink|>")]
    two_results = [_system(_TTS), _user("读两遍“你好”"),
                   _assistant(_call(_TTS["name"], {"text": "你好"}) + _result({"result": _AUDIO})
                              + _result({"result": _AUDIO}) + _AUDIO)]
    bad_result = [_system(_ADDRESS), _user("北京市海淀区中关村大街1号在哪个区？"),
                  _assistant(_call(_ADDRESS["name"], {"inputs": "北京市海淀区中关村大街1号"})
                             + _result(raw="{'district': '海淀区'") + "在海淀区。")]
    answer_marker = [_system(_ADDRESS), _user("上海市浦东新区世纪大道100号在哪个区？"),
                     _assistant(_call(_ADDRESS["name"], {"inputs": "上海市浦东新区世纪大道100号"})
                                + _result({"district": "浦东新区"}) + "Final Answer: 浦东新区")]
    unclosed_result = [_system(_ADDRESS), _user("广州市天河区体育西路在哪个区？"),
                       _assistant(_call(_ADDRESS["name"], {"inputs": "广州市天河区体育西路"})
                                  + "<|startofexec|>```JSON\n{\"district\": \"天河区\"}\nFinal Answer:天河区")]
    short = [_user("只有一句话")]
    odd_tools = [{"from": "system", "value": (
        _MSAGENT_PREAMBLE + '1. {"name": "get_weather", "description": "查询城市天气"}\n\n'
        '2. {"name": "empty_tool", "description": "没有参数", "paths": [{"parameters": []}]}\n\n'
        '3. {"name": "get_weather", "description": "查询天气（重复）", "paths": [{"parameters": '
        '[{"name": "city", "description": "城市"}]}]}\n\n'
        '4. {"broken": {"name": "inner_tool", "description": "藏在坏 JSON 里"}, }\n\n'
        '5. {"wrapper": {"name": "nested_tool", "description": "包在不是工具的对象里"}}\n\n'
        '6. {"name": "no_description"} {"description": "no name"} {"name": 7, "description": 8}')},
        _user("北京今天天气怎么样？"),
        _assistant(_call("get_weather", {"city": "北京"}) + _result("晴，25度") + "北京今天晴，25度。")]
    values = [_system(_IE), _user("抽取数字"),
              _assistant(_call(_IE["name"], {"input": "一二三", "schema": ["数字"]}) + _result([1, 2, 3])
                         + "\n1、2、3\n"),
              _user("再抽取一次"),
              _assistant(_call(_IE["name"], {"input": "四", "schema": ["数字"]}) + _result(4.0, fence=False) + "\n")]
    markers = [_system(_TTS), _user("说“你好”"),
               _assistant("<|startofthink|>没有结束标志的思考"), _user("再试一次"),
               _assistant("前文" + _call(_TTS["name"], {"text": "你好"}) + "后文，没有调用结果。")]
    order = [_user("先说问题"), _system(_TTS), _system(_TRANSLATE), _assistant("直接回答。"),
             _assistant("没有新问题的回答。")]
    as_python = [_system(_TRANSLATE), _user("把“谢谢”翻译成英文"),
                 _assistant(_call(_TRANSLATE["name"], {"text": "谢谢"}) + _result({"result": "Thank you"}) + "Thank you")]
    rows = [tts, ie, address, chat, no_system, two_rounds, two_calls, bad_call, no_parameters, list_call,
            two_results, bad_result, answer_marker, unclosed_result, short, odd_tools, values, markers, order]
    out = [{"conversations": json.dumps(r, ensure_ascii=False) if i % 2 == 0 else r} for i, r in enumerate(rows)]
    out.append({"conversations": repr(as_python)})  # the text of a Python list, as XTuner eval()s it
    return out


CASES["msagent_react"] = _msagent_rows()

# XTuner map_fns we do not provide (multimodal formats).
NOT_PROVIDED = {"llava", "llava_image_only"}


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


def test_msagent_rows_reach_every_branch():
    # guards the equality test above against comparing only easy rows
    outs = [xtuner_map_fns()["msagent_react"](copy.deepcopy(r))["conversation"] for r in CASES["msagent_react"]]
    turns = [t for out in outs for t in out]
    assert sum(out == [] for out in outs) == 5  # bad JSON, no parameters, a list, two results, one turn
    assert sum("input" not in t and t["system"].startswith("Response:") for t in turns) >= 6
    assert any(t["system"].startswith("<|startofexec|>") for t in turns)  # a result never closed
    assert any(t["output"].count("Action:") == 2 for t in turns)  # two calls in one reply
    assert any(t["output"].startswith("Thought:") for t in turns)
    assert sum(t["output"].startswith("Final Answer:") and "system" in t and "input" in t for t in turns) >= 4
    assert any(t["output"].endswith("\n\n") and "input" not in t for t in turns)  # the trailing-newline quirk
    tools = next(t["system"] for t in turns if "inner_tool" in t.get("system", ""))
    assert "nested_tool" in tools and "no_description" not in tools and "输入参数: {}" in tools


def test_msagent_trains_the_calls_and_answers_not_the_results(stories_tokenizer):
    from backend.data import encode
    from xtuner_oracle import xtuner_encode_fn, xtuner_prompt_templates, xtuner_template_map_fn

    row = CASES["msagent_react"][0]  # a poem read out by the speech tool
    conv = get_map_fn("msagent_react")(copy.deepcopy(row))["conversation"]
    ours = encode(conv, stories_tokenizer, "default")
    example = xtuner_template_map_fn({"conversation": conv}, xtuner_prompt_templates()["default"])
    assert ours == xtuner_encode_fn(example, stories_tokenizer, 10**6)
    trained = stories_tokenizer.decode([t for t in ours["labels"] if t != -100])
    assert "Action:modelscope_speech-generation" in trained and "Final Answer:<audio" in trained
    assert "Response:" not in trained and "可以调用外部工具" not in trained


def test_msagent_bench_file_builds(tmp_path, stories_tokenizer):
    # the Bench's own storage: one JSON line a row, the conversations as text
    rows = [{"conversations": r["conversations"] if isinstance(r["conversations"], str)
             else json.dumps(r["conversations"], ensure_ascii=False)} for r in CASES["msagent_react"]]
    ds, report = build_dataset(str(_write(tmp_path, rows)), tokenizer=stories_tokenizer, template="default",
                               max_length=None, cache=False)
    assert report.map_fn == "msagent_react" and "auto-detected" in report.map_fn_reason
    assert (report.rows, report.dropped, report.kept) == (len(rows), 5, len(rows) - 5) and len(ds) == report.kept


@pytest.mark.parametrize("conversations, message", [
    ([_user("你好"), {"from": "tool", "value": "?"}], "'tool'"),
    ([_user("你好"), {"from": "assistant", "value": ["not", "text"]}], "should be text"),
    ("[{'from': 'user', 'value': '你好'}, {'from': 'assistant'", "does not read as a list"),
    (None, "null"),
    ([{"from": "system", "value": '{"name": {"zh": "天气"}, "description": "查询天气"}'}, _user("北京天气")],
     "a tool's name should be text"),
])
def test_msagent_malformed_rows_raise(conversations, message):
    with pytest.raises(RowError, match=message) as err:
        get_map_fn("msagent_react")({"conversations": conversations})
    assert err.value.column == "conversations"


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
        (CASES["msagent_react"], "msagent_react"),
        (CASES["msagent_react"][1::2], "msagent_react"),  # the conversations as lists
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
