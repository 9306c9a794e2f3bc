"""``linear_logprobs``: log-probabilities of a few chosen tokens straight from hidden states and the
LM head, never materialising the ``(N, V)`` logits (the scoring functions built on it are in
``ops/scoring.py``).

Registered ops:
  ``alignkern::linear_logprobs(hidden, weight, targets, bias, temperature, softcap, logit_scale,
  ignore_index, backend) -> (out, row_max, log_sum)``
  ``alignkern::linear_logprobs_backward(grad_out, grad_lse, hidden, weight, targets, bias, row_max,
  log_sum, temperature, softcap, logit_scale, ignore_index, need_hidden_grad, need_weight_grad,
  need_bias_grad, backend, grad_entropy=None, entropy=None) -> (grad_hidden, grad_weight,
  grad_bias)``; a gradient that is not needed comes back with 0 elements, and ``grad_bias`` has 0
  elements when there is no bias.
  ``alignkern::linear_logprobs_stats(...)``: the same with the fused statistics (see below).
The log-sum-exp of each row comes in two parts, ``lse = row_max + log_sum``, as token_logprobs'
does (ops/token_logprobs.py says why; ``row_max`` carries no gradient, ``log_sum`` the LSE's).

The logits are ``z = softcap * tanh(logit_scale * (hidden @ weight.T + bias) / softcap) / T``
(no tanh without a softcap). Without a softcap the kernels get ``logit_scale`` folded into the
temperature (``T / logit_scale``), so the scale costs no pass over the logits.

Backends: ``triton`` (fused tl.dot kernels), ``cuda`` (tensor-core forward from csrc/cuda; its
backward runs the Triton kernels), ``cpu`` (``linear_logprobs_cpu``: BLAS GEMMs over tiles of
at most 4 MiB of logits), ``reference``. On the triton and cuda paths the kernels compute only
the log-sum-exp and the dense part of the gradient; the K target logits are one dot product each
(``_target_logits``) and the K target columns of the gradient are written afterwards
(``ops/_targets.py``), so the cost is O(N·(V + K)·H) for any K.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import torch

from .. import _autocast, _backend, _checks, reference
from . import _logit_stats, _targets
from . import linear_logprobs_cpu as _cpu
from . import token_logprobs as _tokens

SUPPORTED_DTYPES = _checks.FLOAT_DTYPES
# One chunk of dlogits (in the inputs' dtype) in the Triton backward before its two GEMMs; under
# the interpreter (CPU tensors) the cpu backend's tile size.
GPU_CHUNK_BYTES = 256 * 2**20
# Gathered hidden rows and LM-head rows per chunk when the target logits are computed one dot
# product each (the triton and cuda paths).
TARGET_CHUNK_BYTES = 64 * 2**20


class LinearLogprobs(NamedTuple):
    """What ``linear_logprobs(..., return_lse=True)`` returns."""

    logprobs: torch.Tensor
    lse: torch.Tensor


class LinearLogprobsStats(NamedTuple):
    """What ``linear_logprobs(..., stats=...)`` returns; the statistics not asked for are None."""

    logprobs: torch.Tensor
    lse: torch.Tensor
    entropy: torch.Tensor | None
    log_sum_sq_probs: torch.Tensor | None
    mean_logits: torch.Tensor | None
    is_top1: torch.Tensor | None
    max_logits: torch.Tensor | None = None


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- validation


def _check_inputs(fn, hidden, weight, targets, bias, temperature, softcap, logit_scale,
                  ignore_index):
    """docs/design.md's error contract for the forward's arguments; every message names the argument,
    the expected and the got. Returns ``(temperature, softcap, logit_scale, ignore_index)`` as
    Python numbers."""
    _checks.tensor(fn, "hidden", hidden, dtypes=SUPPORTED_DTYPES)
    _checks.tensor(fn, "weight", weight)
    _checks.tensor(fn, "targets", targets, dtypes=_tokens.TARGET_DTYPES)
    _checks.optional_tensor(fn, "bias", bias)
    if weight.dim() != 2:
        raise ValueError(f"{fn}: weight must be the 2-D LM head (V, H), got shape "
                         f"{tuple(weight.shape)}")
    if hidden.dim() < 1:
        raise ValueError(f"{fn}: hidden must have shape (..., H), got a 0-d tensor")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{fn}: hidden size mismatch: hidden has H = {hidden.shape[-1]} (shape "
            f"{tuple(hidden.shape)}) but weight (V, H) has H = {weight.shape[1]} (shape "
            f"{tuple(weight.shape)})"
        )
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"{fn}: weight must have a non-empty vocabulary and hidden size, got "
                         f"shape {tuple(weight.shape)}")
    _check_head_dtypes(fn, hidden, weight, bias)
    lead = tuple(hidden.shape[:-1])
    shape = tuple(targets.shape)
    if not (shape == lead or (len(shape) == len(lead) + 1 and shape[:-1] == lead)):
        raise ValueError(
            f"{fn}: targets must have shape {lead} or {lead + ('K',)} to match hidden of shape "
            f"{tuple(hidden.shape)}, got {shape}"
        )
    if bias is not None:
        _checks.shape(fn, "bias", bias, (weight.shape[0],), "(V,), V from weight")
    _checks.same_device(fn, hidden=hidden, weight=weight, targets=targets, bias=bias)
    return _check_scalars(fn, temperature, softcap, logit_scale, ignore_index)


# The dtypes a head may have below the hidden states' (each holds the head's values exactly).
LOWER_PRECISION_HEADS = {
    torch.float32: (torch.float16, torch.bfloat16),
    torch.float64: (torch.float32, torch.float16, torch.bfloat16),
}


def head_dtype_ok(hidden_dtype: torch.dtype, weight_dtype: torch.dtype) -> bool:
    """The head has the hidden states' dtype, or a lower precision that theirs holds exactly."""
    return weight_dtype == hidden_dtype or weight_dtype in LOWER_PRECISION_HEADS.get(hidden_dtype,
                                                                                      ())


