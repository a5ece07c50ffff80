"""Prompt templates: XTuner 0.2's tables field for field, rendering against a
real chat template, and the whole pipeline against XTuner's own
``template_map_fn`` + ``encode_fn`` token for token."""

from __future__ import annotations

import copy
import importlib
import json

import pytest

from backend.data import (
    IGNORE_INDEX,
    SYSTEM_TEMPLATE,
    TEMPLATES,
    DataError,
    build_dataset,
    encode,
    generation_prompt,
    get_map_fn,
    get_template,
    to_messages,
)
from conftest import DATA
from xtuner_oracle import (
    xtuner_encode_fn,
    xtuner_map_fns,
    xtuner_prompt_templates,
    xtuner_system_templates,
    xtuner_template_map_fn,
)

encode_module = importlib.import_module("backend.data.encode")  # the module: backend.data.encode is also the function
FIELDS = {"SYSTEM": None, "INSTRUCTION": None, "SUFFIX": "", "SUFFIX_AS_EOS": False, "SEP": "", "STOP_WORDS": ()}
DEFAULT_SYSTEM = "You are a helpful assistant"  # what minimind's chat_template puts when there is none


def _jsonl(path):
    return [json.loads(line) for line in (DATA / path).read_text(encoding="utf-8").splitlines() if line.strip()]


PIRATE = _jsonl("openai/pirate_training_set.jsonl")
MLLM = _jsonl("openai/mllm_sft_text_example_data.jsonl")
MEDICAL_SFT = _jsonl("sharegpt/medical_sft_1K_format.jsonl")


# --- the tables ----------------------------------------------------------------------


def test_xtuner_prompt_templates_field_for_field():
    xt = xtuner_prompt_templates()
    assert len(xt) >= 27
    missing = sorted(set(xt) - set(TEMPLATES))
    assert not missing, f"XTuner templates missing here: {missing}"
    for name, fields in xt.items():
        ours = get_template(name)
        assert ours.name == name
        assert set(fields) <= set(FIELDS), f"{name}: unexpected XTuner fields {set(fields) - set(FIELDS)}"
        for field, default in FIELDS.items():
            expected = fields.get(field, default)
            if field == "STOP_WORDS":
                expected = tuple(expected)
            got = getattr(ours, field)
            assert got == expected and type(got) is type(expected), f"{name}.{field}: {got!r} != {expected!r}"


def test_xtuner_system_templates():
    xt = xtuner_system_templates()
    assert set(xt) == set(SYSTEM_TEMPLATE.names())
    for name, text in xt.items():
        assert getattr(SYSTEM_TEMPLATE, name) == text, name


def test_our_extra_templates():
    assert get_template("none").raw
    assert get_template("hf_chat_template").uses_tokenizer_chat_template
    assert get_template(None) is TEMPLATES["none"]
    assert get_template(TEMPLATES["zephyr"]) is TEMPLATES["zephyr"]


def test_unknown_template():
    with pytest.raises(DataError) as err:
        get_template("qwen_chta")
    msg = str(err.value)
    assert "qwen_chta" in msg
    assert "Did you mean" in msg and "qwen_chat" in msg.split("Did you mean")[1].split(".")[0]
    known = msg.split("Known templates:")[1]
    for name in ("internlm2_chat", "llama3_chat", "hf_chat_template", "none"):
        assert name in known


def test_template_dict_access():
    t = get_template("qwen_chat")
    assert t.get("SUFFIX") == "<|im_end|>"
    assert t.get("SUFFIX_AS_EOS") is True
    assert t.get("NO_SUCH_FIELD", "fallback") == "fallback"
    with pytest.raises(Exception):  # frozen, like a shared table should be
        t.SUFFIX = "x"


def test_system_text_without_a_system_slot():
    # minicpm has no SYSTEM in XTuner (its template_map_fn would crash there)
    with pytest.raises(DataError, match="no SYSTEM slot"):
        get_template("minicpm").format_input("hi", "be nice", 1)


# --- rendering against minimind's real ChatML chat_template --------------------------


def _chatml_cases():
    """(conversation, messages) pairs from real data, all with a system prompt so
    minimind's template does not inject its default one."""
    cases = []
    for row in PIRATE:  # system/user/assistant
        cases.append((get_map_fn("openai")(row)["conversation"], row["messages"]))
    for row in MLLM[:80]:  # up to 8 turns, no system: add minimind's default one
        messages = [{"role": "system", "content": DEFAULT_SYSTEM}] + row["messages"]
        cases.append((get_map_fn("openai")({"messages": messages})["conversation"], messages))
    for row in MEDICAL_SFT[:80]:
        conv = get_map_fn("sharegpt")(
            {"conversations": [{"from": "system", "value": DEFAULT_SYSTEM}] + row["conversations"]}
        )["conversation"]
        cases.append((conv, to_messages(conv)))
    return cases


