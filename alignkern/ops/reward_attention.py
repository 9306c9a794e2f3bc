"""``reward_attention``: softmax attention with a differentiable reward bias on the keys and a
reward-ordering mask, FlashAttention-style (O(L) memory); and ``segment_bias``, which turns
per-example rewards into that key bias.

Registered ops:
  ``alignkern::reward_attention(q, k, v, key_bias, key_rank, query_rank, causal, scale, backend)
  -> (out, lse)``
  ``alignkern::reward_attention_backward(grad_out, grad_lse, q, k, v, key_bias, key_rank,
  query_rank, out, lse, causal, scale, need_bias_grad, backend) -> (dq, dk, dv, dbias)``;
  ``dbias`` has the bias's shape, or 0 elements when not asked for.

Backends: ``triton`` (forward and backward kernels), ``cuda`` (tensor-core forward from csrc/cuda;
its backward runs the Triton kernels), ``cpu`` (csrc/cpu, forward and backward), ``reference``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import _autocast, _backend, _checks, reference

SUPPORTED_DTYPES = _checks.FLOAT_DTYPES
# Rank dtypes PyTorch can compare (the reference backend compares them directly).
RANK_DTYPES = (*_checks.FLOAT_DTYPES, torch.uint8, torch.int8, torch.int16, torch.int32,
               torch.int64)
MAX_HEAD_DIM = 256
CUDA_HEAD_DIMS = (16, 32, 64, 128)


class RewardAttention(NamedTuple):
    """What ``reward_attention(..., return_lse=True)`` returns."""

    out: torch.Tensor
    lse: torch.Tensor


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- validation


def _shape(x: torch.Tensor) -> tuple:
    return tuple(x.shape)


def _check_qkv(fn: str, q, k, v) -> None:
    """q ``(B, Hq, Lq, D)``, k and v ``(B, Hkv, Lk, D)`` of one float dtype, ``Hq % Hkv == 0``,
    ``1 <= D <= 256``."""
    _checks.tensor(fn, "q", q, dtypes=SUPPORTED_DTYPES)
    for arg, value in (("k", k), ("v", v)):
        _checks.tensor(fn, arg, value)
        if value.dtype != q.dtype:
            raise TypeError(f"{fn}: {arg} must have q's dtype ({q.dtype}), got {value.dtype}")
    for arg, value in (("q", q), ("k", k), ("v", v)):
        if value.dim() != 4:
            raise ValueError(f"{fn}: {arg} must be 4-D (B, H, L, D), got shape {_shape(value)}")
    batch, heads_q, _, head_dim = q.shape
    if _shape(k) != _shape(v):
        raise ValueError(f"{fn}: k and v must have the same shape, got k {_shape(k)} and v "
                         f"{_shape(v)}")
    if k.shape[0] != batch:
        raise ValueError(f"{fn}: batch sizes differ: q has B = {batch} (shape {_shape(q)}), k "
                         f"has B = {k.shape[0]} (shape {_shape(k)})")
    if k.shape[3] != head_dim:
        raise ValueError(f"{fn}: head dims differ: q has D = {head_dim}, k and v have D = "
                         f"{k.shape[3]}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"{fn}: head dim D must be in [1, {MAX_HEAD_DIM}], got {head_dim}")
    heads_kv = k.shape[1]
    if heads_q == 0 or heads_kv == 0 or heads_q % heads_kv != 0:
        raise ValueError(f"{fn}: the query heads Hq = {heads_q} must be a multiple of the "
                         f"key/value heads Hkv = {heads_kv} (both positive)")


def _check_key_bias(fn: str, key_bias, q, k) -> None:
    """None, or a float tensor ``(B, Lk)`` (shared by the heads) or ``(B, Hq, Lk)``."""
    if key_bias is None:
        return
    _checks.tensor(fn, "key_bias", key_bias)
    if key_bias.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{fn}: key_bias must be a floating-point tensor, got {key_bias.dtype} "
                        "(float32, float16, bfloat16 or float64)")
    batch, heads_q, len_k = q.shape[0], q.shape[1], k.shape[2]
    if _shape(key_bias) not in ((batch, len_k), (batch, heads_q, len_k)):
        raise ValueError(f"{fn}: key_bias must have shape (B, Lk) = {(batch, len_k)} or "
                         f"(B, Hq, Lk) = {(batch, heads_q, len_k)}, got {_shape(key_bias)}")


def _check_ranks(fn: str, key_rank, query_rank, q, k) -> None:
    """Both None, or real tensors ``key_rank (B, Lk)`` and ``query_rank (B, Lq)``."""
    if (key_rank is None) != (query_rank is None):
        raise ValueError(f"{fn}: key_rank and query_rank go together: got only "
                         f"{'key_rank' if query_rank is None else 'query_rank'}")
    if key_rank is None:
        return
    batch = q.shape[0]
    for arg, value, length in (("key_rank", key_rank, k.shape[2]),
                               ("query_rank", query_rank, q.shape[2])):
        _checks.tensor(fn, arg, value)
        if value.dtype not in RANK_DTYPES:
            raise TypeError(f"{fn}: {arg} must be a real-valued tensor, got {value.dtype} "
                            f"({', '.join(str(d).removeprefix('torch.') for d in RANK_DTYPES)})")
        if _shape(value) != (batch, length):
            raise ValueError(f"{fn}: {arg} must have shape (B, L) = {(batch, length)}, got "
                             f"{_shape(value)}")


def _check_scalars(fn: str, head_dim: int, causal, scale) -> tuple[bool, float]:
    """``causal`` a bool; ``scale`` a finite real number, or None for ``head_dim ** -0.5`` (the
    caller has checked ``head_dim >= 1``). Returns ``(causal, scale)``."""
    causal = _checks.boolean(fn, "causal", causal)
    if scale is None:
        return causal, float(head_dim ** -0.5)
    return causal, _checks.real(fn, "scale", scale)


def _check_inputs(fn: str, q, k, v, key_bias, key_rank, query_rank, causal,
                  scale) -> tuple[bool, float]:
    """DESIGN.md's error contract for the forward's arguments (shared by the public function and
    both registered ops): every message names ``fn``, the argument, the expected and the got.
    Returns ``(causal, scale)``, the default scale filled in."""
    _check_qkv(fn, q, k, v)
    _check_key_bias(fn, key_bias, q, k)
    _check_ranks(fn, key_rank, query_rank, q, k)
    _checks.same_device(fn, q=q, k=k, v=v, key_bias=key_bias, key_rank=key_rank,
                        query_rank=query_rank)
    return _check_scalars(fn, q.shape[3], causal, scale)


def _check_gradients(fn: str, grad_out, grad_lse, out, lse, q) -> None:
    """The backward's extra tensors: ``grad_out`` and ``out`` shaped like q ``(B, Hq, Lq, D)``,
    ``lse`` and ``grad_lse`` (or None) ``(B, Hq, Lq)``; real floating point, on q's device."""
    rows = _shape(q)[:3]
    for arg, value, expected, what in (
            ("grad_out", grad_out, _shape(q), "the shape of q"),
            ("out", out, _shape(q), "the shape of q"),
            ("lse", lse, rows, "q's B, Hq, Lq"),
            ("grad_lse", grad_lse, rows, "q's B, Hq, Lq")):
        if value is None and arg == "grad_lse":
            continue
        _checks.tensor(fn, arg, value, floating=True)
        _checks.shape(fn, arg, value, expected, what)
    _checks.same_device(fn, q=q, grad_out=grad_out, grad_lse=grad_lse, out=out, lse=lse)


