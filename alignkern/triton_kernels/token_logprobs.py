"""Triton kernels for token_logprobs and their launchers.

Forward: one program per row walks the vocabulary in BLOCK_V tiles with an online log-sum-exp, then
gathers the K target logits directly. The row's log-sum-exp is written in two parts, its maximum
``row_max`` (0 where infinite) and ``log_sum = log sum exp(z - row_max)``, and a log-probability is
``(z_t - row_max) - log_sum`` (ops/token_logprobs.py says why). Backward: one program per row
recomputes softmax as ``exp((z - row_max) - log_sum)`` tile by tile and writes the dense part of the
gradient, ``-coef * softmax / T``, in the logits' dtype; the caller writes the K target columns
(alignkern/ops/_targets.py). Everything is
computed in the output's float type (float32, or float64 for float64 logits) right after loading,
which also keeps the Triton interpreter exact for bfloat16.

Both kernels compile with ``enable_fp_fusion=False``: z = x * inv_t must round the same way in the
maximum, the sum and the gathers, or at |z| ~ 1e9 a fused multiply-add makes a log-probability
tens of nats positive.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _tuning


@triton.jit
def _reference_point(m):
    """The point the running sum is kept relative to: the max, or 0 when the max is infinite."""
    return tl.where((m == float("inf")) | (m == float("-inf")), 0.0, m)


@triton.jit
def _token_logprobs_fwd_kernel(
    logits_ptr,
    row_offsets_ptr,
    vocab,
    targets_ptr,
    k,
    out_ptr,
    row_max_ptr,
    log_sum_ptr,
    inv_t,
    ignore_index,
    BLOCK_V: tl.constexpr,
):
    acc_dtype = out_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + tl.load(row_offsets_ptr + row)
    m = tl.full([], float("-inf"), acc_dtype)  # running max of z = logits * inv_t
    s = tl.zeros([], acc_dtype)  # sum of exp(z - reference(m))
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf")).to(acc_dtype) * inv_t
        m_new = tl.maximum(m, tl.max(z, 0))
        ref_new = _reference_point(m_new)
        # s == 0: nothing counted yet, and rescaling could compute 0 * inf.
        rescale = (m_new != m) & (s != 0)
        alpha = tl.where(rescale, tl.exp(_reference_point(m) - ref_new), 1.0)
        s = s * alpha + tl.sum(tl.exp(z - ref_new), 0)  # a NaN in z reaches s here
        m = m_new
    shift = _reference_point(m)
    log_sum = tl.log(s)
    tl.store(row_max_ptr + row, shift)
    tl.store(log_sum_ptr + row, log_sum)
    for j in range(k):
        t = tl.load(targets_ptr + row * k + j)
        in_range = (t >= 0) & (t < vocab)
        z_t = tl.load(row_ptr + t, mask=in_range, other=0.0).to(acc_dtype) * inv_t
        value = tl.where(in_range, (z_t - shift) - log_sum, float("nan"))
        value = tl.where(t == ignore_index, 0.0, value)
        tl.store(out_ptr + row * k + j, value)


@triton.jit
def _token_logprobs_dense_bwd_kernel(
    coef_ptr,
    logits_ptr,
    row_offsets_ptr,
    vocab,
    row_max_ptr,
    log_sum_ptr,
    grad_logits_ptr,
    inv_t,
    BLOCK_V: tl.constexpr,
):
    """grad = -coef * softmax(z) * inv_t over the whole row, softmax(z) = exp((z - row_max) -
    log_sum); the target columns are written afterwards by the caller."""
    acc_dtype = log_sum_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + tl.load(row_offsets_ptr + row)
    scale = -tl.load(coef_ptr + row).to(acc_dtype) * inv_t
    shift = tl.load(row_max_ptr + row)
    log_sum = tl.load(log_sum_ptr + row)
    out_row_ptr = grad_logits_ptr + row * vocab
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < vocab
        z = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(acc_dtype) * inv_t
        grad = scale * tl.exp((z - shift) - log_sum)
        tl.store(out_row_ptr + cols, grad.to(grad_logits_ptr.dtype.element_ty), mask=in_row)


# GPU tuning space (one program per row, so only the vocabulary tile and the warps matter): 16 to
# 64 elements per thread; float64 rows hold half as many elements in the same registers.
_ROW_SPACE = (
    _tuning.config(4, BLOCK_V=2048),
    _tuning.config(8, BLOCK_V=4096),
    _tuning.config(8, BLOCK_V=8192),
    _tuning.config(16, BLOCK_V=8192),
    _tuning.config(16, BLOCK_V=16384),
)
_ROW_SPACE_FP64 = (
    _tuning.config(4, BLOCK_V=1024),
    _tuning.config(8, BLOCK_V=2048),
    _tuning.config(8, BLOCK_V=4096),
    _tuning.config(16, BLOCK_V=8192),
)
_KEY = ("vocab",)


def row_space(vocab: int, dtype: torch.dtype) -> tuple:
    """The configurations a row kernel may run with. Interpreter: one tile of up to 8192 elements
    (4096 for float64), fewer interpreted steps. GPU: the tuning space, less the tiles wider than
    the row (all of it from V = 16384 up; the narrowest tile for short rows)."""
    if _tuning.interpreting():
        cap = 4096 if dtype == torch.float64 else 8192
        block = min(cap, triton.next_power_of_2(vocab))
        return (_tuning.config(8 if block >= 4096 else 4, BLOCK_V=block),)
    space = _ROW_SPACE_FP64 if dtype == torch.float64 else _ROW_SPACE
    fitting = tuple(c for c in space if c.kwargs["BLOCK_V"] <= triton.next_power_of_2(vocab))
    return fitting or space[:1]


def _fwd_plan(logits, row_offsets, vocab, targets, out, row_max, log_sum, temperature,
              ignore_index) -> _tuning.Launch | None:
    n_rows, k = targets.shape
    if n_rows == 0:
        return None
    return _tuning.Launch(
        _token_logprobs_fwd_kernel, lambda meta: (n_rows,),
        (logits, row_offsets, vocab, targets, k, out, row_max, log_sum, 1.0 / temperature,
         ignore_index),
        {}, row_space(vocab, logits.dtype), _KEY, dict(enable_fp_fusion=False),
    )


def _dense_bwd_plan(coef, logits, row_offsets, vocab, row_max, log_sum, grad_logits,
                    temperature) -> _tuning.Launch | None:
    n_rows = coef.shape[0]
    if n_rows == 0:
        return None
    return _tuning.Launch(
        _token_logprobs_dense_bwd_kernel, lambda meta: (n_rows,),
        (coef, logits, row_offsets, vocab, row_max, log_sum, grad_logits, 1.0 / temperature),
        {}, row_space(vocab, logits.dtype), _KEY, dict(enable_fp_fusion=False),
    )


def token_logprobs_fwd(
    logits: torch.Tensor,
    row_offsets: torch.Tensor,
    vocab: int,
    targets: torch.Tensor,
    out: torch.Tensor,
    row_max: torch.Tensor,
    log_sum: torch.Tensor,
    temperature: float,
    ignore_index: int,
) -> None:
    """Fill ``out (N, K)``, ``row_max (N,)`` and ``log_sum (N,)``; ``targets (N, K)`` int64
    contiguous, rows of the logits at ``logits.data_ptr() + row_offsets`` (elements), last
    dimension contiguous."""
    _tuning.launch(_fwd_plan(logits, row_offsets, vocab, targets, out, row_max, log_sum,
                             temperature, ignore_index))


def token_logprobs_dense_bwd(
    coef: torch.Tensor,
    logits: torch.Tensor,
    row_offsets: torch.Tensor,
    vocab: int,
    row_max: torch.Tensor,
    log_sum: torch.Tensor,
    grad_logits: torch.Tensor,
    temperature: float,
) -> None:
    """Fill ``grad_logits (N, V)`` (contiguous, logits' dtype) with ``-coef * softmax / T``;
    ``coef``, ``row_max`` and ``log_sum`` ``(N,)`` contiguous in the accumulation dtype."""
    _tuning.launch(_dense_bwd_plan(coef, logits, row_offsets, vocab, row_max, log_sum,
                                   grad_logits, temperature))
