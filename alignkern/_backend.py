"""Which backend runs an op.

Backends:
  ``triton``     Triton kernels (alignkern/triton_kernels). Default for CUDA tensors. Runs on CPU
                 tensors only under the Triton interpreter (``TRITON_INTERPRET=1`` set before
                 alignkern is imported).
  ``cuda``       CUDA kernels from csrc/cuda through ``alignkern._C`` (CUDA tensors only).
  ``cpu``        C++/OpenMP kernels from csrc/cpu through ``alignkern._C``. Default for CPU tensors.
  ``reference``  The plain-PyTorch definitions in ``alignkern.reference`` (any device, float64).

The default follows the device of the inputs. ``alignkern.use_backend(name)`` (a context manager)
and the ``ALIGNKERN_BACKEND`` environment variable override it; the context manager wins. Asking for
a backend that cannot run raises ``RuntimeError`` saying why; an unknown name, ``ValueError``.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from . import _checks

BACKENDS = ("triton", "cuda", "cpu", "reference")

# dtype codes understood by csrc/common.h (DType).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "alignkern_backend", default=None
)
_ext_cache: dict[str, Any] = {}
_warned_fallback = False


def _load_extension() -> tuple[Any | None, str | None]:
    """Import alignkern._C once; return (module, None) or (None, why it failed)."""
    if "module" not in _ext_cache:
        try:
            _ext_cache["module"] = importlib.import_module("alignkern._C")
            _ext_cache["error"] = None
        except ImportError as exc:  # not built, or built for another Python
            _ext_cache["module"] = None
            _ext_cache["error"] = f"alignkern._C could not be imported ({exc})"
    return _ext_cache["module"], _ext_cache["error"]


def extension() -> Any:
    """The compiled extension module; RuntimeError if it is missing."""
    module, error = _load_extension()
    if module is None:
        raise RuntimeError(f"{error}; rebuild with `pip install -e .`")
    return module


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_error() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    return None


def unavailable_reason(name: str, device: torch.device | None = None) -> str | None:
    """None if backend ``name`` can run on ``device`` (any device when None), else why not."""
    if name not in BACKENDS:
        return f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}"
    is_cuda = device is not None and device.type == "cuda"
    is_cpu = device is not None and device.type == "cpu"
    if name == "reference":
        return None
    if name == "triton":
        error = _triton_error()
        if error:
            return error
        if is_cpu and not triton_interpreting():
            return (
                "the triton backend runs CPU tensors only under the Triton interpreter: "
                "set TRITON_INTERPRET=1 before importing alignkern"
            )
        if device is None and not torch.cuda.is_available() and not triton_interpreting():
            return "no CUDA GPU is present and TRITON_INTERPRET is not set"
        return None
    module, error = _load_extension()
    if module is None:
        return error
    if name == "cuda":
        if not module.has_cuda():
            return "alignkern._C was built without CUDA (no CUDA compiler, or ALIGNKERN_SKIP_CUDA=1)"
        if is_cpu:
            return "the cuda backend needs CUDA tensors, got CPU tensors"
        if not torch.cuda.is_available():
            return "no CUDA GPU is present"
        return None
    if is_cuda:  # name == "cpu"
        return "the cpu backend needs CPU tensors, got CUDA tensors"
    return None


def requested_backend() -> str | None:
    """The backend named by use_backend() or ALIGNKERN_BACKEND, if any."""
    name = _override.get() or os.environ.get("ALIGNKERN_BACKEND") or None
    if name is not None and name not in BACKENDS:  # use_backend checks its name, so this is the env
        raise ValueError(
            f"ALIGNKERN_BACKEND: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}"
        )
    return name


def default_backend(device: torch.device) -> str:
    """triton for CUDA tensors; cpu (the C++ kernels) for CPU tensors, else reference."""
    global _warned_fallback
    if device.type == "cuda":
        return "triton"
    if unavailable_reason("cpu", device) is None:
        return "cpu"
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(
            f"alignkern: C++ CPU kernels unavailable ({unavailable_reason('cpu', device)}); "
            "using the reference backend",
            RuntimeWarning,
            stacklevel=3,
        )
    return "reference"


def resolve_backend(device: torch.device) -> str:
    """The backend that runs an op on tensors of ``device``.

    ValueError if ALIGNKERN_BACKEND names no backend; RuntimeError if the requested one cannot run.
    """
    name = requested_backend()
    if name is None:
        return default_backend(device)
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise RuntimeError(f"alignkern backend {name!r} is not available: {reason}")
    return name


def backend_for(fn: str, backend, device: torch.device) -> str:
    """A registered op's ``backend`` argument: ``"auto"`` resolved for ``device``, or a named
    backend that can run there. ValueError for an unknown name (the message starts with ``fn``),
    RuntimeError for one that cannot run."""
    _checks.choice(fn, "backend", backend, ("auto", *BACKENDS))
    if backend == "auto":
        return resolve_backend(device)
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"alignkern backend {backend!r} is not available: {reason}")
    return backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run alignkern ops inside the block with backend ``name``.

    >>> with alignkern.use_backend("reference"):
    ...     out = alignkern.token_logprobs(logits, targets)
    """
    if name not in BACKENDS:
        raise ValueError(f"use_backend: name must be one of {', '.join(BACKENDS)}, got {name!r}")
    token = _override.set(name)
    try:
        yield
    finally:
        _override.reset(token)


def backend_status() -> dict[str, str | None]:
    """For each backend, None if it can run on this machine, else why not (for `alignkern info`)."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return {name: unavailable_reason(name, device) for name in BACKENDS}


def cuda_stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def ensure_cuda_context(device: torch.device) -> None:
    """Make the tensor's device current before launching a CUDA kernel from _C."""
    torch.cuda.set_device(device)
