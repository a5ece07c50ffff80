"""Exported chat templates: every expressible prompt template, saved as a Jinja
``chat_template``, renders OpenAI messages exactly as ``encode`` builds the
training sample and ``generation_prompt`` builds the prompt.

How the comparison works (see ``_check_ids``): ``encode`` tokenizes prompt,
answer and SEP one by one (as XTuner does) while ``apply_chat_template``
tokenizes the whole rendered text at once. So the exact claim is checked on the
text -- the rendered text must equal the concatenation of the very pieces
``encode`` tokenizes, and those pieces, tokenized one by one, must give
``encode``'s ids. The ids of the whole text are then compared too; they may
differ only where the tokenizer treats a piece border differently:

- minimind (byte-level BPE): a word after a space becomes one "Ġword" token in
  the whole text but "Ġ" + "word" as two pieces, which happens where the
  prompt ends with a space (deepseek_v2's "Assistant: "). Byte-level decoding
  is lossless, so there the decoded strings must be equal;
- stories260K (SentencePiece-style "Prepend ▁" normalizer): every piece encoded
  on its own gets a leading "▁" (a space), which the whole text only has after
  a special token. The training ids thus hold a space at each piece border that
  no text can reproduce; we compare with whitespace removed, and require exact
  ids where no border lies inside plain text (a first-turn generation prompt).
"""

from __future__ import annotations

import copy
import json

import jinja2
import pytest

from backend.chat_template import export_chat_template, inexpressible_reason, template_to_jinja
from backend.data import TEMPLATES, Template, encode, get_map_fn, get_template, to_messages
from backend.data.encode import generation_prompt, special_ids
from conftest import DATA


def _jsonl(path):
    return [json.loads(line) for line in (DATA / path).read_text(encoding="utf-8").splitlines() if line.strip()]


PIRATE = _jsonl("openai/pirate_training_set.jsonl")
MLLM = _jsonl("openai/mllm_sft_text_example_data.jsonl")
OPENAI = get_map_fn("openai")


def _conversation(messages):
    return OPENAI({"messages": messages})["conversation"]


def _short(rows, n_messages):
    """The shortest row with exactly ``n_messages`` messages (keeps the test fast)."""
    return min((r for r in rows if len(r["messages"]) == n_messages), key=lambda r: len(json.dumps(r)))


_MULTI = _conversation(_short(MLLM, 6)["messages"])
_PIRATE_SYSTEM = PIRATE[0]["messages"][0]["content"]

CONVERSATIONS = {
    # system + one turn, straight from the OpenAI pirate set
    "single_system": _conversation(PIRATE[0]["messages"]),
    # one turn, no system
    "single": _conversation(_short(MLLM, 2)["messages"]),
    # three turns, no system
    "multi": _MULTI,
    # system on the first turn, then two more turns
    "system_multi": [{**_MULTI[0], "system": _PIRATE_SYSTEM}] + _MULTI[1:],
    # pirate turns chained, a second system text right before the last turn
    "system_later_turn": (
        _conversation(PIRATE[1]["messages"])
        + _conversation(PIRATE[2]["messages"])[:1]
        + [{**_conversation(PIRATE[3]["messages"])[0], "system": "Answer in one line."}]
    ),
}

EXPRESSIBLE = [n for n, t in TEMPLATES.items() if not t.raw and not t.uses_tokenizer_chat_template]


@pytest.fixture(params=["minimind_tokenizer", "stories_tokenizer"])
def tokenizer(request):
    return request.getfixturevalue(request.param)


def _ids(out):
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _render(tok, messages, gen=False, tokenize=False):
    out = tok.apply_chat_template(messages, tokenize=tokenize, add_generation_prompt=gen)
    return _ids(out) if tokenize else out


