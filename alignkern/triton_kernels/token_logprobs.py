"""Triton kernels for token_logprobs and their launchers.

Forward: one program per row walks the vocabulary in BLOCK_V tiles with an online log-sum-exp, then
gathers the K target logits directly. Backward: one program per row recomputes softmax from the
saved LSE tile by tile and writes the gradient in the logits' dtype. Everything is computed in the
output's float type (float32, or float64 for float64 logits) right after loading, which also keeps
the Triton interpreter exact for bfloat16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


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
    lse_ptr,
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
    lse = _reference_point(m) + tl.log(s)
    tl.store(lse_ptr + row, lse)
    for j in range(k):
        t = tl.load(targets_ptr + row * k + j)
        in_range = (t >= 0) & (t < vocab)
        z_t = tl.load(row_ptr + t, mask=in_range, other=0.0).to(acc_dtype) * inv_t
        value = tl.where(in_range, z_t - lse, float("nan"))
        value = tl.where(t == ignore_index, 0.0, value)
        tl.store(out_ptr + row * k + j, value)


@triton.jit
def _token_logprobs_bwd_kernel(
    grad_out_ptr,
    g_row_stride,
    g_col_stride,
    grad_lse_ptr,
    glse_stride,
    logits_ptr,
    row_offsets_ptr,
    vocab,
    targets_ptr,
    k,
    lse_ptr,
    grad_logits_ptr,
    inv_t,
    ignore_index,
    HAS_GRAD_LSE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    acc_dtype = lse_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + tl.load(row_offsets_ptr + row)
    g_ptr = grad_out_ptr + row * g_row_stride
    # coef = sum of valid g_k - g_lse; an out-of-range id makes the row NaN.
    coef = tl.zeros([], acc_dtype)
    if HAS_GRAD_LSE:
        coef -= tl.load(grad_lse_ptr + row * glse_stride).to(acc_dtype)
    for j in range(k):
        t = tl.load(targets_ptr + row * k + j)
        g = tl.load(g_ptr + j * g_col_stride).to(acc_dtype)
        g = tl.where((t >= 0) & (t < vocab), g, float("nan"))
        coef += tl.where(t == ignore_index, 0.0, g)
    lse = tl.load(lse_ptr + row)
    out_row_ptr = grad_logits_ptr + row * vocab
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < vocab
        z = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(acc_dtype) * inv_t
        grad = -coef * tl.exp(z - lse)
        for j in range(k):
            t = tl.load(targets_ptr + row * k + j)
            g = tl.load(g_ptr + j * g_col_stride).to(acc_dtype)
            grad += tl.where((cols == t) & (t != ignore_index), g, 0.0)
        grad = grad * inv_t
        tl.store(out_row_ptr + cols, grad.to(grad_logits_ptr.dtype.element_ty), mask=in_row)


def _launch_config(vocab: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_V, num_warps): tiles of up to 8192 elements (4096 for float64)."""
    cap = 4096 if dtype == torch.float64 else 8192
    block = min(cap, triton.next_power_of_2(vocab))
    return block, (8 if block >= 4096 else 4)


def token_logprobs_fwd(
    logits: torch.Tensor,
    row_offsets: torch.Tensor,
    vocab: int,
    targets: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    temperature: float,
    ignore_index: int,
) -> None:
    """Fill ``out (N, K)`` and ``lse (N,)``; ``targets (N, K)`` int64 contiguous, rows of the
    logits at ``logits.data_ptr() + row_offsets`` (elements), last dimension contiguous."""
    n_rows, k = targets.shape
    if n_rows == 0:
        return
    block, warps = _launch_config(vocab, logits.dtype)
    _token_logprobs_fwd_kernel[(n_rows,)](
        logits, row_offsets, vocab, targets, k, out, lse, 1.0 / temperature, ignore_index,
        BLOCK_V=block, num_warps=warps,
    )


def token_logprobs_bwd(
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    logits: torch.Tensor,
    row_offsets: torch.Tensor,
    vocab: int,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad_logits: torch.Tensor,
    temperature: float,
    ignore_index: int,
) -> None:
    """Fill ``grad_logits (N, V)`` (contiguous, logits' dtype); ``grad_out (N, K)`` and
    ``grad_lse (N,)`` may have any strides, including 0."""
    n_rows, k = targets.shape
    if n_rows == 0:
        return
    block, warps = _launch_config(vocab, logits.dtype)
    has_grad_lse = grad_lse is not None
    _token_logprobs_bwd_kernel[(n_rows,)](
        grad_out, grad_out.stride(0), grad_out.stride(1),
        grad_lse if has_grad_lse else lse, grad_lse.stride(0) if has_grad_lse else 0,
        logits, row_offsets, vocab, targets, k, lse, grad_logits, 1.0 / temperature, ignore_index,
        HAS_GRAD_LSE=has_grad_lse, BLOCK_V=block, num_warps=warps,
    )
