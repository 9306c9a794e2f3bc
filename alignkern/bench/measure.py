"""Timing and peak-memory measurement for `alignkern bench` and the pytest-benchmark suites.

GPU: ``triton.testing.do_bench`` quantiles, ``torch.cuda`` peak-memory counters.
CPU: ``time.perf_counter`` over repeated calls, peak resident memory through Linux's VmHWM.
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


def _read_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


M_MMAP_THRESHOLD = -3
GLIBC_MAX_DYNAMIC_THRESHOLD = 32 << 20


def _set_mmap_threshold(nbytes: int) -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, nbytes)
    except (OSError, AttributeError):
        pass


def cpu_peak_growth_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _read_status_bytes("VmHWM:")
    except (OSError, RuntimeError):
        return False
    return True


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """How far memory use rose above its level before ``fn()`` ran, at its peak (None if this
    platform cannot tell). On CPU this is resident memory, so it includes allocator slack."""
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if not cpu_peak_growth_supported():
        return None
    # glibc raises its mmap threshold after large frees, so freed buffers stay resident and a peak
    # would not show. Measure with every buffer over 1 MiB mmapped (returned on free), then leave
    # the threshold at glibc's dynamic ceiling, where a warm process sits anyway.
    _set_mmap_threshold(1 << 20)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
        before = _read_status_bytes("VmRSS:")
        fn()
        return max(0, _read_status_bytes("VmHWM:") - before)
    finally:
        _set_mmap_threshold(GLIBC_MAX_DYNAMIC_THRESHOLD)