def _pieces(conversation, tok, template, *, generation=False):
    """(text, ids) of each piece ``encode`` concatenates, in order: BOS, prompt,
    answer + SUFFIX, EOS, SEP. With ``generation`` the last turn ends after its
    prompt (what ``generation_prompt`` asks with)."""
    bos, eos = special_ids(tok)
    bos_text = tok.decode(list(bos), skip_special_tokens=False) if bos else ""

    def text(t):
        return t, tok.encode(t, add_special_tokens=False)

    out, after_eos = [], True
    for i, turn in enumerate(conversation):
        if bos and after_eos:
            out.append((bos_text, list(bos)))
        out.append(text(template.format_input(turn.get("input"), turn.get("system"), i + 1)))
        if generation and i == len(conversation) - 1:
            break
        out.append(text(turn["output"] + template.SUFFIX))
        after_eos = not template.SUFFIX_AS_EOS
        if after_eos:
            out.append((tok.eos_token, list(eos)))
        if template.SEP:
            out.append(text(template.SEP))
    return out


def _lossless(tok):
    """Byte-level BPE: decoding is exact, also for pieces encoded one by one
    (False for stories260K, whose every piece gains a leading "▁")."""
    probe = ["a  b\n", "\n c: ", "d"]
    ids = [i for p in probe for i in tok.encode(p, add_special_tokens=False)]
    return tok.decode(ids) == "".join(probe)


def _check_ids(tok, template, chat_ids, train_ids, pieces, where):
    if chat_ids == train_ids:
        return
    if _lossless(tok):
        # Byte-level BPE: only a space that ends a piece may fold into the next
        # piece's first word; the text is the same, byte for byte.
        assert any(t.endswith(" ") for t, _ in pieces[:-1]), f"{where}: ids differ without a space at a border"
        assert tok.decode(chat_ids) == tok.decode(train_ids), where
    else:
        # SentencePiece "▁" per separately encoded piece (see the module docstring).
        def squeeze(ids):
            return "".join(tok.decode(ids, skip_special_tokens=False).split())

        assert squeeze(chat_ids) == squeeze(train_ids), where


def _copy(tok, template):
    tok = copy.deepcopy(tok)
    assert export_chat_template(tok, template)
    return tok


# --- every template, every conversation, two real tokenizers ----------------------------


@pytest.mark.parametrize("name", EXPRESSIBLE)
def test_export_renders_the_training_format(tokenizer, name):
    template = get_template(name)
    tok = _copy(tokenizer, template)
    exact_ids = 0
    for label, conv in CONVERSATIONS.items():
        if template.SYSTEM is None and any(t.get("system") for t in conv):
            continue  # raises instead, see test_no_system_slot_raises
        where = f"{name}/{label}"
        messages = to_messages(conv)

        # the whole conversation == the training sample
        pieces = _pieces(conv, tok, template)
        train_ids = encode(conv, tok, template)["input_ids"]
        assert [i for _, ids in pieces for i in ids] == train_ids, f"{where}: test oracle is off"
        text = _render(tok, messages)
        assert text == "".join(t for t, _ in pieces), where
        chat_ids = _render(tok, messages, tokenize=True)
        _check_ids(tok, template, chat_ids, train_ids, pieces, where)
        exact_ids += chat_ids == train_ids

        # all but the last answer + add_generation_prompt == generation_prompt
        ask = conv[:-1] + [{k: v for k, v in conv[-1].items() if k != "output"}]
        gen_pieces = _pieces(ask, tok, template, generation=True)
        gen_ids = generation_prompt(ask, tok, template)
        assert [i for _, ids in gen_pieces for i in ids] == gen_ids, f"{where}: test oracle is off (generation)"
        gen_messages = messages[:-1]
        assert _render(tok, gen_messages, gen=True) == "".join(t for t, _ in gen_pieces), where
        gen_chat_ids = _render(tok, gen_messages, gen=True, tokenize=True)
        if len(conv) == 1:
            # [BOS] + one prompt piece: no border inside plain text, so exact for every tokenizer
            assert gen_chat_ids == gen_ids, where
        _check_ids(tok, template, gen_chat_ids, gen_ids, gen_pieces, where + " (generation)")

    if _lossless(tok) and not any(t.endswith(" ") for t in (template.INSTRUCTION, template.SEP)):
        # byte-level BPE with no space at a border: the ids are exactly the training ids
        assert exact_ids == sum(
            1 for c in CONVERSATIONS.values() if template.SYSTEM is not None or not any(t.get("system") for t in c)
        ), name


