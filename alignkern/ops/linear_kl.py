"""``linear_kl``: per-token ``KL(pi || pi_ref)`` with both distributions from hidden states and LM
heads in one pass over the vocabulary, never materialising either ``(N, V)`` logits tensor.

Registered ops:
  ``alignkern::linear_kl(hidden, weight, ref_hidden, ref_weight, temperature, logit_scale,
  backend) -> (kl, row_max, log_sum, expect, ref_row_max, ref_log_sum)``: each side's log-sum-exp
  in two parts (``lse = row_max + log_sum``, as in ops/token_logprobs.py, which says why) and
  ``expect = E_pi[z - y]``; ``KL = (expect - (row_max - ref_row_max)) - (log_sum - ref_log_sum)``.
  All but ``kl`` are internal (saved for the backward, or merged across vocabulary shards by
  alignkern.distributed) and carry no gradient;
  ``alignkern::linear_kl_backward(grad_kl, hidden, weight, ref_hidden, ref_weight, row_max,
  log_sum, expect, temperature, logit_scale, need_weight_grad, backend) -> (dhidden, dweight)``.
Both sides' logits are ``z = logit_scale * (hidden @ weight.T) / T``; the kernels get the scale
folded into the temperature (``T / logit_scale``), so it costs nothing.
Only the policy side is differentiable. Backends: ``triton`` (and ``cuda``, which runs the Triton
kernels here), ``cpu`` (BLAS over tiles of at most 16 MiB of logits per side), ``reference``.
"""

from __future__ import annotations

import math

import torch

from .. import _autocast, _backend, _checks, reference
from . import _logit_stats
from . import linear_logprobs_cpu as _tiles_cpu
from . import token_logprobs as _tokens
from .linear_logprobs import SUPPORTED_DTYPES, _accumulation_dtype, _as_matrix, _row_chunks

GPU_CHUNK_BYTES = 256 * 2**20


def _check_inputs(fn, hidden, weight, ref_hidden, ref_weight, temperature, logit_scale):
    """docs/design.md's error contract for the two sides; returns ``(temperature, logit_scale)`` as
    floats."""
    for arg, value in (("hidden", hidden), ("weight", weight), ("ref_hidden", ref_hidden),
                       ("ref_weight", ref_weight)):
        _checks.tensor(fn, arg, value, dtypes=SUPPORTED_DTYPES)
        if value.dtype != hidden.dtype:
            raise TypeError(f"{fn}: {arg} must have hidden's dtype ({hidden.dtype}), got "
                            f"{value.dtype}")
    _checks.same_device(fn, hidden=hidden, weight=weight, ref_hidden=ref_hidden,
                        ref_weight=ref_weight)
    for side, h, w in (("", hidden, weight), ("ref_", ref_hidden, ref_weight)):
        if w.dim() != 2:
            raise ValueError(f"{fn}: {side}weight must be the 2-D LM head (V, H), got shape "
                             f"{tuple(w.shape)}")
        if h.dim() < 1 or h.shape[-1] != w.shape[1]:
            raise ValueError(f"{fn}: hidden size mismatch: {side}hidden {tuple(h.shape)} vs "
                             f"{side}weight {tuple(w.shape)}")
        if w.shape[1] == 0:
            raise ValueError(f"{fn}: {side}weight must have a non-empty hidden size H, got shape "
                             f"{tuple(w.shape)}")
    if weight.shape[0] != ref_weight.shape[0] or weight.shape[0] == 0:
        raise ValueError(f"{fn}: weight and ref_weight must share a non-empty vocabulary, got "
                         f"V = {weight.shape[0]} and {ref_weight.shape[0]}")
    if hidden.shape[:-1] != ref_hidden.shape[:-1]:
        raise ValueError(f"{fn}: hidden {tuple(hidden.shape)} and ref_hidden "
                         f"{tuple(ref_hidden.shape)} must have the same leading shape")
    return _check_scalars(fn, temperature, logit_scale)


def _check_scalars(fn, temperature, logit_scale):
    temperature = _checks.temperature(fn, temperature)
    logit_scale = _checks.real(fn, "logit_scale", logit_scale, positive=True)
    _checks.logit_factors(fn, temperature, logit_scale)
    return temperature, logit_scale


