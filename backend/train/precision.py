"""Which precision ``model.dtype: auto`` trains in: bf16 only where it is faster.

Why this exists. A CPU that lists bf16 instructions does not always run bf16
matmuls faster than fp32, and a LoRA step on a CPU is mostly matmuls:

- with AMX (``amx_bf16``) bf16 matmuls ran ~6x fp32's (1,760-2,000 against
  315-335 GF/s, 2048² through oneDNN), and a bf16 step 1.2-2x an fp32 one;
- on a Sapphire-Rapids-class core whose hypervisor hides AMX, ``avx512_bf16``
  is listed, oneDNN picks its ``avx512_core_bf16`` kernel, and bf16 ran 0.55x
  fp32's speed (150 against 280 GF/s at every shape of the bench model): a
  check of the flags alone trained 25% slower than fp32 there (bench_train,
  4.2M model, packed 512: 4,388 against 5,887 tok/s);
- without any bf16 instruction a bf16 matmul is emulated (a 2048² one ran for
  minutes).

So on a CPU ``auto`` measures: a few 1024² matmuls in each precision (about
0.1 s), and takes bf16 only where they ran at least ``BF16_MIN_SPEEDUP``
times fp32's speed. The step gains less than the matmuls do (casts, fp32
norms and attention slices, fp32 adapter weights): 2.1x faster matmuls gave
1.4x the tokens/s (the issue's host), 6x gave 1.2-2x. CPUs that list no bf16
instruction are not timed at all. A GPU keeps bf16 where it has it (fp16
otherwise): there bf16 always pays.

The ranks of one run must agree (full fine-tuning would otherwise hold fp32
weights on one rank and bf16 on another), and two timings can differ: the
launcher decides once for the ranks it starts and hands the answer down in
``FTSTUDIO_CPU_BF16`` (``rank_env``), which a user may also set (1 or 0) to
skip the measurement. A run across machines (several nodes, or Slurm tasks,
each started by a launcher of its own) has no one to decide for all: there
``auto`` on a CPU is fp32 unless ``FTSTUDIO_CPU_BF16=1`` is set.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path

CPU_BF16_ENV = "FTSTUDIO_CPU_BF16"
BF16_MIN_SPEEDUP = 1.5  # bf16 matmuls at least this many times fp32's speed before a CPU run takes bf16


@dataclass(frozen=True)
class CpuPrecision:
    """Whether a CPU run with ``model.dtype: auto`` trains in bf16, and why (a line for train.log)."""

    bf16: bool
    reason: str


def cpu_has_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU lists bf16 instructions (AVX-512 BF16 or AMX)."""
    try:
        flags = cpuinfo.read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_matmul_speedup(n: int = 1024, repeats: int = 3) -> float:
    """fp32's best time for an n x n x n matmul over bf16's, on this process's threads. Call it only
    on a CPU with bf16 instructions: without them one bf16 matmul of this size takes seconds."""
    import torch

    def best(dtype) -> float:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # oneDNN builds its kernel on the first call
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        return min(times)

    return best(torch.float32) / best(torch.bfloat16)


def decided_in_env() -> str | None:
    """``FTSTUDIO_CPU_BF16`` when it holds a decision ("1" or "0"), else None."""
    value = os.environ.get(CPU_BF16_ENV, "").strip()
    return value if value in ("0", "1") else None


@functools.lru_cache(maxsize=1)
def cpu_precision() -> CpuPrecision:
    """What ``auto`` trains in on this CPU (measured once per process; ``FTSTUDIO_CPU_BF16`` decides
    instead when set)."""
    forced = decided_in_env()
    if forced is not None:
        return CpuPrecision(forced == "1", f"{CPU_BF16_ENV}={forced}")
    if not cpu_has_bf16():
        return CpuPrecision(False, "this CPU lists no bf16 instructions")
    speedup = bf16_matmul_speedup()
    verdict = "at least" if speedup >= BF16_MIN_SPEEDUP else "below"
    return CpuPrecision(speedup >= BF16_MIN_SPEEDUP,
                        f"bf16 matmuls ran {speedup:.2f}x fp32's speed here, {verdict} the "
                        f"{BF16_MIN_SPEEDUP}x auto asks for")


def rank_env(dtype_name: str, across_machines: bool = False) -> dict[str, str]:
    """The environment that makes every rank of a run take the same precision for ``model.dtype: auto``
    on a CPU (empty when there is nothing to agree on). ``across_machines``: launchers elsewhere start
    ranks of this run too and would time on their own, so none is timed (fp32 unless the user set
    ``FTSTUDIO_CPU_BF16``)."""
    import torch

    if dtype_name != "auto" or torch.cuda.is_available():
        return {}
    if across_machines and decided_in_env() is None:
        return {CPU_BF16_ENV: "0"}
    return {CPU_BF16_ENV: "1" if cpu_precision().bf16 else "0"}
