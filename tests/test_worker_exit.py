"""How a training rank ends (``backend/train/worker.py``): a distributed rank whose result is
recorded tears its process group down and ends without the interpreter's teardown, where a
ZeRO-3 run's leftover thread once aborted a finished rank (SIGABRT). Checked in fresh
interpreters, with a real gloo process group."""

from __future__ import annotations

import subprocess
import sys

RANK_THAT_ENDS = """
import os, sys, threading
import torch.distributed as dist
from backend.train.worker import close_process_group, exit_without_teardown
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
# Stands in for what the distributed stack leaves running: a thread that never ends, which a
# normal interpreter exit would wait for for ever.
threading.Thread(target=threading.Event().wait, daemon=False).start()
sys.stdout = open(sys.argv[2], "w", buffering=8192)  # buffered, as train.log is not
print("result recorded")
print("group closed:", close_process_group(), "; still initialized:", dist.is_initialized())
exit_without_teardown(0)
print("never reached")
"""


def test_a_distributed_rank_ends_with_its_code_and_its_output_flushed(tmp_path):
    out = tmp_path / "rank.log"
    proc = subprocess.run([sys.executable, "-c", RANK_THAT_ENDS, str(tmp_path / "store"), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert out.read_text().splitlines() == ["result recorded", "group closed: True ; still initialized: False"]


def test_without_a_process_group_there_is_nothing_to_close():
    proc = subprocess.run([sys.executable, "-c",
                           "from backend.train.worker import close_process_group; print(close_process_group())"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