def _check_saved(fn, hidden, **saved) -> None:
    """The backward's extra tensors, each shaped like hidden's rows, real floating point."""
    for arg, value in saved.items():
        _checks.tensor(fn, arg, value, floating=True)
        _checks.shape(fn, arg, value, hidden.shape[:-1], "the leading shape of hidden")
    _checks.same_device(fn, hidden=hidden, **saved)


def _check_mask(fn, mask, hidden) -> None:
    if mask is not None:
        _checks.mask(fn, "mask", mask, hidden.shape[:-1], "the leading shape of hidden")
        _checks.same_device(fn, hidden=hidden, mask=mask)


# ----------------------------------------------------------------------------- cpu


def _cpu_tile(h, w, rh, rw, block, acc, buffers=None):
    """(z, y) for one tile, into ``buffers`` (two ``_TileBuffer``s) if given; ``h`` and ``rh``
    come pre-scaled by 1/T, so the GEMMs give z and y."""
    outs = (None, None) if buffers is None else (
        b.view(h.shape[0], block.stop - block.start) for b in buffers)
    return tuple(_tiles_cpu._logits_tile(x, head, None, block, None, acc, out=out)
                 for x, head, out in zip((h, rh), (w, rw), outs))


def _scaled_rows(hidden, ref_hidden, rows, temperature, acc):
    """The row chunk of both hidden states in ``acc``, times 1/T: scaling (n, H) instead of the
    (n, V) logits saves a pass over each tile."""
    h, rh = hidden[rows].to(acc), ref_hidden[rows].to(acc)
    if temperature != 1.0:
        h, rh = h / temperature, rh / temperature
    return h, rh


def kl_from_parts(expect, row_max, log_sum, ref_row_max, ref_log_sum) -> torch.Tensor:
    """``KL = E_p[z - y] - lse(z) + lse(y)`` from each side's log-sum-exp in two parts, never
    forming either log-sum-exp as one number (their difference would keep only the bits above
    the spacing of ``|z|``)."""
    return (expect - (row_max - ref_row_max)) - (log_sum - ref_log_sum)


