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

from . import _checks
from .ops.linear_kl import linear_kl
from .ops.scoring import sequence_logprobs

__all__ = ["bradley_terry_loss", "dpo_loss", "fused_linear_dpo_loss", "plackett_luce_loss",
           "linear_kl", "score_shaping", "self_correction_metrics",
           "preference_distinguishability", "DPOOutput", "SelfCorrectionMetrics",
           "Distinguishability"]

REDUCTIONS = ("mean", "sum", "none")
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
# Losses compute in float32 for all but float64 inputs: a larger beta, margin or alpha would turn
# into inf there (and inf * 0 into NaN).
FLOAT32_MAX = torch.finfo(torch.float32).max


# ----------------------------------------------------------------------------- argument checks


def _real_tensor(name: str, arg: str, value, *, floating: bool = True) -> torch.Tensor:
    """A tensor of a real floating-point dtype (with ``floating=False`` also integer or bool: for
    correctness, labels, masks, rewards that only rank). Complex is refused either way."""
    _checks.tensor(name, arg, value, floating=floating)
    if value.is_complex():
        raise TypeError(f"{name}: {arg} must be a real tensor (floating-point, integer or bool), "
                        f"got {value.dtype}")
    return value


def _check_inputs(name: str, *, integral_ok: tuple[str, ...] = (),
                  **tensors: torch.Tensor | None) -> None:
    """``tensors`` (None skipped) must be real tensors (``_real_tensor``; those named in
    ``integral_ok`` may be integer or bool) of one shape on one device."""
    present = {arg: t for arg, t in tensors.items() if t is not None}
    for arg, value in present.items():
        _real_tensor(name, arg, value, floating=arg not in integral_ok)
    _check_same_shape(name, **present)
    _checks.same_device(name, **present)