def _check_backend(backend, q: torch.Tensor, fn: str = "reward_attention") -> str:
    """``"auto"`` (resolved by q's device) or the name of a backend that can run here."""
    backend = _backend.backend_for(fn, backend, q.device)
    if backend == "cuda" and (q.dtype == torch.float64 or q.shape[-1] not in CUDA_HEAD_DIMS):
        raise TypeError(
            f"{fn}: the cuda backend takes float32, float16 or bfloat16 with head dim "
            f"16, 32, 64 or 128, got {q.dtype} with D = {q.shape[-1]} (use the triton backend)"
        )
    return backend


def _fake_checks(fn: str, q, k, v, key_bias, key_rank, query_rank) -> None:
    """The shape checks of ``_check_inputs`` as ``torch._check`` (the fake kernels have no data
    and may see symbolic sizes)."""
    _checks.same_device_in_fake(fn, q=q, k=k, v=v, key_bias=key_bias, key_rank=key_rank,
                                query_rank=query_rank)
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4,
                 lambda: f"{fn}: q, k and v must be 4-D (B, H, L, D)")
    torch._check(k.dtype == q.dtype and v.dtype == q.dtype and q.dtype in SUPPORTED_DTYPES,
                 lambda: f"{fn}: q, k and v must have one float dtype")
    torch._check(_shape(k) == _shape(v), lambda: f"{fn}: k and v must have the same shape")
    torch._check(k.shape[0] == q.shape[0], lambda: f"{fn}: batch sizes differ")
    torch._check(k.shape[3] == q.shape[3], lambda: f"{fn}: head dims differ")
    torch._check(1 <= q.shape[3] <= MAX_HEAD_DIM,
                 lambda: f"{fn}: head dim D must be in [1, {MAX_HEAD_DIM}]")
    torch._check(k.shape[1] > 0 and q.shape[1] > 0 and q.shape[1] % k.shape[1] == 0,
                 lambda: f"{fn}: Hq must be a multiple of Hkv")
    batch, heads_q, len_q, len_k = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    if key_bias is not None:
        torch._check(_shape(key_bias) in ((batch, len_k), (batch, heads_q, len_k)),
                     lambda: f"{fn}: key_bias must have shape (B, Lk) or (B, Hq, Lk)")
    torch._check((key_rank is None) == (query_rank is None),
                 lambda: f"{fn}: key_rank and query_rank go together")
    if key_rank is not None:
        torch._check(_shape(key_rank) == (batch, len_k),
                     lambda: f"{fn}: key_rank must have shape (B, Lk)")
        torch._check(_shape(query_rank) == (batch, len_q),
                     lambda: f"{fn}: query_rank must have shape (B, Lq)")


