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

import math
from typing import NamedTuple

import torch

from .. import _backend, reference

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MAX_HEAD_DIM = 256
CUDA_HEAD_DIMS = (16, 32, 64, 128)


class RewardAttention(NamedTuple):
    """What ``reward_attention(..., return_lse=True)`` returns."""

    out: torch.Tensor
    lse: torch.Tensor


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- validation


def _shape(x) -> tuple:
    return tuple(x.shape)


def _validate(q, k, v, key_bias, key_rank, query_rank, scale) -> None:
    """DESIGN.md's error contract; every message names the argument, the expected and the got."""
    name = "reward_attention"
    for arg, value in (("q", q), ("k", k), ("v", v)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(value).__name__}")
        if value.dim() != 4:
            raise ValueError(f"{name}: {arg} must be 4-D (B, H, L, D), got shape {_shape(value)}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: q must be float32, float16, bfloat16 or float64, got {q.dtype}")
    for arg, value in (("k", k), ("v", v)):
        if value.dtype != q.dtype:
            raise TypeError(f"{name}: {arg} must have q's dtype ({q.dtype}), got {value.dtype}")
    batch, heads_q, len_q, head_dim = q.shape
    if _shape(k) != _shape(v):
        raise ValueError(f"{name}: k and v must have the same shape, got k {_shape(k)} and v "
                         f"{_shape(v)}")
    if k.shape[0] != batch:
        raise ValueError(f"{name}: batch sizes differ: q has B = {batch} (shape {_shape(q)}), k "
                         f"has B = {k.shape[0]} (shape {_shape(k)})")
    if k.shape[3] != head_dim:
        raise ValueError(f"{name}: head dims differ: q has D = {head_dim}, k and v have D = "
                         f"{k.shape[3]}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"{name}: head dim D must be in [1, {MAX_HEAD_DIM}], got {head_dim}")
    heads_kv, len_k = k.shape[1], k.shape[2]
    if heads_kv == 0 or heads_q % heads_kv != 0:
        raise ValueError(f"{name}: the query heads Hq = {heads_q} must be a multiple of the "
                         f"key/value heads Hkv = {heads_kv}")
    if key_bias is not None:
        if not isinstance(key_bias, torch.Tensor) or not key_bias.is_floating_point():
            got = key_bias.dtype if isinstance(key_bias, torch.Tensor) else type(key_bias).__name__
            raise TypeError(f"{name}: key_bias must be a floating-point tensor, got {got}")
        if _shape(key_bias) not in ((batch, len_k), (batch, heads_q, len_k)):
            raise ValueError(f"{name}: key_bias must have shape (B, Lk) = {(batch, len_k)} or "
                             f"(B, Hq, Lk) = {(batch, heads_q, len_k)}, got {_shape(key_bias)}")
    if (key_rank is None) != (query_rank is None):
        raise ValueError(f"{name}: key_rank and query_rank go together: got only "
                         f"{'key_rank' if query_rank is None else 'query_rank'}")
    if key_rank is not None:
        for arg, value, length in (("key_rank", key_rank, len_k), ("query_rank", query_rank, len_q)):
            if not isinstance(value, torch.Tensor) or value.dtype == torch.bool or value.is_complex():
                got = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
                raise TypeError(f"{name}: {arg} must be a real-valued tensor, got {got}")
            if _shape(value) != (batch, length):
                raise ValueError(f"{name}: {arg} must have shape (B, L) = {(batch, length)}, got "
                                 f"{_shape(value)}")
    tensors = [("q", q), ("k", k), ("v", v), ("key_bias", key_bias), ("key_rank", key_rank),
               ("query_rank", query_rank)]
    devices = {arg: t.device for arg, t in tensors if t is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{arg} on {device}" for arg, device in devices.items())
        raise ValueError(f"{name}: all tensors must be on the same device, got {listed}")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"{name}: scale must be finite, got {scale}")


def _check_backend(backend: str, q: torch.Tensor) -> str:
    if backend == "auto":
        return _backend.resolve_backend(q.device)
    reason = _backend.unavailable_reason(backend, q.device)
    if reason is not None:
        raise RuntimeError(f"alignkern backend {backend!r} is not available: {reason}")
    if backend == "cuda" and (q.dtype == torch.float64 or q.shape[-1] not in CUDA_HEAD_DIMS):
        raise TypeError(
            "reward_attention: the cuda backend takes float32, float16 or bfloat16 with head dim "
            f"16, 32, 64 or 128, got {q.dtype} with D = {q.shape[-1]} (use the triton backend)"
        )
    return backend


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


def _prepare(q, k, v, key_bias, key_rank, query_rank) -> _Inputs:
    acc = _accumulation_dtype(q.dtype)
    bias = None
    if key_bias is not None:
        bias = key_bias[:, None] if key_bias.dim() == 2 else key_bias
        bias = bias.to(acc).contiguous()
    ranks = [None if r is None else r.to(torch.float64).contiguous() for r in (key_rank, query_rank)]
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
        grad_out = grad_out.contiguous()
        lse = lse.to(acc).contiguous()
        dq, dk, dv = (_poisoned(t.shape, q.dtype, q.device) for t in (q, k, v))
        dbias = _poisoned((q.shape[0], q.shape[1], k.shape[2]), acc, q.device) \
            if need_bias_grad else None
        if backend == "cpu":
            # Named so that they stay alive while the kernel reads them.
            glse = None if grad_lse is None else grad_lse.to(acc).contiguous()
            out = out.contiguous()
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
    _validate(q, k, v, key_bias, key_rank, query_rank, scale)
    backend = _check_backend(backend, q)
    return _run_forward(q, k, v, key_bias, key_rank, query_rank, causal, scale, backend)


@_reward_attention_op.register_fake
def _reward_attention_fake(q, k, v, key_bias, key_rank, query_rank, causal, scale, backend):
    torch._check(q.dim() == 4 and k.dim() == 4, lambda: "reward_attention: q, k must be 4-D")
    torch._check(q.shape[3] == k.shape[3], lambda: "reward_attention: head dims differ")
    torch._check(q.shape[1] % k.shape[1] == 0,
                 lambda: "reward_attention: Hq must be a multiple of Hkv")
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
    backend = _check_backend(backend, q)
    return _run_backward(grad_out, grad_lse, q, k, v, key_bias, key_rank, query_rank, out, lse,
                         causal, scale, need_bias_grad, backend)


@_reward_attention_backward_op.register_fake
def _reward_attention_backward_fake(grad_out, grad_lse, q, k, v, key_bias, key_rank, query_rank,
                                    out, lse, causal, scale, need_bias_grad, backend):
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
        key_rank, query_rank: ``(B, Lk)`` and ``(B, Lq)`` real numbers (e.g. rewards), together.
        causal: bottom-right aligned causal mask. scale: default ``D ** -0.5``.
        return_lse: also return ``lse (B, Hq, Lq)``, float32 (differentiable too).

    Returns:
        ``out (B, Hq, Lq, D)`` in q's dtype, or ``RewardAttention(out, lse)``. Gradients flow to
        q, k, v and key_bias (deterministically: no float atomics); ranks take none.

    Raises:
        TypeError: non-float or mismatched dtypes, non-real ranks. ValueError: shapes (batch or
        head dims that disagree, Hq not a multiple of Hkv, ranks or bias of the wrong shape, only
        one of the ranks), mixed devices, a non-finite scale. RuntimeError: backend unavailable.

    Example:
        >>> out = alignkern.reward_attention(q, k, v, key_bias=alignkern.segment_bias(
        ...     rewards, segment_ids, beta=2.0))
    """
    scale = q.shape[-1] ** -0.5 if scale is None and isinstance(q, torch.Tensor) else scale
    if torch.compiler.is_compiling():
        backend = "auto"  # resolved when the compiled graph runs, not when it is traced
    else:
        _validate(q, k, v, key_bias, key_rank, query_rank, scale)
        backend = _check_backend("auto", q)
    out, lse = _reward_attention_op(q, k, v, key_bias, key_rank, query_rank, bool(causal),
                                    float(scale), backend)
    return RewardAttention(out, lse) if return_lse else out


def segment_bias(rewards: torch.Tensor, segment_ids: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Per-token key bias ``(B, L)`` from per-example rewards: ``beta * rewards[b, segment_ids]``,
    0 for tokens whose segment id is negative (the prompt). Differentiable in ``rewards``.

    Args:
        rewards: ``(B, S)`` float, the reward of each in-context example.
        segment_ids: ``(B, L)`` int, the example each token belongs to (``-1`` for the prompt).
        beta: the bias per unit of reward.

    Example:
        >>> bias = alignkern.segment_bias(torch.tensor([[0.2, 0.9]]),
        ...                               torch.tensor([[-1, -1, 0, 0, 1, 1]]), beta=4.0)
        >>> out = alignkern.reward_attention(q, k, v, key_bias=bias)
    """
    name = "segment_bias"
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 2 or not rewards.is_floating_point():
        got = (f"{rewards.dtype} of shape {_shape(rewards)}" if isinstance(rewards, torch.Tensor)
               else type(rewards).__name__)
        raise ValueError(f"{name}: rewards must be a (B, S) floating-point tensor, got {got}")
    if not isinstance(segment_ids, torch.Tensor) or segment_ids.dim() != 2 or \
            segment_ids.dtype not in (torch.int32, torch.int64):
        got = (f"{segment_ids.dtype} of shape {_shape(segment_ids)}"
               if isinstance(segment_ids, torch.Tensor) else type(segment_ids).__name__)
        raise ValueError(f"{name}: segment_ids must be a (B, L) int32/int64 tensor, got {got}")
    if segment_ids.shape[0] != rewards.shape[0]:
        raise ValueError(f"{name}: batch sizes differ: rewards {_shape(rewards)}, segment_ids "
                         f"{_shape(segment_ids)}")
    if segment_ids.device != rewards.device:
        raise ValueError(f"{name}: rewards on {rewards.device} and segment_ids on "
                         f"{segment_ids.device} must be on the same device")
    if not torch.compiler.is_compiling() and segment_ids.numel() and \
            int(segment_ids.max()) >= rewards.shape[1]:
        raise IndexError(f"{name}: segment_ids must be < S = {rewards.shape[1]} (or negative for "
                         f"the prompt), got {int(segment_ids.max())}")
    return reference.segment_bias(rewards, segment_ids, beta)