def _check_head_dtypes(fn, hidden, weight, bias) -> None:
    """``weight`` has hidden's dtype or a lower precision (a bfloat16 head under float32 hidden
    states: each tile is converted in the kernel, the head never copied); ``bias`` has the dtype
    of hidden or of weight."""
    if not head_dtype_ok(hidden.dtype, weight.dtype):
        lower = LOWER_PRECISION_HEADS.get(hidden.dtype, ())
        allowed = str(hidden.dtype).removeprefix("torch.") + "".join(
            f" or {str(d).removeprefix('torch.')}" for d in lower)
        raise TypeError(f"{fn}: weight must have the dtype of hidden or a lower precision that it "
                        f"holds exactly ({allowed}), got {weight.dtype} (cast the hidden states, "
                        f"not the head, to mix them the other way)")
    if bias is not None and bias.dtype not in (hidden.dtype, weight.dtype):
        raise TypeError(f"{fn}: bias must have the dtype of hidden ({hidden.dtype}) or of weight "
                        f"({weight.dtype}), got {bias.dtype}")


def _check_scalars(fn, temperature, softcap, logit_scale, ignore_index):
    temperature = _checks.temperature(fn, temperature)
    softcap = _checks.real(fn, "softcap", softcap, positive=True, optional=True)
    logit_scale = _checks.real(fn, "logit_scale", logit_scale, positive=True)
    _checks.logit_factors(fn, temperature, logit_scale, softcap)
    return temperature, softcap, logit_scale, _checks.integer(fn, "ignore_index", ignore_index)