def _cpu_forward(hidden, weight, ref_hidden, ref_weight, temperature, acc, keep=False):
    """Per tile, after its two GEMMs, one pass of a C++ kernel (csrc/cpu/logit_stats.cpp) gives
    each side's log-sum-exp in two parts and E_tile = sum softmax_tile(z) (z - y) (z and y already
    carry 1/T); the tiles are merged (``_logit_stats.merge_parts``) with weights exp(lse_tile -
    lse). Returns the op's six outputs, ``(N,)`` each, and with ``keep`` (one tile of all the rows
    and the whole vocabulary) the backward's direction ``p (z - y - E)`` ``(N, V)``, written over
    the reference's tile by the same kernel (else None)."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    outputs = tuple(torch.empty(n_rows, dtype=acc) for _ in range(6))
    kl, row_max, log_sum, expect, ref_row_max, ref_log_sum = outputs
    kept = None
    tiles = ([(slice(0, n_rows), [slice(0, vocab)])] if keep
             else _tiles_cpu._tiles(n_rows, vocab, acc.itemsize))
    buffers = None if keep else (_tiles_cpu._TileBuffer(acc), _tiles_cpu._TileBuffer(acc))
    for rows, blocks in tiles:
        h, rh = _scaled_rows(hidden, ref_hidden, rows, temperature, acc)
        parts = []
        for block in blocks:
            z, y = _cpu_tile(h, weight, rh, ref_weight, block, acc, buffers)
            part = tuple(torch.empty(z.shape[0], dtype=acc) for _ in range(5))
            _backend.extension().kl_tile_stats_cpu(
                z.data_ptr(), y.data_ptr(), _backend.DTYPE_CODES[acc], z.shape[0], z.shape[1],
                z.stride(0), *(x.data_ptr() for x in part), y.data_ptr() if keep else 0)
            parts.append(part)
            kept = y if keep else None
        z_max, z_log_sum, y_max, y_log_sum, e_parts = (torch.stack(c) for c in zip(*parts))
        row_max[rows], log_sum[rows] = _logit_stats.merge_parts(z_max, z_log_sum)
        ref_row_max[rows], ref_log_sum[rows] = _logit_stats.merge_parts(y_max, y_log_sum)
        weights = torch.exp((z_max - row_max[rows]) + z_log_sum - log_sum[rows])
        expect[rows] = (weights * e_parts).sum(0)
    kl.copy_(kl_from_parts(expect, row_max, log_sum, ref_row_max, ref_log_sum))
    return outputs, kept


def _cpu_backward(grad, hidden, weight, ref_hidden, ref_weight, row_max, log_sum, expect,
                  temperature, need_weight, acc, kept=None):
    """``dz = g p (z - y - E) / T`` into two GEMMs per piece (no temporaries, no atomics): from
    the forward's ``kept`` direction ``p (z - y - E)`` in vocabulary blocks through a scratch
    buffer, or else tile by tile, recomputed and turned into ``dz`` in place."""
    n_rows, (vocab, hidden_size) = hidden.shape[0], weight.shape
    grad_hidden = torch.empty((n_rows, hidden_size), dtype=acc)
    grad_weight = torch.empty((vocab, hidden_size), dtype=acc) if need_weight else None
    written_rows, written_blocks = set(), set()
    for rows, h, block, dz in _dz_pieces(grad, hidden, weight, ref_hidden, ref_weight, row_max,
                                         log_sum, expect, temperature, acc, kept):
        _tiles_cpu._accumulate_mm(grad_hidden[rows], dz, weight[block].to(acc),
                                  first=_tiles_cpu._first_visit(written_rows, rows))
        if need_weight:
            _tiles_cpu._accumulate_mm(grad_weight[block], dz.T, h,
                                      first=_tiles_cpu._first_visit(written_blocks, block))
    if n_rows == 0:
        for result in (grad_hidden, grad_weight):
            if result is not None:
                result.zero_()
    return grad_hidden, grad_weight


def _dz_pieces(grad, hidden, weight, ref_hidden, ref_weight, row_max, log_sum, expect,
               temperature, acc, kept):
    """``(rows, hidden rows in acc, vocabulary block, dz)`` for each piece of the backward."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    scale = grad / temperature
    if kept is not None:
        width = max(1, min(vocab, _tiles_cpu.SCRATCH_BYTES // max(1, n_rows * acc.itemsize)))
        scratch = torch.empty(n_rows * width, dtype=acc)
        rows, h = slice(0, n_rows), hidden.to(acc)
        for start in range(0, vocab, width):
            block = slice(start, min(start + width, vocab))
            out = scratch[: n_rows * (block.stop - block.start)].view(n_rows, -1)
            yield rows, h, block, torch.mul(kept[:, block], scale[:, None], out=out)
        return
    buffers = (_tiles_cpu._TileBuffer(acc), _tiles_cpu._TileBuffer(acc))
    for rows, blocks in _tiles_cpu._tiles(n_rows, vocab, acc.itemsize):
        h, rh = _scaled_rows(hidden, ref_hidden, rows, temperature, acc)
        unscaled = hidden[rows].to(acc)
        for block in blocks:
            z, y = _cpu_tile(h, weight, rh, ref_weight, block, acc, buffers)
            centred_gap = y.neg_().add_(z).sub_(expect[rows, None])
            # z becomes g p / T (one pass of the C++ softmax kernel), then dz = g p (z - y - E) / T
            dz = _tokens.dense_gradient(z, -scale[rows], row_max[rows], log_sum[rows], 1.0,
                                        out=z).mul_(centred_gap)
            del centred_gap, y
            yield rows, unscaled, block, dz


# ----------------------------------------------------------------------------- triton


def _triton_forward(hidden, weight, ref_hidden, ref_weight, temperature, acc):
    from ..triton_kernels import linear_kl as kernels

    outputs = tuple(torch.full((hidden.shape[0],), math.nan, dtype=acc, device=hidden.device)
                    for _ in range(6))
    kernels.linear_kl_fwd(hidden, weight, ref_hidden, ref_weight, *outputs, temperature)
    return outputs


def _triton_backward(grad, hidden, weight, ref_hidden, ref_weight, row_max, log_sum, expect,
                     temperature, need_weight, acc):
    from ..triton_kernels import linear_kl as kernels

    n_rows, (vocab, hidden_size) = hidden.shape[0], weight.shape
    grad_hidden = hidden.new_empty((n_rows, hidden_size))
    grad_weight = weight.new_zeros((vocab, hidden_size)) if need_weight else None
    budget = GPU_CHUNK_BYTES if hidden.is_cuda else _tiles_cpu.TILE_BYTES
    for rows in _row_chunks(n_rows, vocab * hidden.element_size(), budget):
        h = hidden[rows]
        dlogits = torch.full((h.shape[0], vocab), math.nan, dtype=hidden.dtype,
                             device=hidden.device)
        kernels.linear_kl_dlogits(h, weight, ref_hidden[rows], ref_weight, grad[rows],
                                  row_max[rows], log_sum[rows], expect[rows], dlogits, temperature)
        torch.mm(dlogits, weight, out=grad_hidden[rows])
        if need_weight:
            grad_weight.addmm_(dlogits.T, h)
    return grad_hidden, grad_weight


# ----------------------------------------------------------------------------- registered ops


def _reference_logits(hidden, weight, ref_hidden, ref_weight, temperature, logit_scale):
    """(z, y): both sides' scaled logits, materialised (the reference backend)."""
    return (reference.linear_logits(hidden, weight, logit_scale=logit_scale) / temperature,
            reference.linear_logits(ref_hidden, ref_weight, logit_scale=logit_scale) / temperature)


def _matrices(hidden, weight, ref_hidden, ref_weight):
    return (_as_matrix(hidden), _as_matrix(weight), _as_matrix(ref_hidden),
            _as_matrix(ref_weight))


@torch.library.custom_op("alignkern::linear_kl", mutates_args=())
def _linear_kl_op(hidden: torch.Tensor, weight: torch.Tensor, ref_hidden: torch.Tensor,
                  ref_weight: torch.Tensor, temperature: float, logit_scale: float,
                  keep_gradient: bool, backend: str
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                             torch.Tensor, torch.Tensor]:
    fn = "linear_kl"
    temperature, logit_scale = _check_inputs(fn, hidden, weight, ref_hidden, ref_weight,
                                             temperature, logit_scale)
    backend = _backend.backend_for(fn, backend, hidden.device)
    _checks.boolean(fn, "keep_gradient", keep_gradient)
    if keep_gradient and backend != "cpu":
        raise ValueError(f"{fn}: keep_gradient=True is for the cpu backend (its backward reads "
                         f"it), got backend {backend!r}")
    acc = _accumulation_dtype(hidden.dtype)
    lead = hidden.shape[:-1]
    nothing_kept = hidden.new_empty((0,), dtype=acc)
    if backend == "reference":
        kl = reference.linear_kl(hidden, weight, ref_hidden, ref_weight, temperature, logit_scale)
        z, y = _reference_logits(hidden, weight, ref_hidden, ref_weight, temperature, logit_scale)
        expect = (torch.softmax(z, -1) * (z - y)).sum(-1)
        return (kl, *reference.shifted_logsumexp(z), expect, *reference.shifted_logsumexp(y),
                nothing_kept)
    # z = s x / T = x / (T / s): the kernels see the scale as part of the temperature.
    args = (*_matrices(hidden, weight, ref_hidden, ref_weight), temperature / logit_scale, acc)
    if backend == "cpu":
        outputs, kept = _cpu_forward(*args, keep=keep_gradient)
    else:
        outputs, kept = _triton_forward(*args), None
    return (*(t.reshape(lead) for t in outputs), nothing_kept if kept is None else kept)


def _keeps_gradient(backend: str, hidden, weight) -> bool:
    """Whether the cpu backend keeps this call's gradient direction for its backward: a backward
    will follow and the ``(N, V)`` buffer fits ``linear_logprobs_cpu.keep_budget()``."""
    wants_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return (backend == "cpu" and wants_grad
            and _tiles_cpu.keeps_logits(math.prod(hidden.shape[:-1]), weight.shape[0],
                                        _accumulation_dtype(hidden.dtype)))


def _fake_checks(fn, hidden, weight, ref_hidden, ref_weight, **others) -> None:
    _checks.same_device_in_fake(fn, hidden=hidden, weight=weight, ref_hidden=ref_hidden,
                                ref_weight=ref_weight, **others)
    torch._check(weight.dim() == 2 and ref_weight.dim() == 2,
                 lambda: f"{fn}: weight and ref_weight must be 2-D (V, H)")
    torch._check(hidden.shape[-1] == weight.shape[1] and ref_hidden.shape[-1] == ref_weight.shape[1],
                 lambda: f"{fn}: hidden sizes do not match the heads")
    torch._check(hidden.shape[:-1] == ref_hidden.shape[:-1],
                 lambda: f"{fn}: hidden and ref_hidden must have the same leading shape")


@_linear_kl_op.register_fake
def _linear_kl_fake(hidden, weight, ref_hidden, ref_weight, temperature, logit_scale,
                    keep_gradient, backend):
    _fake_checks("linear_kl", hidden, weight, ref_hidden, ref_weight)
    acc = _accumulation_dtype(hidden.dtype)
    kept = (math.prod(hidden.shape[:-1]), weight.shape[0]) if keep_gradient else (0,)
    return (*(hidden.new_empty(hidden.shape[:-1], dtype=acc) for _ in range(6)),
            hidden.new_empty(kept, dtype=acc))


@torch.library.custom_op("alignkern::linear_kl_backward", mutates_args=())
def _linear_kl_backward_op(grad_kl: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                           ref_hidden: torch.Tensor, ref_weight: torch.Tensor,
                           row_max: torch.Tensor, log_sum: torch.Tensor, expect: torch.Tensor,
                           temperature: float, logit_scale: float, need_weight_grad: bool,
                           backend: str, kept_gradient: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    fn = "linear_kl_backward"
    temperature, logit_scale = _check_inputs(fn, hidden, weight, ref_hidden, ref_weight,
                                             temperature, logit_scale)
    _check_saved(fn, hidden, grad_kl=grad_kl, row_max=row_max, log_sum=log_sum, expect=expect)
    _checks.boolean(fn, "need_weight_grad", need_weight_grad)
    backend = _backend.backend_for(fn, backend, hidden.device)
    kept = _check_kept_gradient(fn, kept_gradient, hidden, weight, backend)
    acc = _accumulation_dtype(hidden.dtype)
    h, w, rh, rw = _matrices(hidden, weight, ref_hidden, ref_weight)
    grad, row_max, log_sum, expect = (t.reshape(-1).to(acc).contiguous()
                                      for t in (grad_kl, row_max, log_sum, expect))
    if backend == "reference":
        z, y = _reference_logits(h, w, rh, rw, temperature, logit_scale)
        p = torch.exp((z - row_max[:, None]) - log_sum[:, None])
        dz = grad[:, None] * p * (z - y - expect[:, None])
        dx = dz * (logit_scale / temperature)
        grad_hidden, grad_weight = dx @ w.to(acc), (dx.T @ h.to(acc) if need_weight_grad else None)
    else:
        args = (grad, h, w, rh, rw, row_max, log_sum, expect, temperature / logit_scale,
                need_weight_grad, acc)
        grad_hidden, grad_weight = (_cpu_backward(*args, kept=kept) if backend == "cpu"
                                    else _triton_backward(*args))
    return (grad_hidden.to(hidden.dtype).reshape(hidden.shape),
            grad_weight.to(weight.dtype) if grad_weight is not None else hidden.new_empty((0,)))


def _check_kept_gradient(fn, kept_gradient, hidden, weight, backend):
    """``kept_gradient``: None, 0 elements, or (cpu backend) the forward's ``(N, V)`` direction in
    the accumulation dtype; returns it, or None for none."""
    if kept_gradient is None:
        return None
    _checks.tensor(fn, "kept_gradient", kept_gradient, dtypes=(_accumulation_dtype(hidden.dtype),))
    if kept_gradient.numel() == 0:
        return None
    _checks.shape(fn, "kept_gradient", kept_gradient,
                  (math.prod(hidden.shape[:-1]), weight.shape[0]),
                  "(N, V): what the forward kept, or 0 elements")
    _checks.same_device(fn, hidden=hidden, kept_gradient=kept_gradient)
    if backend != "cpu":
        raise ValueError(f"{fn}: kept_gradient is read by the cpu backend only, got backend "
                         f"{backend!r}")
    return kept_gradient


@_linear_kl_backward_op.register_fake
def _linear_kl_backward_fake(grad_kl, hidden, weight, ref_hidden, ref_weight, row_max, log_sum,
                             expect, temperature, logit_scale, need_weight_grad, backend,
                             kept_gradient=None):
    fn = "linear_kl_backward"
    _fake_checks(fn, hidden, weight, ref_hidden, ref_weight, grad_kl=grad_kl, row_max=row_max,
                 log_sum=log_sum, expect=expect)
    for arg, value in (("grad_kl", grad_kl), ("row_max", row_max), ("log_sum", log_sum),
                       ("expect", expect)):
        torch._check(value.shape == hidden.shape[:-1],
                     lambda arg=arg: f"{fn}: {arg} must have the leading shape of hidden")
    return (hidden.new_empty(hidden.shape),
            weight.new_empty(weight.shape) if need_weight_grad else hidden.new_empty((0,)))


def _setup_context(ctx, inputs, output):
    hidden, weight, ref_hidden, ref_weight, temperature, logit_scale, _keep, backend = inputs
    ctx.save_for_backward(hidden, weight, ref_hidden, ref_weight, *output[1:4], output[6])
    ctx.mark_non_differentiable(*output[1:])
    ctx.scalars, ctx.backend = (temperature, logit_scale), backend
    ctx.set_materialize_grads(False)  # no zero-filled gradient for the kept (N, V) output


def _backward(ctx, grad_kl, *_internal):
    hidden, weight, ref_hidden, ref_weight, row_max, log_sum, expect, kept = ctx.saved_tensors
    if grad_kl is None:
        return (None,) * 8
    need_weight = ctx.needs_input_grad[1]
    grad_hidden, grad_weight = _linear_kl_backward_op(
        grad_kl, hidden, weight, ref_hidden, ref_weight, row_max, log_sum, expect, *ctx.scalars,
        need_weight, ctx.backend, kept)
    return grad_hidden, grad_weight if need_weight else None, None, None, None, None, None, None


_linear_kl_op.register_autograd(_backward, setup_context=_setup_context)
_autocast.register("linear_kl", ("hidden", "weight", "ref_hidden", "ref_weight"))
_autocast.register("linear_kl_backward")


def linear_kl(hidden: torch.Tensor, weight: torch.Tensor, ref_hidden: torch.Tensor,
              ref_weight: torch.Tensor, mask: torch.Tensor | None = None, *,
              temperature: float = 1.0, logit_scale: float = 1.0) -> torch.Tensor:
    """Per-token ``KL(pi || pi_ref)``: ``pi = softmax(logit_scale * hidden @ weight.T / T)``,
    ``pi_ref`` likewise from ``ref_hidden`` and ``ref_weight`` (the same ``logit_scale`` and ``T``
    on both sides: Cohere's ``config.logit_scale``, Granite's ``1 / config.logits_scaling``) —
    SCoRe's / RLHF's KL regulariser without two ``(N, V)`` tensors. ``hidden (..., H)``,
    ``weight (V, H)``, ``ref_hidden (..., H_ref)``, ``ref_weight (V, H_ref)``; ``mask (...)``
    zeroes positions. ``temperature`` and ``logit_scale`` are positive finite numbers. Returns
    ``(...)`` float32 (float64 for float64), differentiable in ``hidden`` and ``weight`` (the
    policy side).

    Example:
        >>> kl = alignkern.linear_kl(h, model.lm_head.weight, h_ref, ref_model.lm_head.weight,
        ...                          mask=response_mask)
        >>> loss = rl_loss + beta * (kl.sum() / response_mask.sum())
    """
    fn = "linear_kl"
    if torch.compiler.is_compiling():
        temperature, logit_scale = _check_scalars(fn, temperature, logit_scale)
        backend = "auto"
    else:
        hidden, weight, ref_hidden, ref_weight = _autocast.cast_operands(hidden, weight,
                                                                         ref_hidden, ref_weight)
        temperature, logit_scale = _check_inputs(fn, hidden, weight, ref_hidden, ref_weight,
                                                 temperature, logit_scale)
        _check_mask(fn, mask, hidden)
        backend = _backend.resolve_backend(hidden.device)
    keep = False if torch.compiler.is_compiling() else _keeps_gradient(backend, hidden, weight)
    kl = _linear_kl_op(hidden, weight, ref_hidden.detach(), ref_weight.detach(), temperature,
                       logit_scale, keep, backend)[0]
    return kl if mask is None else torch.where(mask.to(torch.bool), kl, 0.0)
