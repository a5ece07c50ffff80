"""Export a prompt template as a Hugging Face ``chat_template`` (Jinja).

A model fine-tuned here saw its conversations in one exact text format (see
``backend.data.encode``). Saving that format as the tokenizer's
``chat_template`` lets anything that calls ``tokenizer.apply_chat_template``
(transformers pipelines, vLLM, TGI, ...) prompt the model the way it was
trained:

- messages are OpenAI-style ``{"role": "system"|"user"|"assistant", "content": str}``;
- a system message applies to the user message right after it (our turns carry
  their own system text; ``to_messages`` writes it just before the turn's user
  message), so it may come first or before any later user message;
- each user message renders as [BOS] [SYSTEM] INSTRUCTION, each assistant
  message as output + SUFFIX [+ EOS] + SEP, exactly as ``encode`` builds the
  training sample;
- ``{round}`` (chatglm2) is the 1-based number of the user message;
- BOS appears where ``encode`` puts it (at the start, and after every turn
  that ended with EOS), and only if the tokenizer itself prepends one when
  encoding -- decided once, here, at export time;
- EOS appears as the ``eos_token`` text, so tokenizing the rendered text
  (``apply_chat_template`` does so without adding special tokens) gives the
  EOS id again.

``add_generation_prompt`` adds nothing of its own: our INSTRUCTION already
ends with the assistant's opening (``<|im_start|>assistant\\n``, ``[/INST]``,
``<|Bot|>:``), and it cannot be split off the user's part in general, so a
user message always renders the whole prompt. A conversation ending in a user
message is therefore the generation prompt, with or without the flag -- the
same choice Llama-2's own chat template makes.

Messages the training format cannot hold make the template raise (through
``raise_exception``, which transformers provides): a system message on a
template without a system slot (as ``Template.format_input`` does), a system
message not followed by a user message, a user message not followed by an
assistant answer (unless it is the last message), an assistant message not
preceded by a user message, other roles, and non-text content.

Not expressible (``template_to_jinja`` returns None, ``inexpressible_reason``
says why):

- ``none``: raw pretraining text has no roles to render;
- ``hf_chat_template``: it already *is* the tokenizer's own chat_template;
- a template whose turns end with EOS for a tokenizer whose ``eos_token`` text
  does not tokenize back to its EOS id (or that has none), and a tokenizer
  whose BOS ids cannot be written as text that tokenizes back to them: the
  rendered text could not give the training ids;
- format fields with a format spec or conversion (``{round:02d}``,
  ``{input!r}``): Python's format mini-language has no Jinja equivalent. No
  XTuner template uses them.

Token ids: ``encode`` tokenizes prompt, answer and SEP separately (as XTuner
does), ``apply_chat_template`` tokenizes the whole text at once. The text is
identical; the ids can differ where a tokenizer merges across a piece border
(byte-level BPE joining whitespace such as SEP ``"\\n\\n"``, or
SentencePiece-style tokenizers that put a "▁" in front of every separately
encoded piece).
"""

from __future__ import annotations

import string

from backend.data.encode import special_ids
from backend.data.templates import Template, get_template

__all__ = ["template_to_jinja", "export_chat_template", "inexpressible_reason"]

# Characters written into a Jinja string literal as they are. Everything else
# ASCII (quotes, backslash, braces, %, #, control characters) is escaped, so no
# template text can end the literal or look like a Jinja delimiter. Printable
# non-ASCII characters (问, ｜, ▁) stay readable: Jinja's lexer reads literals
# through ``encode("ascii", "backslashreplace").decode("unicode-escape")``,
# which leaves them unchanged.
_PLAIN = frozenset(string.ascii_letters + string.digits + " _-.,:;!?()[]<>|/=+*&^$@~`")
_NAMED_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}

# The fields each template string is formatted with (what Template.format_input passes).
_SYSTEM_FIELDS = ("system",)
_INSTRUCTION_FIELDS = ("input", "round")


def _literal(text: str) -> str:
    """``text`` as a Jinja string literal that evaluates back to ``text``."""
    out = []
    for ch in text:
        if ch in _PLAIN or (ord(ch) > 0x7F and ch.isprintable()):
            out.append(ch)
        elif ch in _NAMED_ESCAPES:
            out.append(_NAMED_ESCAPES[ch])
        else:
            cp = ord(ch)
            out.append(f"\\x{cp:02x}" if cp < 0x100 else f"\\u{cp:04x}" if cp < 0x10000 else f"\\U{cp:08x}")
    return "'" + "".join(out) + "'"


