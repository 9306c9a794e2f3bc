"""Timing and peak-memory measurement for `alignkern bench` and the pytest-benchmark suites.

GPU: ``triton.testing.do_bench`` quantiles, ``torch.cuda`` peak-memory counters.
CPU: ``time.perf_counter`` over rounds in which the providers of a case take turns, repeated until
the p20-p80 spread is small or the case's time budget is spent; peak memory as the rise of the
resident set (Linux, glibc), else torch.profiler's memory events.
"""

from __future__ import annotations

import gc
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# A case is timed until the p20-p80 spread of every provider is at most TARGET_SPREAD of its
# median (or the case's time budget runs out); a result whose spread is above NOISY_SPREAD is
# reported as noisy.
TARGET_SPREAD = 0.10
NOISY_SPREAD = 0.25
MIN_REPS = 5
MIN_SAMPLE_MS = 2.0  # calls faster than this are repeated inside one sample


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: median, 20th and 80th percentiles over ``samples`` timed runs."""

    p50: float
    p20: float
    p80: float
    samples: int

    @property
    def spread(self) -> float:
        """(p80 - p20) / median: the width of the middle 60 % of the runs, relative."""
        return (self.p80 - self.p20) / self.p50 if self.p50 > 0 else math.inf

    @property
    def noisy(self) -> bool:
        return self.spread > NOISY_SPREAD

    def as_tuple(self) -> tuple[float, float, float]:
        return self.p50, self.p20, self.p80


def summarize(samples_ms: Sequence[float]) -> Timing:
    """Median, p20 and p80 (inclusive quantiles) of per-call times in milliseconds."""
    samples = [float(s) for s in samples_ms]
    if not samples:
        raise ValueError("summarize: no samples")
    if len(samples) == 1:
        return Timing(samples[0], samples[0], samples[0], 1)
    q = statistics.quantiles(samples, n=10, method="inclusive")
    return Timing(statistics.median(samples), q[1], q[7], len(samples))


def time_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, *,
                     budget_s: float = 4.0, target_spread: float = TARGET_SPREAD,
                     min_reps: int = MIN_REPS, max_reps: int = 500,
                     min_sample_ms: float = MIN_SAMPLE_MS,
                     clock: Callable[[], float] = time.perf_counter,
                     first_ms: dict[str, float] | None = None,
                     seed: int = 0) -> dict[str, Timing | Exception]:
    """Time several ways of computing the same thing: name -> Timing, or the exception it raised.

    GPU: ``triton.testing.do_bench`` quantiles, one provider after the other (its own warm-up,
    repeats and L2 flush between runs).

    CPU: the providers take turns — one timed sample of each per round, in a shuffled order — so
    that a load spike from another process hits all of them rather than one. A provider stops once
    it has ``min_reps`` samples and its p20-p80 spread is at most ``target_spread`` of its median;
    all stop when the budget (seconds of timed rounds) is spent and each has ``min_reps`` samples,
    or at ``max_reps``. A call faster than ``min_sample_ms`` is repeated inside one sample (the
    sample is the mean over those calls), so timer resolution does not add noise; how many calls
    that takes comes from ``first_ms`` (a timed call made after the warm-up, which then also
    counts as the first sample where one call is enough) or from one calibration call.
    Every function should have been called once before (warm-up: compilation, first-call
    allocations)."""
    results: dict[str, Timing | Exception] = {}
    if device.type == "cuda":
        import triton.testing

        for name, fn in fns.items():
            try:
                p50, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
                results[name] = Timing(float(p50), float(p20), float(p80), 0)
            except Exception as exc:  # noqa: BLE001 - reported, not raised
                results[name] = exc
        return results

    inner: dict[str, int] = {}
    samples: dict[str, list[float]] = {name: [] for name in fns}

    def sample(name: str) -> float:
        fn, n = fns[name], inner[name]
        start = clock()
        for _ in range(n):
            fn()
        return (clock() - start) * 1e3 / n

    active = []
    first_ms = first_ms or {}
    for name in fns:  # calibrate: how many calls make one sample
        inner[name] = 1
        first = first_ms.get(name)
        if first is None:
            try:
                first = sample(name)
            except Exception as exc:  # noqa: BLE001 - reported, not raised
                results[name] = exc
                continue
        if first >= min_sample_ms:
            samples[name].append(first)  # a slow call: this run is a sample like any other
        inner[name] = max(1, min(1000, math.ceil(min_sample_ms / max(first, 1e-6))))
        active.append(name)
    rng = random.Random(seed)
    deadline = clock() + budget_s
    while active:
        order = active[:]
        rng.shuffle(order)
        for name in order:
            try:
                samples[name].append(sample(name))
            except Exception as exc:  # noqa: BLE001 - reported, not raised
                results[name] = exc
                active.remove(name)
        out_of_time = clock() >= deadline
        for name in active[:]:
            got = samples[name]
            if len(got) >= max_reps or (len(got) >= min_reps and (
                    out_of_time or summarize(got).spread <= target_spread)):
                active.remove(name)
    for name, got in samples.items():
        if name not in results:
            results[name] = summarize(got)
    return results


def time_ms(fn: Callable[[], object], device: torch.device, *, budget_s: float = 1.0,
            min_reps: int = 3, max_reps: int = 50) -> tuple[float, float, float]:
    """(p50, p20, p80) milliseconds of ``fn()`` alone (warm-up call included here)."""
    if device.type != "cuda":
        fn()
    timing = time_interleaved({"fn": fn}, device, budget_s=budget_s, min_reps=min_reps,
                              max_reps=max_reps)["fn"]
    if isinstance(timing, Exception):
        raise timing
    return timing.as_tuple()


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


def measures_resident_set() -> bool:
    """Whether CPU peak memory comes from the resident set (no overhead on the measured call)."""
    return _resident_set_ready()


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
