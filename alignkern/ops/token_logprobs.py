"""``token_logprobs``: log-probabilities of a few chosen tokens per row, without materialising a
``log_softmax`` of the logits.

Registered ops:
  ``alignkern::token_logprobs(logits, targets, temperature, ignore_index, backend) ->
  (out, row_max, log_sum)``
  ``alignkern::token_logprobs_backward(grad_out, grad_lse, logits, targets, row_max, log_sum,
  temperature, ignore_index, backend) -> grad_logits``
``backend`` names one of alignkern's backends, or is ``"auto"`` to pick one by device at run time.

Each row's log-sum-exp of ``z = logits / T`` comes in two parts, ``lse = row_max + log_sum``:
``row_max`` is the row's maximum of z (0 where that maximum is infinite; no gradient) and
``log_sum = log sum_v exp(z_v - row_max)``, whose gradient is ``softmax(z)`` (row_max held fixed,
so that ``row_max + log_sum`` differentiates as the log-sum-exp). Log-probabilities are
``(z_t - row_max) - log_sum`` and the backward's softmax ``exp((z - row_max) - log_sum)``: the sum
rounded to one float loses every bit of ``log_sum`` below the spacing of ``|row_max|`` (tied top
logits at T = 1e-6 gave -0.5 for -0.693).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
from typing import NamedTuple

import torch

from .. import _autocast, _backend, _checks, reference
from . import _targets

SUPPORTED_DTYPES = _checks.FLOAT_DTYPES
TARGET_DTYPES = _checks.INDEX_DTYPES


class TokenLogprobs(NamedTuple):
    """What ``token_logprobs(..., return_lse=True)`` returns."""

    logprobs: torch.Tensor
    lse: torch.Tensor


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- validation


def _check_inputs(fn: str, logits, targets, temperature, ignore_index) -> tuple[float, int]:
    """docs/design.md's error contract for the forward's arguments; returns the scalars as
    ``(float, int)``."""
    _checks.tensor(fn, "logits", logits, dtypes=SUPPORTED_DTYPES)
    _checks.tensor(fn, "targets", targets, dtypes=TARGET_DTYPES)
    if logits.dim() < 1:
        raise ValueError(f"{fn}: logits must have shape (..., V), got a 0-d tensor")
    if logits.shape[-1] == 0:
        raise ValueError(
            f"{fn}: logits must have a non-empty vocabulary (last dimension V > 0), "
            f"got shape {tuple(logits.shape)}"
        )
    lead = tuple(logits.shape[:-1])
    shape = tuple(targets.shape)
    if not (shape == lead or (len(shape) == len(lead) + 1 and shape[:-1] == lead)):
        raise ValueError(
            f"{fn}: targets must have shape {lead} or {lead + ('K',)} to match logits "
            f"of shape {tuple(logits.shape)}, got {shape}"
        )
    _checks.same_device(fn, logits=logits, targets=targets)
    return _checks.temperature(fn, temperature), _checks.integer(fn, "ignore_index", ignore_index)


def _check_gradients(fn: str, grad_out, grad_lse, row_max, log_sum, targets, rows_arg: str,
                     rows) -> None:
    """The backward's extra tensors: ``grad_out`` shaped like the targets, ``grad_lse`` (or None),
    ``row_max`` and ``log_sum`` shaped like the leading dimensions of ``rows`` (the logits, or the
    hidden states of linear_logprobs, named ``rows_arg``), real floating point, on the same
    device."""
    lead = tuple(rows.shape[:-1])
    _checks.tensor(fn, "grad_out", grad_out, floating=True)
    _checks.shape(fn, "grad_out", grad_out, targets.shape, "the shape of targets")
    _checks.optional_tensor(fn, "grad_lse", grad_lse, floating=True)
    if grad_lse is not None:
        _checks.shape(fn, "grad_lse", grad_lse, lead, f"the leading shape of {rows_arg}")
    for arg, value in (("row_max", row_max), ("log_sum", log_sum)):
        _checks.tensor(fn, arg, value, floating=True)
        _checks.shape(fn, arg, value, lead, f"the leading shape of {rows_arg}")
    _checks.same_device(fn, **{rows_arg: rows}, grad_out=grad_out, grad_lse=grad_lse,
                        row_max=row_max, log_sum=log_sum)


# Set while a public function that has already checked its ids (and named them in its own
# words) calls a registered op, so the op does not check them, and sync the device, again.
_IDS_CHECKED: contextvars.ContextVar[bool] = contextvars.ContextVar("alignkern_ids_checked",
                                                                     default=False)


def _check_target_ids(targets: torch.Tensor, vocab: int, ignore_index: int | None,
                      name: str = "token_logprobs", arg: str = "targets") -> None:
    """IndexError for ids outside [0, V) that are not ``ignore_index`` (None: no id is ignored).
    Costs one device sync; ALIGNKERN_VALIDATE=0 turns it off (the kernels then give NaN for such
    ids)."""
    if (_IDS_CHECKED.get() or os.environ.get("ALIGNKERN_VALIDATE", "1") == "0"
            or targets.numel() == 0 or torch.compiler.is_compiling()):
        return  # when compiling, the op checks them as the graph runs
    bad = (targets < 0) | (targets >= vocab)
    if ignore_index is not None:
        bad &= targets != ignore_index
    if bool(bad.any()):
        first = int(targets[bad][0])
        allowed = "" if ignore_index is None else f" or ignore_index ({ignore_index})"
        raise IndexError(f"{name}: {arg} must be token ids in [0, {vocab}){allowed}, got {first}")


@contextlib.contextmanager
def ids_already_checked():
    """Inside the block, registered ops skip their own id check (the caller has done it)."""
    token = _IDS_CHECKED.set(True)
    try:
        yield
    finally:
        _IDS_CHECKED.reset(token)


def _check_backend(backend: str, logits: torch.Tensor, fn: str = "token_logprobs") -> str:
    backend = _backend.backend_for(fn, backend, logits.device)
    if backend == "cuda" and logits.dtype == torch.float64:
        raise TypeError(
            f"{fn}: the cuda backend takes float32, float16 or bfloat16 logits, "
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


def _target_logits(rows: _Rows, acc: torch.dtype) -> torch.Tensor:
    """The logits at each target id ``(N, K)`` in ``acc`` (clamped ids where out of range), read
    through a flat view of the rows' storage so that no copy of the logits is made."""
    n_rows, k = rows.targets.shape
    if n_rows == 0 or k == 0:
        return torch.zeros((n_rows, k), dtype=acc, device=rows.logits.device)
    lead_sizes, lead_strides = rows.logits.shape[:-1], rows.logits.stride()[:-1]
    extent = 1 + sum((size - 1) * stride for size, stride in zip(lead_sizes, lead_strides))
    flat = rows.logits.as_strided((extent - 1 + rows.vocab,), (1,))
    index = rows.offsets[:, None] + rows.targets.clamp(0, rows.vocab - 1)
    return flat[index].to(acc)