def _starts_with_space(conversation):
    return any(t["output"][:1].isspace() or t["input"][:1].isspace() for t in conversation)


def test_qwen_chat_renders_like_the_chat_template(minimind_tokenizer):
    tok = minimind_tokenizer
    n_tokens_equal = 0
    for conv, messages in _chatml_cases():
        ids = encode(conv, tok, "qwen_chat")["input_ids"]
        assert tok.decode(ids) == tok.apply_chat_template(messages, tokenize=False)
        ref_ids = list(tok.apply_chat_template(messages, tokenize=True)["input_ids"])
        # We tokenize prompt and answer separately (as XTuner does); the chat
        # template tokenizes the whole text. With this byte-level BPE the two
        # agree token for token except where an answer (or prompt) starts with
        # whitespace: whole-text tokenization then merges that whitespace with
        # the "\n" before it ("assistant\n" + " \n..." -> "\n " + "\n"). The
        # text is the same either way (asserted above), so there we only check
        # that the token streams decode alike.
        if _starts_with_space(conv):
            assert tok.decode(ref_ids) == tok.decode(ids)
        else:
            assert ids == ref_ids
            n_tokens_equal += 1
    assert n_tokens_equal >= 150


def test_turn_by_turn_tokenization_differs_at_leading_whitespace(minimind_tokenizer):
    # documents the one case above where the token streams differ
    tok = minimind_tokenizer
    messages = [{"role": "system", "content": DEFAULT_SYSTEM},
                {"role": "user", "content": MEDICAL_SFT[0]["conversations"][0]["value"]},
                {"role": "assistant", "content": " \n" + MEDICAL_SFT[0]["conversations"][1]["value"]}]
    conv = get_map_fn("openai")({"messages": messages})["conversation"]
    ids = encode(conv, tok, "qwen_chat")["input_ids"]
    ref_ids = list(tok.apply_chat_template(messages, tokenize=True)["input_ids"])
    assert ids != ref_ids
    assert tok.decode(ids) == tok.decode(ref_ids) == tok.apply_chat_template(messages, tokenize=False)


def _trained_runs(out):
    """Runs of consecutive trained tokens."""
    runs, cur = [], []
    for tok_id, label in zip(out["input_ids"], out["labels"]):
        if label == IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            assert label == tok_id
            cur.append(tok_id)
    return runs + ([cur] if cur else [])


def test_hf_chat_template_trains_only_assistant_parts(minimind_tokenizer):
    tok = minimind_tokenizer
    cases = [(c, m) for c, m in _chatml_cases() if not _starts_with_space(c)]
    # and some without a system prompt: the template injects its default one
    for row in MLLM[80:120]:
        cases.append((get_map_fn("openai")(row)["conversation"], row["messages"]))
    for conv, messages in cases:
        out = encode(conv, tok, "hf_chat_template")
        text = tok.apply_chat_template(messages, tokenize=False)
        assert tok.decode(out["input_ids"]) == text
        assert out["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
        answers = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
        assert [tok.decode(run) for run in _trained_runs(out)] == answers


def test_hf_chat_template_masks_output_without_loss(minimind_tokenizer):
    messages = copy.deepcopy(next(r for r in MLLM if len(r["messages"]) >= 6)["messages"])
    assert len(messages) >= 4
    messages[1]["loss"] = False
    conv = get_map_fn("openai")({"messages": messages})["conversation"]
    out = encode(conv, minimind_tokenizer, "hf_chat_template")
    answers = [m["content"] + "<|im_end|>" for m in messages[3::2]]
    assert [minimind_tokenizer.decode(run) for run in _trained_runs(out)] == answers


def test_hf_chat_template_trains_a_first_answer_token_bpe_would_merge_with_the_prompt(minimind_tokenizer):
    """A generation prompt ending in a space ("### Assistant: ") and an answer starting with a letter: tokenized
    whole, BPE makes " D" + "o" and the D was never trained. Parts are tokenized apart: every answer character is
    trained, and the prompt's tokens are exactly what generation_prompt gives the model at inference."""
    tok = copy.deepcopy(minimind_tokenizer)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}### Human: {{ m['content'] }}\n"
                         "{% elif m['role'] == 'assistant' %}### Assistant: {{ m['content'] }}\n{% endif %}"
                         "{% endfor %}{% if add_generation_prompt %}### Assistant: {% endif %}")
    whole = tok("### Assistant: Do", add_special_tokens=False)["input_ids"]
    assert tok.decode(whole[-1:]) == " Do"  # the merge: one token across the prompt/answer border
    conv = [{"input": "Hi there", "output": "Do not worry."}, {"input": "Why?", "output": "Because."}]
    out = encode(conv, tok, "hf_chat_template")
    assert [tok.decode(run) for run in _trained_runs(out)] == ["Do not worry.", "Because."]
    prompt = generation_prompt([{"input": "Hi there"}], tok, "hf_chat_template")
    assert out["input_ids"][:len(prompt)] == prompt


