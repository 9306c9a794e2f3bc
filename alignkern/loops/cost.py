"""What a loop costs: decoder forwards, token positions they process, rows projected through the
full-vocabulary LM head, wall time and peak memory. Used by ``alignkern demo`` and
``alignkern bench --loops``.

Counting and timing are separate runs: ``count(models)`` hooks the decoders and LM heads and
watches alignkern's fused LM-head ops through a dispatch mode (which slows every op down), and
``measure(fn, device)`` times an unhooked run and reads its peak memory.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from . import _common

# alignkern ops that project rows through an LM head, and how many heads each row goes through
# (linear_kl projects every row through the policy's head and the reference's).
_HEAD_OPS = {"linear_logprobs": 1, "linear_kl": 2}


@dataclass
class Counts:
    """``forwards``: decoder forwards; ``positions``: token positions they processed (padding
    included); ``head_rows``: rows projected through a full-vocabulary LM head, by the model's
    own head (``model(...).logits``) or by alignkern's fused ops, forward passes only."""

    forwards: int = 0
    positions: int = 0
    head_rows: int = 0


class _HeadOps(TorchDispatchMode):
    def __init__(self, counts: Counts):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if getattr(func, "namespace", None) == "alignkern":
            name = func.name().split("::")[-1].split(".")[0]
            if name in _HEAD_OPS and args and isinstance(args[0], torch.Tensor):
                self.counts.head_rows += _HEAD_OPS[name] * int(args[0].numel() //
                                                               max(args[0].shape[-1], 1))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count(*models: nn.Module) -> Iterator[Counts]:
    """Count what runs inside the block on ``models`` (their decoders and LM heads) and in
    alignkern's fused LM-head ops."""
    counts = Counts()
    counter = _common.ForwardCounter()
    handles = []

    def head_hook(module, args):
        counts.head_rows += int(args[0].numel() // args[0].shape[-1])

    for model in dict.fromkeys(models):  # each model once
        handles.append(model.get_decoder().register_forward_pre_hook(counter._hook,
                                                                     with_kwargs=True))
        handles.append(model.get_output_embeddings().register_forward_pre_hook(head_hook))
    try:
        with _HeadOps(counts):
            yield counts
    finally:
        for handle in handles:
            handle.remove()
        counts.forwards, counts.positions = counter.forwards, counter.positions


@dataclass
class Measured:
    """``value``: what ``fn`` returned; ``wall_s``: its wall time; ``peak_bytes``: how far memory
    rose above its level before the call (CUDA: allocated bytes; CPU: the resident set, or None
    where that cannot be read)."""

    value: object
    wall_s: float
    peak_bytes: int | None


def measure(fn: Callable[[], object], device: torch.device, *, repeats: int = 1) -> Measured:
    """Run ``fn`` ``repeats`` times: the median wall time, the largest peak, the first value."""
    runs = [_measure_once(fn, device) for _ in range(max(1, repeats))]
    walls = sorted(run.wall_s for run in runs)
    peaks = [run.peak_bytes for run in runs if run.peak_bytes is not None]
    return Measured(runs[0].value, walls[len(walls) // 2], max(peaks) if peaks else None)


def _measure_once(fn: Callable[[], object], device: torch.device) -> Measured:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        value = fn()
        torch.cuda.synchronize(device)
        wall = time.perf_counter() - start
        return Measured(value, wall, torch.cuda.max_memory_allocated(device) - before)
    ready = _resident_set_ready()
    if ready:
        _LIBC[0].malloc_trim(0)
        _reset_peak()
        before = _status_kib("VmRSS")
    start = time.perf_counter()
    value = fn()
    wall = time.perf_counter() - start
    peak = max(0, _status_kib("VmHWM") - before) * 1024 if ready else None
    return Measured(value, wall, peak)


# ----------------------------------------------------------------------------- CPU peak memory

_LIBC: list = []
_READY: list[bool] = []


def _resident_set_ready() -> bool:
    """Linux + glibc: serve allocations of 1 MiB or more with their own mmap (so that a freed
    buffer leaves the resident set at once and a new one enters it), and check that the peak
    resident set can be reset. Decided once per process; affects later allocations only."""
    if not _READY:
        ok = False
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            ok = libc.mallopt(-3, 1 << 20) == 1  # M_MMAP_THRESHOLD
            _LIBC.append(libc)
            _reset_peak()
            _status_kib("VmHWM")
        except (OSError, AttributeError):
            ok = False
        _READY.append(ok)
    return _READY[0]


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := the current resident set


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")
