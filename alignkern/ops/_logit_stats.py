"""The fused statistics of ``linear_logprobs(..., stats=...)``: per-part partials and their merge.

Every backend walks the vocabulary in parts (the cpu backend's tiles, the Triton kernel's
vocabulary splits, the CUDA kernel's single pass) and reduces each part ``j`` of each row, in the
same pass that gives the part's log-sum-exp ``lse_j``, to:

- ``mean_z_j`` = sum_v q_v z_v with ``q = softmax(z)`` within the part      (for the entropy)
- ``log_sum_sq_j`` = log sum_v q_v^2                                        (log sum p^2)
- ``sum_z_j`` = sum_v z_v                                                   (mean logit)
- ``max_z_j`` and ``argmax_j``, the vocabulary id of the part's first maximum (is_top1,
  max_logits)

``merge`` combines S parts, ``(S, N)`` each, into the row's statistics with ``w_j = exp(lse_j -
lse)``: ``entropy = lse - sum_j w_j mean_z_j``, ``log sum p^2 = logsumexp_j(2 (lse_j - lse) +
log_sum_sq_j)``, ``mean = sum_j sum_z_j / V``, and the first maximum over the parts (the earliest
part wins a tie, so it is the first maximum of the row: TRL's tie rule for ``is_top1``).
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

    lse: torch.Tensor
    mean_z: torch.Tensor | None = None
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


def tile_partials(z: torch.Tensor, lse: torch.Tensor, stats: frozenset[str],
                  first_id: int) -> Partials:
    """The partials of one tile ``z (n, b)`` of scaled logits (vocabulary ids ``first_id`` ...)
    whose log-sum-exp per row is ``lse (n,)``; each field ``(1, n)``."""
    mean_z = log_sum_sq = None
    if stats & {"entropy", "log_sum_sq_probs"}:
        # q sums to 1 only up to the rounding of ``lse`` (by another kernel); dividing by its own
        # sum keeps that error out of the mean, where it would be multiplied by |z|.
        q = torch.exp(z - lse[:, None])
        total = q.sum(-1)
        if "entropy" in stats:
            mean_z = torch.linalg.vecdot(q, z) / total
        if "log_sum_sq_probs" in stats:
            log_sum_sq = torch.linalg.vecdot(q, q).log_() - 2 * total.log()
    sum_z = z.sum(-1) if "mean_logits" in stats else None
    max_z = argmax = None
    if stats & {"is_top1", "max_logits"}:
        max_z, argmax = z.max(-1)  # the first maximum of each row (torch.max's rule)
        argmax = argmax + first_id
    fields = (lse, mean_z, log_sum_sq, sum_z, max_z, argmax)
    return Partials(*(None if x is None else x[None] for x in fields))


def concat(parts: list[Partials]) -> Partials:
    """The parts of one row chunk stacked along the part dimension."""
    return Partials(*(None if column[0] is None else torch.cat(column)
                      for column in zip(*parts)))


def merge_lse(parts: Partials) -> torch.Tensor:
    return parts.lse[0] if parts.lse.shape[0] == 1 else torch.logsumexp(parts.lse, dim=0)


def merge(parts: Partials, lse: torch.Tensor, vocab: int, ids: torch.Tensor,
          valid: torch.Tensor) -> LogitStats:
    """The rows' statistics from their parts (see the module docstring); ``lse (N,)`` is
    ``merge_lse(parts)``, ``ids (N, K)`` the targets and ``valid`` their mask."""
    weight = torch.exp(parts.lse - lse)
    entropy = log_sum_sq = mean = is_top1 = best = None
    if parts.mean_z is not None:
        entropy = lse - (weight * parts.mean_z).sum(0)
    if parts.log_sum_sq is not None:
        log_sum_sq = torch.logsumexp(2 * (parts.lse - lse) + parts.log_sum_sq, dim=0)
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
