"""Triton kernels for linear_logprobs and their launchers.

Forward: a program owns BLOCK_N rows of ``hidden`` and walks its split of the vocabulary (all of
it, unless there are too few row tiles to fill the GPU) in BLOCK_V tiles; each logits tile is
``tl.dot`` over BLOCK_H slices of the hidden size (fp32 accumulation), then bias, logit_scale,
softcap and temperature are applied in registers and the rows' online log-sum-exp is updated; each
split's is written in two parts, its maximum ``row_max`` (0 where infinite) and ``log_sum =
log sum exp(z - row_max)`` (ops/token_logprobs.py says why), and the caller merges the splits
(ops/_logit_stats.merge_parts). The logits at the target ids come from one dot product each
(ops/linear_logprobs.py), so the kernel's cost does not grow with the number of targets. Nothing
of size (N, V) is written.

Fused statistics (constexpr flags): the same kernel also keeps, per row and split, relative to the
same running reference point ref as the LSE's sum s, xd = sum exp(z - ref) (z - ref) and sq = sum
exp(2 (z - ref)) (a move of ref to ref' rescales s by alpha = exp(ref - ref'), sq by alpha^2, and
turns xd into alpha (xd + (ref - ref') s)), the plain sum of z and the first column attaining the
running max; it writes mean_dz = xd / s (the entropy is log_sum - mean_dz), log_sum_sq = log sq -
2 log s, sum_z, max_z and argmax per split. With no flag set the kernel compiles to the plain LSE
kernel.

Backward: for one chunk of rows, a grid of (row tile, vocabulary tile) programs recomputes each
logits tile, its softmax as ``exp((z - row_max) - log_sum)`` from the saved parts, and writes the
dense part of ``dlogits`` for the chunk only; the
caller writes the target columns (ops/_targets.py) and turns the chunk into ``dhidden`` and
``dweight`` with two GEMMs (cuBLAS on GPU). There are no atomics, so the gradients are
deterministic; the extra memory is one chunk of ``dlogits``. With an entropy gradient
(HAS_ENTROPY_GRAD) the dense part gains the term proportional to z.

Both kernels compile with ``enable_fp_fusion=False``, so z = logits * inv_t is rounded once and
the same way in the maximum and in the sum.

Under the Triton interpreter bf16/fp16 operands are upcast before ``tl.dot`` (the interpreter gives
wrong answers otherwise); on a GPU they go to the tensor cores as they are. float32 operands use
``input_precision="ieee"`` so that results match a float32 matmul, not TF32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import _tuning


@triton.jit
def _reference_point(m):
    """The point the running sum is kept relative to: the max, or 0 when the max is infinite."""
    return tl.where((m == float("inf")) | (m == float("-inf")), 0.0, m)


@triton.jit
def _scaled_logits_tile(
    hidden_ptr, hidden_row_stride, weight_ptr, weight_row_stride, bias_ptr,
    rows, row_ok, cols, col_ok, hidden_size, inv_t, softcap, logit_scale,
    acc_dtype: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """(z, capped): z = capped * inv_t for the (BLOCK_N, BLOCK_V) tile, capped = the logits after
    bias, logit_scale and softcap. Columns outside the vocabulary are -inf in z. (Without a
    softcap, callers fold logit_scale into inv_t and pass 1.0; a multiply by 1.0 is exact.)"""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=acc_dtype)
    h_rows = hidden_ptr + rows.to(tl.int64)[:, None] * hidden_row_stride
    w_cols = weight_ptr + cols.to(tl.int64)[None, :] * weight_row_stride
    for start in range(0, hidden_size, BLOCK_H):
        hk = start + tl.arange(0, BLOCK_H)
        hk_ok = hk < hidden_size
        a = tl.load(h_rows + hk[None, :], mask=row_ok[:, None] & hk_ok[None, :], other=0.0)
        b = tl.load(w_cols + hk[:, None], mask=col_ok[None, :] & hk_ok[:, None], other=0.0)
        if UPCAST:
            a = a.to(acc_dtype)
            b = b.to(acc_dtype)
        # out_dtype named: Triton 3.6 defaults it to float32 and asserts on a float64 acc.
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee", out_dtype=acc_dtype)
        else:
            acc = tl.dot(a, b, acc, out_dtype=acc_dtype)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(acc_dtype)[None, :]
    acc = acc * logit_scale
    if HAS_SOFTCAP:
        # tanh(x) = 1 - 2 / (exp(2x) + 1): exact at +-inf, no tl.math.tanh needed.
        acc = softcap * (1.0 - 2.0 / (tl.exp(2.0 * acc / softcap) + 1.0))
    z = tl.where(col_ok[None, :], acc * inv_t, float("-inf"))
    return z, acc


@triton.jit
def _linear_logprobs_fwd_kernel(
    hidden_ptr, hidden_row_stride, weight_ptr, weight_row_stride, bias_ptr, row_max_ptr,
    log_sum_ptr, mean_dz_ptr, log_sum_sq_ptr, sum_z_ptr, max_z_ptr, argmax_ptr,
    n_rows, vocab, hidden_size, split_size, inv_t, softcap, logit_scale,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    HAS_ENTROPY: tl.constexpr, HAS_LOG_SUM_SQ: tl.constexpr, HAS_MEAN_LOGITS: tl.constexpr,
    HAS_TOP1: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Program (i, j): rows [i*BLOCK_N, ...) over the vocabulary split [j*split_size, ...).
    Writes the split's log-sum-exp as row_max[j, row] and log_sum[j, row] and, for each statistic
    flag set, the split's partial statistic to its (S, N) buffer at [j, row] (q = softmax of z
    within the split): HAS_ENTROPY mean_dz = sum q (z - row_max); HAS_LOG_SUM_SQ log_sum_sq =
    log sum q^2; HAS_MEAN_LOGITS sum_z = sum z; HAS_TOP1 max_z = max z and argmax = the global id
    of its first occurrence. The pointers of statistics not requested are never touched; with no
    flag set the kernel is the plain LSE kernel."""
    acc_dtype = log_sum_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    v_begin = tl.program_id(1) * split_size
    v_end = tl.minimum(v_begin + split_size, vocab)
    m = tl.full([BLOCK_N], float("-inf"), acc_dtype)  # running max of z
    s = tl.zeros([BLOCK_N], acc_dtype)  # sum of exp(z - reference(m))
    if HAS_ENTROPY:
        xd = tl.zeros([BLOCK_N], acc_dtype)  # sum of exp(z - ref) * (z - ref), ref = reference(m)
    if HAS_LOG_SUM_SQ:
        sq = tl.zeros([BLOCK_N], acc_dtype)  # sum of exp(2 (z - reference(m)))
    if HAS_MEAN_LOGITS:
        zsum = tl.zeros([BLOCK_N], acc_dtype)  # sum of z over the split's columns
    if HAS_TOP1:
        # The first column attaining m; the split's first column while every z seen is -inf.
        best = tl.zeros([BLOCK_N], tl.int32) + v_begin
    for v_start in range(v_begin, v_end, BLOCK_V):
        cols = v_start + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        z, _ = _scaled_logits_tile(
            hidden_ptr, hidden_row_stride, weight_ptr, weight_row_stride, bias_ptr,
            rows, row_ok, cols, col_ok, hidden_size, inv_t, softcap, logit_scale, acc_dtype,
            HAS_BIAS, HAS_SOFTCAP, UPCAST, IEEE, BLOCK_N, BLOCK_V, BLOCK_H,
        )
        tile_max = tl.max(z, 1)
        m_new = tl.maximum(m, tile_max)
        ref_new = _reference_point(m_new)
        # s == 0: nothing counted yet, and rescaling could compute 0 * inf.
        rescale = (m_new != m) & (s != 0)
        ref_step = tl.where(rescale, _reference_point(m) - ref_new, 0.0)
        alpha = tl.where(rescale, tl.exp(ref_step), 1.0)
        dz = z - ref_new[:, None]
        e = tl.exp(dz)
        if HAS_ENTROPY:
            # e == 0 where z == -inf (outside the vocabulary): 0, not 0 * -inf.
            xd = (xd + ref_step * s) * alpha + tl.sum(e * tl.where(e == 0.0, 0.0, dz), 1)
        s = s * alpha + tl.sum(e, 1)
        if HAS_LOG_SUM_SQ:
            sq = sq * (alpha * alpha) + tl.sum(e * e, 1)
        if HAS_MEAN_LOGITS:
            zsum += tl.sum(tl.where(col_ok[None, :], z, 0.0), 1)
        if HAS_TOP1:
            # The smallest column equal to the tile's max (columns past the split are -inf and come
            # after every valid one); it replaces the running one only for a strictly greater max,
            # so the first maximum wins. Clamped so that a NaN row still gives an id in the split.
            tile_arg = tl.min(tl.where(z == tile_max[:, None], cols[None, :], v_end - 1), 1)
            best = tl.where(tile_max > m, tile_arg, best)
        m = m_new
    out = tl.program_id(1).to(tl.int64) * n_rows + rows64
    tl.store(row_max_ptr + out, _reference_point(m), mask=row_ok)
    tl.store(log_sum_ptr + out, tl.log(s), mask=row_ok)
    if HAS_ENTROPY:
        tl.store(mean_dz_ptr + out, xd / s, mask=row_ok)
    if HAS_LOG_SUM_SQ:
        tl.store(log_sum_sq_ptr + out, tl.log(sq) - 2.0 * tl.log(s), mask=row_ok)
    if HAS_MEAN_LOGITS:
        tl.store(sum_z_ptr + out, zsum, mask=row_ok)
    if HAS_TOP1:
        tl.store(max_z_ptr + out, m, mask=row_ok)
        tl.store(argmax_ptr + out, best.to(tl.int64), mask=row_ok)