class _Unsupported(Exception):
    """A template string uses Python format features Jinja cannot mirror."""


def _format_expr(fmt: str, fields: dict[str, str], where: str) -> list[str]:
    """A ``str.format`` template as a list of Jinja expressions to concatenate.

    ``fields`` maps each allowed field name to its Jinja expression. ``{{``/``}}``
    (escaped braces) become literal braces, as ``str.format`` makes them.
    Raises ValueError for strings ``str.format`` itself would reject here (a
    lone brace, an unknown field), _Unsupported for format specs/conversions.
    """
    parts: list[str] = []
    try:
        parsed = list(string.Formatter().parse(fmt))
    except ValueError as e:
        raise ValueError(f"{where} is not a valid format string ({e}): {fmt!r}") from None
    for literal, name, spec, conversion in parsed:
        if literal:
            parts.append(_literal(literal))
        if name is None:
            continue
        if name not in fields:
            raise ValueError(
                f"{where} uses the field {{{name}}}, but it is formatted only with "
                f"{', '.join('{' + f + '}' for f in fields)}: {fmt!r}"
            )
        if spec or conversion:
            raise _Unsupported(
                f"{where} formats {{{name}}} with a conversion or format spec "
                f"({fmt!r}), which a Jinja chat template cannot reproduce"
            )
        parts.append(fields[name])
    return parts


def _concat(parts: list[str]) -> str:
    return " + ".join(parts) if parts else "''"


def _bos_text(tokenizer) -> tuple[str | None, str | None]:
    """(Jinja expression for the BOS the tokenizer prepends or None if it adds
    none, reason it cannot be written as text or None)."""
    bos_ids = list(special_ids(tokenizer)[0])
    if not bos_ids:
        return None, None
    if bos_ids == [tokenizer.bos_token_id] and tokenizer.bos_token:
        text, expr = tokenizer.bos_token, "bos_token"
    else:
        # e.g. ChatGLM's two prefix tokens: bake their text in.
        text = "".join(tokenizer.convert_ids_to_tokens(bos_ids))
        expr = _literal(text)
    if tokenizer.encode(text, add_special_tokens=False) != bos_ids:
        return None, (
            f"the tokenizer prepends BOS ids {bos_ids}, but their text {text!r} does not "
            "tokenize back to them, so a chat template cannot produce them"
        )
    return expr, None


def _eos_reason(tokenizer) -> str | None:
    eos_ids = list(special_ids(tokenizer)[1])
    if not eos_ids or not tokenizer.eos_token:
        return "the template ends turns with EOS, but the tokenizer has no eos_token"
    if tokenizer.encode(tokenizer.eos_token, add_special_tokens=False) != eos_ids:
        return (
            f"the template ends turns with EOS, but the eos_token text {tokenizer.eos_token!r} "
            f"does not tokenize back to the EOS id(s) {eos_ids}"
        )
    return None


