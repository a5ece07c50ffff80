"""Where a run's wall time goes, phase by phase, and which optional stacks it loaded.

A short run spends much of its time outside the training steps: importing
torch/transformers/peft, building the data, loading the model, saving. Each
process times its own phases here. The worker (rank 0) prints one line at the
end of a run into train.log (``phases: imports 8.1 s, data 0.4 s, ...``) and
records the seconds in result.json; the launcher copies them into status.json
(``phases``) next to its own (``launcher_phases``: preflight checks, data
preflight, waiting in the queue), so the Runs tab can show them.

It also keeps optional packages out of a process that does not need them
(``hide``): peft imports bitsandbytes whenever it is installed, and
accelerate imports DeepSpeed whenever it is installed, a few seconds each at
start-up, though only QLoRA uses the one and only ``--deepspeed`` the other.
"""

from __future__ import annotations

import os
import sys
import time

OPTIONAL_STACKS = ("bitsandbytes", "deepspeed")
LABELS = {"model_load": "model load", "data_preflight": "data"}


def process_age() -> float:
    """Seconds since this process started (from /proc; 0 where that cannot be read),
    so that the interpreter's own start and the first imports are counted too."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def loaded(names=OPTIONAL_STACKS) -> list[str]:
    """Which of ``names`` this process has imported (a hidden one is not imported)."""
    return [n for n in names if sys.modules.get(n) is not None]


def hide(names) -> list[str]:
    """Make ``import name`` fail with ModuleNotFoundError in this process, and
    ``importlib.util.find_spec(name)`` (how peft, accelerate and transformers ask
    whether a package is installed) return None, so libraries that import it
    "if available" skip it. A package already imported is left alone. Returns
    the names hidden."""
    hidden = [n for n in names if n not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # the import system's own "not importable" mark
    return hidden


class Phases:
    """Consecutive phases of one process: ``begin(name)`` ends the running phase and
    starts the next, ``end()`` ends the last. Seconds add up if a name repeats."""

    def __init__(self, first: str | None = None, since_process_start: bool = False):
        self.seconds: dict[str, float] = {}
        self._current: str | None = None
        self._began = time.perf_counter() - (process_age() if since_process_start else 0.0)
        if first:
            self._current = first

    def begin(self, name: str) -> None:
        self.end()
        self._current, self._began = name, time.perf_counter()

    def end(self) -> None:
        if self._current is not None:
            spent = time.perf_counter() - self._began
            self.seconds[self._current] = round(self.seconds.get(self._current, 0.0) + spent, 3)
            self._current = None

    def carve(self, phase: str, parts: dict) -> None:
        """Move seconds timed inside an ended ``phase`` (e.g. checkpoints saved during the steps)
        out of it into phases of their own."""
        for name, spent in parts.items():
            spent = min(spent, self.seconds.get(phase, 0.0))
            if spent > 0:
                self.seconds[phase] = round(self.seconds[phase] - spent, 3)
                self.seconds[name] = round(self.seconds.get(name, 0.0) + spent, 3)

    @property
    def total(self) -> float:
        return round(sum(self.seconds.values()), 3)

    def to_dict(self) -> dict:
        """The seconds of each phase, their total, and the optional stacks imported."""
        return {**self.seconds, "total": self.total, "optional_imports": loaded()}


def format_phases(seconds: dict, prefix: str = "phases") -> str:
    """One line: ``phases: imports 8.1 s, data 0.4 s, model load 0.9 s, steps 30.2 s, save 0.3 s
    (total 39.9 s; bitsandbytes, deepspeed not imported)``."""
    parts = [f"{LABELS.get(k, k.replace('_', ' '))} {v:.1f} s" for k, v in seconds.items()
             if isinstance(v, (int, float)) and k != "total"]
    total = seconds.get("total")
    notes = [f"total {total:.1f} s"] if isinstance(total, (int, float)) else []
    if "optional_imports" in seconds:
        skipped = [n for n in OPTIONAL_STACKS if n not in seconds["optional_imports"]]
        if seconds["optional_imports"]:
            notes.append(f"imported {', '.join(seconds['optional_imports'])}")
        if skipped:
            notes.append(f"{', '.join(skipped)} not imported")
    return f"{prefix}: {', '.join(parts)}" + (f" ({'; '.join(notes)})" if notes else "")
