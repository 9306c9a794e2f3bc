"""The cpu backend of linear_logprobs: BLAS GEMMs over tiles of (rows × vocabulary) logits.

A tile holds at most ``TILE_BYTES`` of float32 logits (float64 for float64 inputs): up to
``MAX_TILE_ROWS`` rows by as many vocabulary columns as fit. Tiling the vocabulary, not only the
rows, keeps every GEMM large (a 32-row chunk of a 128k vocabulary ran 1.9x slower than eager) and
reads the LM head once per row chunk. Each tile's log-sum-exp comes from the C++ token_logprobs
kernel in two parts, the row maximum and the log-sum relative to it, and the tiles' parts are merged
by ``_logit_stats.merge_parts``. The backward recomputes each tile, turns it into ``dlogits`` in
place (the C++ kernel's softmax pass) and feeds two GEMMs; nothing is atomic, so it is
deterministic.

The target ids of a row chunk are sorted once, so each vocabulary block touches only the targets
that fall in it: O(N·K log K) for the targets on top of the GEMMs, never O(K) per block.

All functions take ``hidden (N, H)``, ``weight (V, H)``, ``ids (N, K)`` int64 and return buffers in
the accumulation dtype; the caller casts.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from . import _logit_stats
from . import token_logprobs as _tokens

TILE_BYTES = 16 * 2**20
MAX_TILE_ROWS = 1024


def _tiles(n_rows: int, vocab: int, itemsize: int) -> Iterator[tuple[slice, list[slice]]]:
    """(row chunk, its vocabulary blocks), each tile at most TILE_BYTES."""
    rows = max(1, min(n_rows, MAX_TILE_ROWS))
    cols = max(1, min(vocab, TILE_BYTES // (rows * itemsize)))
    blocks = [slice(v, min(v + cols, vocab)) for v in range(0, vocab, cols)]
    for start in range(0, n_rows, rows):
        yield slice(start, min(start + rows, n_rows)), blocks


def _logits_tile(h, weight, bias, block, softcap, acc, logit_scale=1.0) -> torch.Tensor:
    """Logits ``(n, |block|)`` in ``acc`` after bias, logit_scale and softcap; the scale costs no
    pass of its own with a softcap (``tanh(s x / c) = tanh(x / (c / s))``), nor at 1.0."""
    logits = h @ weight[block].to(acc).T
    if bias is not None:
        logits += bias[block].to(acc)
    if softcap is not None:
        logits.div_(softcap / logit_scale).tanh_().mul_(softcap)
    elif logit_scale != 1.0:
        logits.mul_(logit_scale)
    return logits


def tile_lse(logits: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's log-sum-exp of ``logits / temperature`` as ``(row_max, log_sum)`` (see
    ops/token_logprobs.py), by the vectorised C++ token_logprobs kernel (one read of the tile)."""
    no_targets = torch.empty((logits.shape[0], 0), dtype=torch.int64)
    return _tokens._run_forward(logits, no_targets, temperature, -100, "cpu")[1:]


def _targets_by_block(ids: torch.Tensor, valid: torch.Tensor, blocks: list[slice]):
    """For each vocabulary block, ``(row, column in the block, slot)`` of the valid targets that
    fall in it: the valid ids of the row chunk sorted once, then cut at the block starts."""
    rows, slots = valid.nonzero(as_tuple=True)
    picked = ids[rows, slots]
    picked, order = picked.sort(stable=True)
    rows, slots = rows[order], slots[order]
    starts = torch.tensor([block.start for block in blocks] + [blocks[-1].stop])
    bounds = torch.searchsorted(picked, starts).tolist()
    for block, begin, end in zip(blocks, bounds[:-1], bounds[1:]):
        yield rows[begin:end], picked[begin:end] - block.start, slots[begin:end]


