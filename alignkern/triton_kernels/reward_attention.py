"""Triton kernels for reward_attention (FlashAttention-2 style) and their launchers.

Forward: a program owns BLOCK_M queries of one (batch, query head) and walks the key tiles with an
online softmax. Scores get the scale, the key bias and the masks (causal, and the reward-ordering
mask ``key_rank <= query_rank``) inside the tile loop; key tiles that causality hides are not
visited and tiles that the rank mask hides entirely are skipped. A row with no visible key keeps a
running max of -inf, which is replaced by the reference point 0, so it ends with out = 0 and
lse = -inf instead of NaN.

Backward: ``delta = rowsum(dO * O) - dlse`` is computed by the launcher; one kernel per key tile
and (batch, kv head) loops over the query heads of its group and the query tiles, recomputing P
from the saved LSE, and accumulates dK, dV and, per query head, the key-bias gradient (each output
element has exactly one owner, so no atomics: deterministic); one kernel per query tile computes
dQ. Inputs are (B, H, L, D) contiguous; D is padded to a power of two >= 16 with masked loads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _tuning


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a @ b with fp32 (fp64) accumulation; IEEE keeps float32 operands out of TF32."""
    if IEEE:
        result = tl.dot(a, b, input_precision="ieee")
    else:
        result = tl.dot(a, b)
    return result


@triton.jit
def _load_tile(ptrs, mask, UPCAST: tl.constexpr, acc_dtype: tl.constexpr):
    x = tl.load(ptrs, mask=mask, other=0.0)
    if UPCAST:  # the interpreter computes bf16/fp16 dots wrongly
        x = x.to(acc_dtype)
    return x


@triton.jit
def _scores(q, k, bias_ptrs, key_rank_ptrs, q_rank, rows, cols, len_q, len_k, scale,
            HAS_BIAS: tl.constexpr, HAS_RANKS: tl.constexpr, CAUSAL: tl.constexpr,
            IEEE: tl.constexpr, acc_dtype: tl.constexpr):
    """Scores (BLOCK_M, BLOCK_N) of a query tile against a key tile, -inf where not visible."""
    s = _dot(q, tl.trans(k), IEEE).to(acc_dtype) * scale
    col_ok = cols < len_k
    if HAS_BIAS:
        s += tl.load(bias_ptrs, mask=col_ok, other=0.0).to(acc_dtype)[None, :]
    visible = col_ok[None, :] & (rows < len_q)[:, None]
    if CAUSAL:
        visible = visible & (cols[None, :] <= rows[:, None] + (len_k - len_q))
    if HAS_RANKS:
        k_rank = tl.load(key_rank_ptrs, mask=col_ok, other=0.0)
        visible = visible & (k_rank[None, :] <= q_rank[:, None])
    return tl.where(visible, s, float("-inf"))


@triton.jit
def _rank_tile_hidden(key_rank_ptrs, cols, len_k, q_rank_max, HAS_RANKS: tl.constexpr):
    """True when the rank mask hides the whole key tile from every query of the tile."""
    if HAS_RANKS:
        k_rank = tl.load(key_rank_ptrs, mask=cols < len_k, other=float("inf"))
        return tl.min(k_rank, 0) > q_rank_max
    return False


