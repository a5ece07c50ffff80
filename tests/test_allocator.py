"""The training process keeps its freed memory for the next step (``backend/train/allocator.py``):
the settings take on this glibc, and a loop that allocates and frees step-sized buffers the way a
training step does faults in far fewer pages with them (counted by the kernel, in fresh interpreters:
this test process's heap has a history)."""

from __future__ import annotations

import os
import subprocess
import sys

# step-like buffers: 2-32 MiB, touched, freed, 30 times; prints the minor page faults it caused
STEPS = """
import resource, sys
import numpy as np
from backend.train.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for step in range(30):
    held = [np.ones(n * 2**18) for n in (1, 3, 2, 8, 5, 16, 4)]
    del held
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def test_kept_memory_is_reused_instead_of_faulted_in_again():
    default, kept = _faults("default"), _faults("keep")
    one_step = (1 + 3 + 2 + 8 + 5 + 16 + 4) * 2**21 // 4096  # pages of one step's buffers
    assert kept < 1.5 * one_step  # kept: the first step's pages, then reuse
    assert default > 2 * kept  # glibc's defaults map and fault steps in again (64k against 19k here)


def test_the_worker_sets_it_before_anything_is_built():
    import inspect

    from backend.train import worker

    source = inspect.getsource(worker.main)
    assert source.index("prepare_training_process()") < source.index("from .trainer import train")


def test_onednn_cache_is_capped_unless_the_user_set_it(monkeypatch):
    """bf16 matmuls on a CPU grew oneDNN's primitive cache (and RSS) every step: the training process
    caps it, and a capacity set under either of oneDNN's names is left as it is."""
    from backend.train.allocator import ONEDNN_CACHE_ENTRIES, bound_onednn_cache

    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    monkeypatch.delenv("DNNL_PRIMITIVE_CACHE_CAPACITY", raising=False)
    assert bound_onednn_cache() == ONEDNN_CACHE_ENTRIES == "32"
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "32"
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "500")
    assert bound_onednn_cache() == "500"
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY")
    monkeypatch.setenv("DNNL_PRIMITIVE_CACHE_CAPACITY", "7")
    assert bound_onednn_cache() == "7"
    assert "ONEDNN_PRIMITIVE_CACHE_CAPACITY" not in os.environ


def test_the_training_process_preparation_sets_both(monkeypatch):
    """What the worker (and bench_train) call first: the malloc settings take and the cache is capped."""
    from backend.train import allocator

    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    monkeypatch.delenv("DNNL_PRIMITIVE_CACHE_CAPACITY", raising=False)
    taken = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: taken.append("malloc") or True)
    allocator.prepare_training_process()
    assert taken == ["malloc"]
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == allocator.ONEDNN_CACHE_ENTRIES