def forward(hidden, weight, ids, valid, bias, temperature, softcap, logit_scale, acc,
            stats=frozenset()):
    """``(z_t (N, K), row_max (N,), log_sum (N,), stats)``: the scaled logit at each valid target
    (0 elsewhere), each row's log-sum-exp in two parts, z_t and the LSE read from the same tiles
    with the same 1 / T, and the requested statistics (``_logit_stats.LogitStats``) from the same
    tiles."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    picked = torch.zeros(ids.shape, dtype=acc)
    row_max = _tokens._poisoned((n_rows,), acc, hidden.device)
    log_sum = _tokens._poisoned((n_rows,), acc, hidden.device)
    merged = []
    inv_t = torch.tensor(1.0 / temperature, dtype=acc)  # rounded as the C++ kernel rounds it
    for rows, blocks in _tiles(n_rows, vocab, acc.itemsize):
        h, chunk_picked = hidden[rows].to(acc), picked[rows]
        parts = []
        by_block = _targets_by_block(ids[rows], valid[rows], blocks)
        for block, (row, column, slot) in zip(blocks, by_block):
            logits = _logits_tile(h, weight, bias, block, softcap, acc, logit_scale)
            block_max, block_log_sum = tile_lse(logits, temperature)
            chunk_picked[row, slot] = logits[row, column] * inv_t
            if stats:
                z = logits if temperature == 1.0 else logits.mul_(inv_t)
                parts.append(_logit_stats.tile_partials(z, block_max, block_log_sum, stats,
                                                        block.start))
            else:
                parts.append(_logit_stats.Partials(block_max[None], block_log_sum[None]))
        parts = _logit_stats.concat(parts)
        row_max[rows], log_sum[rows] = _logit_stats.merge_parts(parts.row_max, parts.log_sum)
        if stats:
            merged.append(_logit_stats.merge(parts, row_max[rows], log_sum[rows], vocab, ids[rows],
                                             valid[rows]))
    if not merged:  # no statistics, or no rows
        return picked, row_max, log_sum, _logit_stats.no_rows(stats, ids.shape[1], acc,
                                                              hidden.device)
    return picked, row_max, log_sum, _logit_stats.LogitStats(
        *(None if column[0] is None else torch.cat(column) for column in zip(*merged)))


def backward(g, coef, hidden, weight, ids, valid, bias, row_max, log_sum, temperature, softcap,
             logit_scale, need_hidden, need_weight, need_bias, acc, entropy_grad=None):
    """``(dhidden, dweight, dbias)`` (None where not needed) from the per-slot gradients ``g``
    (0 for slots that are not valid) and each row's ``coef`` = sum of valid g_k - g_lse (plus
    ``g_H (H - log_sum)`` with an entropy gradient ``entropy_grad`` = g_H, whose term is
    ``-g_H p_v ((z_v - row_max) - log_sum + H)``: dense part ``-p_v (coef + g_H (z_v - row_max))``),
    with ``p_v = exp((z_v - row_max) - log_sum)``."""
    n_rows, (vocab, hidden_size) = hidden.shape[0], weight.shape
    grad_hidden = torch.zeros((n_rows, hidden_size), dtype=acc) if need_hidden else None
    grad_weight = torch.zeros((vocab, hidden_size), dtype=acc) if need_weight else None
    grad_bias = torch.zeros((vocab,), dtype=acc) if need_bias else None
    inv_t = 1.0 / temperature
    for rows, blocks in _tiles(n_rows, vocab, acc.itemsize):
        h, chunk_g = hidden[rows].to(acc), g[rows]
        by_block = _targets_by_block(ids[rows], valid[rows], blocks)
        for block, (row, column, slot) in zip(blocks, by_block):
            dlogits = _logits_tile(h, weight, bias, block, softcap, acc, logit_scale)
            squash = None
            if softcap is not None:  # d capped / d logits = 1 - tanh^2, from the capped values
                squash = 1.0 - (dlogits / softcap).square_()
            # dz / T in place, dz = -coef softmax(z) (+ the targets' g below)
            if entropy_grad is None:  # one pass of the C++ softmax kernel
                _tokens.dense_gradient_(dlogits, coef[rows], row_max[rows], log_sum[rows],
                                        temperature)
            else:
                dlogits.mul_(inv_t).sub_(row_max[rows, None])  # z - row_max
                p = torch.exp(dlogits - log_sum[rows, None])
                dlogits.mul_(entropy_grad[rows, None]).add_(coef[rows, None]).mul_(p)
                dlogits.mul_(-inv_t)
                del p
            # repeated ids of a row add up: index_put_ accumulates in order on the CPU
            dlogits.index_put_((row, column), chunk_g[row, slot] * inv_t, accumulate=True)
            if logit_scale != 1.0:  # d logits_capped / d logits (1 without a softcap: folded)
                dlogits.mul_(logit_scale)
            if squash is not None:
                dlogits.mul_(squash)
                del squash
            if need_hidden:
                grad_hidden[rows] += dlogits @ weight[block].to(acc)
            if need_weight:
                grad_weight[block] += dlogits.T @ h
            if need_bias:
                grad_bias[block] += dlogits.sum(0)
    return grad_hidden, grad_weight, grad_bias