@triton.jit
def _key_tile_end(m_start, len_q, len_k, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """One past the last key a causal query tile can see."""
    if CAUSAL:
        return tl.minimum(len_k, tl.maximum(m_start + BLOCK_M + len_k - len_q, 0))
    return len_k


@triton.jit
def _reward_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, bias_b_stride, bias_h_stride, key_rank_ptr, query_rank_ptr,
    out_ptr, lse_ptr, heads_q, group, len_q, len_k, head_dim, scale,
    HAS_BIAS: tl.constexpr, HAS_RANKS: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    acc_dtype = lse_ptr.dtype.element_ty
    m_start = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b = bh // heads_q
    h = bh % heads_q
    kv = b * (heads_q // group) + h // group
    rows = m_start + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < len_q
    dim_ok = dims < head_dim
    q_off = (bh * len_q + rows[:, None]) * head_dim + dims[None, :]
    q_ok = row_ok[:, None] & dim_ok[None, :]
    q = _load_tile(q_ptr + q_off, q_ok, UPCAST, acc_dtype)
    q_rank = tl.zeros([BLOCK_M], dtype=tl.float64)
    q_rank_max = 0.0
    if HAS_RANKS:
        q_rank = tl.load(query_rank_ptr + b * len_q + rows, mask=row_ok, other=float("-inf"))
        q_rank_max = tl.max(q_rank, 0)
    bias_row = bias_ptr + b * bias_b_stride + h * bias_h_stride
    m = tl.full([BLOCK_M], float("-inf"), acc_dtype)
    l_sum = tl.zeros([BLOCK_M], acc_dtype)
    acc = tl.zeros([BLOCK_M, BLOCK_D], acc_dtype)
    for n_start in range(0, _key_tile_end(m_start, len_q, len_k, BLOCK_M, CAUSAL), BLOCK_N):
        cols = n_start + tl.arange(0, BLOCK_N)
        key_ranks = key_rank_ptr + b * len_k + cols
        if not _rank_tile_hidden(key_ranks, cols, len_k, q_rank_max, HAS_RANKS):
            kv_off = (kv * len_k + cols[:, None]) * head_dim + dims[None, :]
            kv_ok = (cols < len_k)[:, None] & dim_ok[None, :]
            k = _load_tile(k_ptr + kv_off, kv_ok, UPCAST, acc_dtype)
            s = _scores(q, k, bias_row + cols, key_ranks, q_rank, rows, cols, len_q, len_k,
                        scale, HAS_BIAS, HAS_RANKS, CAUSAL, IEEE, acc_dtype)
            m_new = tl.maximum(m, tl.max(s, 1))
            ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no visible key yet: stay finite
            alpha = tl.exp(m - ref)
            p = tl.exp(s - ref[:, None])
            l_sum = l_sum * alpha + tl.sum(p, 1)
            v = _load_tile(v_ptr + kv_off, kv_ok, UPCAST, acc_dtype)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE).to(acc_dtype)
            m = m_new
    seen = l_sum > 0
    safe_sum = tl.where(seen, l_sum, 1.0)
    out = tl.where(seen[:, None], acc / safe_sum[:, None], 0.0)
    lse = tl.where(seen, tl.where(m == float("-inf"), 0.0, m) + tl.log(safe_sum), float("-inf"))
    tl.store(out_ptr + q_off, out.to(out_ptr.dtype.element_ty), mask=q_ok)
    tl.store(lse_ptr + bh * len_q + rows, lse, mask=row_ok)


@triton.jit
def _probabilities(s, lse):
    """P = exp(S - lse), 0 for rows with no visible key (lse = -inf)."""
    finite = lse > float("-inf")
    return tl.where(finite[:, None], tl.exp(s - tl.where(finite, lse, 0.0)[:, None]), 0.0)


@triton.jit
def _reward_attention_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, bias_b_stride, bias_h_stride, key_rank_ptr, query_rank_ptr,
    do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dbias_ptr, heads_q, group, len_q, len_k,
    head_dim, scale,
    HAS_BIAS: tl.constexpr, HAS_RANKS: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
    IEEE: tl.constexpr, NEED_BIAS_GRAD: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One key tile of one (batch, kv head): dK, dV over every query of its query heads, and
    the per-query-head key-bias gradient dbias[b, h, j] = sum_i dS_ij."""
    acc_dtype = lse_ptr.dtype.element_ty
    n_start = tl.program_id(0) * BLOCK_N
    bkv = tl.program_id(1).to(tl.int64)  # b * heads_kv + kv head
    heads_kv = heads_q // group
    b = bkv // heads_kv
    cols = n_start + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    col_ok = cols < len_k
    dim_ok = dims < head_dim
    kv_off = (bkv * len_k + cols[:, None]) * head_dim + dims[None, :]
    kv_ok = col_ok[:, None] & dim_ok[None, :]
    k = _load_tile(k_ptr + kv_off, kv_ok, UPCAST, acc_dtype)
    v = _load_tile(v_ptr + kv_off, kv_ok, UPCAST, acc_dtype)
    key_ranks = key_rank_ptr + b * len_k + cols
    dk = tl.zeros([BLOCK_N, BLOCK_D], acc_dtype)
    dv = tl.zeros([BLOCK_N, BLOCK_D], acc_dtype)
    m_first = 0
    if CAUSAL:  # query i sees key j iff i >= j - (len_k - len_q): earlier query tiles see none
        m_first = tl.maximum(n_start - (len_k - len_q), 0) // BLOCK_M * BLOCK_M
    for g in range(group):
        h = (bkv % heads_kv) * group + g
        bh = b * heads_q + h
        bias_row = bias_ptr + b * bias_b_stride + h * bias_h_stride
        dbias = tl.zeros([BLOCK_N], acc_dtype)
        for m_start in range(m_first, len_q, BLOCK_M):
            rows = m_start + tl.arange(0, BLOCK_M)
            row_ok = rows < len_q
            q_off = (bh * len_q + rows[:, None]) * head_dim + dims[None, :]
            q_ok = row_ok[:, None] & dim_ok[None, :]
            q = _load_tile(q_ptr + q_off, q_ok, UPCAST, acc_dtype)
            do = _load_tile(do_ptr + q_off, q_ok, UPCAST, acc_dtype)
            q_rank = tl.zeros([BLOCK_M], dtype=tl.float64)
            if HAS_RANKS:
                q_rank = tl.load(query_rank_ptr + b * len_q + rows, mask=row_ok,
                                 other=float("-inf"))
            s = _scores(q, k, bias_row + cols, key_ranks, q_rank, rows, cols, len_q, len_k,
                        scale, HAS_BIAS, HAS_RANKS, CAUSAL, IEEE, acc_dtype)
            lse = tl.load(lse_ptr + bh * len_q + rows, mask=row_ok, other=float("-inf"))
            delta = tl.load(delta_ptr + bh * len_q + rows, mask=row_ok, other=0.0)
            p = _probabilities(s, lse)
            dv += _dot(tl.trans(p.to(do.dtype)), do, IEEE).to(acc_dtype)
            ds = p * (_dot(do, tl.trans(v), IEEE).to(acc_dtype) - delta[:, None])
            dk += _dot(tl.trans(ds.to(q.dtype)), q, IEEE).to(acc_dtype)
            if NEED_BIAS_GRAD:
                dbias += tl.sum(ds, 0)
        if NEED_BIAS_GRAD:
            tl.store(dbias_ptr + bh * len_k + cols, dbias, mask=col_ok)
    tl.store(dk_ptr + kv_off, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_ok)
    tl.store(dv_ptr + kv_off, dv.to(dv_ptr.dtype.element_ty), mask=kv_ok)


@triton.jit
def _reward_attention_dq_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, bias_b_stride, bias_h_stride, key_rank_ptr, query_rank_ptr,
    do_ptr, lse_ptr, delta_ptr, dq_ptr, heads_q, group, len_q, len_k, head_dim, scale,
    HAS_BIAS: tl.constexpr, HAS_RANKS: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    acc_dtype = lse_ptr.dtype.element_ty
    m_start = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b = bh // heads_q
    h = bh % heads_q
    kv = b * (heads_q // group) + h // group
    rows = m_start + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < len_q
    dim_ok = dims < head_dim
    q_off = (bh * len_q + rows[:, None]) * head_dim + dims[None, :]
    q_ok = row_ok[:, None] & dim_ok[None, :]
    q = _load_tile(q_ptr + q_off, q_ok, UPCAST, acc_dtype)
    do = _load_tile(do_ptr + q_off, q_ok, UPCAST, acc_dtype)
    q_rank = tl.zeros([BLOCK_M], dtype=tl.float64)
    q_rank_max = 0.0
    if HAS_RANKS:
        q_rank = tl.load(query_rank_ptr + b * len_q + rows, mask=row_ok, other=float("-inf"))
        q_rank_max = tl.max(q_rank, 0)
    lse = tl.load(lse_ptr + bh * len_q + rows, mask=row_ok, other=float("-inf"))
    delta = tl.load(delta_ptr + bh * len_q + rows, mask=row_ok, other=0.0)
    bias_row = bias_ptr + b * bias_b_stride + h * bias_h_stride
    dq = tl.zeros([BLOCK_M, BLOCK_D], acc_dtype)
    for n_start in range(0, _key_tile_end(m_start, len_q, len_k, BLOCK_M, CAUSAL), BLOCK_N):
        cols = n_start + tl.arange(0, BLOCK_N)
        key_ranks = key_rank_ptr + b * len_k + cols
        if not _rank_tile_hidden(key_ranks, cols, len_k, q_rank_max, HAS_RANKS):
            kv_off = (kv * len_k + cols[:, None]) * head_dim + dims[None, :]
            kv_ok = (cols < len_k)[:, None] & dim_ok[None, :]
            k = _load_tile(k_ptr + kv_off, kv_ok, UPCAST, acc_dtype)
            v = _load_tile(v_ptr + kv_off, kv_ok, UPCAST, acc_dtype)
            s = _scores(q, k, bias_row + cols, key_ranks, q_rank, rows, cols, len_q, len_k,
                        scale, HAS_BIAS, HAS_RANKS, CAUSAL, IEEE, acc_dtype)
            p = _probabilities(s, lse)
            ds = p * (_dot(do, tl.trans(v), IEEE).to(acc_dtype) - delta[:, None])
            dq += _dot(ds.to(k.dtype), k, IEEE).to(acc_dtype)
    tl.store(dq_ptr + q_off, (dq * scale).to(dq_ptr.dtype.element_ty), mask=q_ok)


def _interpreting() -> bool:
    return _tuning.interpreting()


_c = _tuning.config
# GPU tuning spaces: {(kernel, operands, padded head dimension): configurations}, the first the
# untuned default. "tc" is float16/bfloat16 (tensor cores), "fp32" (IEEE, FMA units) and "fp64".
# BLOCK_M is the query tile, BLOCK_N the key tile. Sized by compiling them
# (tests/gpu_compile.py) under Triton 3.6 (the GPU machines') and 3.9 alike: dK/dV holds two
# (BLOCK_N, D) fp32 accumulators and spills on sm_80 with 64-query tiles or 4 warps; the FMA dot of
# float32/float64 holds whole D-long rows per thread, so their tiles shrink as D grows. Head
# dimensions under 64 use the 64 spaces. Dropped because they spill under Triton 3.6 on sm_80 with
# every optional input (per-head bias and its gradient, ranks, causal): float16/bfloat16 dK/dV
# 32 x 64 tiles at D = 64 (32-36 B with 2 or 3 stages, 1 stage too), hence 32 x 32 and 16 x 64;
# float32 dK/dV 32 x 32 with 4 warps at D = 64 (656 B; it took the forward's tile, which also
# spills 400-560 B on sm_90 without the optional inputs under Triton 3.9), hence a 16 x 16 tile of
# its own, the one tried that spills in no flag combination at D = 64 under either version (32 x 32
# and 16 x 32, 16 x 16 with 4 warps or 1 stage spill 4-20 B in one or two of them).
# Known exceptions (python tests/gpu_compile.py --all): with a head dimension padded to 256 (e.g.
# D = 200) and every optional input, the float16/bfloat16 dK/dV and dQ kernels spill on one arch
# or both for every tile tried; so does float64 dQ at D = 256 on sm_80 (24 B).
_SPACES = {
    ("fwd", "tc", 64): (_c(8, 3, BLOCK_M=128, BLOCK_N=64), _c(4, 3, BLOCK_M=64, BLOCK_N=64)),
    ("dq", "tc", 64): (_c(8, 3, BLOCK_M=128, BLOCK_N=64), _c(4, 3, BLOCK_M=64, BLOCK_N=64)),
    ("dkdv", "tc", 64): (_c(8, 2, BLOCK_M=32, BLOCK_N=32), _c(8, 2, BLOCK_M=16, BLOCK_N=64)),
    ("fwd", "tc", 128): (_c(8, 3, BLOCK_M=64, BLOCK_N=64), _c(4, 3, BLOCK_M=64, BLOCK_N=32)),
    ("dq", "tc", 128): (_c(8, 3, BLOCK_M=64, BLOCK_N=64), _c(8, 3, BLOCK_M=128, BLOCK_N=32)),
    ("dkdv", "tc", 128): (_c(8, 2, BLOCK_M=32, BLOCK_N=64), _c(8, 2, BLOCK_M=32, BLOCK_N=32)),
    ("fwd", "tc", 256): (_c(8, 2, BLOCK_M=32, BLOCK_N=64),),
    ("dq", "tc", 256): (_c(8, 2, BLOCK_M=32, BLOCK_N=64),),
    ("dkdv", "tc", 256): (_c(8, 2, BLOCK_M=32, BLOCK_N=32),),
    ("fwd", "fp32", 64): (_c(4, 1, BLOCK_M=32, BLOCK_N=32),),
    ("fwd", "fp32", 128): (_c(8, 1, BLOCK_M=32, BLOCK_N=32),),
    ("fwd", "fp32", 256): (_c(4, 1, BLOCK_M=16, BLOCK_N=16),),
    ("fwd", "fp64", 64): (_c(4, 1, BLOCK_M=32, BLOCK_N=32),),
    ("fwd", "fp64", 128): (_c(4, 1, BLOCK_M=16, BLOCK_N=16),),
    ("fwd", "fp64", 256): (_c(4, 1, BLOCK_M=16, BLOCK_N=16),),
    ("dkdv", "fp32", 64): (_c(8, 2, BLOCK_M=16, BLOCK_N=16),),
    ("dkdv", "fp32", 128): (_c(8, 1, BLOCK_M=16, BLOCK_N=32),),
    ("dkdv", "fp64", 256): (_c(8, 1, BLOCK_M=16, BLOCK_N=16),),
    # Spills 24 B on sm_80 (2 and 16 warps spill more); float64 at D > 128 is a precision path.
    ("dq", "fp64", 256): (_c(8, 1, BLOCK_M=16, BLOCK_N=16),),
}
for (_kind, _ops, _d), _space in list(_SPACES.items()):
    if _ops != "tc":  # otherwise the backward kernels of float32/float64 take the forward's tiles
        _SPACES.setdefault(("dkdv", _ops, _d), _space)
        _SPACES.setdefault(("dq", _ops, _d), _space)
del _kind, _ops, _d, _space
del _c
_FWD_KEY = ("len_q", "len_k", "head_dim", "HAS_BIAS", "HAS_RANKS", "CAUSAL")
_DKDV_KEY = _FWD_KEY + ("group", "NEED_BIAS_GRAD")


def attention_space(kind: str, dtype: torch.dtype, block_d: int) -> tuple:
    """The configurations the ``kind`` ("fwd", "dkdv" or "dq") kernel may run
    with at head dimension ``block_d`` (padded). Interpreter: one 32 x 32 tile."""
    if _interpreting():
        return (_tuning.config(4, BLOCK_M=32, BLOCK_N=32),)
    operands = {torch.float32: "fp32", torch.float64: "fp64"}.get(dtype, "tc")
    return _SPACES[(kind, operands, max(64, block_d))]


def _config(q: torch.Tensor, head_dim: int) -> dict:
    """The meta-parameters that are not tuned: BLOCK_D and the operand flags."""
    return dict(
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        UPCAST=_interpreting() and q.dtype in (torch.float16, torch.bfloat16),
        IEEE=q.dtype in (torch.float32, torch.float64),
    )


def _common(q, key_bias, key_rank, query_rank):
    """Pointer stand-ins and strides for the optional inputs, and the flags that say which exist.
    A shared bias (B, 1, Lk) gets a head stride of 0."""
    per_head = key_bias is not None and key_bias.shape[1] > 1
    return dict(
        bias=key_bias if key_bias is not None else q,
        bias_b_stride=key_bias.stride(0) if key_bias is not None else 0,
        bias_h_stride=key_bias.stride(1) if per_head else 0,
        key_rank=key_rank if key_rank is not None else q,
        query_rank=query_rank if query_rank is not None else q,
        flags=dict(HAS_BIAS=key_bias is not None, HAS_RANKS=key_rank is not None),
    )


def _fwd_plan(q, k, v, key_bias, key_rank, query_rank, causal, scale, out, lse):
    batch, heads_q, len_q, head_dim = q.shape
    heads_kv, len_k = k.shape[1], k.shape[2]
    if batch * heads_q * len_q == 0:
        return None
    cfg = _config(q, head_dim)
    c = _common(q, key_bias, key_rank, query_rank)
    return _tuning.Launch(
        _reward_attention_fwd_kernel,
        lambda meta: (triton.cdiv(len_q, meta["BLOCK_M"]), batch * heads_q),
        (q, k, v, c["bias"], c["bias_b_stride"], c["bias_h_stride"], c["key_rank"],
         c["query_rank"], out, lse, heads_q, heads_q // heads_kv, len_q, len_k, head_dim, scale),
        dict(CAUSAL=causal, **c["flags"], **cfg),
        attention_space("fwd", q.dtype, cfg["BLOCK_D"]), _FWD_KEY,
    )


def _bwd_plans(grad_out, delta, q, k, v, key_bias, key_rank, query_rank, causal, scale, lse, dq,
               dk, dv, dbias):
    """(dK/dV plan or None, dQ plan or None)."""
    batch, heads_q, len_q, head_dim = q.shape
    heads_kv, len_k = k.shape[1], k.shape[2]
    cfg = _config(q, head_dim)
    c = _common(q, key_bias, key_rank, query_rank)
    head = (q, k, v, c["bias"], c["bias_b_stride"], c["bias_h_stride"], c["key_rank"],
            c["query_rank"], grad_out, lse, delta)
    sizes = (heads_q, heads_q // heads_kv, len_q, len_k, head_dim, scale)
    dkdv = dq_plan = None
    if batch * heads_kv * len_k > 0:
        dkdv = _tuning.Launch(
            _reward_attention_dkdv_kernel,
            lambda meta: (triton.cdiv(len_k, meta["BLOCK_N"]), batch * heads_kv),
            (*head, dk, dv, dbias if dbias is not None else lse, *sizes),
            dict(CAUSAL=causal, NEED_BIAS_GRAD=dbias is not None, **c["flags"], **cfg),
            attention_space("dkdv", q.dtype, cfg["BLOCK_D"]), _DKDV_KEY,
        )
    if batch * heads_q * len_q > 0:
        dq_plan = _tuning.Launch(
            _reward_attention_dq_kernel,
            lambda meta: (triton.cdiv(len_q, meta["BLOCK_M"]), batch * heads_q),
            (*head, dq, *sizes), dict(CAUSAL=causal, **c["flags"], **cfg),
            attention_space("dq", q.dtype, cfg["BLOCK_D"]), _FWD_KEY,
        )
    return dkdv, dq_plan


def reward_attention_fwd(q, k, v, key_bias, key_rank, query_rank, causal, scale, out, lse) -> None:
    """Fill ``out (B, Hq, Lq, D)`` and ``lse (B, Hq, Lq)``. Every tensor contiguous; key_bias
    ``(B, 1 or Hq, Lk)`` in lse's dtype; ranks float64."""
    _tuning.launch(_fwd_plan(q, k, v, key_bias, key_rank, query_rank, causal, scale, out, lse))


def reward_attention_bwd(grad_out, delta, q, k, v, key_bias, key_rank, query_rank, causal, scale,
                         lse, dq, dk, dv, dbias) -> None:
    """Fill ``dq``, ``dk``, ``dv`` (like q, k, v) and, if given, ``dbias (B, Hq, Lk)`` (per query
    head). ``delta (B, Hq, Lq) = rowsum(dO * O) - dlse``."""
    for plan in _bwd_plans(grad_out, delta, q, k, v, key_bias, key_rank, query_rank, causal, scale,
                           lse, dq, dk, dv, dbias):
        _tuning.launch(plan)
