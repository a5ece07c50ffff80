"""``model.dtype: auto`` on a CPU: bf16 only where its matmuls are measured fast enough, the same
answer for every rank of a run, and no bf16 timing on a CPU that would emulate it."""

from __future__ import annotations

import pytest
import torch

from backend import launch
from backend.config import from_dict
from backend.train import precision
from backend.train.trainer import resolve_dtype


@pytest.fixture(autouse=True)
def fresh_decision(monkeypatch):
    """Each test decides anew: no cached answer, no answer handed down in the environment, no GPU."""
    monkeypatch.delenv(precision.CPU_BF16_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    precision.cpu_precision.cache_clear()
    yield
    precision.cpu_precision.cache_clear()


def measured(monkeypatch, flags: bool, speedup: float | None):
    """A CPU with (or without) bf16 flags whose bf16 matmuls run ``speedup`` times fp32's; None: timing
    it is a failure (a CPU without bf16 instructions must never be timed)."""
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: flags)

    def timed(*args, **kwargs):
        if speedup is None:
            raise AssertionError("timed bf16 matmuls on a CPU without bf16 instructions")
        return speedup

    monkeypatch.setattr(precision, "bf16_matmul_speedup", timed)


@pytest.mark.parametrize("speedup, bf16", [(0.55, False), (1.4, False), (1.5, True), (6.0, True)])
def test_auto_takes_bf16_only_where_it_measures_fast_enough(monkeypatch, speedup, bf16):
    """0.55x: a Sapphire-Rapids-class core with AMX hidden; 6x: AMX."""
    measured(monkeypatch, flags=True, speedup=speedup)
    decision = precision.cpu_precision()
    assert decision.bf16 is bf16
    assert f"{speedup:.2f}x fp32's speed" in decision.reason
    assert resolve_dtype("auto") == (torch.bfloat16 if bf16 else torch.float32)
    assert resolve_dtype("fp32") == torch.float32 and resolve_dtype("bf16") == torch.bfloat16


def test_a_cpu_without_bf16_instructions_is_not_timed(monkeypatch):
    measured(monkeypatch, flags=False, speedup=None)
    assert precision.cpu_precision() == precision.CpuPrecision(False, "this CPU lists no bf16 instructions")
    assert resolve_dtype("auto") == torch.float32


@pytest.mark.parametrize("value, bf16", [("1", True), ("0", False)])
def test_the_environment_decides_without_a_measurement(monkeypatch, value, bf16):
    measured(monkeypatch, flags=True, speedup=None)
    monkeypatch.setenv(precision.CPU_BF16_ENV, value)
    assert precision.cpu_precision() == precision.CpuPrecision(bf16, f"{precision.CPU_BF16_ENV}={value}")


def test_the_decision_is_measured_once_per_process(monkeypatch):
    calls = []
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(precision, "bf16_matmul_speedup", lambda: calls.append(1) or 0.5)
    for _ in range(3):
        resolve_dtype("auto")
    assert calls == [1]


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    for flags, has in (("fpu avx2 avx512f", False), ("avx512f avx512_bf16", True), ("amx_bf16 amx_tile", True)):
        (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        assert precision.cpu_has_bf16(tmp_path / "cpuinfo") is has
    assert precision.cpu_has_bf16(tmp_path / "missing") is False


def test_the_real_timing_compares_the_two_precisions():
    """A real (small) measurement: a positive, finite ratio. Small enough to be quick where bf16 is
    emulated too."""
    ratio = precision.bf16_matmul_speedup(n=64, repeats=2)
    assert 0 < ratio < float("inf")


def config(dtype: str):
    return from_dict({"name": "t", "model": {"name_or_path": "demo", "dtype": dtype}, "data": {"path": "demo"}})


def test_every_rank_of_a_run_is_handed_the_launchers_decision(monkeypatch):
    measured(monkeypatch, flags=True, speedup=0.55)
    several, one = launch.LaunchSpec(nproc_per_node=2), launch.LaunchSpec()
    assert launch.ranks_env(config("auto"), several, None, None) == {precision.CPU_BF16_ENV: "0"}
    assert launch.ranks_env(config("auto"), one, None, None) == {}  # one process decides for itself
    assert launch.ranks_env(config("bf16"), several, None, None) == {}  # nothing to decide
    precision.cpu_precision.cache_clear()
    measured(monkeypatch, flags=True, speedup=6.0)
    assert launch.ranks_env(config("auto"), several, None, None) == {precision.CPU_BF16_ENV: "1"}


def test_a_run_across_machines_is_not_timed(monkeypatch):
    """Each machine's launcher would time on its own and could disagree: fp32, unless the user says."""
    measured(monkeypatch, flags=True, speedup=None)
    for spec in (launch.LaunchSpec(nnodes=2, nproc_per_node=2), launch.LaunchSpec(launcher="slurm")):
        assert launch.ranks_env(config("auto"), spec, None, None) == {precision.CPU_BF16_ENV: "0"}
        monkeypatch.setenv(precision.CPU_BF16_ENV, "1")
        assert launch.ranks_env(config("auto"), spec, None, None) == {precision.CPU_BF16_ENV: "1"}
        monkeypatch.delenv(precision.CPU_BF16_ENV)
        precision.cpu_precision.cache_clear()


def test_a_rank_follows_the_decision_handed_down(monkeypatch):
    """What a rank started with the launcher's environment trains in, whatever it would measure."""
    measured(monkeypatch, flags=True, speedup=6.0)
    monkeypatch.setenv(precision.CPU_BF16_ENV, "0")
    assert resolve_dtype("auto") == torch.float32