def _check_backend(backend: str, hidden: torch.Tensor, fn: str = "linear_logprobs") -> str:
    """The backend to run (see alignkern._backend); the cuda kernels take no float64."""
    backend = _backend.backend_for(fn, backend, hidden.device)
    if backend == "cuda" and hidden.dtype == torch.float64:
        raise TypeError(
            f"{fn}: the cuda backend takes float32, float16 or bfloat16 inputs, got "
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


def _target_logits(hidden, weight, bias, ids, softcap, logit_scale, acc) -> torch.Tensor:
    """The logit at each target id after bias, logit_scale and softcap, ``(N, K)`` in ``acc``: one
    dot product per (row, id) pair, in chunks of at most ``TARGET_CHUNK_BYTES`` of gathered
    operands, so the cost is O(N·K·H) however large V is (ids out of range are clamped; callers
    mask them)."""
    n_rows, k = ids.shape
    vocab, hidden_size = weight.shape
    rows = torch.arange(n_rows, device=ids.device).repeat_interleave(k)
    columns = ids.clamp(0, vocab - 1).reshape(-1)
    out = torch.empty(n_rows * k, dtype=acc, device=hidden.device)
    step = max(1, TARGET_CHUNK_BYTES // (2 * hidden_size * acc.itemsize))
    for start in range(0, n_rows * k, step):
        pair = slice(start, start + step)
        dots = torch.linalg.vecdot(hidden[rows[pair]].to(acc), weight[columns[pair]].to(acc))
        if bias is not None:
            dots += bias[columns[pair]].to(acc)
        out[pair] = dots
    if logit_scale != 1.0:
        out *= logit_scale
    if softcap is not None:
        out = softcap * torch.tanh(out / softcap)
    return out.reshape(n_rows, k)


# ----------------------------------------------------------------------------- triton backend


def _gpu_forward(hidden, weight, bias, temperature, softcap, logit_scale, backend, acc,
                 stats=frozenset()) -> _logit_stats.Partials:
    """Each row's log-sum-exp (row maximum and log-sum) and the requested statistics' partials,
    by the CUDA kernel (one part) or the Triton kernel (one part per vocabulary split)."""
    stats = _logit_stats.kernel_stats(stats)
    same_dtypes = weight.dtype == hidden.dtype and (bias is None or bias.dtype == hidden.dtype)
    if backend == "cuda" and same_dtypes:  # a lower-precision head: the Triton kernel converts it
        return _cuda_forward(hidden, weight, bias, temperature, softcap, logit_scale, acc, stats)
    from ..triton_kernels import linear_logprobs as kernels

    return _logit_stats.Partials(*kernels.linear_logprobs_fwd(
        hidden, weight, bias, temperature, softcap, logit_scale, stats))


def _cuda_forward(hidden, weight, bias, temperature, softcap, logit_scale, acc, stats):
    n_rows, device = hidden.shape[0], hidden.device

    def buffer(name, dtype=acc):
        if name not in stats:
            return None
        return torch.full((1, n_rows), -1 if dtype == torch.int64 else math.nan, dtype=dtype,
                          device=device)

    parts = _logit_stats.Partials(
        _tokens._poisoned((1, n_rows), acc, device), _tokens._poisoned((1, n_rows), acc, device),
        buffer("entropy"), buffer("log_sum_sq_probs"), buffer("mean_logits"), buffer("is_top1"),
        buffer("is_top1", torch.int64))
    with torch.cuda.device(device):
        _backend.extension().linear_logprobs_lse_cuda(
            hidden.data_ptr(), hidden.stride(0), weight.data_ptr(), weight.stride(0),
            0 if bias is None else bias.data_ptr(), _backend.DTYPE_CODES[hidden.dtype],
            n_rows, weight.shape[0], weight.shape[1], parts.row_max.data_ptr(),
            parts.log_sum.data_ptr(), float(temperature),
            0.0 if softcap is None else float(softcap), float(logit_scale),
            _backend.cuda_stream(device),
            *(0 if x is None else x.data_ptr() for x in parts[2:]))
    return parts


def _triton_backward(g, coef, hidden, weight, ids, valid, bias, row_max, log_sum, temperature,
                     softcap, logit_scale, need_hidden, need_weight, need_bias, acc,
                     entropy_grad=None):
    """Same contract as ``linear_logprobs_cpu.backward``."""
    from ..triton_kernels import linear_logprobs as kernels

    n_rows, (vocab, hidden_size) = hidden.shape[0], weight.shape
    # dlogits feed the GEMMs in the inputs' dtype (as in PyTorch's own backward); cuBLAS
    # accumulates in fp32 within a chunk.
    grad_hidden = hidden.new_empty((n_rows, hidden_size)) if need_hidden else None
    grad_weight = weight.new_zeros((vocab, hidden_size)) if need_weight else None
    grad_bias = torch.zeros((vocab,), dtype=acc, device=hidden.device) if need_bias else None
    capped = _target_logits(hidden, weight, bias, ids, softcap, logit_scale, acc)
    squash = None if softcap is None else 1.0 - (capped / softcap).square()
    inv_t = 1.0 / temperature
    budget = GPU_CHUNK_BYTES if hidden.is_cuda else _cpu.TILE_BYTES
    for rows in _row_chunks(n_rows, vocab * hidden.element_size(), budget):
        h = hidden[rows]
        dlogits, flat = _targets.gradient_buffer(h.shape[0], vocab, hidden.dtype, hidden.device)
        entropy_rows = None if entropy_grad is None else entropy_grad[rows]
        kernels.linear_logprobs_dlogits(h, weight, bias, coef[rows], row_max[rows], log_sum[rows],
                                        dlogits, temperature, softcap, logit_scale, entropy_rows)
        # d z / d logits = logit_scale / T (times the softcap's derivative)
        _targets.write_target_columns(flat, vocab, ids[rows], valid[rows], g[rows], coef[rows],
                                      capped[rows] * inv_t - row_max[rows, None], log_sum[rows],
                                      inv_t * logit_scale,
                                      None if squash is None else squash[rows], entropy_rows)
        _dlogits_gemms(dlogits, h, weight, grad_hidden, rows, grad_weight)
        if grad_bias is not None:
            grad_bias += dlogits.sum(0, dtype=acc)
    return grad_hidden, grad_weight, grad_bias


def _dlogits_gemms(dlogits, h, weight, grad_hidden, rows, grad_weight) -> None:
    """``grad_hidden[rows] = dlogits @ weight`` and ``grad_weight += dlogits.T @ h`` (either may
    be None). A head of lower precision than ``dlogits`` (hidden's dtype) is converted block by
    block, at most ``TARGET_CHUNK_BYTES`` at a time, never as a whole."""
    if weight.dtype == dlogits.dtype:
        if grad_hidden is not None:
            torch.mm(dlogits, weight, out=grad_hidden[rows])
        if grad_weight is not None:
            grad_weight.addmm_(dlogits.T, h)
        return
    vocab, hidden_size = weight.shape
    if grad_hidden is not None:
        grad_hidden[rows] = 0
    step = max(1, TARGET_CHUNK_BYTES // (hidden_size * dlogits.element_size()))
    for start in range(0, vocab, step):
        block = slice(start, start + step)
        if grad_hidden is not None:
            grad_hidden[rows] += dlogits[:, block] @ weight[block].to(dlogits.dtype)
        if grad_weight is not None:
            grad_weight[block] += (dlogits[:, block].T @ h).to(grad_weight.dtype)


# ----------------------------------------------------------------------------- reference backend


def _reference_backward(grad_out, grad_lse, hidden, weight, ids, bias, row_max, log_sum,
                        temperature, softcap, logit_scale, ignore_index, need_hidden, need_weight,
                        need_bias, grad_entropy=None):
    acc = _accumulation_dtype(hidden.dtype)
    logits = reference.linear_logits(hidden, weight, bias, softcap, logit_scale)
    dlogits = reference.token_logprobs_backward(
        grad_out.reshape(ids.shape), None if grad_lse is None else grad_lse.reshape(-1), logits,
        ids, row_max, log_sum, temperature, ignore_index,
    )
    if grad_entropy is not None:  # d entropy / d logits = -p (log p + entropy) / T
        log_p = torch.log_softmax(logits / temperature, dim=-1)
        p = log_p.exp()
        entropy = -(p * log_p).sum(-1, keepdim=True)
        dlogits = dlogits - grad_entropy[:, None] * p * (log_p + entropy) / temperature
    if softcap is not None:
        dlogits = dlogits * (1.0 - (logits / softcap) ** 2)
    dlogits = dlogits * logit_scale
    grad_hidden = dlogits @ weight.to(acc) if need_hidden else None
    grad_weight = dlogits.T @ hidden.to(acc) if need_weight else None
    grad_bias = dlogits.sum(0) if need_bias else None
    return grad_hidden, grad_weight, grad_bias


# ----------------------------------------------------------------------------- registered ops


def _fold_scale(temperature, softcap, logit_scale):
    """``(temperature, logit_scale)`` for the kernels: without a softcap ``z = s x / T = x / (T / s)``,
    so the scale rides on the temperature and costs no pass over the logits."""
    return (temperature / logit_scale, 1.0) if softcap is None else (temperature, logit_scale)


def _run_forward(hidden, weight, targets, bias, temperature, softcap, logit_scale, ignore_index,
                 backend, stats=frozenset(), keep=False):
    """``(logprobs, row_max, log_sum, LogitStats, kept)`` shaped like ``targets`` and
    ``hidden.shape[:-1]``; ``kept``: with ``keep`` (cpu backend only) the call's logits ``(N, V)``
    for the backward (``linear_logprobs_cpu``), else a 0-element tensor."""
    no_logits = hidden.new_empty((0,), dtype=_accumulation_dtype(hidden.dtype))
    if backend == "reference" and not stats:
        return (*reference.linear_logprobs(hidden, weight, targets, bias, temperature, softcap,
                                           ignore_index, logit_scale), _logit_stats.LogitStats(),
                no_logits)
    if backend == "reference":
        out, row_max, log_sum, ref_stats = reference.linear_logprobs_stats(
            hidden, weight, targets, bias, temperature, softcap, ignore_index, logit_scale)
        return out, row_max, log_sum, _logit_stats.LogitStats(
            *(ref_stats[name] if name in stats else None for name in _logit_stats.STATS)), \
            no_logits
    temperature, logit_scale = _fold_scale(temperature, softcap, logit_scale)
    h, w, ids = _as_matrix(hidden), _as_matrix(weight), _target_rows(targets, hidden)
    bias = None if bias is None else bias.contiguous()
    acc = _accumulation_dtype(hidden.dtype)
    kept = None
    if backend == "cpu":
        out, row_max, log_sum, row_stats, kept = _cpu.forward(
            h, w, ids, bias, temperature, softcap, logit_scale, acc, ignore_index, stats, keep)
    else:
        valid, out_of_range = _targets.target_masks(ids, w.shape[0], ignore_index)
        parts = _gpu_forward(h, w, bias, temperature, softcap, logit_scale, backend, acc, stats)
        row_max, log_sum = _logit_stats.merge_parts(parts.row_max, parts.log_sum)
        row_stats = (_logit_stats.merge(parts, row_max, log_sum, w.shape[0], ids, valid) if stats
                     else _logit_stats.LogitStats())
        z = _target_logits(h, w, bias, ids, softcap, logit_scale, acc) * (1.0 / temperature)
        # A log-probability is at most 0; on the GPU path z and the LSE come from different
        # summation orders, so z can exceed the LSE by a rounding error where p is close to 1.
        out = ((z - row_max[:, None]) - log_sum[:, None]).clamp_(max=0.0)
        out = out.masked_fill_(~valid, 0.0).masked_fill_(out_of_range, math.nan)
    lead = hidden.shape[:-1]
    row_stats = _logit_stats.LogitStats(*(
        None if x is None or name not in stats
        else x.reshape(targets.shape if name == "is_top1" else lead)
        for name, x in zip(_logit_stats.STATS, row_stats)))
    return (out.reshape(targets.shape), row_max.reshape(lead), log_sum.reshape(lead), row_stats,
            no_logits if kept is None else kept)


def _run_backward(grad_out, grad_lse, hidden, weight, targets, bias, row_max, log_sum,
                  temperature, softcap, logit_scale, ignore_index, need_hidden, need_weight,
                  need_bias, backend, grad_entropy=None, entropy=None, kept_logits=None,
                  kept_are_probs=False):
    h, w, ids = _as_matrix(hidden), _as_matrix(weight), _target_rows(targets, hidden)
    bias = None if bias is None else bias.contiguous()
    acc = _accumulation_dtype(hidden.dtype)
    row_max = row_max.reshape(-1).to(acc).contiguous()
    log_sum = log_sum.reshape(-1).to(acc).contiguous()
    need_bias = need_bias and bias is not None
    grad_entropy = None if grad_entropy is None else grad_entropy.reshape(-1).to(acc).contiguous()
    if backend == "reference":
        grads = _reference_backward(grad_out, grad_lse, h, w, ids, bias, row_max, log_sum,
                                    temperature, softcap, logit_scale, ignore_index, need_hidden,
                                    need_weight, need_bias, grad_entropy)
    else:  # cuda's backward is the Triton path until a CUDA backward exists
        temperature, logit_scale = _fold_scale(temperature, softcap, logit_scale)
        g, coef, valid = _targets.gradient_terms(grad_out, grad_lse, ids, w.shape[0],
                                                 ignore_index, acc)
        if grad_entropy is not None:
            # d entropy / d z_v = -p_v ((z_v - row_max) - log_sum + H): the row constant joins
            # coef, the kernels add the (z_v - row_max) term
            coef = coef + grad_entropy * (entropy.reshape(-1).to(acc) - log_sum)
        args = (g, coef, h, w, ids, valid, bias, row_max, log_sum, temperature, softcap,
                logit_scale, need_hidden, need_weight, need_bias, acc, grad_entropy)
        if backend == "cpu":
            kept = kept_logits if kept_logits is not None and kept_logits.numel() else None
            grads = _cpu.backward(*args, kept=kept, kept_are_probs=kept_are_probs)
        else:
            grads = _triton_backward(*args)
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
    logit_scale: float,
    ignore_index: int,
    keep_logits: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    fn = "linear_logprobs"
    temperature, softcap, logit_scale, ignore_index = _check_inputs(
        fn, hidden, weight, targets, bias, temperature, softcap, logit_scale, ignore_index)
    backend = _check_backend(backend, hidden)
    _check_keep(fn, keep_logits, backend)
    _tokens._check_target_ids(targets, weight.shape[0], ignore_index, fn)
    out, row_max, log_sum, _, kept = _run_forward(hidden, weight, targets, bias, temperature,
                                                  softcap, logit_scale, ignore_index, backend,
                                                  keep=keep_logits)
    return out, row_max, log_sum, kept


def _check_keep(fn: str, keep_logits, backend: str) -> None:
    """``keep_logits`` is a bool, and True only where the backend keeps them (cpu)."""
    _checks.boolean(fn, "keep_logits", keep_logits)
    if keep_logits and backend != "cpu":
        raise ValueError(f"{fn}: keep_logits=True is for the cpu backend (its backward reads "
                         f"them), got backend {backend!r}")


def _kept_shape(hidden, weight, keep_logits: bool) -> tuple:
    """The shape of the kept-logits output: ``(N, V)``, or ``(0,)`` when not kept."""
    return (math.prod(hidden.shape[:-1]), weight.shape[0]) if keep_logits else (0,)


def _fake_checks(fn, hidden, weight, targets, **others) -> None:
    _checks.same_device_in_fake(fn, hidden=hidden, weight=weight, targets=targets, **others)
    torch._check(weight.dim() == 2, lambda: f"{fn}: weight must be 2-D (V, H)")
    torch._check(
        hidden.shape[-1] == weight.shape[1],
        lambda: f"{fn}: hidden size mismatch, hidden {tuple(hidden.shape)} vs weight "
        f"{tuple(weight.shape)}",
    )
    torch._check(head_dtype_ok(hidden.dtype, weight.dtype),
                 lambda: f"{fn}: weight must have hidden's dtype or a lower precision")
    torch._check(
        targets.dtype in _tokens.TARGET_DTYPES,
        lambda: f"{fn}: targets must be int32 or int64, got {targets.dtype}",
    )
    lead = hidden.shape[:-1]
    torch._check(
        tuple(targets.shape) == tuple(lead) or tuple(targets.shape[:-1]) == tuple(lead),
        lambda: f"{fn}: targets shape {tuple(targets.shape)} does not match hidden "
        f"{tuple(hidden.shape)}",
    )


@_linear_logprobs_op.register_fake
def _linear_logprobs_fake(hidden, weight, targets, bias, temperature, softcap, logit_scale,
                          ignore_index, keep_logits, backend):
    _fake_checks("linear_logprobs", hidden, weight, targets, bias=bias)
    acc = _accumulation_dtype(hidden.dtype)
    lead = hidden.shape[:-1]
    return (hidden.new_empty(targets.shape, dtype=acc), hidden.new_empty(lead, dtype=acc),
            hidden.new_empty(lead, dtype=acc),
            hidden.new_empty(_kept_shape(hidden, weight, keep_logits), dtype=acc))


@torch.library.custom_op("alignkern::linear_logprobs_backward", mutates_args=())
def _linear_logprobs_backward_op(
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    row_max: torch.Tensor,
    log_sum: torch.Tensor,
    temperature: float,
    softcap: float | None,
    logit_scale: float,
    ignore_index: int,
    need_hidden_grad: bool,
    need_weight_grad: bool,
    need_bias_grad: bool,
    backend: str,
    grad_entropy: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    kept_logits: torch.Tensor | None = None,
    kept_are_probs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    fn = "linear_logprobs_backward"
    temperature, softcap, logit_scale, ignore_index = _check_inputs(
        fn, hidden, weight, targets, bias, temperature, softcap, logit_scale, ignore_index)
    _tokens._check_gradients(fn, grad_out, grad_lse, row_max, log_sum, targets, "hidden", hidden)
    _check_entropy_gradient(fn, grad_entropy, entropy, log_sum)
    for arg, value in (("need_hidden_grad", need_hidden_grad),
                       ("need_weight_grad", need_weight_grad), ("need_bias_grad", need_bias_grad)):
        _checks.boolean(fn, arg, value)
    backend = _check_backend(backend, hidden, fn)
    _check_kept_logits(fn, kept_logits, hidden, weight, backend)
    _checks.boolean(fn, "kept_are_probs", kept_are_probs)
    if kept_are_probs and (softcap is not None or grad_entropy is not None):
        raise ValueError(f"{fn}: kept_are_probs=True (kept_logits holds the softmax) takes no "
                         f"softcap and no entropy gradient, whose derivatives need the logits; got "
                         f"softcap={softcap}, grad_entropy={_described(grad_entropy)}")
    return _run_backward(grad_out, grad_lse, hidden, weight, targets, bias, row_max, log_sum,
                         temperature, softcap, logit_scale, ignore_index, need_hidden_grad,
                         need_weight_grad, need_bias_grad, backend, grad_entropy, entropy,
                         kept_logits, kept_are_probs)


def _check_kept_logits(fn, kept_logits, hidden, weight, backend) -> None:
    """``kept_logits``: None, 0 elements, or (cpu backend) the forward's ``(N, V)`` logits in the
    accumulation dtype on hidden's device."""
    if kept_logits is None:
        return
    _checks.tensor(fn, "kept_logits", kept_logits, dtypes=(_accumulation_dtype(hidden.dtype),))
    if kept_logits.numel() == 0:
        return
    _checks.shape(fn, "kept_logits", kept_logits, _kept_shape(hidden, weight, True),
                  "(N, V): the logits the forward kept, or 0 elements")
    _checks.same_device(fn, hidden=hidden, kept_logits=kept_logits)
    if backend != "cpu":
        raise ValueError(f"{fn}: kept_logits are read by the cpu backend only, got backend "
                         f"{backend!r}")


@_linear_logprobs_backward_op.register_fake
def _linear_logprobs_backward_fake(grad_out, grad_lse, hidden, weight, targets, bias, row_max,
                                   log_sum, temperature, softcap, logit_scale, ignore_index,
                                   need_hidden_grad, need_weight_grad, need_bias_grad, backend,
                                   grad_entropy=None, entropy=None, kept_logits=None,
                                   kept_are_probs=False):
    fn = "linear_logprobs_backward"
    _fake_checks(fn, hidden, weight, targets, bias=bias, grad_out=grad_out, grad_lse=grad_lse,
                 row_max=row_max, log_sum=log_sum, grad_entropy=grad_entropy, entropy=entropy)
    torch._check(grad_out.shape == targets.shape,
                 lambda: f"{fn}: grad_out must have the shape of targets")
    for arg, value in (("row_max", row_max), ("log_sum", log_sum)):
        torch._check(value.shape == hidden.shape[:-1],
                     lambda arg=arg: f"{fn}: {arg} must have the leading shape of hidden")
    return (
        hidden.new_empty(hidden.shape) if need_hidden_grad else _empty(hidden),
        weight.new_empty(weight.shape) if need_weight_grad else _empty(hidden),
        bias.new_empty(bias.shape) if need_bias_grad and bias is not None else _empty(hidden),
    )


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, bias, *options, _keep, backend = inputs
    ctx.save_for_backward(hidden, weight, targets, bias, output[1], output[2], output[3])
    ctx.mark_non_differentiable(output[1], output[3])
    ctx.options = tuple(options)  # temperature, softcap, logit_scale, ignore_index
    ctx.backend = backend
    ctx.kept_are_probs = _cpu.keep_kind(options[1], frozenset()) == "probs"
    # No zero-filled gradients for the outputs nobody differentiates (the kept logits' would be
    # as large as the logits).
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, _grad_row_max, grad_log_sum, _grad_kept):
    hidden, weight, targets, bias, row_max, log_sum, kept = ctx.saved_tensors
    return _input_gradients(ctx, grad_out, grad_log_sum, hidden, weight, targets, bias, row_max,
                            log_sum, kept_logits=kept)


def _input_gradients(ctx, grad_out, grad_lse, hidden, weight, targets, bias, row_max, log_sum,
                     grad_entropy=None, entropy=None, kept_logits=None):
    """The gradients of the forward op's inputs (both ops' autograd), from the backward op."""
    if grad_out is None:
        grad_out = torch.zeros(targets.shape, dtype=log_sum.dtype, device=log_sum.device)
    need_hidden, need_weight, _, need_bias = ctx.needs_input_grad[:4]
    kept_are_probs = ctx.kept_are_probs and kept_logits is not None and kept_logits.numel() > 0
    grad_hidden, grad_weight, grad_bias = _linear_logprobs_backward_op(
        grad_out, grad_lse, hidden, weight, targets, bias, row_max, log_sum, *ctx.options,
        need_hidden, need_weight, need_bias, ctx.backend, grad_entropy, entropy, kept_logits,
        kept_are_probs,
    )
    return (
        grad_hidden if need_hidden else None,
        grad_weight if need_weight else None,
        None,
        grad_bias if need_bias else None,
    )


_linear_logprobs_op.register_autograd(
    lambda ctx, *grads: _backward(ctx, *grads) + (None,) * 6, setup_context=_setup_context)
_autocast.register("linear_logprobs", ("hidden", "weight", "bias"))
_autocast.register("linear_logprobs_backward")


# ----------------------------------------------------------------------------- fused statistics


def _check_entropy_gradient(fn, grad_entropy, entropy, log_sum) -> None:
    """``grad_entropy`` and ``entropy`` come together, each with the shape of ``log_sum``."""
    if (grad_entropy is None) != (entropy is None):
        raise ValueError(f"{fn}: grad_entropy and entropy must be given together, got "
                         f"grad_entropy={_described(grad_entropy)} and "
                         f"entropy={_described(entropy)}")
    for arg, value in (("grad_entropy", grad_entropy), ("entropy", entropy)):
        if value is None:
            continue
        _checks.tensor(fn, arg, value, dtypes=SUPPORTED_DTYPES)
        _checks.shape(fn, arg, value, tuple(log_sum.shape), "the shape of log_sum")
        _checks.same_device(fn, log_sum=log_sum, **{arg: value})


def _described(value) -> str:
    return "None" if value is None else f"a tensor of shape {tuple(value.shape)}"


def _stats_wanted(*flags) -> frozenset[str]:
    return frozenset(name for name, on in zip(_logit_stats.STATS, flags) if on)


@torch.library.custom_op("alignkern::linear_logprobs_stats", mutates_args=())
def _linear_logprobs_stats_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
    softcap: float | None,
    logit_scale: float,
    ignore_index: int,
    entropy: bool,
    log_sum_sq_probs: bool,
    mean_logits: bool,
    is_top1: bool,
    max_logits: bool,
    keep_logits: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor]:
    """``linear_logprobs`` (``out, row_max, log_sum``) plus the statistics flagged on, from the
    same pass over the vocabulary (a statistic not asked for comes back with 0 elements), and
    the kept logits last (as ``linear_logprobs``')."""
    fn = "linear_logprobs_stats"
    temperature, softcap, logit_scale, ignore_index = _check_inputs(
        fn, hidden, weight, targets, bias, temperature, softcap, logit_scale, ignore_index)
    flags = (entropy, log_sum_sq_probs, mean_logits, is_top1, max_logits)
    for arg, value in zip(_logit_stats.STATS, flags):
        _checks.boolean(fn, arg, value)
    backend = _check_backend(backend, hidden, fn)
    _check_keep(fn, keep_logits, backend)
    _tokens._check_target_ids(targets, weight.shape[0], ignore_index, fn)
    stats = _stats_wanted(*flags)
    out, row_max, log_sum, row_stats, kept = _run_forward(
        hidden, weight, targets, bias, temperature, softcap, logit_scale, ignore_index, backend,
        stats, keep_logits)
    return (out, row_max, log_sum) + tuple(_unrequested(name, hidden) if x is None else x
                                           for name, x in zip(_logit_stats.STATS, row_stats)) + (
        kept,)


def _unrequested(name: str, hidden: torch.Tensor) -> torch.Tensor:
    dtype = torch.bool if name == "is_top1" else _accumulation_dtype(hidden.dtype)
    return hidden.new_empty((0,), dtype=dtype)


@_linear_logprobs_stats_op.register_fake
def _linear_logprobs_stats_fake(hidden, weight, targets, bias, temperature, softcap, logit_scale,
                                ignore_index, entropy, log_sum_sq_probs, mean_logits, is_top1,
                                max_logits, keep_logits, backend):
    _fake_checks("linear_logprobs_stats", hidden, weight, targets, bias=bias)
    acc = _accumulation_dtype(hidden.dtype)
    lead = hidden.shape[:-1]

    def row_stat(on):
        return hidden.new_empty(lead if on else (0,), dtype=acc)

    return (hidden.new_empty(targets.shape, dtype=acc), hidden.new_empty(lead, dtype=acc),
            hidden.new_empty(lead, dtype=acc),
            row_stat(entropy), row_stat(log_sum_sq_probs), row_stat(mean_logits),
            hidden.new_empty(targets.shape if is_top1 else (0,), dtype=torch.bool),
            row_stat(max_logits),
            hidden.new_empty(_kept_shape(hidden, weight, keep_logits), dtype=acc))


def _stats_setup_context(ctx, inputs, output):
    hidden, weight, targets, bias, *options = inputs[:8]
    wants_entropy = inputs[8]
    ctx.save_for_backward(hidden, weight, targets, bias, output[1], output[2],
                          output[3] if wants_entropy else None, output[-1])
    ctx.options = tuple(options)
    ctx.backend = inputs[-1]
    ctx.kept_are_probs = _cpu.keep_kind(options[1], _stats_wanted(*inputs[8:13])) == "probs"
    ctx.mark_non_differentiable(output[1], *output[4:])
    # An entropy computed for logging only gets no gradient: None, not zeros, so the backward
    # skips its term.
    ctx.set_materialize_grads(False)


def _stats_backward(ctx, grad_out, _grad_row_max, grad_log_sum, grad_entropy, *_):
    hidden, weight, targets, bias, row_max, log_sum, entropy, kept = ctx.saved_tensors
    if entropy is None or grad_entropy is None:
        grad_entropy = entropy = None
    grads = _input_gradients(ctx, grad_out, grad_log_sum, hidden, weight, targets, bias, row_max,
                             log_sum, grad_entropy, entropy, kept)
    return grads + (None,) * 11


_linear_logprobs_stats_op.register_autograd(_stats_backward, setup_context=_stats_setup_context)
_autocast.register("linear_logprobs_stats", ("hidden", "weight", "bias"))


# ----------------------------------------------------------------------------- public API


def _call(name, hidden, weight, targets, bias, temperature, softcap, logit_scale, ignore_index, *,
          check_ids=True, stats=None):
    """The public functions' path into the op: validation in ``name``'s words (ids too, unless
    the caller has checked them itself), then the registered op (the statistics op when ``stats``
    is a set of names, whose flags follow ``_logit_stats.STATS``); its outputs, the kept logits
    (0 elements unless kept: ``_keeps_logits``) last."""
    if stats is None:
        op, flags = _linear_logprobs_op, ()
    else:
        op, flags = _linear_logprobs_stats_op, tuple(n in stats for n in _logit_stats.STATS)
    if torch.compiler.is_compiling():
        # Tensors are checked by the fake kernel now and by the op when the graph runs; the
        # backend is resolved then too.
        scalars = _check_scalars(name, temperature, softcap, logit_scale, ignore_index)
        return op(hidden, weight, targets, bias, *scalars, *flags, False, "auto")
    hidden, weight, bias = _autocast.cast_operands(hidden, weight, bias)
    temperature, softcap, logit_scale, ignore_index = _check_inputs(
        name, hidden, weight, targets, bias, temperature, softcap, logit_scale, ignore_index)
    backend = _check_backend("auto", hidden, name)
    if check_ids:
        _tokens._check_target_ids(targets, weight.shape[0], ignore_index, name)
    keep = _keeps_logits(backend, hidden, weight, bias)
    with _tokens.ids_already_checked():
        return op(hidden, weight, targets, bias, temperature, softcap, logit_scale, ignore_index,
                  *flags, keep, backend)


def _keeps_logits(backend: str, hidden, weight, bias) -> bool:
    """Whether the cpu backend keeps this call's logits for its backward: a backward will follow
    (gradients on, an input that requires one) and the logits fit ``_cpu.keep_budget()``."""
    wants_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (hidden, weight, bias))
    return (backend == "cpu" and wants_grad
            and _cpu.keeps_logits(math.prod(hidden.shape[:-1]), weight.shape[0],
                                  _accumulation_dtype(hidden.dtype)))


def _check_stats(fn: str, stats) -> frozenset[str]:
    """``stats`` as a set of names; a string, a non-iterable or non-string names are a
    ``TypeError``, unknown names a ``ValueError`` (an iterator is read once)."""
    names = tuple(stats) if isinstance(stats, Iterable) and not isinstance(stats, str) else None
    if names is None or not all(isinstance(name, str) for name in names):
        raise TypeError(f"{fn}: stats must be a tuple of names among {_logit_stats.STATS}, got "
                        f"{_checks.describe(stats)}")
    unknown = sorted(set(names) - set(_logit_stats.STATS))
    if unknown:
        raise ValueError(f"{fn}: stats must be among {_logit_stats.STATS}, got {unknown}")
    return frozenset(names)


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    ignore_index: int = -100,
    return_lse: bool = False,
    stats: tuple[str, ...] | None = None,
) -> torch.Tensor | LinearLogprobs | LinearLogprobsStats:
    """Log-probabilities of chosen tokens under the LM head, ``log_softmax(logits / T)[targets]``
    with ``logits = softcap * tanh(logit_scale * (hidden @ weight.T + bias) / softcap)`` (or
    ``logit_scale * (hidden @ weight.T + bias)`` without a softcap), computed tile by tile without
    ever materialising the ``(N, V)`` logits.

    Under ``torch.autocast`` hidden, weight and bias are cast to the autocast dtype first
    (alignkern/_autocast.py), so any mix of their dtypes is accepted there.

    Args:
        hidden: ``(..., H)`` float32, float16, bfloat16 (or float64) hidden states; any strides.
        weight: ``(V, H)`` LM head, in hidden's dtype or a lower precision that it holds exactly
            (a float16/bfloat16 head under float32 hidden states, as with TRL's
            ``cast_lm_head_to_fp32``): each tile is converted in the kernel, the head is never
            copied, and its gradient comes back in its own dtype.
        targets: ``(...)`` token ids, or ``(..., K)`` for K tokens per row; int32 or int64.
            Entries equal to ``ignore_index`` give 0.
        bias: optional ``(V,)`` LM-head bias, in hidden's or weight's dtype.
        temperature: positive divisor applied after the softcap.
        softcap: if given, logits are squashed to ``(-softcap, softcap)`` first (Gemma 2).
        logit_scale: positive factor on the logits before the softcap: Cohere's
            ``config.logit_scale``, or ``1 / config.logits_scaling`` for Granite.
        ignore_index: the id that marks positions to skip (default -100).
        return_lse: also return ``lse (...)``, the log-sum-exp of the scaled logits
            (differentiable too).
        stats: statistics of the same distribution ``softmax(z)`` to compute in the same pass
            over the vocabulary, among ``"entropy"`` (``(...)``, differentiable: its gradient
            joins the same backward), ``"log_sum_sq_probs"`` (``(...)``, log sum_v p_v^2),
            ``"mean_logits"`` (``(...)``, the mean of ``z`` over the vocabulary),
            ``"is_top1"`` (bool, shaped like ``targets``: the target is the first maximum of
            ``z``, TRL's tie rule; False for ignored ids) and ``"max_logits"`` (``(...)``, the
            maximum of ``z``). All but the entropy carry no gradient.

    Returns:
        ``logprobs`` shaped like ``targets``, float32 (float64 for float64 inputs); with
        ``return_lse=True`` a ``LinearLogprobs(logprobs, lse)`` named tuple; with ``stats`` a
        ``LinearLogprobsStats(logprobs, lse, entropy, log_sum_sq_probs, mean_logits, is_top1,
        max_logits)`` named tuple, None for the statistics not asked for. Differentiable in ``hidden``,
        ``weight`` and ``bias`` for any upstream gradient.

    Raises:
        TypeError: non-float hidden, a head of higher precision than hidden (or float16 against
            bfloat16), float targets, a scalar that is not a real number (a bool, a string, a
            tensor), ``stats`` that are not names.
        ValueError: a weight that is not 2-D, a hidden size that does not match, bad target or
            bias shapes, mixed devices, a temperature, softcap or logit_scale that is not
            positive and finite, or whose quotients leave [1e-30, 1e30] (the kernels hold
            ``logit_scale / temperature`` and ``softcap / temperature`` in float32).
        IndexError: a target id outside ``[0, V)`` that is not ``ignore_index`` (checked unless
            ``ALIGNKERN_VALIDATE=0``; kernels then return NaN for that element).
        RuntimeError: the requested backend cannot run here.

    Example:
        >>> hidden, head = torch.randn(8, 64), torch.randn(32000, 64)
        >>> alignkern.linear_logprobs(hidden, head, torch.randint(0, 32000, (8, 4))).shape
        torch.Size([8, 4])
    """
    if stats is not None:
        stats = _check_stats("linear_logprobs", stats)
        out, row_max, log_sum, *row_stats, _ = _call(
            "linear_logprobs", hidden, weight, targets, bias, temperature, softcap, logit_scale,
            ignore_index, stats=stats)
        return LinearLogprobsStats(out, row_max + log_sum,
                                   *(x if name in stats else None
                                     for name, x in zip(_logit_stats.STATS, row_stats)))
    out, row_max, log_sum, _ = _call("linear_logprobs", hidden, weight, targets, bias,
                                     temperature, softcap, logit_scale, ignore_index)
    return LinearLogprobs(out, row_max + log_sum) if return_lse else out
