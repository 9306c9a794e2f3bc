"""Scoring with the model itself, built on ``linear_logprobs``: ``option_logprobs`` (the same
option ids at every row), ``self_eval_scores`` (RAIN / P(True) / G-Eval) and ``sequence_logprobs``
(log-likelihood of whole candidate sequences). None of them materialises the logits.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import _checks
from . import token_logprobs as _tokens
from .linear_logprobs import _call

# The ignore_index handed to the op by the option functions: options are checked to lie in
# [0, V) first, so no option equals it (int32 options cannot even hold it).
NO_IGNORED_ID = _checks.INT64_MIN


class SelfEvalScores(NamedTuple):
    """What ``self_eval_scores`` returns: ``score`` = expected value of the options under the
    probabilities renormalised over them; ``mass`` = total probability on the options."""

    score: torch.Tensor
    mass: torch.Tensor


def _check_options(name: str, options, weight) -> None:
    """options: a non-empty 1-D int32/int64 tensor of ids in [0, V) (never an ignore_index:
    every option is scored)."""
    _checks.tensor(name, "options", options, dtypes=_checks.INDEX_DTYPES)
    if options.dim() != 1 or options.shape[0] == 0:
        raise ValueError(f"{name}: options must be a non-empty 1-D tensor of K token ids, got "
                         f"shape {tuple(options.shape)}")
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        _tokens._check_target_ids(options, weight.shape[0], None, name, "options")


def _option_logprobs(name, hidden, weight, options, bias, temperature, softcap,
                     logit_scale) -> torch.Tensor:
    _check_options(name, options, weight)
    targets = options.expand(*hidden.shape[:-1], options.shape[0]) \
        if isinstance(hidden, torch.Tensor) else options
    # No id is ignored: the op's ignore_index is a value no option can take once checked.
    return _call(name, hidden, weight, targets, bias, temperature, softcap, logit_scale,
                 NO_IGNORED_ID, check_ids=False)[0]


def option_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    options: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
) -> torch.Tensor:
    """Log-probabilities ``(..., K)`` of the same ``options (K,)`` token ids at every row (RAIN's
    "(A)"/"(B)", "Yes"/"No", rating tokens), normalised over the full vocabulary.

    The option ids are expanded without a copy of the hidden states; the LM head is read once per
    tile of rows, exactly as ``linear_logprobs`` with ``targets = options`` at every row. Options
    are never ignored (-100 is not special here).

    Args:
        hidden: ``(..., H)`` hidden states (float32, float16, bfloat16 or float64).
        weight: ``(V, H)`` LM head.
        options: ``(K,)`` int32/int64 token ids, K >= 1, each in ``[0, V)``.
        bias: optional ``(V,)`` LM-head bias, as in ``linear_logprobs``.
        temperature: as in ``linear_logprobs``.
        softcap: as in ``linear_logprobs``.
        logit_scale: as in ``linear_logprobs``.

    Returns:
        ``(..., K)`` float32 (float64 for float64 inputs), differentiable in hidden, weight and
        bias.

    Raises:
        TypeError: options that are not an int32/int64 tensor; anything ``linear_logprobs``
            raises a TypeError for.
        ValueError: options that are not a non-empty 1-D tensor; anything ``linear_logprobs``
            raises a ValueError for.
        IndexError: an option outside ``[0, V)`` (unless ``ALIGNKERN_VALIDATE=0``: its
            log-probability is then NaN).
    """
    return _option_logprobs("option_logprobs", hidden, weight, options, bias, temperature,
                            softcap, logit_scale)


def self_eval_scores(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    options: torch.Tensor,
    values: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
) -> SelfEvalScores:
    """RAIN / P(True) / G-Eval scoring from the last hidden state of each prompt.

    ``p = softmax over the K options of option_logprobs``; ``score = sum_k p_k * values_k`` and
    ``mass = sum_k exp(option_logprobs_k)`` (low mass: the model did not answer with an option).

    Args:
        hidden: ``(..., H)`` hidden states, e.g. the last position of each prompt.
        weight: ``(V, H)`` LM head.
        options: ``(K,)`` int32/int64 token ids.
        values: ``(K,)`` real tensor, the value of each option; default ``(+1, -1)`` for K = 2
            (``p_A - p_B``). G-Eval's expected rating: ``options`` = the ids of "1".."10",
            ``values = 1..10``.
        bias: optional ``(V,)`` LM-head bias, as in ``linear_logprobs``.
        temperature: as in ``linear_logprobs``.
        softcap: as in ``linear_logprobs``.
        logit_scale: as in ``linear_logprobs``.

    Returns:
        ``SelfEvalScores(score, mass)``, both ``(...)`` float32, differentiable.

    Raises:
        TypeError: values that are not a real tensor; what ``option_logprobs`` raises.
        ValueError: values of the wrong shape, or none given for K != 2 options; what
            ``option_logprobs`` raises.
        IndexError: an option outside ``[0, V)``.

    Example:
        >>> s = alignkern.self_eval_scores(last_hidden, lm_head, torch.tensor([id_A, id_B]))
        >>> s.score  # p(A) - p(B) among the two answers, in [-1, 1]
    """
    name = "self_eval_scores"
    _check_options(name, options, weight)
    k = options.shape[0]
    if values is None:
        if k != 2:
            raise ValueError(
                f"{name}: values must be given for K = {k} options (the default (+1, -1) is "
                "defined for K = 2 only)"
            )
        values = torch.tensor([1.0, -1.0], device=options.device)
    _checks.tensor(name, "values", values)
    if values.is_complex() or values.dtype == torch.bool:
        raise TypeError(f"{name}: values must be a real tensor, got {values.dtype}")
    _checks.shape(name, "values", values, (k,), "one value per option")
    logprobs = _option_logprobs(name, hidden, weight, options, bias, temperature, softcap,
                                logit_scale)
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
    logit_scale: float = 1.0,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Log-likelihood of whole candidate sequences (DPO implicit rewards, SCoRe).

    Args:
        hidden: ``(B, T, H)`` hidden states.
        weight: ``(V, H)`` LM head.
        targets: ``(B, T)`` int32/int64 ids already aligned to the positions that predict them
            (``input_ids[:, 1:]`` for ``hidden[:, :-1]``).
        mask: optional ``(B, T)`` tensor of dtype ``torch.bool``, or an integer dtype holding 0
            and 1 (an ``attention_mask`` as a tokenizer returns it, int64, works as it is); a
            floating-point mask is a TypeError. Positions where it is false/0 (or the target is
            ``ignore_index``) are not counted, and their ids are not checked.
        reduction: ``"sum"`` or ``"mean"`` over the counted tokens (a sequence with none gives 0).
        bias: optional ``(V,)`` LM-head bias, as in ``linear_logprobs``.
        temperature: as in ``linear_logprobs``.
        softcap: as in ``linear_logprobs``.
        logit_scale: as in ``linear_logprobs``.
        ignore_index: as in ``linear_logprobs``.

    Returns:
        ``(B,)`` float32 (float64 for float64 inputs), differentiable in hidden, weight, bias.

    Raises:
        TypeError: float targets, a floating-point or complex mask; what ``linear_logprobs``
            raises.
        ValueError: hidden that is not 3-D, targets or mask not ``(B, T)``, a reduction other
            than ``"sum"``/``"mean"``; what ``linear_logprobs`` raises.
        IndexError: a counted target outside ``[0, V)``.
    """
    name = "sequence_logprobs"
    ignore_index = check_sequence_arguments(name, hidden, targets, mask, reduction, ignore_index)
    targets, counted = counted_targets(targets, mask, ignore_index)
    logprobs = _call(name, hidden, weight, targets, bias, temperature, softcap, logit_scale,
                     ignore_index)[0]
    return reduce_sequence(logprobs, counted, reduction)