def _build(template: Template, tokenizer) -> tuple[str | None, str | None]:
    """(jinja, None) or (None, reason)."""
    if template.raw:
        return None, (
            "template 'none' is raw text (pretraining): the map_fn's text is used as is, "
            "there are no roles for a chat template to render"
        )
    if template.uses_tokenizer_chat_template:
        return None, (
            "template 'hf_chat_template' renders with the tokenizer's own chat_template; "
            "that template already is the export"
        )
    need_eos = not template.SUFFIX_AS_EOS
    if need_eos and (reason := _eos_reason(tokenizer)):
        return None, reason
    bos, reason = _bos_text(tokenizer)
    if reason:
        return None, reason
    try:
        system = (
            None
            if template.SYSTEM is None
            else _format_expr(template.SYSTEM, {"system": "ns.system"}, f"{template.name}.SYSTEM")
        )
        instruction = _format_expr(
            template.INSTRUCTION,
            {"input": "content", "round": "(ns.turn | string)"},
            f"{template.name}.INSTRUCTION",
        )
    except _Unsupported as e:
        return None, str(e)

    def fail(message: str) -> str:
        return "{{- raise_exception(" + _literal(message) + ") -}}"

    name = "".join(c for c in template.name if c.isalnum() or c in "_-.")
    lines = [
        f"{{#- Finetune Studio prompt template '{name}' (XTuner fields), exported by "
        "backend/chat_template.py: renders exactly the training format. -#}",
        "{%- set ns = namespace(system='', has_system=false, open=false, turn=0) -%}",
        "{%- for message in messages -%}",
        "{%- set content = message['content'] if message['content'] is defined "
        "and message['content'] is not none else '' -%}",
        "{%- if content is not string -%}"
        + fail(f"template '{name}' takes text message content only")
        + "{%- endif -%}",
        "{%- if message['role'] == 'system' -%}",
        "{%- if ns.open -%}"
        + fail("a system message cannot come between a user message and its assistant answer")
        + "{%- endif -%}",
        "{%- if ns.has_system -%}"
        + fail("only one system message may come before a user message")
        + "{%- endif -%}",
        "{%- set ns.system = content -%}{%- set ns.has_system = true -%}",
        "{%- elif message['role'] == 'user' -%}",
        "{%- if ns.open -%}"
        + fail("a user message must be followed by an assistant message before the next user message")
        + "{%- endif -%}",
        "{%- set ns.turn = ns.turn + 1 -%}",
    ]
    if bos is not None:
        # BOS opens the sample and every turn after one that ended with EOS.
        if need_eos:
            lines.append("{{- " + bos + " -}}")
        else:
            lines.append("{%- if ns.turn == 1 -%}{{- " + bos + " -}}{%- endif -%}")
    if system is None:
        lines.append(
            "{%- if ns.system -%}"
            + fail(
                f"template '{name}' has no SYSTEM slot, but the conversation has a system "
                "message. Pick a template with a system slot, or leave the system message out."
            )
            + "{%- endif -%}"
        )
    else:
        lines.append("{%- if ns.system -%}{{- " + _concat(system) + " -}}{%- endif -%}")
    lines += [
        "{{- " + _concat(instruction) + " -}}",
        "{%- set ns.system = '' -%}{%- set ns.has_system = false -%}{%- set ns.open = true -%}",
        "{%- elif message['role'] == 'assistant' -%}",
        "{%- if not ns.open -%}" + fail("an assistant message must follow a user message") + "{%- endif -%}",
        "{{- " + _concat(["content"] + ([_literal(template.SUFFIX)] if template.SUFFIX else [])) + " -}}",
    ]
    if need_eos:
        lines.append("{{- eos_token -}}")
    if template.SEP:
        lines.append("{{- " + _literal(template.SEP) + " -}}")
    lines += [
        "{%- set ns.open = false -%}",
        "{%- else -%}",
        fail(f"template '{name}' knows the roles system, user and assistant only"),
        "{%- endif -%}",
        "{%- endfor -%}",
        "{%- if ns.has_system -%}" + fail("a system message must be followed by a user message") + "{%- endif -%}",
        # add_generation_prompt: the last user message already ended with the
        # assistant's opening (see the module docstring).
    ]
    return "\n".join(lines), None


def inexpressible_reason(template: str | Template, tokenizer) -> str | None:
    """Why ``template`` cannot be a chat template for ``tokenizer``; None if it can."""
    return _build(get_template(template), tokenizer)[1]


def template_to_jinja(template: str | Template, tokenizer) -> str | None:
    """The Jinja ``chat_template`` that renders messages exactly as ``encode``
    renders the training text (and, for a conversation ending in a user
    message, as ``generation_prompt`` renders the prompt). None where the
    template cannot be expressed; ``inexpressible_reason`` says why.

    ``tokenizer`` decides whether BOS is written (only if it prepends one
    itself) and checks that BOS/EOS text tokenizes back to their ids.
    """
    return _build(get_template(template), tokenizer)[0]


def export_chat_template(tokenizer, template: str | Template) -> bool:
    """Set ``tokenizer.chat_template`` to the template's Jinja; return whether
    it did (False leaves the tokenizer untouched, e.g. for 'none' or
    'hf_chat_template')."""
    jinja = template_to_jinja(template, tokenizer)
    if jinja is None:
        return False
    tokenizer.chat_template = jinja
    return True
