"""Preference and self-correction losses, exact and differentiable, with per-example outputs.

Every loss takes ``reduction="mean" | "sum" | "none"``. The log-likelihoods they consume come from
``alignkern.sequence_logprobs`` (fused, never materialising logits); ``fused_linear_dpo_loss``
does that step for you.

  bradley_terry_loss       -logsigmoid(chosen - rejected - margin)
  dpo_loss                 DPO and its IPO / hinge / robust variants, with TRL's logged metrics
  fused_linear_dpo_loss    DPO from hidden states and the LM head (chosen rows, then rejected)
  plackett_luce_loss       the listwise ranking loss, O(N log N)
  linear_kl                per-token KL(pi || pi_ref) from hidden states, no logits (ops/linear_kl)
  score_shaping            SCoRe's second-attempt reward
  self_correction_metrics  Acc@t1, Acc@t2, delta, delta i->c, delta c->i as SCoRe reports them
  preference_distinguishability  Im & Li's quantities that predict what DPO learns first
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .ops.linear_kl import linear_kl
from .ops.scoring import sequence_logprobs

__all__ = ["bradley_terry_loss", "dpo_loss", "fused_linear_dpo_loss", "plackett_luce_loss",
           "linear_kl", "score_shaping", "self_correction_metrics",
           "preference_distinguishability", "DPOOutput", "SelfCorrectionMetrics",
           "Distinguishability"]

REDUCTIONS = ("mean", "sum", "none")
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def _reduce(name: str, losses: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    if reduction == "none":
        return losses
    raise ValueError(f"{name}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _in_loss_dtype(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Losses are computed and returned in float32 (float64 for float64 inputs); gradients still
    reach half-precision inputs in their own dtype."""
    return tuple(t if t.dtype == torch.float64 else t.float() for t in tensors)


def _check_same_shape(name: str, **tensors: torch.Tensor) -> None:
    shapes = {arg: tuple(t.shape) for arg, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{arg} {shape}" for arg, shape in shapes.items())
        raise ValueError(f"{name}: shapes must match, got {listed}")


# ----------------------------------------------------------------------------- pairwise


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, *, margin: float = 0.0,
                       reduction: str = "mean") -> torch.Tensor:
    """``-logsigmoid(chosen - rejected - margin)`` for reward-model scores of each pair."""
    _check_same_shape("bradley_terry_loss", chosen=chosen, rejected=rejected)
    chosen, rejected = _in_loss_dtype(chosen, rejected)
    return _reduce("bradley_terry_loss", -F.logsigmoid(chosen - rejected - margin), reduction)


