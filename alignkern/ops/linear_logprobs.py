"""``linear_logprobs``: log-probabilities of a few chosen tokens straight from hidden states and the
LM head, never materialising the ``(N, V)`` logits (the scoring functions built on it are in
``ops/scoring.py``).

Registered ops:
  ``alignkern::linear_logprobs(hidden, weight, targets, bias, temperature, softcap, ignore_index,
  backend) -> (out, lse)``
  ``alignkern::linear_logprobs_backward(grad_out, grad_lse, hidden, weight, targets, bias, lse,
  temperature, softcap, ignore_index, need_hidden_grad, need_weight_grad, backend)
  -> (grad_hidden, grad_weight, grad_bias)``; a gradient that is not needed comes back with 0
  elements, and ``grad_bias`` has 0 elements when there is no bias.

Backends: ``triton`` (fused tl.dot kernels), ``cuda`` (tensor-core forward from csrc/cuda; its
backward runs the Triton kernels), ``cpu`` (``linear_logprobs_cpu``: BLAS GEMMs over tiles of
at most 16 MiB of logits), ``reference``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import torch

from .. import _backend, reference
from . import linear_logprobs_cpu as _cpu
from . import token_logprobs as _tokens

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# One chunk of dlogits (in the inputs' dtype) in the Triton backward before its two GEMMs; under
# the interpreter (CPU tensors) the cpu backend's tile size.
GPU_CHUNK_BYTES = 256 * 2**20


class LinearLogprobs(NamedTuple):
    """What ``linear_logprobs(..., return_lse=True)`` returns."""

    logprobs: torch.Tensor
    lse: torch.Tensor


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- validation


def _validate(name, hidden, weight, targets, bias, temperature, softcap) -> None:
    """DESIGN.md's error contract; every message names the argument, the expected and the got."""
    for arg, value in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(value).__name__}")
    if hidden.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name}: hidden must be float32, float16, bfloat16 or float64, got {hidden.dtype}"
        )
    if weight.dim() != 2:
        raise ValueError(
            f"{name}: weight must be the 2-D LM head (V, H), got shape {tuple(weight.shape)}"
        )
    if hidden.dim() < 1:
        raise ValueError(f"{name}: hidden must have shape (..., H), got a 0-d tensor")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{name}: hidden size mismatch: hidden has H = {hidden.shape[-1]} (shape "
            f"{tuple(hidden.shape)}) but weight (V, H) has H = {weight.shape[1]} (shape "
            f"{tuple(weight.shape)})"
        )
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(
            f"{name}: weight must have a non-empty vocabulary and hidden size, got shape "
            f"{tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"{name}: weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}"
        )
    if targets.dtype not in _tokens.TARGET_DTYPES:
        raise TypeError(f"{name}: targets must be int32 or int64 token ids, got {targets.dtype}")
    lead = tuple(hidden.shape[:-1])
    shape = tuple(targets.shape)
    if not (shape == lead or (len(shape) == len(lead) + 1 and shape[:-1] == lead)):
        raise ValueError(
            f"{name}: targets must have shape {lead} or {lead + ('K',)} to match hidden of shape "
            f"{tuple(hidden.shape)}, got {shape}"
        )
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"{name}: bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(
                f"{name}: bias must have shape (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}"
            )
        if bias.dtype != hidden.dtype:
            raise TypeError(
                f"{name}: bias must have the dtype of hidden ({hidden.dtype}), got {bias.dtype}"
            )
    devices = {arg: t.device for arg, t in
               (("hidden", hidden), ("weight", weight), ("targets", targets), ("bias", bias))
               if t is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{arg} on {device}" for arg, device in devices.items())
        raise ValueError(f"{name}: all tensors must be on the same device, got {listed}")
    if not (0 < temperature < math.inf):
        raise ValueError(f"{name}: temperature must be positive and finite, got {temperature}")
    if softcap is not None and not (0 < softcap < math.inf):
        raise ValueError(f"{name}: softcap must be None or positive and finite, got {softcap}")


def _check_backend(backend: str, hidden: torch.Tensor) -> str:
    if backend == "auto":
        return _backend.resolve_backend(hidden.device)
    reason = _backend.unavailable_reason(backend, hidden.device)
    if reason is not None:
        raise RuntimeError(f"alignkern backend {backend!r} is not available: {reason}")
    if backend == "cuda" and hidden.dtype == torch.float64:
        raise TypeError(
            "linear_logprobs: the cuda backend takes float32, float16 or bfloat16 inputs, got "
            "float64 (use the triton or reference backend)"
        )
    return backend


# ----------------------------------------------------------------------------- shared plumbing


def _as_matrix(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a 2-D view (copied only if no view exists) with a contiguous last dimension."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def _target_rows(targets: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """``targets`` as ``(N, K)`` int64 contiguous."""
    k = targets.shape[-1] if targets.dim() == hidden.dim() else 1
    return targets.reshape(math.prod(hidden.shape[:-1]), k).to(torch.int64).contiguous()


def _row_chunks(n_rows: int, row_bytes: int, budget: int) -> Iterator[slice]:
    step = max(1, min(n_rows, budget // max(row_bytes, 1)))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def _target_gradients(grad_out, grad_lse, ids, vocab, ignore_index, acc):
    """Per target ``g_k`` (0 for ignored or out-of-range ids) and per row ``coef`` = sum of valid
    ``g_k`` - ``g_lse``, NaN for a row with an out-of-range id."""
    n_rows, k = ids.shape
    g = grad_out.to(acc).reshape(n_rows, k)
    ignored = ids == ignore_index
    out_of_range = ~ignored & ((ids < 0) | (ids >= vocab))
    coef = g.masked_fill(ignored, 0.0).masked_fill(out_of_range, math.nan).sum(-1)
    if grad_lse is not None:
        coef = coef - grad_lse.to(acc).reshape(n_rows)
    return g.masked_fill(ignored | out_of_range, 0.0).contiguous(), coef.contiguous()


# ----------------------------------------------------------------------------- triton backend


def _triton_forward(hidden, weight, ids, bias, temperature, softcap, ignore_index, backend):
    acc = _accumulation_dtype(hidden.dtype)
    n_rows, device = hidden.shape[0], hidden.device
    if backend == "cuda":
        out = _tokens._poisoned(ids.shape, acc, device)
        lse = _tokens._poisoned((n_rows,), acc, device)
        _cuda_forward(hidden, weight, ids, bias, out, lse, temperature, softcap, ignore_index)
        return out, lse
    from ..triton_kernels import linear_logprobs as kernels

    picked = _tokens._poisoned(ids.shape, acc, device)
    lse_parts = kernels.linear_logprobs_fwd(
        hidden, weight, bias, ids, picked,
        lambda splits: _tokens._poisoned((splits, n_rows), acc, device), temperature, softcap,
    )
    lse = lse_parts[0] if lse_parts.shape[0] == 1 else torch.logsumexp(lse_parts, dim=0)
    ignored = ids == ignore_index
    in_range = (ids >= 0) & (ids < weight.shape[0])
    out = torch.where(in_range, picked - lse[:, None], math.nan).masked_fill_(ignored, 0.0)
    return out, lse


def _cuda_forward(hidden, weight, ids, bias, out, lse, temperature, softcap, ignore_index):
    ext = _backend.extension()
    with torch.cuda.device(hidden.device):
        ext.linear_logprobs_fwd_cuda(
            hidden.data_ptr(), hidden.stride(0), weight.data_ptr(), weight.stride(0),
            0 if bias is None else bias.contiguous().data_ptr(),
            _backend.DTYPE_CODES[hidden.dtype], hidden.shape[0], weight.shape[0], weight.shape[1],
            ids.data_ptr(), ids.shape[1], out.data_ptr(), lse.data_ptr(), float(temperature),
            0.0 if softcap is None else float(softcap), int(ignore_index),
            _backend.cuda_stream(hidden.device),
        )


def _triton_backward(target_grad, coef, hidden, weight, ids, bias, lse, temperature, softcap,
                     need_hidden, need_weight, need_bias, acc):
    """Same contract as ``linear_logprobs_cpu.backward``."""
    from ..triton_kernels import linear_logprobs as kernels

    n_rows, (vocab, hidden_size) = hidden.shape[0], weight.shape
    # dlogits feed the GEMMs in the inputs' dtype (as in PyTorch's own backward); cuBLAS
    # accumulates in fp32 within a chunk.
    grad_hidden = hidden.new_empty((n_rows, hidden_size)) if need_hidden else None
    grad_weight = weight.new_zeros((vocab, hidden_size)) if need_weight else None
    grad_bias = torch.zeros((vocab,), dtype=acc, device=hidden.device) if need_bias else None
    budget = GPU_CHUNK_BYTES if hidden.is_cuda else _cpu.TILE_BYTES
    for rows in _row_chunks(n_rows, vocab * hidden.element_size(), budget):
        h = hidden[rows]
        dlogits = _tokens._poisoned((h.shape[0], vocab), hidden.dtype, hidden.device)
        kernels.linear_logprobs_dlogits(h, weight, bias, ids[rows], target_grad[rows], coef[rows],
                                        lse[rows], dlogits, temperature, softcap)
        if need_hidden:
            torch.mm(dlogits, weight, out=grad_hidden[rows])
        if need_weight:
            grad_weight.addmm_(dlogits.T, h)
        if grad_bias is not None:
            grad_bias += dlogits.sum(0, dtype=acc)
    return grad_hidden, grad_weight, grad_bias


# ----------------------------------------------------------------------------- reference backend


def _reference_backward(grad_out, grad_lse, hidden, weight, ids, bias, lse, temperature, softcap,
                        ignore_index, need_hidden, need_weight, need_bias):
    acc = _accumulation_dtype(hidden.dtype)
    logits = reference.linear_logits(hidden, weight, bias, softcap)
    dlogits = reference.token_logprobs_backward(
        grad_out.reshape(ids.shape), None if grad_lse is None else grad_lse.reshape(-1), logits,
        ids, lse, temperature, ignore_index,
    )
    if softcap is not None:
        dlogits = dlogits * (1.0 - (logits / softcap) ** 2)
    grad_hidden = dlogits @ weight.to(acc) if need_hidden else None
    grad_weight = dlogits.T @ hidden.to(acc) if need_weight else None
    grad_bias = dlogits.sum(0) if need_bias else None
    return grad_hidden, grad_weight, grad_bias


# ----------------------------------------------------------------------------- registered ops


def _run_forward(hidden, weight, targets, bias, temperature, softcap, ignore_index, backend):
    if backend == "reference":
        return reference.linear_logprobs(hidden, weight, targets, bias, temperature, softcap,
                                         ignore_index)
    h, w, ids = _as_matrix(hidden), _as_matrix(weight), _target_rows(targets, hidden)
    bias = None if bias is None else bias.contiguous()
    if backend == "cpu":
        acc = _accumulation_dtype(hidden.dtype)
        out, lse = _cpu.forward(h, w, ids, bias, temperature, softcap, ignore_index, acc)
    else:
        out, lse = _triton_forward(h, w, ids, bias, temperature, softcap, ignore_index, backend)
    return out.reshape(targets.shape), lse.reshape(hidden.shape[:-1])


def _run_backward(grad_out, grad_lse, hidden, weight, targets, bias, lse, temperature, softcap,
                  ignore_index, need_hidden, need_weight, need_bias, backend):
    h, w, ids = _as_matrix(hidden), _as_matrix(weight), _target_rows(targets, hidden)
    bias = None if bias is None else bias.contiguous()
    acc = _accumulation_dtype(hidden.dtype)
    lse = lse.reshape(-1).to(acc).contiguous()
    need_bias = need_bias and bias is not None
    if backend == "reference":
        grads = _reference_backward(grad_out, grad_lse, h, w, ids, bias, lse, temperature, softcap,
                                    ignore_index, need_hidden, need_weight, need_bias)
    else:  # cuda's backward is the Triton path until a CUDA backward exists
        target_grad, coef = _target_gradients(grad_out, grad_lse, ids, w.shape[0], ignore_index, acc)
        implementation = _cpu.backward if backend == "cpu" else _triton_backward
        grads = implementation(target_grad, coef, h, w, ids, bias, lse, temperature, softcap,
                               need_hidden, need_weight, need_bias, acc)
    grad_hidden, grad_weight, grad_bias = grads
    return (
        _empty(hidden) if grad_hidden is None else grad_hidden.to(hidden.dtype).reshape(hidden.shape),
        _empty(hidden) if grad_weight is None else grad_weight.to(weight.dtype),
        _empty(hidden) if grad_bias is None else grad_bias.to(bias.dtype),
    )


def _empty(like: torch.Tensor) -> torch.Tensor:
    """The placeholder for a gradient that was not asked for (a fresh one each time: outputs of
    a custom op may not alias each other)."""
    return like.new_empty((0,))


@torch.library.custom_op("alignkern::linear_logprobs", mutates_args=())
def _linear_logprobs_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
    softcap: float | None,
    ignore_index: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    _validate("linear_logprobs", hidden, weight, targets, bias, temperature, softcap)
    _tokens._check_target_ids(targets, weight.shape[0], ignore_index, "linear_logprobs")
    backend = _check_backend(backend, hidden)
    return _run_forward(hidden, weight, targets, bias, temperature, softcap, ignore_index, backend)


@_linear_logprobs_op.register_fake
def _linear_logprobs_fake(hidden, weight, targets, bias, temperature, softcap, ignore_index,
                          backend):
    torch._check(weight.dim() == 2, lambda: "linear_logprobs: weight must be 2-D (V, H)")
    torch._check(
        hidden.shape[-1] == weight.shape[1],
        lambda: f"linear_logprobs: hidden size mismatch, hidden {tuple(hidden.shape)} vs weight "
        f"{tuple(weight.shape)}",
    )
    torch._check(hidden.dtype == weight.dtype, lambda: "linear_logprobs: dtypes must match")
    torch._check(
        targets.dtype in _tokens.TARGET_DTYPES,
        lambda: f"linear_logprobs: targets must be int32 or int64, got {targets.dtype}",
    )
    lead = hidden.shape[:-1]
    torch._check(
        tuple(targets.shape) == tuple(lead) or tuple(targets.shape[:-1]) == tuple(lead),
        lambda: f"linear_logprobs: targets shape {tuple(targets.shape)} does not match hidden "
        f"{tuple(hidden.shape)}",
    )
    acc = _accumulation_dtype(hidden.dtype)
    return hidden.new_empty(targets.shape, dtype=acc), hidden.new_empty(lead, dtype=acc)


@torch.library.custom_op("alignkern::linear_logprobs_backward", mutates_args=())
def _linear_logprobs_backward_op(
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    lse: torch.Tensor,
    temperature: float,
    softcap: float | None,
    ignore_index: int,
    need_hidden_grad: bool,
    need_weight_grad: bool,
    need_bias_grad: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    backend = _check_backend(backend, hidden)
    return _run_backward(grad_out, grad_lse, hidden, weight, targets, bias, lse, temperature,
                         softcap, ignore_index, need_hidden_grad, need_weight_grad,
                         need_bias_grad, backend)


@_linear_logprobs_backward_op.register_fake
def _linear_logprobs_backward_fake(grad_out, grad_lse, hidden, weight, targets, bias, lse,
                                   temperature, softcap, ignore_index, need_hidden_grad,
                                   need_weight_grad, need_bias_grad, backend):
    return (
        hidden.new_empty(hidden.shape) if need_hidden_grad else _empty(hidden),
        weight.new_empty(weight.shape) if need_weight_grad else _empty(hidden),
        bias.new_empty(bias.shape) if need_bias_grad and bias is not None else _empty(hidden),
    )


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, bias, temperature, softcap, ignore_index, backend = inputs
    ctx.save_for_backward(hidden, weight, targets, bias, output[1])
    ctx.options = (temperature, softcap, ignore_index)
    ctx.backend = backend


def _backward(ctx, grad_out, grad_lse):
    hidden, weight, targets, bias, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros(targets.shape, dtype=lse.dtype, device=lse.device)
    need_hidden, need_weight, _, need_bias = ctx.needs_input_grad[:4]
    grad_hidden, grad_weight, grad_bias = _linear_logprobs_backward_op(
        grad_out, grad_lse, hidden, weight, targets, bias, lse, *ctx.options, need_hidden,
        need_weight, need_bias, ctx.backend,
    )
    return (
        grad_hidden if need_hidden else None,
        grad_weight if need_weight else None,
        None,
        grad_bias if need_bias else None,
        None, None, None, None,
    )


_linear_logprobs_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API


def _call(name, hidden, weight, targets, bias, temperature, softcap, ignore_index):
    if torch.compiler.is_compiling():
        backend = "auto"  # resolved when the compiled graph runs, not when it is traced
    else:
        _validate(name, hidden, weight, targets, bias, temperature, softcap)
        backend = _check_backend("auto", hidden)
    return _linear_logprobs_op(hidden, weight, targets, bias, float(temperature),
                               None if softcap is None else float(softcap), int(ignore_index),
                               backend)


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    return_lse: bool = False,
) -> torch.Tensor | LinearLogprobs:
    """Log-probabilities of chosen tokens under the LM head, ``log_softmax(logits / T)[targets]``
    with ``logits = softcap * tanh((hidden @ weight.T + bias) / softcap)``, computed tile by tile
    without ever materialising the ``(N, V)`` logits.

    Args:
        hidden: ``(..., H)`` float32, float16, bfloat16 (or float64) hidden states; any strides.
        weight: ``(V, H)`` LM head, same dtype.
        targets: ``(...)`` token ids, or ``(..., K)`` for K tokens per row; int32 or int64.
            Entries equal to ``ignore_index`` give 0.
        bias: optional ``(V,)`` LM-head bias, same dtype.
        temperature: positive divisor applied after the softcap.
        softcap: if given, logits are squashed to ``(-softcap, softcap)`` first (Gemma 2).
        ignore_index: the id that marks positions to skip (default -100).
        return_lse: also return ``lse (...)``, the log-sum-exp of the scaled logits
            (differentiable too).

    Returns:
        ``logprobs`` shaped like ``targets``, float32 (float64 for float64 inputs); with
        ``return_lse=True`` a ``LinearLogprobs(logprobs, lse)`` named tuple. Differentiable in
        ``hidden``, ``weight`` and ``bias`` for any upstream gradient.

    Raises:
        TypeError: non-float hidden, mismatched dtypes, float targets.
        ValueError: a weight that is not 2-D, a hidden size that does not match, bad target or
            bias shapes, mixed devices, a temperature or softcap that is not positive and finite.
        IndexError: a target id outside ``[0, V)`` that is not ``ignore_index`` (checked unless
            ``ALIGNKERN_VALIDATE=0``; kernels then return NaN for that element).
        RuntimeError: the requested backend cannot run here.

    Example:
        >>> hidden, head = torch.randn(8, 64), torch.randn(32000, 64)
        >>> alignkern.linear_logprobs(hidden, head, torch.randint(0, 32000, (8, 4))).shape
        torch.Size([8, 4])
    """
    out, lse = _call("linear_logprobs", hidden, weight, targets, bias, temperature, softcap,
                     ignore_index)
    return LinearLogprobs(out, lse) if return_lse else out