def _fake_gradient_checks(fn: str, grad_out, grad_lse, out, lse, q) -> None:
    """The shape checks of ``_check_gradients`` as ``torch._check``."""
    _checks.same_device_in_fake(fn, q=q, grad_out=grad_out, grad_lse=grad_lse, out=out, lse=lse)
    rows = _shape(q)[:3]
    torch._check(_shape(grad_out) == _shape(q), lambda: f"{fn}: grad_out must have q's shape")
    torch._check(_shape(out) == _shape(q), lambda: f"{fn}: out must have q's shape")
    torch._check(_shape(lse) == rows, lambda: f"{fn}: lse must have shape (B, Hq, Lq)")
    if grad_lse is not None:
        torch._check(_shape(grad_lse) == rows,
                     lambda: f"{fn}: grad_lse must have shape (B, Hq, Lq)")


# ----------------------------------------------------------------------------- kernel plumbing


class _Inputs(NamedTuple):
    """What the kernels take: contiguous q, k, v; bias (B, 1 or Hq, Lk) in the accumulation type;
    float64 ranks."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    bias: torch.Tensor | None
    key_rank: torch.Tensor | None
    query_rank: torch.Tensor | None


def _float64_ranks(key_rank: torch.Tensor, query_rank: torch.Tensor):
    """``key_rank (B, Lk)`` and ``query_rank (B, Lq)`` as contiguous float64 tensors that compare
    (``key_rank_j <= query_rank_i``) exactly as the given ranks do.

    Float ranks convert to float64 exactly. Integer ranks would not (int64 values above 2**53
    merge), so each is replaced by its dense order within its batch: how many of the batch's
    ranks, keys and queries together, are strictly smaller. That count keeps every ``<`` and
    ``==`` between the batch's ranks and is below ``Lk + Lq``, exact in float64."""
    if key_rank.is_floating_point() or query_rank.is_floating_point():
        return (key_rank.to(torch.float64).contiguous(),
                query_rank.to(torch.float64).contiguous())
    key_rank = key_rank.to(torch.int64).contiguous()
    query_rank = query_rank.to(torch.int64).contiguous()
    ordered = torch.cat([key_rank, query_rank], dim=1).sort(dim=1).values
    return (torch.searchsorted(ordered, key_rank).to(torch.float64),
            torch.searchsorted(ordered, query_rank).to(torch.float64))