class DPOOutput(NamedTuple):
    """``dpo_loss``'s loss and the metrics DPO trainers log (per pair, detached):
    ``chosen_rewards = beta * (policy_chosen - ref_chosen)``, likewise ``rejected_rewards``,
    ``margins = chosen_rewards - rejected_rewards``, ``accuracies = chosen > rejected``."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    margins: torch.Tensor
    accuracies: torch.Tensor


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, *, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, reduction: str = "mean") -> DPOOutput:
    """Direct Preference Optimisation from sequence log-likelihoods ``(B,)``, with TRL's formulas
    for each ``loss_type``; ``h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)``:

    - ``"sigmoid"``: ``-(1 - ls) logsigmoid(beta h) - ls logsigmoid(-beta h)`` (cDPO smoothing)
    - ``"robust"``: ``(-(1 - ls) logsigmoid(beta h) + ls logsigmoid(-beta h)) / (1 - 2 ls)``
    - ``"hinge"``: ``relu(1 - beta h)``
    - ``"ipo"``: ``(h - 1 / (2 beta))^2``
    """
    name = "dpo_loss"
    _check_same_shape(name, policy_chosen=policy_chosen, policy_rejected=policy_rejected,
                      ref_chosen=ref_chosen, ref_rejected=ref_rejected)
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"{name}: loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    if not beta > 0:
        raise ValueError(f"{name}: beta must be positive, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"{name}: label_smoothing must be in [0, 0.5), got {label_smoothing}"
                         + (" (robust DPO divides by 1 - 2 * label_smoothing)"
                            if loss_type == "robust" else ""))
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = _in_loss_dtype(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    chosen_logratio = policy_chosen - ref_chosen
    rejected_logratio = policy_rejected - ref_rejected
    h = chosen_logratio - rejected_logratio
    smooth = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - smooth) * F.logsigmoid(beta * h) - smooth * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - smooth) * F.logsigmoid(beta * h)
                  + smooth * F.logsigmoid(-beta * h)) / (1 - 2 * smooth)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        losses = (h - 1 / (2 * beta)) ** 2
    chosen_rewards = beta * chosen_logratio.detach()
    rejected_rewards = beta * rejected_logratio.detach()
    return DPOOutput(_reduce(name, losses, reduction), chosen_rewards, rejected_rewards,
                     chosen_rewards - rejected_rewards,
                     (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype))


def fused_linear_dpo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          mask: torch.Tensor | None = None, *,
                          ref_logps: torch.Tensor | None = None,
                          ref_hidden: torch.Tensor | None = None,
                          ref_weight: torch.Tensor | None = None, beta: float = 0.1,
                          loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                          average_log_prob: bool = False, reduction: str = "mean") -> DPOOutput:
    """DPO straight from hidden states: ``hidden (2B, T, H)`` holds the B chosen sequences, then
    the B rejected ones; ``targets``, ``mask (2B, T)``. Sequence log-likelihoods come from
    ``sequence_logprobs`` (no logits materialised); the reference side is ``ref_logps (2B,)`` or
    computed from ``ref_hidden`` and ``ref_weight`` (no gradient). Gradients flow to ``hidden``
    and ``weight``. ``average_log_prob`` uses the mean over tokens instead of the sum (IPO)."""
    name = "fused_linear_dpo_loss"
    if hidden.dim() != 3 or hidden.shape[0] % 2:
        raise ValueError(f"{name}: hidden must be (2B, T, H), chosen rows then rejected rows, got "
                         f"shape {tuple(hidden.shape)}")
    if (ref_logps is None) == (ref_hidden is None):
        raise ValueError(f"{name}: give exactly one of ref_logps or ref_hidden (with ref_weight)")
    reduction_kind = "mean" if average_log_prob else "sum"
    policy = sequence_logprobs(hidden, weight, targets, mask, reduction=reduction_kind)
    if ref_logps is None:
        if ref_weight is None:
            raise ValueError(f"{name}: ref_hidden needs ref_weight")
        with torch.no_grad():
            ref_logps = sequence_logprobs(ref_hidden, ref_weight, targets, mask,
                                          reduction=reduction_kind)
    if tuple(ref_logps.shape) != tuple(policy.shape):
        raise ValueError(f"{name}: ref_logps must have shape {tuple(policy.shape)}, got "
                         f"{tuple(ref_logps.shape)}")
    half = hidden.shape[0] // 2
    ref_logps = ref_logps.to(policy.dtype)
    return dpo_loss(policy[:half], policy[half:], ref_logps[:half], ref_logps[half:], beta=beta,
                    loss_type=loss_type, label_smoothing=label_smoothing, reduction=reduction)


# ----------------------------------------------------------------------------- listwise


def plackett_luce_loss(scores: torch.Tensor, rewards: torch.Tensor,
                       mask: torch.Tensor | None = None, *, reduction: str = "mean") -> torch.Tensor:
    """Listwise ranking loss over N candidates ranked by reward (highest first, ties: lower index
    first): ``sum_i [-s_(i) + logsumexp_{k >= i} s_(k)]``, the negative log-probability of the
    reward ordering under the Plackett–Luce model of the scores. Masked-out candidates (mask
    false) take no part; a list with a NaN reward among its kept candidates has no ordering and
    gets a NaN loss. ``scores, rewards (B, N)`` (or ``(N,)``); returns float32 (float64 for
    float64 scores), ``(B,)`` with ``reduction="none"``. One stable sort and a reverse
    log-cumsum-exp: O(N log N) time, O(B·N) memory."""
    name = "plackett_luce_loss"
    _check_same_shape(name, scores=scores, rewards=rewards)
    if mask is not None:
        _check_same_shape(name, scores=scores, mask=mask)
    if scores.dim() not in (1, 2):
        raise ValueError(f"{name}: scores must be (N,) or (B, N), got {tuple(scores.shape)}")
    single = scores.dim() == 1
    if single:
        scores, rewards = scores[None], rewards[None]
        mask = None if mask is None else mask[None]
    (scores,) = _in_loss_dtype(scores)
    valid = torch.ones_like(scores, dtype=torch.bool) if mask is None else mask.to(torch.bool)
    keys = torch.where(valid, rewards.to(torch.float64), float("-inf"))
    unordered = keys.isnan().any(-1)
    # Excluded candidates sort last and get a score whose exp is 0, so they change no suffix.
    # A list with a NaN key is answered with NaN below, whatever order its sort gives.
    order = torch.sort(keys, dim=-1, descending=True, stable=True).indices
    ranked = scores.gather(-1, order)
    ranked_valid = valid.gather(-1, order)
    ranked = torch.where(ranked_valid, ranked, torch.finfo(ranked.dtype).min)
    suffix = torch.logcumsumexp(ranked.flip(-1), dim=-1).flip(-1)
    losses = torch.where(ranked_valid, suffix - ranked, 0.0).sum(-1)
    losses = torch.where(unordered, math.nan, losses)
    return _reduce(name, losses[0] if single else losses, reduction)


# ----------------------------------------------------------------------------- self-correction


def score_shaping(r1: torch.Tensor, r2: torch.Tensor, *, alpha: float) -> torch.Tensor:
    """SCoRe's second-attempt reward ``r2 + alpha * (r2 - r1)``: a bonus for improving on the first
    attempt and a penalty for making it worse."""
    _check_same_shape("score_shaping", r1=r1, r2=r2)
    return r2 + alpha * (r2 - r1)


class SelfCorrectionMetrics(NamedTuple):
    """SCoRe's table: accuracy at each attempt, their difference, and the fractions of problems
    that went incorrect → correct and correct → incorrect between the attempts."""

    acc_t1: torch.Tensor
    acc_t2: torch.Tensor
    delta: torch.Tensor
    delta_i_to_c: torch.Tensor
    delta_c_to_i: torch.Tensor


def self_correction_metrics(r1: torch.Tensor, r2: torch.Tensor) -> SelfCorrectionMetrics:
    """From per-problem correctness at the first and second attempt (``(N,)``, bool or 0/1)."""
    name = "self_correction_metrics"
    _check_same_shape(name, r1=r1, r2=r2)
    for arg, r in (("r1", r1), ("r2", r2)):
        if r.numel() == 0 or not bool(((r == 0) | (r == 1)).all()):
            raise ValueError(f"{name}: {arg} must be a non-empty tensor of correctness values "
                             "(bool or 0/1)")
    first, second = r1.to(torch.float64), r2.to(torch.float64)
    acc_t1, acc_t2 = first.mean(), second.mean()
    return SelfCorrectionMetrics(acc_t1, acc_t2, acc_t2 - acc_t1,
                                 ((1 - first) * second).mean(), (first * (1 - second)).mean())


class Distinguishability(NamedTuple):
    """Im & Li's DPO learning-dynamics quantities for one behaviour: ``mean_distance`` =
    ``|mu_+ - mu_-|``; ``concentration`` = the larger operator norm (largest eigenvalue) of the two
    class covariances; ``trace`` = the larger of their traces. Far-apart, concentrated preferences
    are learned first."""

    mean_distance: torch.Tensor
    concentration: torch.Tensor
    trace: torch.Tensor


def preference_distinguishability(features: torch.Tensor,
                                  labels: torch.Tensor) -> Distinguishability:
    """``features (N, d)`` (e.g. embeddings of responses), ``labels (N,)`` bool (True = preferred).
    Covariances are the population ones (divided by the class size)."""
    name = "preference_distinguishability"
    if features.dim() != 2 or labels.shape != features.shape[:1]:
        raise ValueError(f"{name}: features must be (N, d) and labels (N,), got "
                         f"{tuple(features.shape)} and {tuple(labels.shape)}")
    labels = labels.to(torch.bool)
    positive, negative = features[labels], features[~labels]
    if positive.shape[0] == 0 or negative.shape[0] == 0:
        raise ValueError(f"{name}: labels must contain both classes, got {int(labels.sum())} "
                         f"positive of {labels.numel()}")

    def covariance(x):
        centred = x - x.mean(0)
        return centred.T @ centred / x.shape[0]

    covariances = [covariance(positive), covariance(negative)]
    return Distinguishability(
        torch.linalg.vector_norm(positive.mean(0) - negative.mean(0)),
        torch.stack([torch.linalg.matrix_norm(c, ord=2) for c in covariances]).max(),
        torch.stack([c.trace() for c in covariances]).max(),
    )
