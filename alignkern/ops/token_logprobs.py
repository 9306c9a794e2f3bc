"""``token_logprobs``: log-probabilities of a few chosen tokens per row, without materialising a
``log_softmax`` of the logits.

Registered ops:
  ``alignkern::token_logprobs(logits, targets, temperature, ignore_index, backend) -> (out, lse)``
  ``alignkern::token_logprobs_backward(grad_out, grad_lse, logits, targets, lse, temperature,
  ignore_index, backend) -> grad_logits``
``backend`` names one of alignkern's backends, or is ``"auto"`` to pick one by device at run time.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch

from .. import _backend, reference

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
TARGET_DTYPES = (torch.int32, torch.int64)


class TokenLogprobs(NamedTuple):
    """What ``token_logprobs(..., return_lse=True)`` returns."""

    logprobs: torch.Tensor
    lse: torch.Tensor


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- validation


def _validate(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> None:
    """DESIGN.md's error contract; every message names the argument, the expected and the got."""
    for name, value in (("logits", logits), ("targets", targets)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"token_logprobs: {name} must be a torch.Tensor, got {type(value).__name__}")
    if logits.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            "token_logprobs: logits must be float32, float16, bfloat16 or float64, "
            f"got {logits.dtype}"
        )
    if targets.dtype not in TARGET_DTYPES:
        raise TypeError(
            f"token_logprobs: targets must be int32 or int64 token ids, got {targets.dtype}"
        )
    if logits.dim() < 1:
        raise ValueError("token_logprobs: logits must have shape (..., V), got a 0-d tensor")
    if logits.shape[-1] == 0:
        raise ValueError(
            "token_logprobs: logits must have a non-empty vocabulary (last dimension V > 0), "
            f"got shape {tuple(logits.shape)}"
        )
    lead = tuple(logits.shape[:-1])
    shape = tuple(targets.shape)
    if not (shape == lead or (len(shape) == len(lead) + 1 and shape[:-1] == lead)):
        raise ValueError(
            f"token_logprobs: targets must have shape {lead} or {lead + ('K',)} to match logits "
            f"of shape {tuple(logits.shape)}, got {shape}"
        )
    if logits.device != targets.device:
        raise ValueError(
            "token_logprobs: logits and targets must be on the same device, got logits on "
            f"{logits.device} and targets on {targets.device}"
        )
    if not (0 < temperature < float("inf")):
        raise ValueError(
            f"token_logprobs: temperature must be positive and finite, got {temperature}"
        )


def _check_target_ids(targets: torch.Tensor, vocab: int, ignore_index: int,
                      name: str = "token_logprobs") -> None:
    """IndexError for ids outside [0, V) that are not ignore_index. Costs one device sync;
    ALIGNKERN_VALIDATE=0 turns it off (the kernels then give NaN for such ids)."""
    if os.environ.get("ALIGNKERN_VALIDATE", "1") == "0" or targets.numel() == 0:
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        first = int(targets[bad][0])
        raise IndexError(
            f"{name}: targets must be token ids in [0, {vocab}) or ignore_index "
            f"({ignore_index}), got {first}"
        )


def _check_backend(backend: str, logits: torch.Tensor) -> str:
    if backend == "auto":
        return _backend.resolve_backend(logits.device)
    reason = _backend.unavailable_reason(backend, logits.device)
    if reason is not None:
        raise RuntimeError(f"alignkern backend {backend!r} is not available: {reason}")
    if backend == "cuda" and logits.dtype == torch.float64:
        raise TypeError(
            "token_logprobs: the cuda backend takes float32, float16 or bfloat16 logits, "
            "got float64 (use the triton or reference backend)"
        )
    return backend


# ----------------------------------------------------------------------------- kernel plumbing


class _Rows(NamedTuple):
    """The logits seen as N rows of V contiguous elements at arbitrary offsets."""

    logits: torch.Tensor  # the (possibly non-contiguous) tensor; kernels use its data_ptr
    offsets: torch.Tensor  # (N,) int64 element offsets of each row from logits.data_ptr()
    aligned16: bool  # every row starts 16 bytes aligned (lets the CUDA kernel vectorise)
    vocab: int
    targets: torch.Tensor  # (N, K) int64 contiguous