def test_hf_chat_template_renders_through_the_compiled_template_as_apply_chat_template_does(minimind_tokenizer):
    """The batch path renders with transformers' compiled template straight (no per-conversation
    re-validation): every text equals apply_chat_template's, with and without the generation prompt, and a
    str subclass in a message reaches the template as a plain str."""
    class Marked(str):
        def shout(self):  # a method a template must never see
            return self.upper()

    chats = [to_messages(get_map_fn("openai")(row)["conversation"]) for row in MLLM[:30]]
    chats[0][0]["content"] = Marked(chats[0][0]["content"])
    render = encode_module._ChatRenderer(minimind_tokenizer)
    assert render.direct is not None
    for add_generation_prompt in (False, True):
        got = render(chats, add_generation_prompt)
        assert render.checked[add_generation_prompt] is True  # the direct path was taken
        assert got == list(minimind_tokenizer.apply_chat_template(chats, tokenize=False,
                                                                  add_generation_prompt=add_generation_prompt))
    assert type(to_messages([{"input": Marked("hi"), "output": "yo"}])[0]["content"]) is str


def test_the_direct_render_keeps_the_sandbox(minimind_tokenizer):
    """The direct path reads a message's keys first, and nothing else: a template reaching for a dict's
    internals is stopped by the same SecurityError as through apply_chat_template."""
    import jinja2

    tok = copy.deepcopy(minimind_tokenizer)
    tok.chat_template = "{% for m in messages %}{{ m.role }}{{ m.__class__.__mro__[1].__subclasses__() }}{% endfor %}"
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(jinja2.exceptions.SecurityError, match="__class__"):
        tok.apply_chat_template(messages, tokenize=False)
    with pytest.raises(jinja2.exceptions.SecurityError, match="__class__"):
        encode_module._template_renderer(tok)(messages, False)
    tok.chat_template = "{% for m in messages %}{{ m.role }}:{{ m.items()|list|length }}:{{ m.nothing }};{% endfor %}"
    assert encode_module._template_renderer(tok)(messages, False) == tok.apply_chat_template(messages,
                                                                                             tokenize=False) == "user:2:;"


# templates that reach through each shortcut of ``encode._fast_template`` (a str's methods, a loop's and a
# namespace's attributes, calling a str method) for what the sandbox allows and for what it stops
_SHORTCUT_PROBES = [
    "{% for m in messages %}{{ m.content.upper() }}{{ m.content.split(' ')|length }}"
    "{{ m.content.startswith('h') }}{% endfor %}",
    "{% for m in messages %}{{ loop.index0 }}{{ loop.first }}{{ loop.last }}{{ loop.cycle('a', 'b') }}{% endfor %}",
    "{% set ns = namespace(n=0, f=messages[0].content.format) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
    "{% endfor %}{{ ns.n }}{{ ns.f(1) }}{{ ns.missing }}",
    "{{ messages[0].content.format(messages[0]) }}",  # "{0.__class__}": the sandbox's formatter refuses it
    "{{ messages[1].content.format_map({'a': 1}) }}",
    "{{ messages[0].content.__class__.__mro__ }}",
    "{{ messages[0].content.__class__.__mro__[1].__subclasses__() }}",
    "{% for m in messages %}{{ loop.__class__.__init__.__globals__ }}{% endfor %}",
    "{% set ns = namespace(a=1) %}{{ ns._Namespace__attrs }}{{ ns.__dict__.clear() }}",
    "{{ messages[0].content.nothing }}{{ messages[0].content.nothing() }}",
]


@pytest.mark.parametrize("source", _SHORTCUT_PROBES)
def test_the_direct_render_answers_as_the_sandbox_does_through_every_shortcut(minimind_tokenizer, source):
    """Each probe renders to the same text through the direct path as through apply_chat_template, or
    is stopped by the same exception (SecurityError for the internals and the unsafe format)."""
    import jinja2

    tok = copy.deepcopy(minimind_tokenizer)
    tok.chat_template = source
    messages = [{"role": "user", "content": "{0.__class__}"}, {"role": "assistant", "content": "hi there"}]
    outcomes = []
    for render in (lambda: tok.apply_chat_template(messages, tokenize=False),
                   lambda: encode_module._template_renderer(tok)(messages, False)):
        try:
            outcomes.append(("text", render()))
        except (jinja2.exceptions.SecurityError, jinja2.exceptions.UndefinedError, TypeError) as error:
            outcomes.append((type(error), str(error)))
    assert outcomes[0] == outcomes[1]


