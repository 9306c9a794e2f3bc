"""Triton kernels for linear_kl: per-row KL(pi || pi_ref) with both distributions computed from
hidden states and LM heads, tile by tile, never writing (N, V).

With z = h W^T / T (policy) and y = h_ref W_ref^T / T (reference) (a logit_scale s arrives folded
into the temperature, T / s),
``KL = E_p[z - y] - lse(z) + lse(y)``. Forward: a program owns BLOCK_N rows and walks the
vocabulary, keeping online (max, sum) for both log-sum-exps and the running sum of
``exp(z - m) (z - y)``; each log-sum-exp is written in two parts, the row maximum (0 where
infinite) and the log of the sum relative to it, and KL is formed from the parts
(``(E - (m_z - m_y)) - (log s_z - log s_y)``, ops/linear_kl.py). Backward: ``dz_v = g p_v (z_v -
y_v - E_p[z - y]) / T`` with ``p = exp((z - m_z) - log s_z)``, recomputed tile by tile and written
for one chunk of rows; the launcher turns it into dhidden and dweight with two GEMMs (no atomics:
deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _tuning
from .linear_logprobs import _flags, _reference_point, _scaled_logits_tile
from .linear_logprobs import tile_space as _tile_space


@triton.jit
def _both_tiles(h_ptr, h_stride, w_ptr, w_stride, rh_ptr, rh_stride, rw_ptr, rw_stride, rows,
                row_ok, cols, col_ok, hidden_size, ref_hidden_size, inv_t, acc_dtype: tl.constexpr,
                UPCAST: tl.constexpr, IEEE: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """(z, y) for one (rows x vocabulary) tile; -inf outside the vocabulary."""
    z, _ = _scaled_logits_tile(h_ptr, h_stride, w_ptr, w_stride, w_ptr, rows, row_ok, cols,
                               col_ok, hidden_size, inv_t, 1.0, 1.0, acc_dtype, False, False,
                               UPCAST, IEEE, BLOCK_N, BLOCK_V, BLOCK_H)
    y, _ = _scaled_logits_tile(rh_ptr, rh_stride, rw_ptr, rw_stride, rw_ptr, rows, row_ok, cols,
                               col_ok, ref_hidden_size, inv_t, 1.0, 1.0, acc_dtype, False, False,
                               UPCAST, IEEE, BLOCK_N, BLOCK_V, BLOCK_H)
    return z, y


@triton.jit
def _online_update(m, s, x):
    """Fold a tile into a running (max, sum of exp(x - reference(max))); returns m, s, alpha, ref."""
    m_new = tl.maximum(m, tl.max(x, 1))
    ref = _reference_point(m_new)
    alpha = tl.where((m_new != m) & (s != 0), tl.exp(_reference_point(m) - ref), 1.0)
    return m_new, s * alpha + tl.sum(tl.exp(x - ref[:, None]), 1), alpha, ref


@triton.jit
def _linear_kl_fwd_kernel(
    h_ptr, h_stride, w_ptr, w_stride, rh_ptr, rh_stride, rw_ptr, rw_stride, kl_ptr, row_max_ptr,
    log_sum_ptr, expect_ptr, ref_row_max_ptr, ref_log_sum_ptr, n_rows, vocab, hidden_size,
    ref_hidden_size, inv_t,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    acc_dtype = kl_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    m_z = tl.full([BLOCK_N], float("-inf"), acc_dtype)
    s_z = tl.zeros([BLOCK_N], acc_dtype)
    a_z = tl.zeros([BLOCK_N], acc_dtype)  # sum of exp(z - reference(m_z)) * (z - y)
    m_y = tl.full([BLOCK_N], float("-inf"), acc_dtype)
    s_y = tl.zeros([BLOCK_N], acc_dtype)
    for v_start in range(0, vocab, BLOCK_V):
        cols = v_start + tl.arange(0, BLOCK_V)
        col_ok = cols < vocab
        z, y = _both_tiles(h_ptr, h_stride, w_ptr, w_stride, rh_ptr, rh_stride, rw_ptr,
                           rw_stride, rows, row_ok, cols, col_ok, hidden_size, ref_hidden_size,
                           inv_t, acc_dtype, UPCAST, IEEE, BLOCK_N, BLOCK_V, BLOCK_H)
        m_z, s_z, alpha, ref = _online_update(m_z, s_z, z)
        gap = tl.where(col_ok[None, :], z - y, 0.0)
        a_z = a_z * alpha + tl.sum(tl.exp(z - ref[:, None]) * gap, 1)
        m_y, s_y, _, _ = _online_update(m_y, s_y, y)
    shift_z = _reference_point(m_z)
    shift_y = _reference_point(m_y)
    log_sum_z = tl.log(s_z)
    log_sum_y = tl.log(s_y)
    expect = a_z / s_z
    rows64 = rows.to(tl.int64)
    tl.store(kl_ptr + rows64, (expect - (shift_z - shift_y)) - (log_sum_z - log_sum_y), mask=row_ok)
    tl.store(row_max_ptr + rows64, shift_z, mask=row_ok)
    tl.store(log_sum_ptr + rows64, log_sum_z, mask=row_ok)
    tl.store(expect_ptr + rows64, expect, mask=row_ok)
    tl.store(ref_row_max_ptr + rows64, shift_y, mask=row_ok)
    tl.store(ref_log_sum_ptr + rows64, log_sum_y, mask=row_ok)


@triton.jit
def _linear_kl_dlogits_kernel(
    h_ptr, h_stride, w_ptr, w_stride, rh_ptr, rh_stride, rw_ptr, rw_stride, grad_ptr, row_max_ptr,
    log_sum_ptr, expect_ptr, dlogits_ptr, n_rows, vocab, hidden_size, ref_hidden_size, inv_t,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    acc_dtype = log_sum_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < n_rows
    col_ok = cols < vocab
    rows64 = rows.to(tl.int64)
    z, y = _both_tiles(h_ptr, h_stride, w_ptr, w_stride, rh_ptr, rh_stride, rw_ptr, rw_stride,
                       rows, row_ok, cols, col_ok, hidden_size, ref_hidden_size, inv_t, acc_dtype,
                       UPCAST, IEEE, BLOCK_N, BLOCK_V, BLOCK_H)
    shift = tl.load(row_max_ptr + rows64, mask=row_ok, other=0.0)
    log_sum = tl.load(log_sum_ptr + rows64, mask=row_ok, other=0.0)
    expect = tl.load(expect_ptr + rows64, mask=row_ok, other=0.0)
    g = tl.load(grad_ptr + rows64, mask=row_ok, other=0.0).to(acc_dtype)
    p = tl.exp((z - shift[:, None]) - log_sum[:, None])
    grad = tl.where(col_ok[None, :], g[:, None] * p * (z - y - expect[:, None]) * inv_t, 0.0)
    tl.store(dlogits_ptr + rows64[:, None] * vocab + cols[None, :],
             grad.to(dlogits_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _launch_args(hidden, weight, ref_hidden, ref_weight):
    return (hidden, hidden.stride(0), weight, weight.stride(0), ref_hidden, ref_hidden.stride(0),
            ref_weight, ref_weight.stride(0))


# Two logits tiles (policy and reference) live at once, so these spaces hold smaller tiles than
# linear_logprobs' (tests/gpu_compile.py: 64 x 128 x 64 and 128 x 64 x 64 float16/bfloat16 tiles
# spill with odd sizes; no float32 tile of 4 warps or of 64 rows compiles without a spill in both
# kernels, so float32 has a space per kernel; 64 x 64 x 32 float64 tiles spill).
_SPACE_TENSOR_CORE = (
    _tuning.config(8, 3, BLOCK_N=64, BLOCK_V=64, BLOCK_H=64),
    _tuning.config(8, 3, BLOCK_N=64, BLOCK_V=128, BLOCK_H=32),
)
_SPACE_FP32 = {
    "fwd": (_tuning.config(8, 1, BLOCK_N=32, BLOCK_V=64, BLOCK_H=32),),
    "dlogits": (
        _tuning.config(8, 2, BLOCK_N=32, BLOCK_V=64, BLOCK_H=16),
        _tuning.config(8, 2, BLOCK_N=32, BLOCK_V=32, BLOCK_H=32),
    ),
}
_SPACE_FP64 = (  # 2 stages of 64 x 64 x 16 spill 148 B in the forward on sm_90 under Triton 3.6
    _tuning.config(8, 1, BLOCK_N=64, BLOCK_V=64, BLOCK_H=16),
    _tuning.config(4, 2, BLOCK_N=32, BLOCK_V=64, BLOCK_H=16),
)
KEY = ("vocab", "hidden_size", "ref_hidden_size")


def tile_space(n_rows: int, vocab: int, hidden_size: int, dtype: torch.dtype,
               kind: str = "fwd") -> tuple:
    """The configurations the ``kind`` ("fwd" or "dlogits") kernel may run with."""
    if _tuning.interpreting():
        return _tile_space(n_rows, vocab, hidden_size, dtype)
    if dtype == torch.float32:
        return _SPACE_FP32[kind]
    return _SPACE_FP64 if dtype == torch.float64 else _SPACE_TENSOR_CORE


def _kl_flags(hidden) -> dict:
    flags = _flags(hidden, None, None)
    return dict(UPCAST=flags["UPCAST"], IEEE=flags["IEEE"])


def _fwd_plan(hidden, weight, ref_hidden, ref_weight, kl, row_max, log_sum, expect, ref_row_max,
              ref_log_sum, temperature):
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    if n_rows == 0:
        return None
    return _tuning.Launch(
        _linear_kl_fwd_kernel, lambda meta: (triton.cdiv(n_rows, meta["BLOCK_N"]),),
        (*_launch_args(hidden, weight, ref_hidden, ref_weight), kl, row_max, log_sum, expect,
         ref_row_max, ref_log_sum, n_rows, vocab, hidden.shape[1], ref_hidden.shape[1],
         1.0 / temperature),
        _kl_flags(hidden), tile_space(n_rows, vocab, hidden.shape[1], hidden.dtype), KEY,
    )


def _dlogits_plan(hidden, weight, ref_hidden, ref_weight, grad, row_max, log_sum, expect, dlogits,
                  temperature):
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    if n_rows == 0:
        return None
    return _tuning.Launch(
        _linear_kl_dlogits_kernel,
        lambda meta: (triton.cdiv(n_rows, meta["BLOCK_N"]), triton.cdiv(vocab, meta["BLOCK_V"])),
        (*_launch_args(hidden, weight, ref_hidden, ref_weight), grad, row_max, log_sum, expect,
         dlogits, n_rows, vocab, hidden.shape[1], ref_hidden.shape[1], 1.0 / temperature),
        _kl_flags(hidden), tile_space(n_rows, vocab, hidden.shape[1], hidden.dtype, "dlogits"),
        KEY,
    )


def linear_kl_fwd(hidden, weight, ref_hidden, ref_weight, kl, row_max, log_sum, expect,
                  ref_row_max, ref_log_sum, temperature) -> None:
    """Fill ``kl``, the policy's ``row_max`` and ``log_sum``, ``expect`` (E_p[z - y]) and the
    reference's ``ref_row_max`` and ``ref_log_sum``, each (N,)."""
    _tuning.launch(_fwd_plan(hidden, weight, ref_hidden, ref_weight, kl, row_max, log_sum, expect,
                             ref_row_max, ref_log_sum, temperature))


def linear_kl_dlogits(hidden, weight, ref_hidden, ref_weight, grad, row_max, log_sum, expect,
                      dlogits, temperature) -> None:
    """Fill ``dlogits (n, V)`` for one chunk of n rows."""
    _tuning.launch(_dlogits_plan(hidden, weight, ref_hidden, ref_weight, grad, row_max, log_sum,
                                 expect, dlogits, temperature))