def check_sequence_arguments(name: str, hidden, targets, mask, reduction, ignore_index) -> int:
    """Check ``sequence_logprobs``'s own arguments (the head's are checked by the op); returns
    ``ignore_index`` as a Python int."""
    _checks.choice(name, "reduction", reduction, ("sum", "mean"))
    _checks.tensor(name, "hidden", hidden)
    _checks.tensor(name, "targets", targets, dtypes=_checks.INDEX_DTYPES)
    if hidden.dim() != 3:
        raise ValueError(f"{name}: hidden must have shape (B, T, H), got {tuple(hidden.shape)}")
    _checks.shape(name, "targets", targets, hidden.shape[:2], "(B, T) of hidden")
    ignore_index = _checks.integer(name, "ignore_index", ignore_index)
    if mask is not None:
        _checks.mask(name, "mask", mask, targets.shape, "the shape of targets")
    return ignore_index


def counted_targets(targets: torch.Tensor, mask: torch.Tensor | None,
                    ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(targets, counted)``: the ``(B, T)`` targets with the positions outside ``mask`` set to
    ``ignore_index`` (their ids are then not read), and the bool positions that count."""
    counted = targets != ignore_index
    if mask is not None:
        counted = counted & mask.to(torch.bool)
        targets = targets.masked_fill(~counted, ignore_index)
    return targets, counted


def reduce_sequence(logprobs: torch.Tensor, counted: torch.Tensor, reduction: str) -> torch.Tensor:
    """``(B,)`` sum, or mean over the counted positions (0 for a sequence with none), of ``(B, T)``
    log-probabilities whose ignored positions are exactly 0."""
    total = logprobs.sum(-1)
    if reduction == "mean":
        return total / counted.sum(-1).clamp(min=1).to(total.dtype)
    return total
