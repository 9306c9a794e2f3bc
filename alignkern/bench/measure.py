"""Timing and peak-memory measurement for `alignkern bench` and the pytest-benchmark suites.

GPU: ``triton.testing.do_bench`` quantiles, ``torch.cuda`` peak-memory counters.
CPU: ``time.perf_counter`` over repeated calls, peak allocation from torch.profiler's memory events.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, *, budget_s: float = 1.0,
            min_reps: int = 3, max_reps: int = 50) -> tuple[float, float, float]:
    """(p50, p20, p80) milliseconds of ``fn()``."""
    if device.type == "cuda":
        import triton.testing

        p50, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return float(p50), float(p20), float(p80)
    fn()  # warm-up (first-call allocations, compilation)
    samples: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(samples) < min_reps or (len(samples) < max_reps and time.perf_counter() < deadline):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(samples, n=10, method="inclusive") if len(samples) > 1 else samples * 9
    return statistics.median(samples), q[1], q[7]


def _cpu_peak_allocated(fn: Callable[[], object]) -> int:
    """Peak of bytes allocated by torch's CPU allocator while fn runs (profiler memory events
    of leaf ops, so a nested op's allocation is counted once)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.events() if e.cpu_memory_usage != 0 and not e.cpu_children]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.time_range.start):
        current += event.cpu_memory_usage
        peak = max(peak, current)
    return peak


def sees_allocations_of(provider: str, device: torch.device) -> bool:
    """On CPU the profiler does not see the buffers inductor-generated code allocates, so a
    torch.compile provider's peak would read as 0; report it as unknown instead."""
    return device.type == "cuda" or "compile" not in provider


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """How far allocated memory rose above its level before ``fn()`` ran, at its peak."""
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    return _cpu_peak_allocated(fn)
