"""Local question-answer data for lm-eval's custom-task mechanism.

These machines cannot download benchmark data, so the shipped tasks
(``ftstudio_qa``: exact match of a greedy answer; ``ftstudio_qa_mc``: pick the
right answer among the file's others by log-likelihood) read a JSON-lines
file on this disk. lm-eval calls ``load``/``load_mc`` as the tasks'
``custom_dataset`` with the task metadata as keywords, so the file is chosen
with ``ftstudio eval --data FILE`` or lm-eval's own
``--metadata '{"ftstudio_data": "FILE"}'``; without one, the demo's own
questions (assets/demo/studio_qa.jsonl) are asked.

A row is ``{"question", "answer"}``, ``{"input", "output"}`` or a chat row
``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}, ...]}``
(its first user message and the answer to it), so a chat training file can
be asked back as it is.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DEMO_DATA = Path(__file__).resolve().parents[2] / "assets" / "demo" / "studio_qa.jsonl"
DISTRACTORS = 3  # wrong answers next to the right one in the multiple-choice variant


try:  # Finetune Studio's one error type for bad data: ftstudio eval shows it as one line
    from backend.data.errors import DataError as _Bad
except ImportError:  # lm-eval's own CLI run outside the project
    _Bad = ValueError


class QAFileError(_Bad):
    """A question file that cannot be read as questions and answers (names the row)."""


def _from_messages(messages) -> tuple[str, str] | None:
    if not isinstance(messages, list):
        return None
    for i, m in enumerate(messages[:-1]):
        nxt = messages[i + 1]
        if isinstance(m, dict) and isinstance(nxt, dict) and m.get("role") == "user" \
                and nxt.get("role") == "assistant":
            return m.get("content"), nxt.get("content")
    return None


def qa_pair(row: dict, where: str) -> dict:
    """{"question", "answer"} of one row, whatever its shape; QAFileError naming ``where`` otherwise."""
    if not isinstance(row, dict):
        raise QAFileError(f"{where}: not a JSON object")
    pair = None
    for q, a in (("question", "answer"), ("input", "output")):
        if q in row and a in row:
            pair = row[q], row[a]
            break
    if pair is None and "messages" in row:
        pair = _from_messages(row["messages"])
    if pair is None:
        raise QAFileError(f"{where}: needs question/answer, input/output, or messages with a user "
                          f"message and its assistant answer (keys: {', '.join(map(str, row)) or 'none'})")
    question, answer = pair
    if not isinstance(question, str) or not isinstance(answer, str) or not question.strip() or not answer.strip():
        raise QAFileError(f"{where}: question and answer must be non-empty text")
    return {"question": question, "answer": answer}


def read_pairs(path: str | Path | None = None) -> list[dict]:
    """Every row of a .jsonl (or .json list) file as {"question", "answer"}."""
    path = Path(path) if path else DEMO_DATA
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise QAFileError(f"question file {path}: {exc.strerror or exc}") from None
    try:
        if path.suffix == ".json":
            rows = [(f"{path} item {i + 1}", r) for i, r in enumerate(json.loads(text))]
        else:
            rows = [(f"{path} line {i + 1}", json.loads(line)) for i, line in enumerate(text.splitlines())
                    if line.strip()]
    except (ValueError, TypeError) as exc:
        raise QAFileError(f"question file {path}: not valid JSON ({exc})") from None
    if not rows:
        raise QAFileError(f"question file {path}: no rows")
    return [qa_pair(row, where) for where, row in rows]


def with_choices(pairs: list[dict], seed: int = 0) -> list[dict]:
    """Each question with its answer among up to DISTRACTORS others of the file, in a seeded order."""
    answers = sorted({p["answer"] for p in pairs})
    if len(answers) < 2:
        raise QAFileError("the multiple-choice task needs at least two different answers in the file")
    out = []
    for i, p in enumerate(pairs):
        rng = random.Random(seed * 1_000_003 + i)
        others = [a for a in answers if a != p["answer"]]
        choices = rng.sample(others, min(DISTRACTORS, len(others))) + [p["answer"]]
        rng.shuffle(choices)
        out.append({**p, "choices": choices, "label": choices.index(p["answer"])})
    return out


def _dataset(rows: list[dict]):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load(ftstudio_data: str | None = None, **_metadata):
    """lm-eval ``custom_dataset`` of ``ftstudio_qa``."""
    return _dataset(read_pairs(ftstudio_data))


def load_mc(ftstudio_data: str | None = None, **_metadata):
    """lm-eval ``custom_dataset`` of ``ftstudio_qa_mc``."""
    return _dataset(with_choices(read_pairs(ftstudio_data)))