def test_openai_rows_render_as_trained(minimind_tokenizer, stories_tokenizer):
    """The user's own OpenAI-format rows, passed as they are to apply_chat_template,
    render as the openai map_fn + template trained on them."""
    for tokenizer in (minimind_tokenizer, stories_tokenizer):
        for name in ("qwen_chat", "llama2_chat", "vicuna"):
            tok = _copy(tokenizer, name)
            for row in PIRATE[:3] + [_short(MLLM, 4)]:
                conv = _conversation(row["messages"])
                text = _render(tok, row["messages"])
                assert text == "".join(t for t, _ in _pieces(conv, tok, get_template(name)))
                if not _lossless(tok):
                    continue
                assert _render(tok, row["messages"], tokenize=True) == encode(conv, tok, name)["input_ids"]


def test_bos_only_where_the_tokenizer_adds_one(minimind_tokenizer, stories_tokenizer):
    conv = CONVERSATIONS["multi"]
    # minimind declares bos_token <|im_start|> but never prepends it: no BOS text at all
    assert special_ids(minimind_tokenizer)[0] == ()
    tok = _copy(minimind_tokenizer, "vicuna")
    assert "bos_token" not in tok.chat_template
    assert not _render(tok, to_messages(conv)).startswith("<|im_start|>")
    # stories prepends <s>: at the start and after every turn that ended with </s> ...
    tok = _copy(stories_tokenizer, "vicuna")
    text = _render(tok, to_messages(conv))
    assert text.startswith("<s>USER: ")
    assert text.count("<s>") == text.count("</s>") == len(conv)
    assert text.count("</s>\n<s>USER: ") == len(conv) - 1
    # ... but only at the start when SUFFIX ends the turn instead of EOS
    tok = _copy(stories_tokenizer, "qwen_chat")
    text = _render(tok, to_messages(conv))
    assert text.startswith("<s><|im_start|>user\n") and text.count("<s>") == 1 and "</s>" not in text


@pytest.mark.parametrize("name", EXPRESSIBLE)
def test_training_through_the_export_is_the_same(minimind_tokenizer, name):
    """A tokenizer saved with the export, trained with 'hf_chat_template', gets
    the very ids and labels the named template gives (byte-level tokenizer; where
    the prompt ends with a space the whole-text ids differ, see the module docstring)."""
    template = get_template(name)
    tok = _copy(minimind_tokenizer, name)
    for label, conv in CONVERSATIONS.items():
        if template.SYSTEM is None and any(t.get("system") for t in conv):
            continue
        named, via_export = encode(conv, tok, name), encode(conv, tok, "hf_chat_template")
        if template.INSTRUCTION.endswith(" "):
            assert tok.decode(via_export["input_ids"]) == tok.decode(named["input_ids"])
            continue
        assert via_export == named, f"{name}/{label}"


# --- details ---------------------------------------------------------------------------


def test_inexpressible_templates(minimind_tokenizer):
    tok = copy.deepcopy(minimind_tokenizer)
    own = tok.chat_template
    for name in ("none", "hf_chat_template"):
        assert template_to_jinja(name, tok) is None
        assert inexpressible_reason(name, tok)
        assert export_chat_template(tok, name) is False
        assert tok.chat_template == own  # untouched
    assert "raw" in inexpressible_reason("none", tok)
    assert "own chat_template" in inexpressible_reason("hf_chat_template", tok)
    for name in EXPRESSIBLE:
        assert inexpressible_reason(name, tok) is None


def test_chatglm2_round_numbers(minimind_tokenizer):
    tok = _copy(minimind_tokenizer, "chatglm2")
    conv = CONVERSATIONS["multi"]
    text = _render(tok, to_messages(conv))
    assert [text.count(f"[Round {n}]\n\n问：") for n in (1, 2, 3, 4)] == [1, 1, 1, 0]
    assert text.index("[Round 1]") < text.index("[Round 2]") < text.index("[Round 3]")
    ask = _render(tok, to_messages(conv)[:-1], gen=True)
    assert ask.endswith(f"[Round 3]\n\n问：{conv[-1]['input']}\n\n答：")


def test_no_system_slot_raises(minimind_tokenizer):
    tok = _copy(minimind_tokenizer, "minicpm")
    messages = [{"role": "system", "content": "Be a pirate."}, {"role": "user", "content": "Hi"}]
    with pytest.raises(jinja2.TemplateError, match="minicpm.*no SYSTEM slot"):
        _render(tok, messages, gen=True)
    with pytest.raises(jinja2.TemplateError, match="no SYSTEM slot"):
        _render(tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}] + messages)
    # as encode does: an empty system text is no system text
    assert _render(tok, [{"role": "system", "content": ""}] + messages[1:], gen=True) == "<用户> Hi <AI>"