def _prepare(q, k, v, key_bias, key_rank, query_rank) -> _Inputs:
    acc = _accumulation_dtype(q.dtype)
    bias = None
    if key_bias is not None:
        bias = key_bias[:, None] if key_bias.dim() == 2 else key_bias
        bias = bias.to(acc).contiguous()
    # With no query or no key there is no pair for the ranks to mask. They are dropped: an empty
    # rank tensor may have no address, which the C++ kernels would read as "no ranks" while the
    # other one has an address, and refuse.
    no_pairs = q.shape[2] == 0 or k.shape[2] == 0
    ranks = (None, None) if key_rank is None or no_pairs \
        else _float64_ranks(key_rank, query_rank)
    return _Inputs(q.contiguous(), k.contiguous(), v.contiguous(), bias, *ranks)


def _cpp_args(x: _Inputs, causal: bool, scale: float) -> list:
    batch, heads_q, len_q, head_dim = x.q.shape
    return [
        x.q.data_ptr(), x.k.data_ptr(), x.v.data_ptr(), _backend.DTYPE_CODES[x.q.dtype], batch,
        heads_q, x.k.shape[1], len_q, x.k.shape[2], head_dim,
        0 if x.bias is None else x.bias.data_ptr(), 1 if x.bias is None else x.bias.shape[1],
        0 if x.key_rank is None else x.key_rank.data_ptr(),
        0 if x.query_rank is None else x.query_rank.data_ptr(), int(causal), float(scale),
    ]


def _poisoned(shape, dtype, device) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _run_forward(q, k, v, key_bias, key_rank, query_rank, causal, scale, backend):
    if backend == "reference":
        return reference.reward_attention(q, k, v, key_bias, key_rank, query_rank, causal, scale)
    x = _prepare(q, k, v, key_bias, key_rank, query_rank)
    out = _poisoned(q.shape, q.dtype, q.device)
    lse = _poisoned(q.shape[:3], _accumulation_dtype(q.dtype), q.device)
    if backend == "triton":
        from ..triton_kernels import reward_attention as kernels

        kernels.reward_attention_fwd(*x, causal, scale, out, lse)
    elif backend == "cuda":
        with torch.cuda.device(q.device):
            _backend.extension().reward_attention_fwd_cuda(
                *_cpp_args(x, causal, scale), out.data_ptr(), lse.data_ptr(),
                _backend.cuda_stream(q.device))
    else:
        _backend.extension().reward_attention_fwd_cpu(*_cpp_args(x, causal, scale),
                                                      out.data_ptr(), lse.data_ptr())
    return out, lse


