"""map_fns: turn a dataset row into XTuner's ``{"conversation": [turn, ...]}``.

A turn is ``{"system"?: str, "input": str, "output": str}`` plus the optional
flags ``output_with_loss`` (False masks that answer) and ``need_eos_token``.
For well-formed rows every built-in map_fn returns exactly what XTuner 0.2's
function of the same name returns (its whitespace quirks included), so a
dataset trains the same here as there. Where XTuner would crash with a bare
KeyError or quietly train on garbage (a missing column, a non-string value,
an unknown role), these raise ``RowError`` naming the column; the pipeline adds
the row index and the map_fn's name.

The registry is a plain dict filled by a decorator. ``get_map_fn`` also takes
``path/to/file.py:function`` and ``package.module:function`` for custom ones,
and an unchanged XTuner custom map_fn works, since the contract is the same.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

from .errors import DataError
from .templates import SYSTEM_TEMPLATE


class RowError(DataError):
    """A problem with one row; ``column`` names the field at fault."""

    def __init__(self, message: str, column: str | None = None):
        super().__init__(message)
        self.column = column

    def __reduce__(self):  # keep `column` across process boundaries
        return (RowError, (self.args[0], self.column))


@dataclass(frozen=True)
class MapFnInfo:
    name: str
    fn: Callable[[dict], dict]
    columns: tuple[str, ...]
    description: str


MAP_FNS: dict[str, MapFnInfo] = {}
_ALIASES: dict[str, str] = {}


def register_map_fn(name: str, columns: tuple[str, ...], description: str, aliases=()):
    """Register a built-in map_fn under ``name``, ``name + '_map_fn'`` and ``aliases``."""

    def deco(fn):
        if name in MAP_FNS:
            raise ValueError(f"map_fn {name!r} is registered twice")
        MAP_FNS[name] = MapFnInfo(name, fn, tuple(columns), description)
        for alias in (f"{name}_map_fn", *aliases):
            if alias in _ALIASES or alias in MAP_FNS:
                raise ValueError(f"map_fn alias {alias!r} is registered twice")
            _ALIASES[alias] = name
        return fn

    return deco


# --- column access with clear errors -------------------------------------------------


def _col(example: dict, column: str, *, optional: bool = False) -> str:
    """A string column. A missing or null optional column reads as ''."""
    if column not in example:
        if optional:
            return ""
        present = ", ".join(sorted(map(str, example))) or "none"
        raise RowError(
            f"missing column {column!r} (columns present: {present}); pick the map_fn "
            "that matches this dataset's columns, or rename the column",
            column,
        )
    value = example[column]
    if value is None:
        if optional:
            return ""
        raise RowError(f"column {column!r} is null; fill it or drop the row", column)
    if not isinstance(value, str):
        raise RowError(
            f"column {column!r} should be text, got {type(value).__name__} {_preview(value)}",
            column,
        )
    return value


def _preview(value: Any, n: int = 60) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def _messages(example: dict, column: str, role_key: str, content_key: str) -> list[dict]:
    msgs = example.get(column, None) if isinstance(example, dict) else None
    if column not in example:
        _col(example, column)  # raises the missing-column error
    if not isinstance(msgs, list):
        raise RowError(
            f"column {column!r} should be a list of messages, got {type(msgs).__name__} "
            f"{_preview(msgs)}",
            column,
        )
    for j, msg in enumerate(msgs):
        where = f"{column}[{j}]"
        if not isinstance(msg, dict):
            raise RowError(f"{where} should be an object, got {_preview(msg)}", column)
        for key in (role_key, content_key):
            if key not in msg:
                raise RowError(f"{where} has no {key!r} key (keys: {', '.join(msg)})", column)
        if not isinstance(msg[role_key], str):
            raise RowError(f"{where}.{role_key} should be text, got {_preview(msg[role_key])}", column)
        if not isinstance(msg[content_key], str):
            raise RowError(
                f"{where}.{content_key} should be text, got "
                f"{type(msg[content_key]).__name__} {_preview(msg[content_key])}",
                column,
            )
    return msgs


def _one_turn(input: str, output: str, system: str | None = None) -> dict:
    turn = {} if system is None else {"system": system}
    turn["input"] = input
    turn["output"] = output
    return {"conversation": [turn]}


# --- the XTuner 0.2 map_fns ----------------------------------------------------------


@register_map_fn("alpaca", ("instruction", "input", "output"),
                 "instruction/input/output (tatsu-lab/alpaca); '<nooutput>' rows are dropped")
def alpaca_map_fn(example):
    output = _col(example, "output")
    if output == "<nooutput>":
        return {"conversation": []}
    # XTuner keeps the newline even when `input` is empty.
    return _one_turn(f"{_col(example, 'instruction')}\n{_col(example, 'input', optional=True)}", output)


@register_map_fn("alpaca_zh", ("instruction_zh", "input_zh", "output_zh"),
                 "instruction_zh/input_zh/output_zh (silk-road/alpaca-data-gpt4-chinese)")
def alpaca_zh_map_fn(example):
    return _one_turn(
        f"{_col(example, 'instruction_zh')}\n{_col(example, 'input_zh', optional=True)}",
        _col(example, "output_zh"),
    )


@register_map_fn("arxiv", ("abstract", "title"), "abstract -> title, paper-titling system prompt")
def arxiv_map_fn(example):
    return _one_turn(_col(example, "abstract"), _col(example, "title"), SYSTEM_TEMPLATE.arxiv_gentile)


@register_map_fn("code_alpaca", ("prompt", "completion"),
                 "prompt/completion (HuggingFaceH4/CodeAlpaca_20K), coder system prompt")
def code_alpaca_map_fn(example):
    return _one_turn(_col(example, "prompt"), _col(example, "completion"), SYSTEM_TEMPLATE.coder)


@register_map_fn("colors", ("description", "color"), "colour description -> hex colour (burkelibbey/colors)")
def colors_map_fn(example):
    desc = ":".join(_col(example, "description").split(":")[1:]).strip()
    return _one_turn(desc, _col(example, "color"), SYSTEM_TEMPLATE.colorist)


@register_map_fn("crime_kg_assitant", ("input", "output"),
                 "input/output with the Chinese lawyer system prompt (CrimeKgAssitant)",
                 aliases=("crime_kg_assitan",))  # XTuner's DATASET_FORMAT_MAPPING spelling
def crime_kg_assitant_map_fn(example):
    return _one_turn(_col(example, "input"), _col(example, "output"), SYSTEM_TEMPLATE.lawyer)


@register_map_fn("default", ("input", "output"), "input/output as they are")
def default_map_fn(example):
    return _one_turn(_col(example, "input"), _col(example, "output"))


@register_map_fn("law_reference", ("question", "answer"),
                 "question/answer with the Chinese lawyer system prompt")
def law_reference_map_fn(example):
    return _one_turn(_col(example, "question"), _col(example, "answer"), SYSTEM_TEMPLATE.lawyer)


@register_map_fn("medical", ("instruction", "input", "output"),
                 "instruction/input/output (shibing624/medical), doctor system prompt")
def medical_map_fn(example):
    text = f"{_col(example, 'instruction')}\n{_col(example, 'input', optional=True)}"
    return _one_turn(text, _col(example, "output"), SYSTEM_TEMPLATE.medical)


@register_map_fn("oasst1", ("text",),
                 "'### Human: ... ### Assistant: ...' text (timdettmers/openassistant-guanaco)")
def oasst1_map_fn(example):
    said = []
    for part in _col(example, "text").strip().split("###"):
        part = part.strip()
        if part.startswith("Human:"):
            said.append(part[len("Human:"):].strip())
        elif part.startswith("Assistant:"):
            said.append(part[len("Assistant:"):].strip())
    if len(said) % 2:
        said.pop()  # a last question with no answer carries no loss: drop it
    return {"conversation": [{"input": q, "output": a} for q, a in zip(said[::2], said[1::2])]}


@register_map_fn("openai", ("messages",),
                 "OpenAI fine-tuning 'messages' (system/user/assistant; assistant 'loss' flag)")
def openai_map_fn(example):
    msgs = _messages(example, "messages", "role", "content")
    start = 0
    while start < len(msgs) and msgs[start]["role"] == "assistant":
        start += 1  # an opening assistant message has nothing to answer
    conversation, system, prompt = [], "", ""
    for j in range(start, len(msgs)):
        role, content = msgs[j]["role"], msgs[j]["content"]
        if role == "system":
            system = content
        elif role == "user":
            prompt += content
        elif role == "assistant":
            with_loss = str(msgs[j].get("loss", "True")).lower() == "true"
            conversation.append(
                {"system": system, "input": prompt, "output": content, "output_with_loss": with_loss}
            )
            system, prompt = "", ""
        else:
            raise RowError(
                f"messages[{j}].role is {role!r}; openai expects system, user or assistant",
                "messages",
            )
    return {"conversation": conversation}


@register_map_fn("openorca", ("system_prompt", "question", "response"),
                 "system_prompt/question/response (Open-Orca/OpenOrca)")
def openorca_map_fn(example):
    return _one_turn(
        _col(example, "question"), _col(example, "response"), _col(example, "system_prompt", optional=True)
    )


@register_map_fn("pretrain", ("text",), "plain text, all of it trained, no EOS (use template 'none')")
def pretrain_map_fn(example):
    return {"conversation": [{"input": "", "output": _col(example, "text").strip(), "need_eos_token": False}]}


@register_map_fn("sql", ("context", "question", "answer"),
                 "CREATE TABLE context + question -> SQL (b-mc2/sql-create-context)")
def sql_map_fn(example):
    text = f"{_col(example, 'context')}\n{_col(example, 'question')}"
    return _one_turn(text, _col(example, "answer"), SYSTEM_TEMPLATE.sql)


@register_map_fn("stack_exchange", ("question", "response"), "question/response (ArmelR/stack-exchange-instruction)")
def stack_exchange_map_fn(example):
    return _one_turn(_col(example, "question"), _col(example, "response"))


@register_map_fn("tiny_codes", ("prompt", "response"), "prompt/response (nampdn-ai/tiny-codes), coder system prompt")
def tiny_codes_map_fn(example):
    return _one_turn(_col(example, "prompt"), _col(example, "response"), SYSTEM_TEMPLATE.coder)


@register_map_fn("wizardlm", ("conversations",), "'conversations' from human/gpt (WizardLM evol-instruct)")
def wizardlm_map_fn(example):
    msgs = _messages(example, "conversations", "from", "value")
    start = 0
    while start < len(msgs) and msgs[start]["from"] == "gpt":
        start += 1
    conversation, prompt = [], ""
    for j in range(start, len(msgs)):
        who, value = msgs[j]["from"], msgs[j]["value"]
        if who == "human":
            prompt += value
        elif who == "gpt":
            conversation.append({"input": prompt, "output": value})
            prompt = ""
        else:
            raise RowError(
                f"conversations[{j}].from is {who!r}; wizardlm expects human or gpt "
                "(use map_fn 'sharegpt' for system/function_call/observation turns)",
                "conversations",
            )
    return {"conversation": conversation}


# --- MSAgent-Bench (damo/MSAgent-Bench): tool calls rewritten as ReAct -----------------

_THINK = ("<|startofthink|>", "<|endofthink|>")  # a tool call: ```JSON {"api_name", "parameters"}```
_EXEC = ("<|startofexec|>", "<|endofexec|>")  # the tool's result, then the answer from it
_FINAL = "Final Answer:"
# XTuner's system text: its tools as a dict, then the ReAct format ({names}: the tool names as a list)
_MSAGENT_TOOLS = "你是一个可以调用外部工具的助手，可以使用的工具包括：\n{tools}\n"
_MSAGENT_FORMAT = (
    "如果使用工具请遵循以下格式回复：\n```\n"
    "Thought:思考你当前步骤需要解决什么问题，是否需要使用工具\n"
    "Action:工具名称，你的工具必须从 [{names}] 选择\n"
    "Action Input:工具输入参数\n```\n工具返回按照以下格式回复：\n```\n"
    "Response:调用工具后的结果\n```\n如果你已经知道了答案，或者你不需要工具，"
    "请遵循以下格式回复\n```\n"
    "Thought:给出最终答案的思考过程\n"
    "Final Answer:最终答案\n```\n开始!\n"
)


class _BadToolCall(Exception):
    """A tool call that does not parse: XTuner drops the whole row, and so do we."""


def _unfenced_json(text: str):
    """The JSON inside a ```JSON fence, line breaks removed first (as XTuner reads it)."""
    return json.loads(text.replace("```JSON", "").replace("```", "").replace("\n", ""))


def _msagent_turns(example: dict):
    if example.get("conversations") is None:
        _col(example, "conversations")  # raises: missing or null
    turns = example["conversations"]
    if isinstance(turns, str):  # the Bench stores the list as its Python / JSON text
        try:
            turns = ast.literal_eval(turns)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            try:
                turns = json.loads(turns)
            except ValueError:
                raise RowError(f"column 'conversations' is text that does not read as a list of turns: "
                               f"{_preview(turns)}", "conversations") from None
    return turns


def _msagent_tools(system: str, where: str) -> dict:
    """name -> description of every tool object ({"name", "description", ...}) in a
    system text, with its parameters (from ``paths[0].parameters``) where it has them."""
    decoder, tools = json.JSONDecoder(), {}
    start = system.find("{")
    while start != -1:
        try:
            obj, end = decoder.raw_decode(system, start)
        except ValueError:
            obj, end = None, start + 1
        if isinstance(obj, dict) and "name" in obj and "description" in obj:
            if isinstance(obj["name"], (dict, list)):
                raise RowError(f"{where}: a tool's name should be text, got {_preview(obj['name'])}", "conversations")
            tools[obj["name"]] = obj["description"]
            try:
                params = {p["name"]: p["description"] for p in obj["paths"][0]["parameters"]}
            except (KeyError, IndexError, TypeError):
                params = None
            if params is not None and isinstance(obj["description"], str):
                tools[obj["name"]] += f"\n输入参数: {params}"
        else:
            end = start + 1  # not a tool: look inside it
        start = system.find("{", end)
    return tools


def _react_reply(text: str) -> str:
    """An assistant message before any tool result: each call becomes
    Thought (the text before it) / Action / Action Input; a reply without one
    is the Final Answer."""
    parts, calls, rest = [], 0, text
    while True:
        before, opened, after = rest.partition(_THINK[0])
        call, closed, tail = after.partition(_THINK[1])
        if not (opened and closed):
            break
        if before.strip():
            parts.append(f"Thought:{before.strip()}\n")
        try:
            parsed = _unfenced_json(call)
            parts.append(f"Action:{parsed['api_name']}\nAction Input:{parsed['parameters']}\n")
        except (ValueError, KeyError, TypeError):
            raise _BadToolCall from None
        calls, rest = calls + 1, tail
    return "".join(parts) + rest + "\n" if calls else f"{_FINAL}{rest}\n"


def _react_result(after: str) -> dict | None:
    """What follows <|startofexec|>: ``Response:<result>`` becomes an untrained
    system text and the answer after it the trained ``Final Answer:``. None where
    XTuner keeps nothing of it (no answer, a result that does not parse)."""
    result, closed, tail = after.partition(_EXEC[1])
    if not closed:
        text = _EXEC[0] + after  # never closed: kept as it is
    else:
        try:
            value = _unfenced_json(result)
        except ValueError:
            return None
        newline = "\n" if tail.endswith("\n") else ""  # one final newline stays after the answer
        answer = tail[: len(tail) - len(newline)].strip()
        text = f"Response:{value}\n" + (f"{_FINAL}{answer}\n" if answer else "") + newline
    if text.count(_FINAL) != 1:
        return None
    response, _, answer = text.partition(_FINAL)
    return {"system": response, "output": _FINAL + answer}


@register_map_fn("msagent_react", ("conversations",),
                 "MSAgent-Bench tool calls (<|startofthink|>/<|startofexec|>) as ReAct Thought/Action/Response")
def msagent_react_map_fn(example):
    """MSAgent-Bench rows: a system text listing tools, user questions, and
    assistant replies that call a tool and answer from its result. A row whose
    tool call does not parse is dropped (an empty conversation), as in XTuner."""
    turns = _msagent_turns(example)
    if isinstance(turns, list) and len(turns) < 2:
        return {"conversation": []}  # nothing to learn from
    turns = _messages({"conversations": turns}, "conversations", "from", "value")
    conversation, system, prompt = [], "", ""
    for j, turn in enumerate(turns):
        who, value = turn["from"], turn["value"]
        if who == "system":
            tools = _msagent_tools(value, f"conversations[{j}]")
            system += _MSAGENT_TOOLS.format(tools=tools) + _MSAGENT_FORMAT.format(names=list(tools))
        elif who == "user":
            prompt += value + "\n"
        elif who == "assistant":
            reply, opened, result = value.partition(_EXEC[0])
            if _EXEC[0] in result:
                return {"conversation": []}  # two tool results in one reply
            try:
                conversation.append({"system": system, "input": prompt, "output": _react_reply(reply)})
            except _BadToolCall:
                return {"conversation": []}
            system, prompt = "", ""
            answer = _react_result(result) if opened else None
            if answer is not None:
                conversation.append(answer)
        else:
            raise RowError(f"conversations[{j}].from is {who!r}; msagent_react expects system, user or assistant",
                           "conversations")
    return {"conversation": conversation}


# --- ours ----------------------------------------------------------------------------

_SHAREGPT_USER = {"human", "user", "observation", "tool"}
_SHAREGPT_ASSISTANT = {"gpt", "assistant", "model", "function_call"}


@register_map_fn("sharegpt", ("conversations",),
                 "ShareGPT 'conversations' from/value: system, human, gpt, function_call, observation")
def sharegpt_map_fn(example):
    """ShareGPT, the Hub's most common chat format (XTuner has no map_fn for it).

    human/user and observation (a tool's result) are prompt; gpt/assistant and
    function_call are trained answers; a system turn or a row-level ``system``
    column becomes the first turn's system text, and a row-level ``tools``
    column (function definitions, as in glaive) is appended to it so the model
    sees what it may call. Consecutive prompt messages are joined by a newline.
    """
    msgs = _messages(example, "conversations", "from", "value")
    system = _col(example, "system", optional=True)
    tools = example.get("tools")
    if tools not in (None, "", [], "[]"):
        tools_text = tools if isinstance(tools, str) else json.dumps(tools, ensure_ascii=False)
        system = (system + "\n\n" if system else "") + "You have access to the following tools:\n" + tools_text
    conversation, prompt = [], []
    for j, msg in enumerate(msgs):
        who, value = msg["from"].lower(), msg["value"]
        if who == "system":
            if conversation or prompt:
                raise RowError(f"conversations[{j}] is a system turn after the dialogue started", "conversations")
            system = value
        elif who in _SHAREGPT_USER:
            prompt.append(value)
        elif who in _SHAREGPT_ASSISTANT:
            if not conversation and not prompt and who == "gpt":
                continue  # an opening answer to nothing, as XTuner skips it
            turn = {"input": "\n".join(prompt), "output": value}
            if not conversation and system:
                turn = {"system": system, **turn}
            conversation.append(turn)
            prompt = []
        else:
            known = ", ".join(sorted(_SHAREGPT_USER | _SHAREGPT_ASSISTANT | {"system"}))
            raise RowError(f"conversations[{j}].from is {msg['from']!r}; known roles: {known}", "conversations")
    return {"conversation": conversation}


@register_map_fn("conversation", ("conversation",),
                 "rows already in XTuner's 'conversation' format (no mapping)")
def conversation_map_fn(example):
    conv = example.get("conversation")
    if "conversation" not in example:
        _col(example, "conversation")
    return {"conversation": conv}


# --- lookup --------------------------------------------------------------------------


def _load_custom(spec: str) -> Callable:
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise DataError(f"custom map_fn {spec!r} should read 'path/to/file.py:function' or 'package.module:function'")
    if target.endswith(".py") or os.sep in target or "/" in target:
        path = os.path.abspath(os.path.expanduser(target))
        if not os.path.isfile(path):
            raise DataError(f"custom map_fn file {target!r} does not exist")
        mod_name = f"_ftstudio_custom_{abs(hash(path))}"
        module = sys.modules.get(mod_name)
        if module is None:
            spec_ = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(spec_)
            sys.modules[mod_name] = module
            try:
                spec_.loader.exec_module(module)
            except Exception as exc:
                del sys.modules[mod_name]
                raise DataError(f"custom map_fn file {target!r} failed to import: {exc!r}") from exc
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise DataError(f"custom map_fn module {target!r} cannot be imported: {exc}") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise DataError(f"{target!r} has no function {attr!r}")
    return fn


def get_map_fn(name_or_spec: str | Callable) -> Callable[[dict], dict]:
    """A map_fn by name (``alpaca`` or ``alpaca_map_fn``), by ``file.py:fn`` or
    ``package.module:fn``, or a callable given directly."""
    if callable(name_or_spec):
        return name_or_spec
    key = str(name_or_spec).strip()
    key = _ALIASES.get(key, key)
    if key in MAP_FNS:
        return MAP_FNS[key].fn
    if ":" in key:
        return _load_custom(key)
    close = difflib.get_close_matches(key, list(MAP_FNS) + list(_ALIASES), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise DataError(
        f"unknown map_fn {key!r}.{hint} Known: {', '.join(sorted(MAP_FNS))}; "
        "or give a custom one as path/to/file.py:function"
    )


def map_fn_name(name_or_spec) -> str:
    """The canonical name for display and cache keys."""
    if callable(name_or_spec):
        return f"{getattr(name_or_spec, '__module__', '?')}.{getattr(name_or_spec, '__qualname__', '?')}"
    key = str(name_or_spec).strip()
    return _ALIASES.get(key, key)


# --- auto-detection ------------------------------------------------------------------

# (map_fn, columns that must all be present), most specific first.
_DETECT_ORDER = [
    ("conversation", {"conversation"}),
    ("openai", {"messages"}),
    ("alpaca_zh", {"instruction_zh", "output_zh"}),
    ("alpaca", {"instruction", "output"}),
    ("openorca", {"system_prompt", "question", "response"}),
    ("sql", {"context", "question", "answer"}),
    ("code_alpaca", {"prompt", "completion"}),
    ("tiny_codes", {"prompt", "response"}),
    ("arxiv", {"abstract", "title"}),
    ("colors", {"description", "color"}),
    ("stack_exchange", {"question", "response"}),
    ("law_reference", {"question", "answer"}),
    ("default", {"input", "output"}),
]


def detect_map_fn(columns, first_rows=()) -> tuple[str | None, str]:
    """Suggest a map_fn from a dataset's columns (and a peek at its first rows).

    Returns ``(name, reason)``; name is None when it cannot tell, and the
    reason then says why and what to do.
    """
    cols = set(columns)
    rows = [r for r in first_rows if isinstance(r, dict)]
    if "conversations" in cols:
        if any(_THINK[0] in (c if isinstance(c, str) else json.dumps(c, ensure_ascii=False, default=str))
               for c in (r.get("conversations") for r in rows)):
            return "msagent_react", "column 'conversations' with <|startofthink|> tool calls (MSAgent-Bench)"
        roles = {
            str(m.get("from", "")).lower()
            for r in rows for m in (r.get("conversations") or []) if isinstance(m, dict)
        }
        if roles and roles <= {"human", "gpt"} and "system" not in cols and "tools" not in cols:
            return "sharegpt", "column 'conversations' with human/gpt turns (ShareGPT; wizardlm gives the same for these)"
        return "sharegpt", "column 'conversations' with from/value turns (ShareGPT)"
    if "text" in cols and len(cols & {"instruction", "messages", "conversations", "input"}) == 0:
        texts = [r.get("text") for r in rows if isinstance(r.get("text"), str)]
        if texts and all("### Human:" in t for t in texts):
            return "oasst1", "column 'text' holding '### Human: ... ### Assistant: ...' dialogues"
        return "pretrain", "a single 'text' column of plain text (continued pretraining; use template 'none')"
    for name, need in _DETECT_ORDER:
        if need <= cols:
            return name, f"columns {', '.join(sorted(need))}"
    return None, (
        f"cannot tell from columns {', '.join(sorted(map(str, cols))) or '(none)'}; pick a map_fn "
        "(ftstudio list-map-fn) or write one: path/to/file.py:function returning {'conversation': [...]}"
    )