@pytest.mark.parametrize(
    "messages, error",
    [
        ([{"role": "assistant", "content": "Yo"}], "must follow a user message"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "must be followed by an assistant"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "cannot come between"),
        ([{"role": "system", "content": "s"}], "must be followed by a user"),
        ([{"role": "system", "content": "s"}, {"role": "system", "content": "t"}], "only one system"),
        ([{"role": "tool", "content": "{}"}], "roles system, user and assistant only"),
        ([{"role": "user", "content": [{"type": "text", "text": "a"}]}], "text message content only"),
    ],
)
def test_messages_the_format_cannot_hold_raise(minimind_tokenizer, messages, error):
    tok = _copy(minimind_tokenizer, "qwen_chat")
    with pytest.raises(jinja2.TemplateError, match=error):
        _render(tok, messages, gen=True)


def test_generation_prompt_flag_and_none_content(minimind_tokenizer):
    # The INSTRUCTION already opens the assistant's turn, so a conversation that
    # ends with a user message renders the generation prompt with or without the flag.
    tok = _copy(minimind_tokenizer, "qwen_chat")
    messages = [{"role": "user", "content": "Hi"}]
    assert _render(tok, messages) == _render(tok, messages, gen=True) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert _render(tok, [{"role": "user", "content": None}], gen=True) == (
        "<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n"
    )


def test_template_strings_are_escaped(minimind_tokenizer, stories_tokenizer):
    nasty = Template(
        name="nasty",
        # format strings: {{ and }} are literal braces, as in str.format
        SYSTEM="{{sys}} '\"\\ {system} %}} {{% {{# #}} }}\t\r\n",
        INSTRUCTION="{{{input}}} \\n' {{{{ raise_exception('x') }}}} {round}{round} ▁｜问\x00\u2028\U0001F600\n",
        # plain text
        SUFFIX="'}}%}\\",
        SEP="\"{{%\n",
    )
    conv = [
        {"system": "s'}}{%", "input": "{{ x }}\\n", "output": "'\"{% endfor %}"},
        {"input": "two", "output": "{#"},
    ]
    for tokenizer in (minimind_tokenizer, stories_tokenizer):
        tok = _copy(tokenizer, nasty)
        assert _render(tok, to_messages(conv)) == "".join(t for t, _ in _pieces(conv, tok, nasty))
        assert "{round}" not in _render(tok, to_messages(conv)) and "22" in _render(tok, to_messages(conv))


def test_unsupported_and_broken_format_strings(minimind_tokenizer):
    tok = minimind_tokenizer
    spec = Template(name="spec", INSTRUCTION="[{round:02d}] {input}")
    assert template_to_jinja(spec, tok) is None
    assert "format spec" in inexpressible_reason(spec, tok)
    assert template_to_jinja(Template(name="conv", INSTRUCTION="{input!r}"), tok) is None
    with pytest.raises(ValueError, match="field"):
        template_to_jinja(Template(name="bad", INSTRUCTION="{input} {system}"), tok)
    with pytest.raises(ValueError, match="not a valid format string"):
        template_to_jinja(Template(name="lone", INSTRUCTION="{input} {"), tok)


def test_eos_must_tokenize_back(minimind_tokenizer):
    tok = copy.deepcopy(minimind_tokenizer)
    tok.eos_token = None
    assert template_to_jinja("vicuna", tok) is None
    assert "eos_token" in inexpressible_reason("vicuna", tok)
    assert template_to_jinja("qwen_chat", tok) is not None  # SUFFIX ends its turns, no EOS needed


def test_survives_save_and_reload(minimind_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tok = _copy(minimind_tokenizer, "llama3_chat")
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    messages = to_messages(CONVERSATIONS["system_multi"])
    assert again.chat_template == tok.chat_template
    assert _render(again, messages) == _render(tok, messages)
    assert minimind_tokenizer.chat_template != tok.chat_template  # the fixture stayed clean