def _run_backward(grad_out, grad_lse, q, k, v, key_bias, key_rank, query_rank, out, lse, causal,
                  scale, need_bias_grad, backend):
    acc = _accumulation_dtype(q.dtype)
    need_bias_grad = need_bias_grad and key_bias is not None
    if backend == "reference":
        dq, dk, dv, dbias = reference.reward_attention_backward(
            grad_out, grad_lse, q, k, v, key_bias, key_rank, query_rank, causal, scale)
    else:
        x = _prepare(q, k, v, key_bias, key_rank, query_rank)
        grad_out = grad_out.to(q.dtype).contiguous()  # the kernels read it in q's dtype
        lse = lse.to(acc).contiguous()
        dq, dk, dv = (_poisoned(t.shape, q.dtype, q.device) for t in (q, k, v))
        dbias = _poisoned((q.shape[0], q.shape[1], k.shape[2]), acc, q.device) \
            if need_bias_grad else None
        if backend == "cpu":
            # Named so that they stay alive while the kernel reads them.
            glse = None if grad_lse is None else grad_lse.to(acc).contiguous()
            out = out.to(q.dtype).contiguous()
            _backend.extension().reward_attention_bwd_cpu(
                grad_out.data_ptr(), 0 if glse is None else glse.data_ptr(),
                *_cpp_args(x, causal, scale), out.data_ptr(), lse.data_ptr(), dq.data_ptr(),
                dk.data_ptr(), dv.data_ptr(), 0 if dbias is None else dbias.data_ptr())
        else:  # triton, and cuda (whose backward is the Triton path until a CUDA backward exists)
            from ..triton_kernels import reward_attention as kernels

            delta = (grad_out.to(acc) * out.to(acc)).sum(-1)
            if grad_lse is not None:
                delta = delta - grad_lse.to(acc)
            kernels.reward_attention_bwd(grad_out, delta.contiguous(), *x[:3], *x[3:], causal,
                                         scale, lse, dq, dk, dv, dbias)
    if need_bias_grad:
        dbias = (dbias.sum(1) if key_bias.dim() == 2 else dbias).to(key_bias.dtype)
    else:
        dbias = q.new_empty((0,))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias


# ----------------------------------------------------------------------------- registered ops


@torch.library.custom_op("alignkern::reward_attention", mutates_args=())
def _reward_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_bias: torch.Tensor | None,
    key_rank: torch.Tensor | None,
    query_rank: torch.Tensor | None,
    causal: bool,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    causal, scale = _check_inputs("reward_attention", q, k, v, key_bias, key_rank, query_rank,
                                  causal, scale)
    backend = _check_backend(backend, q)
    return _run_forward(q, k, v, key_bias, key_rank, query_rank, causal, scale, backend)


@_reward_attention_op.register_fake
def _reward_attention_fake(q, k, v, key_bias, key_rank, query_rank, causal, scale, backend):
    _fake_checks("reward_attention", q, k, v, key_bias, key_rank, query_rank)
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        q.new_empty(q.shape[:3], dtype=_accumulation_dtype(q.dtype))