def _as_rows(logits: torch.Tensor, targets: torch.Tensor) -> _Rows:
    vocab = logits.shape[-1]
    if logits.stride(-1) != 1 and vocab > 1:
        logits = logits.contiguous()
    offsets = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)
    for dim, (size, stride) in enumerate(zip(logits.shape[:-1], logits.stride()[:-1])):
        view = [1] * (logits.dim() - 1)
        view[dim] = size
        offsets = offsets + torch.arange(size, device=logits.device).view(view) * stride
    element = logits.element_size()
    aligned16 = logits.data_ptr() % 16 == 0 and all(
        (stride * element) % 16 == 0
        for size, stride in zip(logits.shape[:-1], logits.stride()[:-1])
        if size > 1
    )
    k = targets.shape[-1] if targets.dim() == logits.dim() else 1
    n_rows = math.prod(logits.shape[:-1])
    ids = targets.reshape(n_rows, k).to(torch.int64).contiguous()
    return _Rows(logits, offsets.reshape(-1).contiguous(), aligned16, vocab, ids)


def _cpp_forward(rows: _Rows, out, lse, temperature, ignore_index, on_cuda: bool) -> None:
    ext = _backend.extension()
    args = [
        rows.logits.data_ptr(), _backend.DTYPE_CODES[rows.logits.dtype], rows.targets.shape[0],
        rows.vocab, rows.offsets.data_ptr(),
    ]
    tail = [rows.targets.data_ptr(), rows.targets.shape[1], out.data_ptr(), lse.data_ptr(),
            float(temperature), int(ignore_index)]
    if on_cuda:
        with torch.cuda.device(rows.logits.device):
            ext.token_logprobs_fwd_cuda(
                *args, int(rows.aligned16), *tail, _backend.cuda_stream(rows.logits.device)
            )
    else:
        ext.token_logprobs_fwd_cpu(*args, *tail)


def _cpp_backward(grad_out, grad_lse, rows: _Rows, lse, grad, temperature, ignore_index,
                  on_cuda: bool) -> None:
    ext = _backend.extension()
    head = [
        grad_out.data_ptr(), grad_out.stride(0), grad_out.stride(1),
        0 if grad_lse is None else grad_lse.data_ptr(),
        0 if grad_lse is None else grad_lse.stride(0),
        rows.logits.data_ptr(), _backend.DTYPE_CODES[rows.logits.dtype], rows.targets.shape[0],
        rows.vocab, rows.offsets.data_ptr(),
    ]
    tail = [rows.targets.data_ptr(), rows.targets.shape[1], lse.data_ptr(), grad.data_ptr(),
            float(temperature), int(ignore_index)]
    if on_cuda:
        with torch.cuda.device(rows.logits.device):
            ext.token_logprobs_bwd_cuda(
                *head, int(rows.aligned16), *tail, _backend.cuda_stream(rows.logits.device)
            )
    else:
        ext.token_logprobs_bwd_cpu(*head, *tail)