@triton.jit
def _linear_logprobs_dlogits_kernel(
    hidden_ptr, hidden_row_stride, weight_ptr, weight_row_stride, bias_ptr,
    coef_ptr, row_max_ptr, log_sum_ptr, dlogits_ptr, entropy_grad_ptr, n_rows, vocab, hidden_size,
    inv_t, softcap, logit_scale,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    HAS_ENTROPY_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """The dense part of dlogits: -coef * softmax(z)_v * inv_t * logit_scale, times the softcap's
    derivative, softmax(z) = exp((z - row_max) - log_sum); ``coef`` = sum of valid g_k - g_lse.
    With HAS_ENTROPY_GRAD the factor is -(coef + entropy_grad * (z_v - row_max)) instead (the
    caller folds the rest of the entropy's gradient, entropy_grad * (entropy - log_sum), into
    coef). The caller writes the target columns afterwards."""
    acc_dtype = log_sum_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < n_rows
    col_ok = cols < vocab
    rows64 = rows.to(tl.int64)
    z, capped = _scaled_logits_tile(
        hidden_ptr, hidden_row_stride, weight_ptr, weight_row_stride, bias_ptr,
        rows, row_ok, cols, col_ok, hidden_size, inv_t, softcap, logit_scale, acc_dtype,
        HAS_BIAS, HAS_SOFTCAP, UPCAST, IEEE, BLOCK_N, BLOCK_V, BLOCK_H,
    )
    shift = tl.load(row_max_ptr + rows64, mask=row_ok, other=0.0)
    log_sum = tl.load(log_sum_ptr + rows64, mask=row_ok, other=0.0)
    coef = tl.load(coef_ptr + rows64, mask=row_ok, other=0.0)
    dz = z - shift[:, None]
    p = tl.exp(dz - log_sum[:, None])
    if HAS_ENTROPY_GRAD:
        entropy_grad = tl.load(entropy_grad_ptr + rows64, mask=row_ok, other=0.0)
        # (Columns outside the vocabulary, z = -inf, are not stored; 0 keeps them finite.)
        factor = coef[:, None] + entropy_grad[:, None] * tl.where(col_ok[None, :], dz, 0.0)
        grad = -factor * p * (inv_t * logit_scale)
    else:
        grad = -coef[:, None] * p * (inv_t * logit_scale)
    if HAS_SOFTCAP:
        tanh = capped / softcap
        grad = grad * (1.0 - tanh * tanh)
    tl.store(dlogits_ptr + rows64[:, None] * vocab + cols[None, :],
             grad.to(dlogits_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _interpreting() -> bool:
    return _tuning.interpreting()


# GPU tuning spaces, (rows x vocabulary x hidden) tiles of the logits product. The first entry of
# each is the untuned default. float16/bfloat16 go to the tensor cores (wgmma on sm_90, mma on
# sm_80); float32 (IEEE) and float64 run on the FMA units, so their tiles are smaller.
_SPACE_TENSOR_CORE = (
    _tuning.config(8, 2, BLOCK_N=64, BLOCK_V=128, BLOCK_H=32),
    _tuning.config(8, 3, BLOCK_N=64, BLOCK_V=64, BLOCK_H=64),
)
_SPACE_FP32 = (_tuning.config(8, 2, BLOCK_N=64, BLOCK_V=128, BLOCK_H=16),)
# float32 hidden states and a float16/bfloat16 head: the weight tile's conversion takes registers
# of its own, and every 64- or 128-row or 128-column tile spills 4-12 B in one Triton or the other.
_SPACE_FP32_HALF_HEAD = (
    _tuning.config(8, 2, BLOCK_N=32, BLOCK_V=64, BLOCK_H=16),
    _tuning.config(4, 2, BLOCK_N=32, BLOCK_V=64, BLOCK_H=16),
)
_SPACE_FP64 = (
    _tuning.config(8, 2, BLOCK_N=64, BLOCK_V=64, BLOCK_H=16),
    _tuning.config(8, 2, BLOCK_N=64, BLOCK_V=64, BLOCK_H=32),
)
# The forward with fused statistics carries up to four more per-row accumulators (on the FMA path
# each thread holds 8 rows of the tile: 32-64 more registers), hence spaces of their own for
# float32 and float64; the tensor-core space compiles without spills with them as it is.
_SPACE_FP32_STATS = (
    _tuning.config(8, 1, BLOCK_N=64, BLOCK_V=128, BLOCK_H=16),
    _tuning.config(8, 1, BLOCK_N=32, BLOCK_V=128, BLOCK_H=16),
)
_SPACE_FP64_STATS = (
    _tuning.config(8, 1, BLOCK_N=32, BLOCK_V=64, BLOCK_H=16),
    _tuning.config(8, 1, BLOCK_N=32, BLOCK_V=128, BLOCK_H=16),
)
# Every entry compiles without spills for sm_80 and sm_90 under Triton 3.9 and 3.6 (the GPU
# machines'), every dtype, bias and softcap given, aligned and odd sizes (tests/gpu_compile.py).
# Dropped because they spill in one of those (8-44 B; ptxas allocates registers differently in
# each Triton): float16/bfloat16 64 x 128 x 64, 128 x 128 x 64, 64 x 256 x 64, 128 x 256 x 32,
# 64 x 128 x 32 with 4 warps or 3 stages, 128 x 64 x 16 and 128 x 64 x 32 (2 or 3 stages) and
# 64 x 64 x 32 with 3 stages; float32 128 x 64 x 16 and 64 x 64 x 16 (1 or 2 stages), 64 x 128 x 16
# with 1 stage, 64 x 64 x 32 and 32 x 64 x 32 with odd sizes; float64 32 x 64 x 16 with odd sizes
# on sm_90; with the statistics, float32 64 x 64 x 16 and 128 x 64 x 16 (1 or 2 stages) and float64
# 64 x 64 x 16/32 and 32 x 64 x 16 with 4 warps.
KEY = ("vocab", "hidden_size")


def tile_space(n_rows: int, vocab: int, hidden_size: int, dtype: torch.dtype,
               stats: bool = False, head_dtype: torch.dtype | None = None) -> tuple:
    """The configurations the logits-tile kernels (these and linear_kl's) may run with. GPU: the
    tuning space of the dtype (``stats``: of the forward with fused statistics; a ``head_dtype``
    of lower precision than ``dtype`` converts each weight tile, which takes registers of its
    own); under the interpreter one configuration fitted to the sizes (larger vocabulary tiles
    mean fewer, slow, interpreted loop iterations)."""
    if _interpreting():
        block_v = min(1024, max(16, triton.next_power_of_2(vocab)))
        block_h = min(128, max(16, triton.next_power_of_2(hidden_size)))
        block_n = min(32, max(16, triton.next_power_of_2(n_rows)))
        return (_tuning.config(4, BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h),)
    if dtype == torch.float64:
        return _SPACE_FP64_STATS if stats else _SPACE_FP64
    if dtype == torch.float32:
        if head_dtype not in (None, dtype):
            return _SPACE_FP32_STATS if stats else _SPACE_FP32_HALF_HEAD
        return _SPACE_FP32_STATS if stats else _SPACE_FP32
    return _SPACE_TENSOR_CORE


def _flags(hidden: torch.Tensor, bias, softcap, weight: torch.Tensor | None = None) -> dict:
    """The constexpr flags of the logits tile. UPCAST converts both operands to the accumulation
    dtype after loading: under the interpreter for float16/bfloat16 (whose tl.dot it gets wrong),
    and for a head of lower precision than the hidden states (a float32 tile of a bfloat16 head
    is exact, and only a tile is ever converted)."""
    mixed = weight is not None and weight.dtype != hidden.dtype
    return dict(
        HAS_BIAS=bias is not None,
        HAS_SOFTCAP=softcap is not None,
        UPCAST=mixed or (_interpreting() and hidden.dtype in (torch.float16, torch.bfloat16)),
        IEEE=hidden.dtype in (torch.float32, torch.float64),
    )


# The row tile and vocabulary tile the vocabulary split is sized for (the splits must not depend
# on the configuration the autotuner picks: the launcher allocates one output row per split).
_SPLIT_BLOCK_N = 64
_SPLIT_BLOCK_V = 256


def _vocab_splits(n_rows: int, vocab: int, device: torch.device) -> int:
    """Split the vocabulary across programs when there are too few row tiles to fill the GPU
    (N = 1024 is 16 tiles of 64 rows for 132 SMs); the partial LSEs are merged afterwards."""
    if _interpreting() or device.type != "cuda" or n_rows == 0:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    wanted = triton.cdiv(2 * sms, triton.cdiv(n_rows, _SPLIT_BLOCK_N))
    return max(1, min(wanted, triton.cdiv(vocab, 4 * _SPLIT_BLOCK_V)))


class SplitStats(NamedTuple):
    """Per vocabulary split j and row n, each (S, N); fields not requested are None."""

    row_max: torch.Tensor  # max_{v in split} z_v, 0 where infinite (acc dtype)
    log_sum: torch.Tensor  # log sum_{v in split} exp(z_v - row_max) (acc dtype)
    mean_dz: torch.Tensor | None  # sum_v q_v (z_v - row_max), q = softmax of z within the split
    log_sum_sq: torch.Tensor | None  # log sum_v q_v^2 (q as above) ("log_sum_sq_probs")
    sum_z: torch.Tensor | None  # sum_v z_v over the split's columns ("mean_logits")
    max_z: torch.Tensor | None  # max_v z_v ("is_top1")
    argmax: torch.Tensor | None  # int64: global id of the first v attaining max_z ("is_top1")


STATS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _stat_flags(stats) -> dict:
    unknown = sorted(set(stats) - set(STATS))
    if unknown:
        raise ValueError(f"linear_logprobs: unknown statistics {unknown}; expected a subset of "
                         f"{STATS}")
    return dict(HAS_ENTROPY="entropy" in stats, HAS_LOG_SUM_SQ="log_sum_sq_probs" in stats,
                HAS_MEAN_LOGITS="mean_logits" in stats, HAS_TOP1="is_top1" in stats)


def _fwd_plan(hidden, weight, bias, temperature, softcap, logit_scale, stats=frozenset()):
    """(plan or None, SplitStats): the forward launch and its (S, N) outputs, NaN-filled (argmax:
    -1) buffers in the accumulation dtype (float64 for float64 inputs, else float32; int64 for
    argmax) on hidden's device, for the LSE's two parts and the statistics in ``stats``."""
    flags = _stat_flags(stats)
    n_rows = hidden.shape[0]
    vocab, hidden_size = weight.shape
    splits = _vocab_splits(n_rows, vocab, hidden.device)
    # Each split a whole number of the widest vocabulary tile of any space.
    split_size = triton.cdiv(triton.cdiv(vocab, splits), _SPLIT_BLOCK_V) * _SPLIT_BLOCK_V
    splits = triton.cdiv(vocab, split_size)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32

    def poisoned(flag=None, dtype=acc, fill=float("nan")):
        if flag is not None and not flags[flag]:
            return None
        return torch.full((splits, n_rows), fill, dtype=dtype, device=hidden.device)

    out = SplitStats(poisoned(), poisoned(), poisoned("HAS_ENTROPY"), poisoned("HAS_LOG_SUM_SQ"),
                     poisoned("HAS_MEAN_LOGITS"), poisoned("HAS_TOP1"),
                     poisoned("HAS_TOP1", torch.int64, -1))
    if n_rows == 0:
        return None, out
    # Statistics not requested get the log-sum buffer as a stand-in pointer (never touched).
    stat_ptrs = tuple(out.log_sum if t is None else t for t in out[2:])
    plan = _tuning.Launch(
        _linear_logprobs_fwd_kernel,
        lambda meta: (triton.cdiv(n_rows, meta["BLOCK_N"]), splits),
        (hidden, hidden.stride(0), weight, weight.stride(0), bias if bias is not None else weight,
         out.row_max, out.log_sum, *stat_ptrs, n_rows, vocab, hidden_size, split_size,
         1.0 / temperature, softcap or 1.0, logit_scale),
        {**_flags(hidden, bias, softcap, weight), **flags},
        tile_space(n_rows, vocab, hidden_size, hidden.dtype, stats=any(flags.values()),
                   head_dtype=weight.dtype), KEY,
        dict(enable_fp_fusion=False),
    )
    return plan, out


def _dlogits_plan(hidden, weight, bias, coef, row_max, log_sum, dlogits, temperature, softcap,
                  logit_scale, entropy_grad=None):
    n_rows = hidden.shape[0]
    vocab, hidden_size = weight.shape
    if n_rows == 0:
        return None
    return _tuning.Launch(
        _linear_logprobs_dlogits_kernel,
        lambda meta: (triton.cdiv(n_rows, meta["BLOCK_N"]), triton.cdiv(vocab, meta["BLOCK_V"])),
        (hidden, hidden.stride(0), weight, weight.stride(0), bias if bias is not None else weight,
         coef, row_max, log_sum, dlogits, coef if entropy_grad is None else entropy_grad, n_rows,
         vocab,
         hidden_size, 1.0 / temperature, softcap or 1.0, logit_scale),
        {**_flags(hidden, bias, softcap, weight), "HAS_ENTROPY_GRAD": entropy_grad is not None},
        tile_space(n_rows, vocab, hidden_size, hidden.dtype, head_dtype=weight.dtype), KEY,
        dict(enable_fp_fusion=False),
    )


def linear_logprobs_fwd(hidden, weight, bias, temperature, softcap, logit_scale,
                        stats: frozenset[str] = frozenset()) -> SplitStats:
    """Each of S vocabulary splits' log-sum-exp of every row, in two parts, and the statistics
    named in ``stats`` (a subset of :data:`STATS`) from the same pass: a :class:`SplitStats` of
    (S, N) buffers (the others None). ``hidden (N, H)`` and ``weight (V, H)`` have a contiguous
    last dimension. Merging the splits is the caller's."""
    plan, out = _fwd_plan(hidden, weight, bias, temperature, softcap, logit_scale,
                          frozenset(stats))
    _tuning.launch(plan)
    return out


def linear_logprobs_dlogits(hidden, weight, bias, coef, row_max, log_sum, dlogits, temperature,
                            softcap, logit_scale, entropy_grad=None) -> None:
    """Fill ``dlogits (n, V)`` for one chunk of ``n`` rows with the dense part of the gradient
    (see the kernel for the formula); ``coef``, ``row_max``, ``log_sum`` ``(n,)`` and
    ``entropy_grad (n,)`` (which adds the entropy's z-proportional term) are in the accumulation
    dtype."""
    _tuning.launch(_dlogits_plan(hidden, weight, bias, coef, row_max, log_sum, dlogits,
                                 temperature, softcap, logit_scale, entropy_grad))