def _cpp_forward(rows: _Rows, out, row_max, log_sum, temperature, ignore_index,
                 on_cuda: bool) -> None:
    ext = _backend.extension()
    args = [
        rows.logits.data_ptr(), _backend.DTYPE_CODES[rows.logits.dtype], rows.targets.shape[0],
        rows.vocab, rows.offsets.data_ptr(),
    ]
    tail = [rows.targets.data_ptr(), rows.targets.shape[1], out.data_ptr(), row_max.data_ptr(),
            log_sum.data_ptr(), float(temperature), int(ignore_index)]
    if on_cuda:
        with torch.cuda.device(rows.logits.device):
            ext.token_logprobs_fwd_cuda(
                *args, int(rows.aligned16), *tail, _backend.cuda_stream(rows.logits.device)
            )
    else:
        ext.token_logprobs_fwd_cpu(*args, *tail)


def _cpp_dense_backward(coef, rows: _Rows, row_max, log_sum, grad, temperature,
                        on_cuda: bool, entropy_grad=None) -> None:
    """grad = -coef * softmax(logits / T) / T over every column (no target terms); with
    ``entropy_grad`` (cpu only) -(coef + entropy_grad (z - row_max)) * softmax / T."""
    ext = _backend.extension()
    args = [coef.data_ptr(), rows.logits.data_ptr(), _backend.DTYPE_CODES[rows.logits.dtype],
            rows.targets.shape[0], rows.vocab, rows.offsets.data_ptr()]
    tail = [row_max.data_ptr(), log_sum.data_ptr(), grad.data_ptr(), float(temperature)]
    if on_cuda:
        with torch.cuda.device(rows.logits.device):
            ext.token_logprobs_bwd_cuda(*args, int(rows.aligned16), *tail,
                                        _backend.cuda_stream(rows.logits.device))
    else:
        ext.token_logprobs_bwd_cpu(*args, *tail,
                                   0 if entropy_grad is None else entropy_grad.data_ptr())