def _poisoned(shape, dtype, device) -> torch.Tensor:
    """An output buffer filled with NaN, so an element a kernel forgets to write shows up."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _run_forward(logits, targets, temperature, ignore_index, backend):
    if backend == "reference":
        return reference.token_logprobs(logits, targets, temperature, ignore_index)
    rows = _as_rows(logits, targets)
    acc = _accumulation_dtype(logits.dtype)
    n_rows, k = rows.targets.shape
    out = _poisoned((n_rows, k), acc, logits.device)
    lse = _poisoned((n_rows,), acc, logits.device)
    if backend == "triton":
        from ..triton_kernels import token_logprobs as kernels

        kernels.token_logprobs_fwd(rows.logits, rows.offsets, rows.vocab, rows.targets, out, lse,
                                   temperature, ignore_index)
    else:
        _cpp_forward(rows, out, lse, temperature, ignore_index, on_cuda=backend == "cuda")
    return out.reshape(targets.shape), lse.reshape(logits.shape[:-1])


def _run_backward(grad_out, grad_lse, logits, targets, lse, temperature, ignore_index, backend):
    if backend == "reference":
        return reference.token_logprobs_backward(
            grad_out, grad_lse, logits, targets, lse, temperature, ignore_index
        )
    rows = _as_rows(logits, targets)
    n_rows, k = rows.targets.shape
    acc = _accumulation_dtype(logits.dtype)
    # Small (N, K) / (N,) tensors: reshape keeps stride-0 expansions as views.
    grad_out = grad_out.to(acc).reshape(n_rows, k)
    grad_lse = None if grad_lse is None else grad_lse.to(acc).reshape(n_rows)
    lse = lse.to(acc).reshape(n_rows).contiguous()
    grad = _poisoned((n_rows, rows.vocab), logits.dtype, logits.device)
    if backend == "triton":
        from ..triton_kernels import token_logprobs as kernels

        kernels.token_logprobs_bwd(grad_out, grad_lse, rows.logits, rows.offsets, rows.vocab,
                                   rows.targets, lse, grad, temperature, ignore_index)
    else:
        _cpp_backward(grad_out, grad_lse, rows, lse, grad, temperature, ignore_index,
                      on_cuda=backend == "cuda")
    return grad.reshape(logits.shape)


# ----------------------------------------------------------------------------- registered ops


@torch.library.custom_op("alignkern::token_logprobs", mutates_args=())
def _token_logprobs_op(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    ignore_index: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    _validate(logits, targets, temperature)
    _check_target_ids(targets, logits.shape[-1], ignore_index)
    backend = _check_backend(backend, logits)
    return _run_forward(logits, targets, temperature, ignore_index, backend)


@_token_logprobs_op.register_fake
def _token_logprobs_fake(logits, targets, temperature, ignore_index, backend):
    torch._check(logits.dim() >= 1, lambda: "token_logprobs: logits must have shape (..., V)")
    torch._check(logits.shape[-1] > 0, lambda: "token_logprobs: logits has an empty vocabulary")
    torch._check(
        logits.dtype in SUPPORTED_DTYPES,
        lambda: f"token_logprobs: logits must be a float tensor, got {logits.dtype}",
    )
    torch._check(
        targets.dtype in TARGET_DTYPES,
        lambda: f"token_logprobs: targets must be int32 or int64, got {targets.dtype}",
    )
    lead = logits.shape[:-1]
    torch._check(
        tuple(targets.shape) == tuple(lead) or tuple(targets.shape[:-1]) == tuple(lead),
        lambda: f"token_logprobs: targets shape {tuple(targets.shape)} does not match logits "
        f"{tuple(logits.shape)}",
    )
    acc = _accumulation_dtype(logits.dtype)
    return targets.new_empty(targets.shape, dtype=acc), logits.new_empty(lead, dtype=acc)


@torch.library.custom_op("alignkern::token_logprobs_backward", mutates_args=())
def _token_logprobs_backward_op(
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    temperature: float,
    ignore_index: int,
    backend: str,
) -> torch.Tensor:
    backend = _check_backend(backend, logits)
    return _run_backward(grad_out, grad_lse, logits, targets, lse, temperature, ignore_index,
                         backend)


@_token_logprobs_backward_op.register_fake
def _token_logprobs_backward_fake(grad_out, grad_lse, logits, targets, lse, temperature,
                                  ignore_index, backend):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, targets, temperature, ignore_index, backend = inputs
    ctx.save_for_backward(logits, targets, output[1])
    ctx.temperature = temperature
    ctx.ignore_index = ignore_index
    ctx.backend = backend


def _backward(ctx, grad_out, grad_lse):
    logits, targets, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros(targets.shape, dtype=lse.dtype, device=lse.device)
    grad = _token_logprobs_backward_op(
        grad_out, grad_lse, logits, targets, lse, ctx.temperature, ctx.ignore_index, ctx.backend
    )
    return grad, None, None, None, None


_token_logprobs_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_lse: bool = False,
) -> torch.Tensor | TokenLogprobs:
    """Log-probabilities of chosen tokens, ``log_softmax(logits / temperature)[targets]``, read in
    one pass over the logits without materialising ``log_softmax``.

    Args:
        logits: ``(..., V)`` float32, float16, bfloat16 (or float64) scores; any strides.
        targets: ``(...)`` token ids, or ``(..., K)`` for K tokens per row; int32 or int64.
            Entries equal to ``ignore_index`` give 0.
        temperature: positive divisor applied to the logits first.
        ignore_index: the id that marks positions to skip (default -100).
        return_lse: also return ``lse (...)``, the log-sum-exp of ``logits / temperature``
            (differentiable too).

    Returns:
        ``logprobs`` shaped like ``targets``, float32 (float64 for float64 logits); with
        ``return_lse=True`` a ``TokenLogprobs(logprobs, lse)`` named tuple.

    Raises:
        TypeError: logits not floating point, or targets not int32/int64.
        ValueError: shapes that do not match, an empty vocabulary, mixed devices, a temperature
            that is not positive and finite.
        IndexError: a target id outside ``[0, V)`` that is not ``ignore_index`` (checked unless
            ``ALIGNKERN_VALIDATE=0``; kernels then return NaN for that element).
        RuntimeError: the requested backend cannot run here.

    Example:
        >>> logits = torch.randn(4, 32000)
        >>> alignkern.token_logprobs(logits, torch.tensor([1, 2, 3, 4])).shape
        torch.Size([4])
    """
    if torch.compiler.is_compiling():
        backend = "auto"  # resolved when the compiled graph runs, not when it is traced
    else:
        _validate(logits, targets, temperature)
        backend = _check_backend("auto", logits)
    out, lse = _token_logprobs_op(logits, targets, float(temperature), int(ignore_index), backend)
    return TokenLogprobs(out, lse) if return_lse else out
