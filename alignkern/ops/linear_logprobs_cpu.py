"""The cpu backend of linear_logprobs: BLAS GEMMs over tiles of (rows × vocabulary) logits.

A tile holds at most ``TILE_BYTES`` of float32 logits (float64 for float64 inputs): up to
``MAX_TILE_ROWS`` rows by as many vocabulary columns as fit. Tiling the vocabulary, not only the
rows, keeps every GEMM large (a 32-row chunk of a 128k vocabulary ran 1.9x slower than eager) and
reads the LM head once per row chunk. After each tile's GEMM one pass of a C++ kernel gives each
row's log-sum-exp in two parts, the row maximum and the log-sum relative to it (the token_logprobs
kernel), or those and the fused statistics' partials (csrc/cpu/logit_stats.cpp); the tiles' parts
are merged by ``_logit_stats``.

Kept logits: when the whole call's logits take at most ``keep_budget()`` bytes and a backward will
follow, the forward computes them into one buffer that the op returns and autograd keeps, and the
backward reads it instead of recomputing it: three GEMMs, as eager PyTorch, whose saved
``log_softmax`` is the same size. Without a softcap or an entropy (``keep_kind``) the buffer holds
the probabilities ``P`` (one more in-place pass in the forward) and the backward is two GEMMs read
straight from it: ``dz = G - coef P`` (``G`` the K target columns), so ``dweight = -P^T (coef h) +
sum_k g_k e_{t_k} h`` and ``dhidden = -coef (P W) + sum_k g_k W[t_k]``: no pass over ``(N, V)``
and no scratch. Otherwise it holds the logits, and the backward runs the general path below from
them. Without keeping, the backward recomputes each tile: four GEMMs, and never an ``(N, V)``
buffer.

Backward (general): one pass of the C++ softmax kernel turns logits into the dense part of
``dlogits`` (the recomputed tile in place; from kept logits into a scratch block of at most
``SCRATCH_BYTES``), the targets' columns are added, and two GEMMs write or add into the gradient
buffers (no temporaries); nothing is atomic, so it is deterministic.

The target ids of a row chunk are sorted once, so each vocabulary block touches only the targets
that fall in it: O(N·K log K) for the targets on top of the GEMMs, never O(K) per block.

All functions take ``hidden (N, H)``, ``weight (V, H)``, ``ids (N, K)`` int64 and return buffers in
the accumulation dtype; the caller casts.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch

from .. import _backend
from . import _logit_stats, _targets
from . import token_logprobs as _tokens

TILE_BYTES = 4 * 2**20
MAX_TILE_ROWS = 1024
SCRATCH_BYTES = 2**18
DEFAULT_KEEP_MIB = 256


def keep_budget() -> int:
    """Bytes of logits the forward may keep for the backward: ``ALIGNKERN_CPU_KEEP_LOGITS_MIB``
    (default 256; 0 always recomputes)."""
    value = os.environ.get("ALIGNKERN_CPU_KEEP_LOGITS_MIB", str(DEFAULT_KEEP_MIB))
    try:
        return max(0, int(float(value) * 2**20))
    except ValueError:
        raise ValueError(f"ALIGNKERN_CPU_KEEP_LOGITS_MIB must be a number of MiB, got "
                         f"{value!r}") from None


def keeps_logits(n_rows: int, vocab: int, acc: torch.dtype) -> bool:
    """Whether a call of ``n_rows`` rows over ``vocab`` ids keeps its logits for the backward."""
    return 0 < n_rows * vocab * acc.itemsize <= keep_budget()


def keep_kind(softcap, stats) -> str:
    """What a kept buffer holds: ``"probs"`` (the softmax, enough for the backward's two GEMMs)
    without a softcap (whose derivative needs the logits) or an entropy (whose gradient needs
    them too), else ``"logits"``."""
    return "probs" if softcap is None and "entropy" not in stats else "logits"


def _tiles(n_rows: int, vocab: int, itemsize: int) -> Iterator[tuple[slice, list[slice]]]:
    """(row chunk, its vocabulary blocks), each tile at most TILE_BYTES."""
    rows = max(1, min(n_rows, MAX_TILE_ROWS))
    cols = max(1, min(vocab, TILE_BYTES // (rows * itemsize)))
    blocks = [slice(v, min(v + cols, vocab)) for v in range(0, vocab, cols)]
    for start in range(0, n_rows, rows):
        yield slice(start, min(start + rows, n_rows)), blocks


def _logits_tile(h, weight, bias, block, softcap, acc, logit_scale=1.0, out=None) -> torch.Tensor:
    """Logits ``(n, |block|)`` in ``acc`` after bias, logit_scale and softcap (into ``out`` if
    given, contiguous); the scale costs no pass of its own with a softcap (``tanh(s x / c) =
    tanh(x / (c / s))``), nor at 1.0. A head of lower precision than ``acc`` is converted one
    block at a time."""
    logits = torch.mm(h, weight[block].to(acc).T, out=out)
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


def tile_partials(logits: torch.Tensor, temperature: float, stats: frozenset[str],
                  first_id: int) -> _logit_stats.Partials:
    """The log-sum-exp and, for the statistics in ``stats``, the partials of one tile ``logits
    (n, b)`` (float32/float64, contiguous rows) whose columns are the vocabulary ids ``first_id``
    ...; each field ``(1, n)``. One read of the tile (csrc/cpu/logit_stats.cpp with statistics,
    the token_logprobs kernel without)."""
    if not stats:
        row_max, log_sum = tile_lse(logits, temperature)
        return _logit_stats.Partials(row_max[None], log_sum[None])
    n_rows, width = logits.shape
    wanted = _logit_stats.kernel_stats(stats)

    def output(name, dtype=logits.dtype):
        return torch.empty(n_rows, dtype=dtype) if name is None or name in wanted else None

    fields = (output(None), output(None), output("entropy"), output("log_sum_sq_probs"),
              output("mean_logits"), output("is_top1"), output("is_top1", torch.int64))
    if n_rows:
        _backend.extension().logit_stats_cpu(
            logits.data_ptr(), _backend.DTYPE_CODES[logits.dtype], n_rows, width,
            logits.stride(0), float(temperature),
            *(0 if x is None else x.data_ptr() for x in fields))
    if fields[-1] is not None:
        fields[-1].add_(first_id)
    return _logit_stats.Partials(*(None if x is None else x[None] for x in fields))


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


def forward(hidden, weight, ids, bias, temperature, softcap, logit_scale, acc, ignore_index,
            stats=frozenset(), keep=False):
    """``(logprobs (N, K), row_max (N,), log_sum (N,), stats, kept)``: the log-probability of each
    target (0 for ``ignore_index``, NaN outside the vocabulary), each row's log-sum-exp in two
    parts, the targets' logits and the LSE read from the same tiles with the same 1 / T, the
    requested statistics (``_logit_stats.LogitStats``) from the same tiles, and with ``keep`` the
    whole ``(N, V)`` buffer ``keep_kind`` says (else None). A row chunk whose tile spans the whole
    vocabulary without statistics (the common case) gets everything from one call of the C++
    token kernel."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    if not stats and (keep or n_rows * vocab * acc.itemsize <= TILE_BYTES):  # one tile: no merging
        logits = _logits_tile(hidden.to(acc), weight, bias, slice(0, vocab), softcap, acc,
                              logit_scale, out=torch.empty((n_rows, vocab), dtype=acc))
        out, row_max, log_sum = _tokens._run_forward(logits, ids, temperature, ignore_index, "cpu")
        kept = None
        if keep:
            kept = (_probabilities_(logits, row_max, log_sum, temperature)
                    if keep_kind(softcap, stats) == "probs" else logits)
        return (out, row_max, log_sum, _logit_stats.no_rows(stats, ids.shape[1], acc, hidden.device),
                kept)
    valid = _targets.target_masks(ids, vocab, ignore_index)[0]
    picked = torch.zeros(ids.shape, dtype=acc)
    out = _tokens._poisoned(ids.shape, acc, hidden.device)
    row_max = _tokens._poisoned((n_rows,), acc, hidden.device)
    log_sum = _tokens._poisoned((n_rows,), acc, hidden.device)
    kept = torch.empty((n_rows, vocab), dtype=acc) if keep else None
    tiles = [(slice(0, n_rows), [slice(0, vocab)])] if keep else _tiles(n_rows, vocab, acc.itemsize)
    buffer = kept if keep else _TileBuffer(acc)
    merged, from_picked = [], []
    inv_t = torch.tensor(1.0 / temperature, dtype=acc)  # rounded as the C++ kernel rounds it
    for rows, blocks in tiles:
        h = hidden[rows].to(acc)
        if len(blocks) == 1 and not stats:
            logits = _logits_tile(h, weight, bias, blocks[0], softcap, acc, logit_scale,
                                  out=_tile_view(buffer, h, blocks[0]))
            out[rows], row_max[rows], log_sum[rows] = _tokens._run_forward(
                logits, ids[rows], temperature, ignore_index, "cpu")
            continue
        parts, chunk_picked = [], picked[rows]
        by_block = _targets_by_block(ids[rows], valid[rows], blocks)
        for block, (row, column, slot) in zip(blocks, by_block):
            logits = _logits_tile(h, weight, bias, block, softcap, acc, logit_scale,
                                  out=_tile_view(buffer, h, block))
            chunk_picked[row, slot] = logits[row, column] * inv_t
            parts.append(tile_partials(logits, temperature, stats, block.start))
        parts = _logit_stats.concat(parts)
        row_max[rows], log_sum[rows] = _logit_stats.merge_parts(parts.row_max, parts.log_sum)
        from_picked.append(rows)
        if stats:
            merged.append(_logit_stats.merge(parts, row_max[rows], log_sum[rows], vocab, ids[rows],
                                             valid[rows]))
    for rows in from_picked:
        out[rows] = _logprobs_from(picked[rows], row_max[rows], log_sum[rows], ids[rows],
                                   valid[rows], ignore_index)
    if kept is not None and keep_kind(softcap, stats) == "probs":
        _probabilities_(kept, row_max, log_sum, temperature)
    if not merged:  # no statistics, or no rows
        row_stats = _logit_stats.no_rows(stats, ids.shape[1], acc, hidden.device)
    else:
        row_stats = _logit_stats.LogitStats(*(None if column[0] is None else torch.cat(column)
                                              for column in zip(*merged)))
    return out, row_max, log_sum, row_stats, kept


class _TileBuffer:
    """One buffer of ``TILE_BYTES`` that every tile of a call is computed into: allocated (and its
    pages faulted in) once per call instead of once per tile."""

    def __init__(self, acc: torch.dtype):
        self.data = torch.empty(TILE_BYTES // acc.itemsize, dtype=acc)

    def view(self, n_rows: int, width: int) -> torch.Tensor:
        return self.data[: n_rows * width].view(n_rows, width)


def _tile_view(buffer, h: torch.Tensor, block: slice) -> torch.Tensor:
    """Where the tile of rows ``h`` and vocabulary ``block`` goes: the kept logits' own columns
    (the one tile of a kept call spans them all) or a view of the call's tile buffer."""
    if isinstance(buffer, _TileBuffer):
        return buffer.view(h.shape[0], block.stop - block.start)
    return buffer


def _probabilities_(logits, row_max, log_sum, temperature) -> torch.Tensor:
    """``softmax(logits / T)`` in place, ``exp((z - row_max) - log_sum)``: one pass of the C++
    softmax kernel (its ``-coef exp(...) / T`` with ``coef = -T``)."""
    coef = torch.full_like(row_max, -temperature)
    return _tokens.dense_gradient(logits, coef, row_max, log_sum, temperature, logits)


def _logprobs_from(z, row_max, log_sum, ids, valid, ignore_index):
    """``(z - row_max) - log_sum`` at the valid targets, 0 at ``ignore_index`` and NaN at ids
    outside the vocabulary, as the C++ token kernel gives them."""
    out = torch.where(valid, (z - row_max[:, None]) - log_sum[:, None], 0.0)
    return out.masked_fill_(~valid & (ids != ignore_index), float("nan"))


def _dlogits_blocks(hidden, weight, ids, valid, bias, softcap, logit_scale, acc, kept):
    """``(rows, h, block, logits, out, targets)`` for each piece of the backward: the row chunk
    and its hidden states in ``acc``, the logits of a (row chunk x vocabulary block) piece, the
    buffer its ``dlogits`` goes to, and its targets (``_targets_by_block``). Kept logits are read
    in vocabulary blocks of all the rows into a scratch buffer; otherwise each tile is recomputed
    and turned into its ``dlogits`` in place."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    if kept is not None:
        width = max(1, min(vocab, SCRATCH_BYTES // max(1, n_rows * acc.itemsize)))
        blocks = [slice(v, min(v + width, vocab)) for v in range(0, vocab, width)]
        scratch = torch.empty(n_rows * width, dtype=acc)
        rows, h = slice(0, n_rows), hidden.to(acc)
        for block, targets in zip(blocks, _targets_by_block(ids, valid, blocks)):
            out = scratch[: n_rows * (block.stop - block.start)].view(n_rows, -1)
            yield rows, h, block, kept[:, block], out, targets
        return
    buffer = _TileBuffer(acc)
    for rows, blocks in _tiles(n_rows, vocab, acc.itemsize):
        h = hidden[rows].to(acc)
        for block, targets in zip(blocks, _targets_by_block(ids[rows], valid[rows], blocks)):
            logits = _logits_tile(h, weight, bias, block, softcap, acc, logit_scale,
                                  out=_tile_view(buffer, h, block))
            yield rows, h, block, logits, logits, targets


def backward(g, coef, hidden, weight, ids, valid, bias, row_max, log_sum, temperature, softcap,
             logit_scale, need_hidden, need_weight, need_bias, acc, entropy_grad=None, kept=None,
             kept_are_probs=False):
    """``(dhidden, dweight, dbias)`` (None where not needed) from the per-slot gradients ``g``
    (0 for slots that are not valid) and each row's ``coef`` = sum of valid g_k - g_lse (plus
    ``g_H (H - log_sum)`` with an entropy gradient ``entropy_grad`` = g_H, whose term is
    ``-g_H p_v ((z_v - row_max) - log_sum + H)``: dense part ``-p_v (coef + g_H (z_v - row_max))``),
    with ``p_v = exp((z_v - row_max) - log_sum)``; ``kept``: what the forward kept (its logits,
    or with ``kept_are_probs`` its probabilities), or None to recompute the logits."""
    if kept is not None and kept_are_probs:
        return _backward_from_probabilities(g, coef, hidden, weight, ids, valid, bias, kept,
                                            temperature / logit_scale, need_hidden,
                                            need_weight, need_bias, acc)
    n_rows, (vocab, hidden_size) = hidden.shape[0], weight.shape
    # Each piece's GEMM writes (first visit) or adds into its block of the gradients, so the large
    # ones need no zero-filling pass.
    grad_hidden = torch.empty((n_rows, hidden_size), dtype=acc) if need_hidden else None
    grad_weight = torch.empty((vocab, hidden_size), dtype=acc) if need_weight else None
    grad_bias = torch.zeros((vocab,), dtype=acc) if need_bias else None
    written_rows, written_blocks = set(), set()
    inv_t = 1.0 / temperature
    pieces = _dlogits_blocks(hidden, weight, ids, valid, bias, softcap, logit_scale, acc, kept)
    for rows, h, block, logits, dlogits, (row, column, slot) in pieces:
        # d capped / d logits = 1 - tanh^2, from the capped values (before an in-place pass)
        squash = None if softcap is None else 1.0 - (logits / softcap).square_()
        # dz / T, dz = -(coef + g_H (z - row_max)) softmax(z): one pass of the C++ kernel
        _tokens.dense_gradient(logits, coef[rows], row_max[rows], log_sum[rows], temperature,
                               dlogits, None if entropy_grad is None else entropy_grad[rows])
        # repeated ids of a row add up: index_put_ accumulates in order on the CPU
        dlogits.index_put_((row, column), g[rows][row, slot] * inv_t, accumulate=True)
        if logit_scale != 1.0:  # d logits_capped / d logits (1 without a softcap: folded)
            dlogits.mul_(logit_scale)
        if squash is not None:
            dlogits.mul_(squash)
            del squash
        if need_hidden:
            _accumulate_mm(grad_hidden[rows], dlogits, weight[block].to(acc),
                           first=_first_visit(written_rows, rows))
        if need_weight:
            _accumulate_mm(grad_weight[block], dlogits.T, h,
                           first=_first_visit(written_blocks, block))
        if need_bias:
            grad_bias[block] += dlogits.sum(0)
    if n_rows == 0:  # no piece visited them
        for grad in (grad_hidden, grad_weight):
            if grad is not None:
                grad.zero_()
    return grad_hidden, grad_weight, grad_bias


def _backward_from_probabilities(g, coef, hidden, weight, ids, valid, bias, probs, temperature,
                                 need_hidden, need_weight, need_bias, acc):
    """The backward from the kept softmax ``probs`` ``P (N, V)`` (no softcap, no entropy
    gradient): ``dlogits = (G - coef P) / T`` with ``G`` the targets' columns, never formed:
    ``dweight = (-P^T (coef h) + sum_k g_k e_{t_k} h_r) / T``, ``dhidden = (-coef (P W) +
    sum_k g_k W[t_k]) / T``, ``dbias = (-P^T coef + sum_k g_k e_{t_k}) / T``: two GEMMs that read
    ``P`` as it is, and O(N K H) for the targets (index_add_, in order: deterministic). A head of
    lower precision than ``acc`` is converted a block of at most ``SCRATCH_BYTES`` at a time."""
    h = hidden.to(acc)
    scale = coef / -temperature  # (N,): -coef / T
    # The targets' terms one slot at a time: (N, H) temporaries, never (N K, H). Slots that are
    # not valid carry g = 0 (their ids clamped into range add nothing).
    slot_g = torch.where(valid, g, 0.0) / temperature
    slot_ids = ids.clamp(0, weight.shape[0] - 1)
    grad_hidden = grad_weight = grad_bias = None
    if need_weight:
        grad_weight = torch.mm(probs.T, h * scale[:, None])
        for k in range(ids.shape[1]):
            grad_weight.index_add_(0, slot_ids[:, k], h * slot_g[:, k, None])
    if need_hidden:
        grad_hidden = _probs_times_head(probs, weight, acc).mul_(scale[:, None])
        for k in range(ids.shape[1]):
            grad_hidden.addcmul_(weight[slot_ids[:, k]].to(acc), slot_g[:, k, None])
    if need_bias:
        grad_bias = torch.mv(probs.T, scale)
        for k in range(ids.shape[1]):
            grad_bias.index_add_(0, slot_ids[:, k], slot_g[:, k])
    return grad_hidden, grad_weight, grad_bias


def _probs_times_head(probs, weight, acc) -> torch.Tensor:
    """``P @ W`` ``(N, H)`` in ``acc``; a head of lower precision is converted block by block."""
    if weight.dtype == acc:
        return torch.mm(probs, weight)
    n_rows, (vocab, hidden_size) = probs.shape[0], weight.shape
    out = torch.zeros((n_rows, hidden_size), dtype=acc)
    step = max(1, SCRATCH_BYTES // (hidden_size * acc.itemsize))
    for start in range(0, vocab, step):
        block = slice(start, start + step)
        out.addmm_(probs[:, block], weight[block].to(acc))
    return out


def _first_visit(seen: set, part: slice) -> bool:
    key = (part.start, part.stop)
    first = key not in seen
    seen.add(key)
    return first


def _accumulate_mm(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, first: bool) -> None:
    """``out = a @ b`` on the first visit of ``out`` (a contiguous block of a gradient), ``out +=
    a @ b`` after: no temporary either way."""
    if first:
        torch.mm(a, b, out=out)
    else:
        out.addmm_(a, b)
