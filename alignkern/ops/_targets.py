"""The target columns of a log-probability backward, shared by token_logprobs and linear_logprobs.

For log-probabilities of K target ids per row with upstream gradient ``g (N, K)`` and ``g_lse (N,)``,
``dz_v = sum_k g_k [t_k = v] - coef * softmax(z)_v`` with ``coef = sum_{k valid} g_k - g_lse``.
The kernels write the dense part ``-coef * softmax(z) / T`` over the whole vocabulary; the K
target columns are then written once each from ``(S_t - coef * p_t) / T``, where ``S_t`` sums the
gradients of every slot of the row that names id ``t``. Repeated ids are summed after one sort of
each row, so the cost is O(N·K log K) on top of the O(N·V) pass, never O(K²) or O(V·K), and each
target column is rounded once, from the accumulation dtype.
"""

from __future__ import annotations

import math

import torch


def target_masks(ids: torch.Tensor, vocab: int, ignore_index: int):
    """``(valid, out_of_range)`` for ``ids (N, K)``: ids in ``[0, V)`` that are not ignored, and ids
    outside it that are not ``ignore_index`` (which make their row's gradient NaN)."""
    ignored = ids == ignore_index
    in_range = (ids >= 0) & (ids < vocab)
    return in_range & ~ignored, ~in_range & ~ignored


def gradient_terms(grad_out, grad_lse, ids, vocab, ignore_index, acc):
    """``(g (N, K), coef (N,), valid (N, K))`` in ``acc``: the upstream gradient of each slot (0 for
    slots that are not valid) and ``coef``, NaN for a row with an out-of-range id."""
    n_rows, k = ids.shape
    g = grad_out.to(acc).reshape(n_rows, k)
    valid, out_of_range = target_masks(ids, vocab, ignore_index)
    coef = g.masked_fill(~valid, 0.0).masked_fill(out_of_range, math.nan).sum(-1)
    if grad_lse is not None:
        coef = coef - grad_lse.to(acc).reshape(n_rows)
    return g.masked_fill(~valid, 0.0), coef, valid


def _sum_repeated_ids(ids: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """For each slot, the sum of ``g`` over the slots of its row with the same id: a stable sort of
    each row, then each run's total as a difference of float64 prefix sums (deterministic on
    every device, unlike an atomic scatter-add)."""
    k = ids.shape[1]
    sorted_ids, order = ids.sort(dim=1, stable=True)
    g_sorted = g.gather(1, order).to(torch.float64)
    through = g_sorted.cumsum(1)
    before = through - g_sorted
    position = torch.arange(k, device=ids.device).expand_as(ids)
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    run_start = torch.where(starts, position, 0).cummax(1).values
    run_end = torch.where(ends, position, k).flip(1).cummin(1).values.flip(1)
    run_total = through.gather(1, run_end) - before.gather(1, run_start)
    return torch.empty_like(g).scatter_(1, order, run_total.to(g.dtype))


def gradient_buffer(n_rows: int, vocab: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad (N, V), flat)``: a NaN-poisoned gradient and the flat buffer under it, which has one
    spare element at the end where ``write_target_columns`` sends the slots it must not write."""
    flat = torch.full((n_rows * vocab + 1,), math.nan, dtype=dtype, device=device)
    return flat[: n_rows * vocab].view(n_rows, vocab), flat


def write_target_columns(flat, vocab, ids, valid, g, coef, shifted, log_sum, inv_t, factor=None,
                         entropy_grad=None):
    """Overwrite each valid target column of ``flat`` (from ``gradient_buffer``) with
    ``(S - coef * p) * inv_t`` (times ``factor``, e.g. the softcap's derivative), rounded once to
    the gradient's dtype, where ``p = exp(shifted - log_sum)``; ``S`` sums ``g`` over the slots of
    the row naming the same id. ``shifted (N, K)`` is ``z_t - row_max``, the scaled logit at each
    target less its row's maximum, and ``log_sum (N,)`` the row's log-sum of ``exp(z - row_max)``;
    slots naming the same id carry the same value, so the order of the writes does not matter.
    With ``entropy_grad (N,)`` the dense coefficient is ``coef + entropy_grad * shifted``, as the
    kernels write it."""
    n_rows, k = ids.shape
    if n_rows == 0 or k == 0:
        return
    summed = g if k == 1 else _sum_repeated_ids(ids.masked_fill(~valid, -1), g)
    # A probability is at most 1: z and the LSE may come from different summation orders.
    p = torch.exp((shifted - log_sum[:, None]).clamp(max=0.0))
    dense = (coef[:, None] if entropy_grad is None
             else coef[:, None] + entropy_grad[:, None] * shifted)
    value = (summed - dense * p) * inv_t
    if factor is not None:
        value = value * factor
    row_start = torch.arange(n_rows, device=ids.device)[:, None] * vocab
    index = torch.where(valid, row_start + ids, n_rows * vocab)  # the spare element
    flat.index_put_((index.reshape(-1),), value.to(flat.dtype).reshape(-1))