def test_the_probes_reach_the_sandbox_refusals(minimind_tokenizer):
    """The probes above test refusals, not only renders: the internals raise SecurityError, and the
    format method stays the sandbox's (``"{0.__class__}".format(x)`` gives nothing, not x's class)."""
    import jinja2

    tok = copy.deepcopy(minimind_tokenizer)
    messages = [{"role": "user", "content": "{0.__class__}"}]
    for source in _SHORTCUT_PROBES[5:8]:
        tok.chat_template = source
        with pytest.raises(jinja2.exceptions.SecurityError, match="unsafe"):
            encode_module._template_renderer(tok)(messages, False)
    tok.chat_template = _SHORTCUT_PROBES[3]
    assert encode_module._template_renderer(tok)(messages, False) == ""
    assert "{0.__class__}".format(messages[0]) == "<class 'dict'>"


def test_hf_chat_template_falls_back_to_apply_chat_template_when_the_direct_render_differs(minimind_tokenizer,
                                                                                           monkeypatch):
    """Should transformers render differently from the compiled template called straight (a new template
    variable, say), the first conversation's check catches it and the batch goes through
    apply_chat_template: the encoded samples are the same as ever."""
    conv = [{"input": "Hi there", "output": "Hello."}, {"input": "And?", "output": "Bye."}]
    expected = encode(conv, minimind_tokenizer, "hf_chat_template")
    real = encode_module._template_renderer

    def drifting(tokenizer):
        direct = real(tokenizer)
        return lambda messages, add_generation_prompt: "drift " + direct(messages, add_generation_prompt)

    monkeypatch.setattr(encode_module, "_template_renderer", drifting)
    render = encode_module._ChatRenderer(minimind_tokenizer)
    assert render([to_messages(conv)], False) == [minimind_tokenizer.apply_chat_template(to_messages(conv),
                                                                                         tokenize=False)]
    assert render.checked[False] is False
    assert encode(conv, minimind_tokenizer, "hf_chat_template") == expected


def test_hf_chat_template_needs_a_chat_template(stories_tokenizer):
    with pytest.raises(DataError, match="chat_template"):
        encode([{"input": "a", "output": "b"}], stories_tokenizer, "hf_chat_template")


# --- the whole pipeline against XTuner's template_map_fn + encode_fn ------------------

# name -> (file, map_fn, rows, max_length). The stories260K tokenizer spends
# about one token per 2-3 characters, so 256 truncates most samples; pirate
# gets 512 because llama2_chat's stock system prompt alone is ~300 tokens.
SOURCES = {
    "alpaca_en_demo": ("alpaca/alpaca_en_demo.json", "alpaca", 100, 256),
    "mllm_multi_turn": ("openai/mllm_sft_text_example_data.jsonl", "openai", 200, 256),
    "pirate_system": ("openai/pirate_training_set.jsonl", "openai", 10, 512),
}
PIPELINE_TEMPLATES = ["internlm2_chat", "llama2_chat", "default", "qwen_chat", "llama3_chat", "chatglm2", "zephyr"]


def _raw_rows(path, limit):
    text = (DATA / path).read_text(encoding="utf-8")
    rows = json.loads(text) if path.endswith(".json") else [json.loads(x) for x in text.splitlines() if x.strip()]
    return rows[:limit]


_SPELLING: dict = {}


def spelling(tokenizer, template):
    """stories260K with the template's markers added as tokens (model.add_template_tokens), as
    training would use it: without them the pipeline refuses the template (test_template_tokens.py)."""
    if template not in _SPELLING:
        import copy

        from backend.data import add_template_tokens

        _SPELLING[template] = copy.deepcopy(tokenizer)
        add_template_tokens(_SPELLING[template], template)
    return _SPELLING[template]


