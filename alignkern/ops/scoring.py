"""Scoring with the model itself, built on ``linear_logprobs``: ``option_logprobs`` (the same
option ids at every row), ``self_eval_scores`` (RAIN / P(True) / G-Eval) and ``sequence_logprobs``
(log-likelihood of whole candidate sequences). None of them materialises the logits.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .linear_logprobs import _call


class SelfEvalScores(NamedTuple):
    """What ``self_eval_scores`` returns: ``score`` = expected value of the options under the
    probabilities renormalised over them; ``mass`` = total probability on the options."""

    score: torch.Tensor
    mass: torch.Tensor


def _check_options(name: str, options: torch.Tensor, hidden: torch.Tensor) -> None:
    if not isinstance(options, torch.Tensor) or options.dim() != 1:
        got = tuple(options.shape) if isinstance(options, torch.Tensor) else type(options).__name__
        raise ValueError(f"{name}: options must be a 1-D tensor of K token ids, got {got}")
    if options.shape[0] == 0:
        raise ValueError(f"{name}: options must hold at least one token id, got an empty tensor")


def option_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    options: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Log-probabilities ``(..., K)`` of the same ``options (K,)`` token ids at every row (RAIN's
    "(A)"/"(B)", "Yes"/"No", rating tokens), normalised over the full vocabulary.

    The option ids are expanded without a copy of the hidden states; the LM head is read once per
    tile of rows, exactly as ``linear_logprobs`` with ``targets = options`` at every row.
    Raises what ``linear_logprobs`` raises, and ``ValueError`` for options that are not a
    non-empty 1-D tensor.
    """
    _check_options("option_logprobs", options, hidden)
    targets = options.expand(*hidden.shape[:-1], options.shape[0])
    return _call("option_logprobs", hidden, weight, targets, bias, temperature, softcap, -100)[0]


def self_eval_scores(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    options: torch.Tensor,
    values: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
) -> SelfEvalScores:
    """RAIN / P(True) / G-Eval scoring from the last hidden state of each prompt.

    ``p = softmax over the K options of option_logprobs``; ``score = sum_k p_k * values_k`` and
    ``mass = sum_k exp(option_logprobs_k)`` (low mass: the model did not answer with an option).

    Args:
        hidden: ``(..., H)``; weight: ``(V, H)``; options: ``(K,)`` token ids.
        values: ``(K,)`` the value of each option; default ``(+1, -1)`` for K = 2 (``p_A - p_B``).
            G-Eval's expected rating: ``options`` = the ids of "1".."10", ``values = 1..10``.

    Returns:
        ``SelfEvalScores(score, mass)``, both ``(...)`` float32, differentiable.

    Example:
        >>> s = alignkern.self_eval_scores(last_hidden, lm_head, torch.tensor([id_A, id_B]))
        >>> s.score  # p(A) - p(B) among the two answers, in [-1, 1]
    """
    _check_options("self_eval_scores", options, hidden)
    k = options.shape[0]
    if values is None:
        if k != 2:
            raise ValueError(
                f"self_eval_scores: values must be given for K = {k} options (the default "
                "(+1, -1) is defined for K = 2 only)"
            )
        values = torch.tensor([1.0, -1.0], device=hidden.device)
    if not isinstance(values, torch.Tensor) or tuple(values.shape) != (k,):
        got = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(f"self_eval_scores: values must have shape ({k},) like options, got {got}")
    logprobs = option_logprobs(hidden, weight, options, bias=bias, temperature=temperature,
                               softcap=softcap)
    p = torch.softmax(logprobs, dim=-1)
    score = (p * values.to(device=p.device, dtype=p.dtype)).sum(-1)
    mass = torch.logsumexp(logprobs, dim=-1).exp()
    return SelfEvalScores(score, mass)


def sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    reduction: str = "sum",
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Log-likelihood of whole candidate sequences (DPO implicit rewards, SCoRe).

    Args:
        hidden: ``(B, T, H)`` hidden states; weight: ``(V, H)``.
        targets: ``(B, T)`` ids already aligned to the positions that predict them.
        mask: optional ``(B, T)`` bool; positions where it is false (or the target is
            ``ignore_index``) are not counted, and their ids are not checked.
        reduction: ``"sum"`` or ``"mean"`` over the counted tokens (a sequence with none gives 0).

    Returns:
        ``(B,)`` float32 (float64 for float64 inputs), differentiable in hidden, weight, bias.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"sequence_logprobs: reduction must be 'sum' or 'mean', got {reduction!r}")
    if isinstance(hidden, torch.Tensor) and hidden.dim() != 3:
        raise ValueError(
            f"sequence_logprobs: hidden must have shape (B, T, H), got {tuple(hidden.shape)}"
        )
    if isinstance(targets, torch.Tensor) and isinstance(hidden, torch.Tensor) and \
            tuple(targets.shape) != tuple(hidden.shape[:2]):
        raise ValueError(
            f"sequence_logprobs: targets must have shape (B, T) = {tuple(hidden.shape[:2])}, got "
            f"{tuple(targets.shape)}"
        )
    counted = targets != ignore_index
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(targets.shape):
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(
                f"sequence_logprobs: mask must have shape {tuple(targets.shape)} like targets, "
                f"got {got}"
            )
        counted = counted & mask.to(torch.bool)
        targets = targets.masked_fill(~counted, ignore_index)
    logprobs = _call("sequence_logprobs", hidden, weight, targets, bias, temperature, softcap,
                     ignore_index)[0]
    total = logprobs.sum(-1)  # ignored positions are exactly 0
    if reduction == "mean":
        return total / counted.sum(-1).clamp(min=1).to(total.dtype)
    return total