def dense_gradient(logits: torch.Tensor, coef: torch.Tensor, row_max: torch.Tensor,
                   log_sum: torch.Tensor, temperature: float, out: torch.Tensor,
                   entropy_grad: torch.Tensor | None = None) -> torch.Tensor:
    """``out = -(coef + entropy_grad * d) * exp(d - log_sum) / T`` with ``d = logits / T -
    row_max`` (``entropy_grad`` None: 0), in one pass of the C++ kernel: ``logits (n, b)``
    float32/float64 on the CPU with a contiguous last dimension (a block of a wider tile is
    fine), ``out (n, b)`` contiguous in the same dtype (``logits`` itself is fine: each chunk is
    read before it is written), ``coef``, ``row_max``, ``log_sum``, ``entropy_grad`` ``(n,)`` in
    that dtype."""
    n_rows, width = logits.shape
    if n_rows == 0 or width == 0:
        return out
    rows = _Rows(logits, torch.arange(n_rows, dtype=torch.int64) * logits.stride(0), False, width,
                 torch.empty((n_rows, 0), dtype=torch.int64))
    _cpp_dense_backward(coef.contiguous(), rows, row_max.contiguous(), log_sum.contiguous(), out,
                        temperature, on_cuda=False,
                        entropy_grad=None if entropy_grad is None else entropy_grad.contiguous())
    return out


