"""Launch plans and tuning spaces shared by the Triton launchers.

Every launcher builds a :class:`Launch` — the kernel, its runtime arguments, the fixed
meta-parameters (flags, ``BLOCK_D``), the launch options and the tuning space — and hands it to
:func:`launch`. ``tests/test_gpu_compile.py`` builds the same plans from the same code with meta
tensors and compiles every configuration of every space for sm_80 and sm_90, so what is proven to
compile is what the launchers launch.

On a GPU a space of more than one configuration goes through ``triton.autotune`` (one autotuner
per kernel and space, keyed on the sizes that change the best choice; the tensors' dtypes are part
of every key). Under the Triton interpreter a space is one small configuration fitted to the sizes
(fewer, wider interpreted steps) and nothing is tuned. ``ALIGNKERN_AUTOTUNE=0`` launches the first
configuration of each space (the untuned default) without timing anything, for CUDA graph capture
or short test runs.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import triton

# Tuning time per configuration (ms): enough to rank tiles of the kernels' usual sizes, small
# enough that a new key costs well under a second.
TUNE_WARMUP_MS = 5
TUNE_REP_MS = 25


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune_enabled() -> bool:
    return os.environ.get("ALIGNKERN_AUTOTUNE", "1") not in ("", "0")


def config(num_warps: int, num_stages: int | None = None, **meta: int) -> triton.Config:
    """A ``triton.Config`` of tile sizes ``meta``; ``num_stages=None`` keeps Triton's default."""
    if num_stages is None:
        return triton.Config(dict(meta), num_warps=num_warps)
    return triton.Config(dict(meta), num_warps=num_warps, num_stages=num_stages)


def config_label(cfg: triton.Config) -> str:
    """``BLOCK_N=64 BLOCK_V=128 w8 s3`` (s- when the stage count is Triton's default)."""
    tiles = " ".join(f"{k}={v}" for k, v in cfg.kwargs.items())
    return f"{tiles} w{cfg.num_warps} s{cfg.num_stages}".strip()


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch, before its tiles are chosen.

    ``grid`` maps the meta-parameters (the chosen configuration's tiles and ``constexprs``) to the
    grid; ``configs`` is the tuning space (one configuration: nothing to tune); ``key`` names the
    kernel arguments whose values change the best configuration."""

    kernel: object
    grid: Callable[[dict], tuple]
    args: tuple
    constexprs: dict
    configs: tuple
    key: tuple
    options: dict = dataclasses.field(default_factory=dict)

    @property
    def name(self) -> str:
        return kernel_name(self.kernel)


def kernel_name(kernel) -> str:
    fn = getattr(kernel, "fn", kernel)
    return getattr(fn, "__name__", repr(fn))


def _bench(kernel_call, quantiles):
    return triton.testing.do_bench(kernel_call, warmup=TUNE_WARMUP_MS, rep=TUNE_REP_MS,
                                   quantiles=quantiles)


_AUTOTUNERS: dict = {}


def autotuner(plan: Launch):
    """The autotuner of ``plan``'s kernel over ``plan.configs`` (one per kernel, space and key,
    kept for the process so that each key is tuned once)."""
    ident = (plan.name, tuple(config_label(c) for c in plan.configs), plan.key)
    tuner = _AUTOTUNERS.get(ident)
    if tuner is None:
        tuner = triton.autotune(configs=list(plan.configs), key=list(plan.key), do_bench=_bench)(
            plan.kernel)
        _AUTOTUNERS[ident] = tuner
    return tuner


def autotuners() -> dict:
    """Every autotuner made in this process: {(kernel name, space, key): autotuner}."""
    return dict(_AUTOTUNERS)


def launch(plan: Launch | None) -> None:
    """Run ``plan``: the only configuration, the first one with ``ALIGNKERN_AUTOTUNE=0``, or the
    autotuner's choice."""
    if plan is None:
        return
    if len(plan.configs) == 1 or interpreting() or not autotune_enabled():
        cfg = plan.configs[0]
        meta = {**plan.constexprs, **cfg.kwargs}
        plan.kernel[plan.grid(meta)](*plan.args, **plan.constexprs, **cfg.all_kwargs(),
                                     **plan.options)
        return
    autotuner(plan)[plan.grid](*plan.args, **plan.constexprs, **plan.options)
