"""The fused statistics of ``linear_logprobs(..., stats=...)``: per-part partials and their merge.

Every backend walks the vocabulary in parts (the cpu backend's tiles, the Triton kernel's
vocabulary splits, the CUDA kernel's single pass) and reduces each part ``j`` of each row, in the
same pass that gives the part's log-sum-exp in two parts, ``lse_j = c_j + l_j`` (``c_j`` the
part's maximum of z, 0 where infinite, and ``l_j = log sum_v exp(z_v - c_j)``), to:

- ``mean_dz_j`` = sum_v q_v (z_v - c_j) with ``q = softmax(z)`` within the part  (for the entropy)
- ``log_sum_sq_j`` = log sum_v q_v^2                                              (log sum p^2)
- ``sum_z_j`` = sum_v z_v                                                         (mean logit)
- ``max_z_j`` and ``argmax_j``, the vocabulary id of the part's first maximum (is_top1,
  max_logits)

``merge_parts`` combines S parts' ``(c_j, l_j)`` into the row's ``(c, l)`` with ``c`` the largest
``c_j`` of a non-empty part and ``l = log sum_j exp((c_j - c) + l_j)``; ``merge`` gives the rows'
statistics with ``w_j = exp((c_j - c) + l_j - l)``: ``entropy = l - sum_j w_j ((c_j - c) +
mean_dz_j)``, ``log sum p^2 = logsumexp_j(2 ((c_j - c) + l_j - l) + log_sum_sq_j)``, ``mean =
sum_j sum_z_j / V``, and the first maximum over the parts (the earliest part wins a tie, so it is the
first maximum of the row: TRL's tie rule for ``is_top1``). Every quantity is relative to a row
maximum: ``lse = c + l`` rounded to one float, or ``sum p z`` near ``|z|``, would lose every bit
below the spacing of ``|z|`` (docs/design.md, The numerics).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

STATS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "max_logits")


def kernel_stats(stats: frozenset[str]) -> frozenset[str]:
    """What to ask the kernels for: ``max_logits`` comes with ``is_top1``'s partials."""
    return frozenset(stats - {"max_logits"} | ({"is_top1"} if "max_logits" in stats else set()))


class Partials(NamedTuple):
    """Per part and row, each ``(S, N)``; the statistics not requested are None."""

    row_max: torch.Tensor
    log_sum: torch.Tensor
    mean_dz: torch.Tensor | None = None
    log_sum_sq: torch.Tensor | None = None
    sum_z: torch.Tensor | None = None
    max_z: torch.Tensor | None = None
    argmax: torch.Tensor | None = None


class LogitStats(NamedTuple):
    """The merged statistics: ``entropy``, ``log_sum_sq_probs``, ``mean_logits`` ``(N,)``,
    ``is_top1 (N, K)`` bool and ``max_logits (N,)``; None where not requested."""

    entropy: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    max_logits: torch.Tensor | None = None


def tile_partials(z: torch.Tensor, row_max: torch.Tensor, log_sum: torch.Tensor,
                  stats: frozenset[str], first_id: int) -> Partials:
    """The partials of one tile ``z (n, b)`` of scaled logits (vocabulary ids ``first_id`` ...)
    whose log-sum-exp per row is ``row_max + log_sum`` (``(n,)`` each); each field ``(1, n)``."""
    mean_dz = log_sum_sq = None
    if stats & {"entropy", "log_sum_sq_probs"}:
        dz = z - row_max[:, None]
        # q sums to 1 only up to the rounding of ``log_sum`` (by another kernel); dividing by its
        # own sum keeps that error out of the mean.
        q = torch.exp(dz - log_sum[:, None])
        total = q.sum(-1)
        if "entropy" in stats:
            # q == 0 where z = -inf: add 0, not 0 * -inf
            mean_dz = torch.linalg.vecdot(q, dz.masked_fill_(q == 0, 0.0)) / total
        if "log_sum_sq_probs" in stats:
            log_sum_sq = torch.linalg.vecdot(q, q).log_() - 2 * total.log()
    sum_z = z.sum(-1) if "mean_logits" in stats else None
    max_z = argmax = None
    if stats & {"is_top1", "max_logits"}:
        max_z, argmax = z.max(-1)  # the first maximum of each row (torch.max's rule)
        argmax = argmax + first_id
    fields = (row_max, log_sum, mean_dz, log_sum_sq, sum_z, max_z, argmax)
    return Partials(*(None if x is None else x[None] for x in fields))


def concat(parts: list[Partials]) -> Partials:
    """The parts of one row chunk stacked along the part dimension."""
    return Partials(*(None if column[0] is None else torch.cat(column)
                      for column in zip(*parts)))


def merge_parts(row_max: torch.Tensor, log_sum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A row's log-sum-exp ``(c, l)`` from its parts' ``(c_j, l_j)``, ``(S, N)`` each: ``c`` the
    largest ``c_j`` of a part that holds some mass (``l_j > -inf``; 0 if none does) and
    ``l = log sum_j exp((c_j - c) + l_j)``. NaN in any part gives NaN."""
    if row_max.shape[0] == 1:
        return row_max[0], log_sum[0]
    top = torch.where(log_sum > float("-inf"), row_max, float("-inf")).amax(0)
    top = torch.where(torch.isfinite(top), top, 0.0)
    return top, torch.logsumexp((row_max - top) + log_sum, dim=0)


def merge(parts: Partials, row_max: torch.Tensor, log_sum: torch.Tensor, vocab: int,
          ids: torch.Tensor, valid: torch.Tensor) -> LogitStats:
    """The rows' statistics from their parts (see the module docstring); ``(row_max, log_sum)``
    ``(N,)`` come from ``merge_parts``, ``ids (N, K)`` are the targets and ``valid`` their mask."""
    offset = parts.row_max - row_max  # c_j - c, exact where it matters (Sterbenz)
    log_weight = offset + parts.log_sum - log_sum
    weight = torch.exp(log_weight)
    entropy = log_sum_sq = mean = is_top1 = best = None
    if parts.mean_dz is not None:
        # A part with no mass has weight 0 and a 0/0 mean: it adds nothing.
        contribution = torch.where(weight > 0, weight * (offset + parts.mean_dz), 0.0)
        entropy = log_sum - contribution.sum(0)
    if parts.log_sum_sq is not None:
        log_sum_sq = torch.logsumexp(2 * log_weight + parts.log_sum_sq, dim=0)
    if parts.sum_z is not None:
        mean = parts.sum_z.sum(0) / vocab
    if parts.max_z is not None:
        best = parts.max_z.amax(0)
        first_part = (parts.max_z == best).to(torch.uint8).argmax(0)  # the first part attaining it
        first_id = parts.argmax.gather(0, first_part[None])[0]
        is_top1 = (ids == first_id[:, None]) & valid
    return LogitStats(entropy, log_sum_sq, mean, is_top1, best)


def no_rows(stats: frozenset[str], k: int, dtype: torch.dtype, device) -> LogitStats:
    """The requested statistics of zero rows."""
    def empty(name, shape, dtype_=dtype):
        return torch.empty(shape, dtype=dtype_, device=device) if name in stats else None

    return LogitStats(empty("entropy", (0,)), empty("log_sum_sq_probs", (0,)),
                      empty("mean_logits", (0,)), empty("is_top1", (0, k), torch.bool),
                      empty("max_logits", (0,)))