def _poisoned(shape, dtype, device) -> torch.Tensor:
    """An output buffer filled with NaN, so an element a kernel forgets to write shows up."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _run_forward(logits, targets, temperature, ignore_index, backend):
    """``(out, row_max, log_sum)`` shaped like ``targets`` and ``logits.shape[:-1]``."""
    if backend == "reference":
        return reference.token_logprobs(logits, targets, temperature, ignore_index)
    rows = _as_rows(logits, targets)
    acc = _accumulation_dtype(logits.dtype)
    n_rows, k = rows.targets.shape
    out = _poisoned((n_rows, k), acc, logits.device)
    row_max = _poisoned((n_rows,), acc, logits.device)
    log_sum = _poisoned((n_rows,), acc, logits.device)
    if backend == "triton":
        from ..triton_kernels import token_logprobs as kernels

        kernels.token_logprobs_fwd(rows.logits, rows.offsets, rows.vocab, rows.targets, out,
                                   row_max, log_sum, temperature, ignore_index)
    else:
        _cpp_forward(rows, out, row_max, log_sum, temperature, ignore_index,
                     on_cuda=backend == "cuda")
    lead = logits.shape[:-1]
    return out.reshape(targets.shape), row_max.reshape(lead), log_sum.reshape(lead)


def _run_backward(grad_out, grad_lse, logits, targets, row_max, log_sum, temperature,
                  ignore_index, backend):
    if backend == "reference":
        return reference.token_logprobs_backward(
            grad_out, grad_lse, logits, targets, row_max, log_sum, temperature, ignore_index
        )
    rows = _as_rows(logits, targets)
    n_rows = rows.targets.shape[0]
    acc = _accumulation_dtype(logits.dtype)
    g, coef, valid = _targets.gradient_terms(grad_out, grad_lse, rows.targets, rows.vocab,
                                             ignore_index, acc)
    row_max = row_max.to(acc).reshape(n_rows).contiguous()
    log_sum = log_sum.to(acc).reshape(n_rows).contiguous()
    grad, flat = _targets.gradient_buffer(n_rows, rows.vocab, logits.dtype, logits.device)
    if n_rows:
        if backend == "triton":
            from ..triton_kernels import token_logprobs as kernels

            kernels.token_logprobs_dense_bwd(coef, rows.logits, rows.offsets, rows.vocab,
                                             row_max, log_sum, grad, temperature)
        else:
            _cpp_dense_backward(coef, rows, row_max, log_sum, grad, temperature,
                                on_cuda=backend == "cuda")
    inv_t = 1.0 / temperature
    shifted = _target_logits(rows, acc) * inv_t - row_max[:, None]
    _targets.write_target_columns(flat, rows.vocab, rows.targets, valid, g, coef, shifted,
                                  log_sum, inv_t)
    return grad.reshape(logits.shape)


# ----------------------------------------------------------------------------- registered ops


@torch.library.custom_op("alignkern::token_logprobs", mutates_args=())
def _token_logprobs_op(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    ignore_index: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    temperature, ignore_index = _check_inputs("token_logprobs", logits, targets, temperature,
                                              ignore_index)
    backend = _check_backend(backend, logits)
    _check_target_ids(targets, logits.shape[-1], ignore_index)
    return _run_forward(logits, targets, temperature, ignore_index, backend)


def _fake_checks(fn, logits, targets) -> None:
    """What the fake kernels can check without data (torch._check, so symbolic shapes work)."""
    _checks.same_device_in_fake(fn, logits=logits, targets=targets)
    torch._check(logits.dim() >= 1, lambda: f"{fn}: logits must have shape (..., V)")
    torch._check(logits.shape[-1] > 0, lambda: f"{fn}: logits has an empty vocabulary")
    torch._check(
        logits.dtype in SUPPORTED_DTYPES,
        lambda: f"{fn}: logits must be a float tensor, got {logits.dtype}",
    )
    torch._check(
        targets.dtype in TARGET_DTYPES,
        lambda: f"{fn}: targets must be int32 or int64, got {targets.dtype}",
    )
    lead = logits.shape[:-1]
    torch._check(
        tuple(targets.shape) == tuple(lead) or tuple(targets.shape[:-1]) == tuple(lead),
        lambda: f"{fn}: targets shape {tuple(targets.shape)} does not match logits "
        f"{tuple(logits.shape)}",
    )


@_token_logprobs_op.register_fake
def _token_logprobs_fake(logits, targets, temperature, ignore_index, backend):
    _fake_checks("token_logprobs", logits, targets)
    acc = _accumulation_dtype(logits.dtype)
    lead = logits.shape[:-1]
    return (targets.new_empty(targets.shape, dtype=acc), logits.new_empty(lead, dtype=acc),
            logits.new_empty(lead, dtype=acc))


@torch.library.custom_op("alignkern::token_logprobs_backward", mutates_args=())
def _token_logprobs_backward_op(
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    logits: torch.Tensor,
    targets: torch.Tensor,
    row_max: torch.Tensor,
    log_sum: torch.Tensor,
    temperature: float,
    ignore_index: int,
    backend: str,
) -> torch.Tensor:
    fn = "token_logprobs_backward"
    temperature, ignore_index = _check_inputs(fn, logits, targets, temperature, ignore_index)
    _check_gradients(fn, grad_out, grad_lse, row_max, log_sum, targets, "logits", logits)
    backend = _check_backend(backend, logits, fn)
    return _run_backward(grad_out, grad_lse, logits, targets, row_max, log_sum, temperature,
                         ignore_index, backend)


@_token_logprobs_backward_op.register_fake
def _token_logprobs_backward_fake(grad_out, grad_lse, logits, targets, row_max, log_sum,
                                  temperature, ignore_index, backend):
    fn = "token_logprobs_backward"
    _fake_checks(fn, logits, targets)
    _checks.same_device_in_fake(fn, logits=logits, grad_out=grad_out, grad_lse=grad_lse,
                                row_max=row_max, log_sum=log_sum)
    torch._check(grad_out.shape == targets.shape,
                 lambda: f"{fn}: grad_out must have the shape of targets")
    for arg, value in (("row_max", row_max), ("log_sum", log_sum)):
        torch._check(value.shape == logits.shape[:-1],
                     lambda arg=arg: f"{fn}: {arg} must have the leading shape of logits")
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, targets, temperature, ignore_index, backend = inputs
    ctx.save_for_backward(logits, targets, output[1], output[2])
    ctx.mark_non_differentiable(output[1])
    ctx.temperature = temperature
    ctx.ignore_index = ignore_index
    ctx.backend = backend


def _backward(ctx, grad_out, _grad_row_max, grad_log_sum):
    logits, targets, row_max, log_sum = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros(targets.shape, dtype=log_sum.dtype, device=log_sum.device)
    grad = _token_logprobs_backward_op(
        grad_out, grad_log_sum, logits, targets, row_max, log_sum, ctx.temperature,
        ctx.ignore_index, ctx.backend
    )
    return grad, None, None, None, None


_token_logprobs_op.register_autograd(_backward, setup_context=_setup_context)
_autocast.register("token_logprobs")
_autocast.register("token_logprobs_backward")


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
        TypeError: a temperature that is not a real number, an ignore_index that is not an
            integer.
        ValueError: shapes that do not match, an empty vocabulary, mixed devices, a temperature
            outside [1e-30, 1e30], an ignore_index outside int64.
        IndexError: a target id outside ``[0, V)`` that is not ``ignore_index`` (checked unless
            ``ALIGNKERN_VALIDATE=0``; kernels then return NaN for that element).
        RuntimeError: the requested backend cannot run here.

    Example:
        >>> logits = torch.randn(4, 32000)
        >>> alignkern.token_logprobs(logits, torch.tensor([1, 2, 3, 4])).shape
        torch.Size([4])
    """
    fn = "token_logprobs"
    if torch.compiler.is_compiling():
        # Tensors are checked by the fake kernel now and by the op when the graph runs; the
        # backend is resolved then too.
        temperature = _checks.temperature(fn, temperature)
        ignore_index = _checks.integer(fn, "ignore_index", ignore_index)
        backend = "auto"
    else:
        temperature, ignore_index = _check_inputs(fn, logits, targets, temperature, ignore_index)
        backend = _check_backend("auto", logits)
    out, row_max, log_sum = _token_logprobs_op(logits, targets, temperature, ignore_index, backend)
    return TokenLogprobs(out, row_max + log_sum) if return_lse else out