@pytest.mark.parametrize("template", PIPELINE_TEMPLATES)
@pytest.mark.parametrize("source", sorted(SOURCES))
def test_pipeline_equals_xtuner(source, template, stories_tokenizer):
    path, map_fn, limit, max_length = SOURCES[source]
    stories_tokenizer = spelling(stories_tokenizer, template)
    ds, report = build_dataset(str(DATA / path), tokenizer=stories_tokenizer, template=template,
                               map_fn=map_fn, max_length=max_length, max_rows=limit, pack=False)

    xt_template = xtuner_prompt_templates()[template]
    xt_map_fn = xtuner_map_fns()[map_fn]
    expected, truncated = [], []
    for row in _raw_rows(path, limit):
        example = xtuner_template_map_fn(xt_map_fn(row), xt_template)
        expected.append(xtuner_encode_fn(example, stories_tokenizer, max_length))
        truncated.append(len(xtuner_encode_fn(example, stories_tokenizer, 10**9)["input_ids"]) > max_length)
    # XTuner keeps samples with nothing to train (all labels -100); we drop them
    keep = [any(label != IGNORE_INDEX for label in e["labels"]) for e in expected]
    kept = [e for e, k in zip(expected, keep) if k]
    assert report.rows == len(expected)
    assert report.dropped == report.dropped_no_loss == len(expected) - len(kept)
    assert report.kept == len(ds) == len(kept)
    assert report.truncated == sum(t for t, k in zip(truncated, keep) if k)
    assert ds["input_ids"] == [e["input_ids"] for e in kept]
    assert ds["labels"] == [e["labels"] for e in kept]
    assert ds["length"] == [len(e["input_ids"]) for e in kept]


def test_pipeline_comparison_exercises_truncation_and_drops(stories_tokenizer):
    # guards the test above against comparing only easy samples
    _, report = build_dataset(str(DATA / "alpaca/alpaca_en_demo.json"), tokenizer=stories_tokenizer,
                              template="llama2_chat", map_fn="alpaca", max_length=256, max_rows=100)
    assert report.truncated > 10
    _, report = build_dataset(str(DATA / "openai/mllm_sft_text_example_data.jsonl"), tokenizer=stories_tokenizer,
                              template="chatglm2", map_fn="openai", max_length=256)
    assert report.truncated > 10
    assert report.dropped_no_loss > 10  # prompts longer than 256 tokens leave nothing to train


def test_nothing_trainable_is_an_error(stories_tokenizer):
    # llama2_chat's system prompt + each pirate question exceed 256 tokens: XTuner
    # would train on 10 all-masked samples; we refuse with the counts
    with pytest.raises(DataError, match="no trainable sample: 10 rows.* 10 with no answer token left"):
        build_dataset(str(DATA / "openai/pirate_training_set.jsonl"), tokenizer=stories_tokenizer,
                      template="llama2_chat", map_fn="openai", max_length=256)


def test_chatglm2_round_numbers(stories_tokenizer):
    conv = get_map_fn("openai")(MLLM[next(i for i, r in enumerate(MLLM) if len(r["messages"]) >= 6)])["conversation"]
    text = stories_tokenizer.decode(encode(conv, stories_tokenizer, "chatglm2")["input_ids"])
    assert "[Round 1]" in text and "[Round 2]" in text and "[Round 3]" in text


# --- documented deviation: BOS for tokenizers that declare one but never add it ------


def test_no_bos_for_a_tokenizer_that_does_not_add_it(minimind_tokenizer):
    """minimind declares bos_token <|im_start|> but add_bos_token is false.
    XTuner's encode_fn still puts bos_token_id in front of every sample (and
    after every EOS), doubling <|im_start|>; we put none."""
    tok = minimind_tokenizer
    assert tok.bos_token == "<|im_start|>" and tok.encode("a")[0] != tok.bos_token_id
    bos = tok.bos_token_id
    for row in PIRATE + MLLM[:30]:
        conv = get_map_fn("openai")(row)["conversation"]
        example = {"conversation": conv}
        for template in ("qwen_chat", "default"):
            ours = encode(conv, tok, template)
            theirs = xtuner_encode_fn(
                xtuner_template_map_fn(copy.deepcopy(example), xtuner_prompt_templates()[template]), tok, 10**6
            )
            assert ours["input_ids"][:2] != [bos, bos]
            if template == "qwen_chat":
                # SUFFIX is the EOS: XTuner adds BOS only at the very start
                assert theirs["input_ids"] == [bos] + ours["input_ids"]
                assert theirs["labels"] == [IGNORE_INDEX] + ours["labels"]
                assert tok.decode(theirs["input_ids"]).startswith("<|im_start|><|im_start|>")
            else:
                # EOS after every answer: XTuner adds a BOS at every turn start
                n_turns = len(conv)
                assert theirs["input_ids"].count(bos) == n_turns + ours["input_ids"].count(bos)
                assert [t for t in theirs["input_ids"] if t != bos] == [t for t in ours["input_ids"] if t != bos]
