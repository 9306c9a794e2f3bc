"""Timing and peak-memory measurement for `alignkern bench` and the pytest-benchmark suites.

GPU: ``triton.testing.do_bench`` quantiles, ``torch.cuda`` peak-memory counters.
CPU: ``time.perf_counter`` over repeated calls; peak memory as the rise of the resident set (Linux,
glibc), else torch.profiler's memory events.
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
    of leaf ops, so a nested op's allocation is counted once).

    Frees made inside autograd's backward or inside a Python custom op do not reach the profiler
    (torch 2.13: ten 4 MiB buffers allocated and freed in turn there read as 40 MiB), so this is
    an upper bound; it is the fallback where the resident-set method below is unavailable."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.events() if e.cpu_memory_usage != 0 and not e.cpu_children]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.time_range.start):
        current += event.cpu_memory_usage
        peak = max(peak, current)
    return peak


_MMAP_THRESHOLD_SET: list[bool] = []
_LIBC: list = []


def _resident_set_ready() -> bool:
    """Linux + glibc: serve every allocation of 1 MiB or more with its own mmap (so a freed
    buffer leaves the resident set at once and a new one has to enter it), and check that the
    peak resident set can be reset. Once per process; affects only later allocations."""
    if not _MMAP_THRESHOLD_SET:
        ok = False
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            m_mmap_threshold = -3
            ok = libc.mallopt(m_mmap_threshold, 1 << 20) == 1
            _LIBC.append(libc)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except (OSError, AttributeError):
            ok = False
        _MMAP_THRESHOLD_SET.append(ok)
    return _MMAP_THRESHOLD_SET[0]


def _resident_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def _cpu_peak_resident(fn: Callable[[], object]) -> int:
    """How far the resident set rose above its level before fn ran (VmHWM after resetting it).
    Sees every allocation, including inductor's and autograd's; small ones (< 1 MiB, served from
    the heap) can blur it by a few MiB."""
    # Give free heap pages back first: otherwise a free inside fn can trim the heap, lower the
    # resident set below `before` and hide that much of fn's own peak.
    _LIBC[0].malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    before = _resident_kib("VmRSS")
    fn()
    return max(0, _resident_kib("VmHWM") - before) * 1024


def sees_allocations_of(provider: str, device: torch.device) -> bool:
    """With the profiler fallback on CPU, the buffers inductor-generated code allocates are
    invisible, so a torch.compile provider's peak would read as 0; report it as unknown."""
    return device.type == "cuda" or _resident_set_ready() or "compile" not in provider


def peak_memory_bytes(fn: Callable[[], object], device: torch.device, *,
                      cpu_method: str = "auto") -> int:
    """How far allocated memory rose above its level before ``fn()`` ran, at its peak.

    ``cpu_method``: ``"auto"`` (resident set where available, else profiler), ``"profiler"``
    (torch allocator events only: exact to the byte for small buffers, but an upper bound when
    frees happen inside a backward or a custom op; what the Triton interpreter's own host copies
    should not be charged to)."""
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if cpu_method == "auto" and _resident_set_ready():
        return _cpu_peak_resident(fn)
    return _cpu_peak_allocated(fn)