@torch.library.custom_op("alignkern::reward_attention_backward", mutates_args=())
def _reward_attention_backward_op(
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_bias: torch.Tensor | None,
    key_rank: torch.Tensor | None,
    query_rank: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    scale: float,
    need_bias_grad: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    fn = "reward_attention_backward"
    causal, scale = _check_inputs(fn, q, k, v, key_bias, key_rank, query_rank, causal, scale)
    _check_gradients(fn, grad_out, grad_lse, out, lse, q)
    need_bias_grad = _checks.boolean(fn, "need_bias_grad", need_bias_grad)
    backend = _check_backend(backend, q, fn)
    return _run_backward(grad_out, grad_lse, q, k, v, key_bias, key_rank, query_rank, out, lse,
                         causal, scale, need_bias_grad, backend)


@_reward_attention_backward_op.register_fake
def _reward_attention_backward_fake(grad_out, grad_lse, q, k, v, key_bias, key_rank, query_rank,
                                    out, lse, causal, scale, need_bias_grad, backend):
    fn = "reward_attention_backward"
    _fake_checks(fn, q, k, v, key_bias, key_rank, query_rank)
    _fake_gradient_checks(fn, grad_out, grad_lse, out, lse, q)
    dbias = key_bias.new_empty(key_bias.shape) if need_bias_grad and key_bias is not None \
        else q.new_empty((0,))
    contiguous = torch.contiguous_format
    return (torch.empty_like(q, memory_format=contiguous),
            torch.empty_like(k, memory_format=contiguous),
            torch.empty_like(v, memory_format=contiguous), dbias)


def _setup_context(ctx, inputs, output):
    q, k, v, key_bias, key_rank, query_rank, causal, scale, backend = inputs
    ctx.save_for_backward(q, k, v, key_bias, key_rank, query_rank, *output)
    ctx.options = (causal, scale)
    ctx.backend = backend


def _backward(ctx, grad_out, grad_lse):
    q, k, v, key_bias, key_rank, query_rank, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    need_bias = ctx.needs_input_grad[3]
    dq, dk, dv, dbias = _reward_attention_backward_op(
        grad_out, grad_lse, q, k, v, key_bias, key_rank, query_rank, out, lse, *ctx.options,
        need_bias, ctx.backend,
    )
    return dq, dk, dv, dbias if need_bias else None, None, None, None, None, None


_reward_attention_op.register_autograd(_backward, setup_context=_setup_context)
_autocast.register("reward_attention", ("q", "k", "v"))
_autocast.register("reward_attention_backward")


# ----------------------------------------------------------------------------- public API


def reward_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_bias: torch.Tensor | None = None,
    key_rank: torch.Tensor | None = None,
    query_rank: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | RewardAttention:
    """Softmax attention with a reward bias on the keys and a reward-ordering mask, computed tile
    by tile (never the ``(Lq, Lk)`` score matrix).

    ``S_ij = scale * <q_i, k_j> + key_bias_j``; key j is visible to query i iff
    (``causal`` ⇒ ``j <= i + Lk - Lq``) and (ranks given ⇒ ``key_rank_j <= query_rank_i``): each
    response attends to the responses it outranks, the Plackett–Luce suffix softmax of in-context
    alignment. ``out_i = softmax_j(S_i) v``; a row with no visible key gives 0 (and ``lse = -inf``).

    Args:
        q: ``(B, Hq, Lq, D)``; k, v: ``(B, Hkv, Lk, D)`` with ``Hq % Hkv == 0`` (grouped-query
            attention); float32, float16, bfloat16 (float64 off the cuda backend); D <= 256.
        key_bias: ``(B, Lk)`` shared by the heads, or ``(B, Hq, Lk)``; e.g. ``beta * reward`` of
            the example each key belongs to (see ``segment_bias``). Differentiable.
        key_rank, query_rank: ``(B, Lk)`` and ``(B, Lq)`` real numbers (e.g. rewards), together;
            float or integer (integers compare exactly, int64 included, on every backend).
        causal: bottom-right aligned causal mask. scale: default ``D ** -0.5``.
        return_lse: also return ``lse (B, Hq, Lq)``, float32 (differentiable too).

    Returns:
        ``out (B, Hq, Lq, D)`` in q's dtype, or ``RewardAttention(out, lse)``. Gradients flow to
        q, k, v and key_bias (deterministically: no float atomics); ranks take none.

    Raises:
        TypeError: an argument that is not a tensor, non-float or mismatched dtypes, ranks that
            are not real, a ``causal`` or ``return_lse`` that is not a bool, a ``scale`` that is
            not a real number.
        ValueError: shapes (batch or head dims that disagree, D outside [1, 256], Hq not a
            multiple of Hkv, ranks or bias of the wrong shape, only one of the ranks), mixed
            devices, a non-finite scale (or an integer beyond float's range).
        RuntimeError: the backend cannot run here.

    Example:
        >>> out = alignkern.reward_attention(q, k, v, key_bias=alignkern.segment_bias(
        ...     rewards, segment_ids, beta=2.0))
    """
    causal, scale = _check_inputs("reward_attention", q, k, v, key_bias, key_rank, query_rank,
                                  causal, scale)
    return_lse = _checks.boolean("reward_attention", "return_lse", return_lse)
    # Under torch.compile the backend is resolved when the compiled graph runs, not when traced.
    backend = "auto" if torch.compiler.is_compiling() else _check_backend("auto", q)
    out, lse = _reward_attention_op(q, k, v, key_bias, key_rank, query_rank, causal, scale,
                                    backend)
    return RewardAttention(out, lse) if return_lse else out


def segment_bias(rewards: torch.Tensor, segment_ids: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Per-token key bias ``(B, L)`` from per-example rewards: ``beta * rewards[b, segment_ids]``,
    0 for tokens whose segment id is negative (the prompt). Differentiable in ``rewards``.

    Args:
        rewards: ``(B, S)`` float, the reward of each in-context example (S may be 0: only
            prompt tokens).
        segment_ids: ``(B, L)`` int32/int64, the example each token belongs to (negative, e.g.
            ``-1``, for the prompt).
        beta: the bias per unit of reward, a finite real number (for a learned beta, scale the
            rewards: ``segment_bias(beta * rewards, segment_ids)``).

    Returns:
        ``(B, L)`` in rewards' dtype.

    Raises:
        TypeError: rewards or segment_ids not a tensor, beta not a real number (a bool, string
        or tensor). ValueError: wrong shapes or dtypes, batch sizes that differ, mixed devices,
        a NaN or infinite beta. IndexError: a segment id >= S.

    Example:
        >>> bias = alignkern.segment_bias(torch.tensor([[0.2, 0.9]]),
        ...                               torch.tensor([[-1, -1, 0, 0, 1, 1]]), beta=4.0)
        >>> out = alignkern.reward_attention(q, k, v, key_bias=bias)
    """
    _check_segments("segment_bias", rewards, segment_ids)
    beta = _checks.real("segment_bias", "beta", beta)
    if rewards.shape[1] == 0:  # S = 0: every token is prompt (ids < 0); gather needs one column
        rewards = torch.nn.functional.pad(rewards, (0, 1))
    return reference.segment_bias(rewards, segment_ids, beta)


def _check_segments(fn: str, rewards, segment_ids) -> None:
    """rewards ``(B, S)`` float and segment_ids ``(B, L)`` int32/int64 below S, on one device:
    TypeError for a non-tensor, ValueError for a wrong shape or dtype, IndexError for an id >= S
    (not checked under torch.compile)."""
    _checks.tensor(fn, "rewards", rewards)
    _checks.tensor(fn, "segment_ids", segment_ids)
    if rewards.dim() != 2 or not rewards.is_floating_point():
        raise ValueError(f"{fn}: rewards must be a (B, S) floating-point tensor, got "
                         f"{_checks.describe(rewards)}")
    if segment_ids.dim() != 2 or segment_ids.dtype not in _checks.INDEX_DTYPES:
        raise ValueError(f"{fn}: segment_ids must be a (B, L) int32/int64 tensor, got "
                         f"{_checks.describe(segment_ids)}")
    if segment_ids.shape[0] != rewards.shape[0]:
        raise ValueError(f"{fn}: batch sizes differ: rewards {_shape(rewards)}, segment_ids "
                         f"{_shape(segment_ids)}")
    _checks.same_device(fn, rewards=rewards, segment_ids=segment_ids)
    if not torch.compiler.is_compiling() and segment_ids.numel() and \
            int(segment_ids.max()) >= rewards.shape[1]:
        raise IndexError(f"{fn}: segment_ids must be < S = {rewards.shape[1]} (or negative for "
                         f"the prompt), got {int(segment_ids.max())}")