def _check_same_shape(name: str, **tensors: torch.Tensor) -> None:
    shapes = {arg: tuple(t.shape) for arg, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{arg} {shape}" for arg, shape in shapes.items())
        raise ValueError(f"{name}: shapes must match, got {listed}")


def _check_binary(name: str, arg: str, value: torch.Tensor, what: str) -> None:
    """``value`` must be non-empty and hold only 0 and 1 (or False and True)."""
    bad = ~((value == 0) | (value == 1))
    if value.numel() == 0 or bool(bad.any()):
        found = "no values" if value.numel() == 0 else f"{value[bad].flatten()[0].item()!r}"
        raise ValueError(f"{name}: {arg} must be a non-empty tensor of {what} (bool or 0/1), got "
                         f"{_checks.describe(value)} holding {found}")


def _scalar(name: str, arg: str, value, **kwargs) -> float:
    """A finite real number (not bool, str or tensor) that stays finite in float32."""
    number = _checks.real(name, arg, value, **kwargs)
    if abs(number) > FLOAT32_MAX:
        raise ValueError(f"{name}: {arg} must be at most {FLOAT32_MAX:.4g} in magnitude (losses "
                         f"compute in float32), got {number:g}")
    return number


def _dpo_options(name: str, beta, loss_type, label_smoothing, reduction
                 ) -> tuple[float, str, float, str]:
    """``dpo_loss``'s scalar arguments, checked: beta positive and finite, label_smoothing in
    [0, 0.5)."""
    loss_type = _checks.choice(name, "loss_type", loss_type, DPO_LOSS_TYPES)
    reduction = _checks.choice(name, "reduction", reduction, REDUCTIONS)
    beta = _scalar(name, "beta", beta, positive=True)
    label_smoothing = _checks.real(name, "label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"{name}: label_smoothing must be in [0, 0.5), got {label_smoothing}"
                         + (" (robust DPO divides by 1 - 2 * label_smoothing)"
                            if loss_type == "robust" else ""))
    return beta, loss_type, label_smoothing, reduction


def _reduce(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    """``reduction`` is one of REDUCTIONS, already checked."""
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return losses


def _in_loss_dtype(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Losses are computed and returned in float32 (float64 for float64 inputs); gradients still
    reach half-precision inputs in their own dtype."""
    return tuple(t if t.dtype == torch.float64 else t.float() for t in tensors)


# ----------------------------------------------------------------------------- pairwise


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, *, margin: float = 0.0,
                       reduction: str = "mean") -> torch.Tensor:
    """``-logsigmoid(chosen - rejected - margin)`` for reward-model scores ``chosen, rejected``
    (any one shape, real floating-point); ``margin`` a finite number. Returns float32 (float64
    for float64 inputs), of the inputs' shape with ``reduction="none"``."""
    name = "bradley_terry_loss"
    _check_inputs(name, chosen=chosen, rejected=rejected)
    margin = _scalar(name, "margin", margin)
    reduction = _checks.choice(name, "reduction", reduction, REDUCTIONS)
    chosen, rejected = _in_loss_dtype(chosen, rejected)
    return _reduce(-F.logsigmoid(chosen - rejected - margin), reduction)


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

    The four inputs are real floating-point tensors of one shape on one device; ``beta`` is
    positive and finite, ``label_smoothing`` in ``[0, 0.5)``. Loss and metrics are float32
    (float64 for float64 inputs).
    """
    name = "dpo_loss"
    _check_inputs(name, policy_chosen=policy_chosen, policy_rejected=policy_rejected,
                  ref_chosen=ref_chosen, ref_rejected=ref_rejected)
    beta, loss_type, label_smoothing, reduction = _dpo_options(name, beta, loss_type,
                                                               label_smoothing, reduction)
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
    return DPOOutput(_reduce(losses, reduction), chosen_rewards, rejected_rewards,
                     chosen_rewards - rejected_rewards,
                     (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype))


def fused_linear_dpo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          mask: torch.Tensor | None = None, *,
                          ref_logps: torch.Tensor | None = None,
                          ref_hidden: torch.Tensor | None = None,
                          ref_weight: torch.Tensor | None = None, beta: float = 0.1,
                          loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                          average_log_prob: bool = False, reduction: str = "mean",
                          logit_scale: float = 1.0) -> DPOOutput:
    """DPO straight from hidden states: ``hidden (2B, T, H)`` holds the B chosen sequences, then
    the B rejected ones; ``targets``, ``mask (2B, T)``. Sequence log-likelihoods come from
    ``sequence_logprobs`` (no logits materialised); the reference side is ``ref_logps (2B,)`` or
    computed from ``ref_hidden`` and ``ref_weight`` (no gradient). Gradients flow to ``hidden``
    and ``weight``. ``average_log_prob`` (a bool) uses the mean over tokens instead of the sum
    (IPO). ``logit_scale`` (positive, finite) multiplies the logits of both the policy and the
    ``ref_hidden``/``ref_weight`` side, as in ``linear_logprobs``. The scalar arguments are
    checked as ``dpo_loss`` checks them, before any work."""
    name = "fused_linear_dpo_loss"
    _checks.tensor(name, "hidden", hidden, floating=True)
    _checks.optional_tensor(name, "ref_logps", ref_logps, floating=True)
    _checks.optional_tensor(name, "ref_hidden", ref_hidden, floating=True)
    _checks.same_device(name, hidden=hidden, ref_logps=ref_logps, ref_hidden=ref_hidden)
    beta, loss_type, label_smoothing, reduction = _dpo_options(name, beta, loss_type,
                                                               label_smoothing, reduction)
    average_log_prob = _checks.boolean(name, "average_log_prob", average_log_prob)
    logit_scale = _checks.real(name, "logit_scale", logit_scale, positive=True)
    if hidden.dim() != 3 or hidden.shape[0] % 2:
        raise ValueError(f"{name}: hidden must be (2B, T, H), chosen rows then rejected rows, got "
                         f"shape {tuple(hidden.shape)}")
    if (ref_logps is None) == (ref_hidden is None):
        raise ValueError(f"{name}: give exactly one of ref_logps or ref_hidden (with ref_weight)")
    if ref_logps is not None:
        _checks.shape(name, "ref_logps", ref_logps, hidden.shape[:1])
    reduction_kind = "mean" if average_log_prob else "sum"
    policy = sequence_logprobs(hidden, weight, targets, mask, reduction=reduction_kind,
                               logit_scale=logit_scale)
    if ref_logps is None:
        if ref_weight is None:
            raise ValueError(f"{name}: ref_hidden needs ref_weight")
        with torch.no_grad():
            ref_logps = sequence_logprobs(ref_hidden, ref_weight, targets, mask,
                                          reduction=reduction_kind, logit_scale=logit_scale)
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
    log-cumsum-exp: O(N log N) time, O(B·N) memory. ``scores`` are real floating-point; ``rewards``
    (only compared) and ``mask`` may also be integer or bool."""
    name = "plackett_luce_loss"
    _check_inputs(name, integral_ok=("rewards", "mask"), scores=scores, rewards=rewards,
                  mask=mask)
    reduction = _checks.choice(name, "reduction", reduction, REDUCTIONS)
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
    return _reduce(losses[0] if single else losses, reduction)


# ----------------------------------------------------------------------------- self-correction


def score_shaping(r1: torch.Tensor, r2: torch.Tensor, *, alpha: float) -> torch.Tensor:
    """SCoRe's second-attempt reward ``r2 + alpha * (r2 - r1)``: a bonus for improving on the first
    attempt and a penalty for making it worse. ``r1, r2``: rewards of one shape, floating-point or
    integer/bool correctness (those are taken as float32); ``alpha`` a finite number."""
    name = "score_shaping"
    _check_inputs(name, integral_ok=("r1", "r2"), r1=r1, r2=r2)
    alpha = _scalar(name, "alpha", alpha)
    r1, r2 = (r if r.is_floating_point() else r.float() for r in (r1, r2))
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
    """From per-problem correctness at the first and second attempt (``(N,)``, bool or 0/1 of any
    real dtype); each metric is a float64 scalar."""
    name = "self_correction_metrics"
    _check_inputs(name, integral_ok=("r1", "r2"), r1=r1, r2=r2)
    for arg, r in (("r1", r1), ("r2", r2)):
        _check_binary(name, arg, r, "correctness values")
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
    """``features (N, d)`` (e.g. embeddings of responses; any real dtype, computed in float32, or
    float64 for float64), ``labels (N,)`` bool or 0/1 (1 = preferred). Covariances are the
    population ones (divided by the class size). Non-finite features give NaN (or inf) results
    rather than an error. Returns three scalars in the compute dtype."""
    name = "preference_distinguishability"
    _real_tensor(name, "features", features, floating=False)
    _real_tensor(name, "labels", labels, floating=False)
    _checks.same_device(name, features=features, labels=labels)
    if features.dim() != 2 or labels.shape != features.shape[:1]:
        raise ValueError(f"{name}: features must be (N, d) and labels (N,), got "
                         f"{tuple(features.shape)} and {tuple(labels.shape)}")
    _check_binary(name, "labels", labels, "labels")
    labels = labels.to(torch.bool)
    (features,) = _in_loss_dtype(features)
    positive, negative = features[labels], features[~labels]
    if positive.shape[0] == 0 or negative.shape[0] == 0:
        raise ValueError(f"{name}: labels must contain both classes, got {int(labels.sum())} "
                         f"positive of {labels.numel()}")

    def covariance(x):
        centred = x - x.mean(0)
        return centred.T @ centred / x.shape[0]

    def operator_norm(c):  # the SVD behind it refuses non-finite input: answer NaN instead
        finite = c.isfinite()
        return torch.where(finite.all(), torch.linalg.matrix_norm(c.where(finite, 0), ord=2),
                           math.nan)

    covariances = [covariance(positive), covariance(negative)]
    return Distinguishability(
        torch.linalg.vector_norm(positive.mean(0) - negative.mean(0)),
        torch.stack([operator_norm(c) for c in covariances]).max(),
        torch.stack([c.trace() for c in covariances]).max(),
    )
