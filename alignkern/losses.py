"""Preference and self-correction losses, exact and differentiable, with per-example outputs.

Every loss takes ``reduction="mean" | "sum" | "none"``. The log-likelihoods they consume come from
``alignkern.sequence_logprobs`` (fused, never materialising logits); ``fused_linear_dpo_loss``
does that step for you.

  bradley_terry_loss       -logsigmoid(chosen - rejected - margin)
  dpo_loss                 DPO with every loss type of TRL 1.16's DPOTrainer, TRL's semantics
  fused_linear_dpo_loss    DPO from hidden states and the LM head (chosen rows, then rejected)
  plackett_luce_loss       the listwise ranking loss, O(N log N)
  linear_kl                per-token KL(pi || pi_ref) from hidden states, no logits (ops/linear_kl)
  score_shaping            SCoRe's second-attempt reward
  self_correction_metrics  Acc@t1, Acc@t2, delta, delta i->c, delta c->i as SCoRe reports them
  preference_distinguishability  Im & Li's quantities that predict what DPO learns first
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import _checks
from .ops.linear_kl import linear_kl
from .ops.scoring import check_sequence_arguments, counted_targets, sequence_logprobs

__all__ = ["bradley_terry_loss", "dpo_loss", "fused_linear_dpo_loss", "plackett_luce_loss",
           "linear_kl", "score_shaping", "self_correction_metrics",
           "preference_distinguishability", "DPOOutput", "SelfCorrectionMetrics",
           "Distinguishability"]

REDUCTIONS = ("mean", "sum", "none")
# Every loss type of TRL 1.16's DPOTrainer, in its order.
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair",
                  "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft",
                  "sigmoid_norm")
# TRL's f-DPO regularisers, and the loss types built on the chosen-rejected score difference that
# accept one other than reverse_kl (TRL refuses the others: their log Z(x) term does not cancel).
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust",
                           "discopop", "sft")
# "trl": label_smoothing reaches only robust, exo_pair, aot and aot_unpaired, as in TRL 1.16;
# "cdpo": sigmoid also gets conservative DPO's smoothing (alignkern's default before TRL parity).
DPO_SMOOTHINGS = ("trl", "cdpo")
_SMOOTHED_LOSS_TYPES = ("robust", "exo_pair", "aot", "aot_unpaired")
# Loss types that normalise by completion length: they need chosen_lengths (and rejected_lengths).
_LENGTH_LOSS_TYPES = {"ipo": ("chosen_lengths", "rejected_lengths"),
                      "sigmoid_norm": ("chosen_lengths", "rejected_lengths"),
                      "sft": ("chosen_lengths",)}
# TRL clamps exp's argument in the alpha divergence to keep it representable in float32.
_ALPHA_DIVERGENCE_CLAMP = 80.0
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


def _check_inputs(name: str, *, integral_ok: tuple[str, ...] = (), optional: tuple[str, ...] = (),
                  **tensors: torch.Tensor | None) -> None:
    """``tensors`` must be real tensors (``_real_tensor``; those named in ``integral_ok`` may be
    integer or bool) of one shape on one device; those named in ``optional`` may be None."""
    present = {arg: t for arg, t in tensors.items() if t is not None or arg not in optional}
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


class _DPOOptions(NamedTuple):
    beta: float
    loss_types: tuple[str, ...]
    loss_weights: tuple[float, ...]
    label_smoothing: float
    smoothing: str
    reduction: str
    f_divergence_type: str
    f_alpha_divergence_coef: float
    discopop_tau: float


def _dpo_options(name: str, beta, loss_type, label_smoothing, reduction, smoothing, loss_weights,
                 f_divergence_type, f_alpha_divergence_coef, discopop_tau) -> _DPOOptions:
    """``dpo_loss``'s scalar arguments, checked: beta positive and finite; loss_type one type or a
    non-empty list of them, loss_weights None or one finite weight per type; label_smoothing in
    [0, 0.5) (and above 0 for exo_pair); the f-divergence one that every type supports."""
    if isinstance(loss_type, (list, tuple)):
        if not loss_type:
            raise ValueError(f"{name}: loss_type must name at least one loss type, got "
                             f"{_checks.describe(loss_type)}")
        loss_types = tuple(_checks.choice(name, "loss_type", t, DPO_LOSS_TYPES) for t in loss_type)
    else:
        loss_types = (_checks.choice(name, "loss_type", loss_type, DPO_LOSS_TYPES),)
    if loss_weights is None:
        weights = (1.0,) * len(loss_types)
    else:
        if not isinstance(loss_weights, Sequence) or isinstance(loss_weights, str):
            raise TypeError(f"{name}: loss_weights must be None or a list of numbers, one per loss "
                            f"type, got {_checks.describe(loss_weights)}")
        if len(loss_weights) != len(loss_types):
            raise ValueError(f"{name}: loss_weights must have one weight per loss type, got "
                             f"{len(loss_weights)} weights for {len(loss_types)} loss types")
        weights = tuple(_scalar(name, "loss_weights", w) for w in loss_weights)
    reduction = _checks.choice(name, "reduction", reduction, REDUCTIONS)
    smoothing = _checks.choice(name, "smoothing", smoothing, DPO_SMOOTHINGS)
    beta = _scalar(name, "beta", beta, positive=True)
    label_smoothing = _checks.real(name, "label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"{name}: label_smoothing must be in [0, 0.5), got {label_smoothing}"
                         + (" (robust DPO divides by 1 - 2 * label_smoothing)"
                            if "robust" in loss_types else ""))
    if "exo_pair" in loss_types and label_smoothing == 0.0:
        raise ValueError(f"{name}: loss_type 'exo_pair' needs label_smoothing > 0 (EXO's epsilon; "
                         f"the paper recommends 1e-3), got 0.0")
    f_divergence_type = _checks.choice(name, "f_divergence_type", f_divergence_type,
                                       F_DIVERGENCE_TYPES)
    unsupported = [t for t in loss_types if t not in F_DIVERGENCE_LOSS_TYPES]
    if f_divergence_type != "reverse_kl" and unsupported:
        raise ValueError(f"{name}: f_divergence_type {f_divergence_type!r} is only supported for "
                         f"loss types {', '.join(map(repr, F_DIVERGENCE_LOSS_TYPES))}, got "
                         f"{', '.join(map(repr, unsupported))}")
    f_alpha_divergence_coef = _scalar(name, "f_alpha_divergence_coef", f_alpha_divergence_coef)
    discopop_tau = _scalar(name, "discopop_tau", discopop_tau, positive=True)
    uses_smoothing = set(_SMOOTHED_LOSS_TYPES) | ({"sigmoid"} if smoothing == "cdpo" else set())
    if label_smoothing > 0 and not uses_smoothing & set(loss_types):
        warnings.warn(f"{name}: label_smoothing={label_smoothing} has no effect on loss type(s) "
                      f"{', '.join(map(repr, loss_types))} with TRL's semantics (the default since "
                      f"alignkern follows TRL 1.16); pass smoothing='cdpo' for conservative DPO's "
                      f"smoothing of the sigmoid loss", UserWarning, stacklevel=3)
    return _DPOOptions(beta, loss_types, weights, label_smoothing, smoothing, reduction,
                       f_divergence_type, f_alpha_divergence_coef, discopop_tau)


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
    ``margins = chosen_rewards - rejected_rewards``, ``accuracies = chosen > rejected`` (1.0 or
    0.0). These are TRL's for every loss type and f-divergence (TRL's rewards are always the
    beta-scaled log-ratios). ``metrics()`` gives the batch means under TRL's logged names."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    margins: torch.Tensor
    accuracies: torch.Tensor

    def metrics(self) -> dict[str, torch.Tensor]:
        """``{"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"}``:
        the batch means TRL's ``DPOTrainer`` logs under those keys, as detached 0-dim tensors
        (``float()`` them to log; nothing here synchronises with the device)."""
        return {"rewards/chosen": self.chosen_rewards.mean(),
                "rewards/rejected": self.rejected_rewards.mean(),
                "rewards/accuracies": self.accuracies.mean(),
                "rewards/margins": self.margins.mean()}


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, *, beta: float = 0.1,
             loss_type: str | Sequence[str] = "sigmoid", label_smoothing: float = 0.0,
             reduction: str = "mean", chosen_lengths: torch.Tensor | None = None,
             rejected_lengths: torch.Tensor | None = None,
             loss_weights: Sequence[float] | None = None, smoothing: str = "trl",
             f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5,
             discopop_tau: float = 0.05) -> DPOOutput:
    """Direct Preference Optimisation from sequence log-likelihoods (the sums over each
    completion's tokens), equal to TRL 1.16's ``DPOTrainer`` for every loss type it has, with
    its arguments' names and defaults (``DPOConfig``'s ``beta``, ``loss_type``, ``loss_weights``,
    ``label_smoothing``, ``f_divergence_type``, ``f_alpha_divergence_coef``, ``discopop_tau``).

    With ``lr_c = policy_chosen - ref_chosen``, ``lr_r = policy_rejected - ref_rejected``, the
    scores ``s_c, s_r`` (the log-ratios, or their f-divergence transform), ``d = s_c - s_r`` and
    ``ls = label_smoothing``, the per-pair losses are:

    - ``"sigmoid"``: ``-logsigmoid(beta d)``; no smoothing, as TRL (``smoothing="cdpo"``:
      ``-(1 - ls) logsigmoid(beta d) - ls logsigmoid(-beta d)``, conservative DPO)
    - ``"hinge"``: ``relu(1 - beta d)``
    - ``"ipo"``: ``(s_c / n_c - s_r / n_r - 1 / (2 beta))^2``, ``n`` the completion lengths
    - ``"exo_pair"``: EXO's KL to ``[1 - ls, ls]`` (needs ``ls > 0``)
    - ``"nca_pair"``: ``-logsigmoid(beta lr_c) - (logsigmoid(-beta lr_c) + logsigmoid(-beta lr_r)) / 2``
    - ``"robust"``: ``(-(1 - ls) logsigmoid(beta d) + ls logsigmoid(-beta d)) / (1 - 2 ls)``
    - ``"bco_pair"``: ``-logsigmoid(beta lr_c) - logsigmoid(-beta lr_r)`` (TRL 1.16 keeps no
      running reward mean for it)
    - ``"sppo_hard"``: ``(lr_c - 1 / (2 beta))^2 + (lr_r + 1 / (2 beta))^2``
    - ``"aot"`` / ``"aot_unpaired"``: the cDPO form on the batch-sorted log-ratio differences
      (``reduction="none"`` answers in sorted order, as TRL)
    - ``"apo_zero"`` / ``"apo_down"``: APO's anchored losses
    - ``"discopop"``: DiscoPOP's blend of logistic and exponential losses, ``discopop_tau``
    - ``"sft"``: ``-sum(policy_chosen) / sum(chosen_lengths)``, the token-mean NLL of the chosen
      completions, the same value for every pair
    - ``"sigmoid_norm"``: ``-logsigmoid(beta (s_c / n_c - s_r / n_r))``

    ``loss_type`` may be a list; the loss is then ``sum_k loss_weights[k] * loss_k`` (weights 1
    when None), as TRL combines them (MPO). ``chosen_lengths``, ``rejected_lengths``: completion
    token counts (integer or float, the inputs' shape; clamped to at least 1 where they divide a
    score), required by ``ipo``, ``sigmoid_norm`` and (chosen only) ``sft``. ``f_divergence_type``
    is one of ``F_DIVERGENCE_TYPES``, allowed only for ``F_DIVERGENCE_LOSS_TYPES``.

    ``label_smoothing`` is in ``[0, 0.5)``; with TRL's semantics (``smoothing="trl"``) it reaches
    only robust, exo_pair, aot and aot_unpaired (a warning says when it reaches nothing). The four
    log-likelihood inputs are real floating-point tensors of one shape on one device; ``beta``
    positive and finite. Loss and metrics are float32 (float64 for float64 inputs); the metrics
    are ``DPOOutput``'s, detached.
    """
    name = "dpo_loss"
    _check_inputs(name, integral_ok=("chosen_lengths", "rejected_lengths"),
                  optional=("chosen_lengths", "rejected_lengths"),
                  policy_chosen=policy_chosen, policy_rejected=policy_rejected,
                  ref_chosen=ref_chosen, ref_rejected=ref_rejected,
                  chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    options = _dpo_options(name, beta, loss_type, label_smoothing, reduction, smoothing,
                           loss_weights, f_divergence_type, f_alpha_divergence_coef, discopop_tau)
    _check_lengths(name, options, chosen_lengths=chosen_lengths,
                   rejected_lengths=rejected_lengths)
    return _dpo(policy_chosen, policy_rejected, ref_chosen, ref_rejected, options,
                chosen_lengths, rejected_lengths)


def _check_lengths(name: str, options: _DPOOptions, **lengths: torch.Tensor | None) -> None:
    for loss_type in options.loss_types:
        for arg in _LENGTH_LOSS_TYPES.get(loss_type, ()):
            if lengths[arg] is None:
                raise ValueError(f"{name}: loss_type {loss_type!r} needs {arg}, the completion "
                                 f"token counts (TRL normalises by them)")


def _f_divergence_scores(options: _DPOOptions, logratios: torch.Tensor) -> torch.Tensor:
    """TRL's f'(policy / ref) for the f-DPO regularisers, from the log-ratio."""
    kind = options.f_divergence_type
    if kind == "forward_kl":  # f'(t) = 1 - 1/t
        return 1 - torch.exp(-logratios)
    if kind == "js_divergence":  # f'(t) = log(2t / (t + 1)) = log 2 + logsigmoid(log t)
        return math.log(2) + F.logsigmoid(logratios)
    alpha = options.f_alpha_divergence_coef
    if kind == "reverse_kl" or abs(alpha - 1.0) < 1e-6:  # alpha -> 1 is reverse KL, as in TRL
        return logratios
    # alpha divergence: f'(t) = (t^(alpha - 1) - 1) / (alpha - 1), exp's argument clamped as TRL
    t = torch.clamp((alpha - 1.0) * logratios, max=_ALPHA_DIVERGENCE_CLAMP)
    return (torch.exp(t) - 1.0) * (1.0 / (alpha - 1.0))


def _dpo(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
         ref_rejected: torch.Tensor, options: _DPOOptions, chosen_lengths: torch.Tensor | None,
         rejected_lengths: torch.Tensor | None) -> DPOOutput:
    """``dpo_loss`` on checked arguments."""
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = _in_loss_dtype(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    dtype = policy_chosen.dtype
    beta, smooth = options.beta, options.label_smoothing
    chosen_logratio = policy_chosen - ref_chosen
    rejected_logratio = policy_rejected - ref_rejected
    chosen_score = _f_divergence_scores(options, chosen_logratio)
    rejected_score = _f_divergence_scores(options, rejected_logratio)
    delta = chosen_score - rejected_score

    def length_normalised_delta():
        return (chosen_score / chosen_lengths.to(dtype).clamp(min=1.0)
                - rejected_score / rejected_lengths.to(dtype).clamp(min=1.0))

    def smoothed(x):  # cDPO: the preference is flipped with probability label_smoothing
        return -F.logsigmoid(beta * x) * (1 - smooth) - F.logsigmoid(-beta * x) * smooth

    total = None
    for loss_type, weight in zip(options.loss_types, options.loss_weights):
        if loss_type == "sigmoid":
            losses = smoothed(delta) if options.smoothing == "cdpo" else -F.logsigmoid(beta * delta)
        elif loss_type == "hinge":
            losses = torch.relu(1 - beta * delta)
        elif loss_type == "ipo":
            losses = (length_normalised_delta() - 1 / (2 * beta)) ** 2
        elif loss_type == "exo_pair":
            # KL(softmax(beta * [s_c, s_r]) || [1 - eps, eps]), EXO-pref (arXiv 2402.00856, Eq. 16)
            losses = (torch.sigmoid(beta * delta) * (F.logsigmoid(beta * delta) - math.log1p(-smooth))
                      + torch.sigmoid(-beta * delta)
                      * (F.logsigmoid(-beta * delta) - math.log(smooth)))
        elif loss_type == "nca_pair":
            losses = (-F.logsigmoid(beta * chosen_logratio)
                      - 0.5 * F.logsigmoid(-beta * chosen_logratio)
                      - 0.5 * F.logsigmoid(-beta * rejected_logratio))
        elif loss_type == "robust":
            losses = ((-(1 - smooth) * F.logsigmoid(beta * delta)
                       + smooth * F.logsigmoid(-beta * delta)) / (1 - 2 * smooth))
        elif loss_type == "bco_pair":
            losses = (-F.logsigmoid(beta * chosen_logratio)
                      - F.logsigmoid(-beta * rejected_logratio))
        elif loss_type == "sppo_hard":  # SPPO with hard win probabilities 1 and 0
            losses = ((chosen_logratio - 0.5 / beta) ** 2 + (rejected_logratio + 0.5 / beta) ** 2)
        elif loss_type == "aot":  # sorted over the batch: an optimal-transport coupling
            policy_sorted = torch.sort(policy_chosen - policy_rejected, dim=0).values
            ref_sorted = torch.sort(ref_chosen - ref_rejected, dim=0).values
            losses = smoothed(policy_sorted - ref_sorted)
        elif loss_type == "aot_unpaired":
            losses = smoothed(torch.sort(chosen_logratio, dim=0).values
                              - torch.sort(rejected_logratio, dim=0).values)
        elif loss_type == "apo_zero":  # APO (arXiv 2408.06266) Eq. 7: chosen up, rejected down
            losses = (1 - torch.sigmoid(beta * chosen_logratio)
                      + torch.sigmoid(beta * rejected_logratio))
        elif loss_type == "apo_down":  # Eq. 8: both down, rejected more
            losses = (torch.sigmoid(beta * chosen_logratio)
                      + 1 - torch.sigmoid(beta * (chosen_logratio - rejected_logratio)))
        elif loss_type == "discopop":  # DiscoPOP (arXiv 2406.08414) Eq. 5
            logits = beta * delta
            modulation = torch.sigmoid(logits / options.discopop_tau)
            losses = -F.logsigmoid(logits) * (1 - modulation) + torch.exp(-logits) * modulation
        elif loss_type == "sft":  # token-mean NLL of the chosen completions, for every pair
            nll = -policy_chosen.sum() / chosen_lengths.to(dtype).sum()
            losses = nll.expand(policy_chosen.shape)
        else:  # "sigmoid_norm"
            losses = -F.logsigmoid(beta * length_normalised_delta())
        losses = losses * weight
        total = losses if total is None else total + losses

    chosen_rewards = beta * chosen_logratio.detach()
    rejected_rewards = beta * rejected_logratio.detach()
    return DPOOutput(_reduce(total, options.reduction), chosen_rewards, rejected_rewards,
                     chosen_rewards - rejected_rewards,
                     (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype))


def completion_lengths(targets: torch.Tensor, mask: torch.Tensor | None = None,
                       average_log_prob: bool = False, ignore_index: int = -100) -> torch.Tensor:
    """``(rows,)`` float32 token counts of what ``sequence_logprobs`` sums for ``targets (rows,
    T)``: the positions in ``mask`` whose target is not ``ignore_index`` (TRL's completion
    lengths); ones with ``average_log_prob`` (the log-likelihoods are then already per token).
    ``targets`` int32/int64, ``mask`` None or bool (or 0/1) of targets' shape."""
    name = "completion_lengths"
    _checks.tensor(name, "targets", targets, dtypes=_checks.INDEX_DTYPES)
    if targets.dim() != 2:
        raise ValueError(f"{name}: targets must have shape (rows, T), got {tuple(targets.shape)}")
    if mask is not None:
        _checks.mask(name, "mask", mask, targets.shape, "the shape of targets")
        _checks.same_device(name, targets=targets, mask=mask)
    average_log_prob = _checks.boolean(name, "average_log_prob", average_log_prob)
    ignore_index = _checks.integer(name, "ignore_index", ignore_index)
    if average_log_prob:
        return torch.ones(targets.shape[0], dtype=torch.float32, device=targets.device)
    return counted_targets(targets, mask, ignore_index)[1].sum(-1).to(torch.float32)


def check_fused_dpo_arguments(name: str, hidden, ref_logps, ref_hidden, ref_weight,
                              average_log_prob, logit_scale) -> tuple[bool, float]:
    """The hidden-state side of ``fused_linear_dpo_loss`` (its vocabulary-parallel twin too):
    ``hidden (2B, T, H)``, exactly one reference source; returns the checked
    ``(average_log_prob, logit_scale)``."""
    average_log_prob = _checks.boolean(name, "average_log_prob", average_log_prob)
    logit_scale = _checks.real(name, "logit_scale", logit_scale, positive=True)
    if hidden.dim() != 3 or hidden.shape[0] % 2:
        raise ValueError(f"{name}: hidden must be (2B, T, H), chosen rows then rejected rows, got "
                         f"shape {tuple(hidden.shape)}")
    if (ref_logps is None) == (ref_hidden is None):
        raise ValueError(f"{name}: give exactly one of ref_logps or ref_hidden (with ref_weight)")
    if ref_logps is not None:
        _checks.shape(name, "ref_logps", ref_logps, hidden.shape[:1])
    elif ref_weight is None:
        raise ValueError(f"{name}: ref_hidden needs ref_weight")
    return average_log_prob, logit_scale


def _check_heads(name: str, hidden, weight, targets, mask, ref_hidden, ref_weight) -> None:
    """What ``sequence_logprobs`` would check, checked here so that the errors name ``name``:
    ``weight (V, H)`` for ``hidden (2B, T, H)``, ``targets`` and ``mask (2B, T)``; with a
    computed reference, ``ref_hidden (2B, T, H')`` and ``ref_weight (V', H')``."""
    check_sequence_arguments(name, hidden, targets, mask, "sum", -100)
    pairs = [("weight", weight, hidden)]
    if ref_hidden is not None:
        if ref_hidden.dim() != 3 or ref_hidden.shape[:2] != hidden.shape[:2]:
            raise ValueError(f"{name}: ref_hidden must have shape (2B, T, H') with hidden's 2B, T "
                             f"= {tuple(hidden.shape[:2])}, got {tuple(ref_hidden.shape)}")
        pairs.append(("ref_weight", ref_weight, ref_hidden))
    for arg, head, states in pairs:
        _checks.tensor(name, arg, head, floating=True)
        if head.dim() != 2 or head.shape[1] != states.shape[-1]:
            raise ValueError(f"{name}: {arg} must be the 2-D LM head (V, H) with H = "
                             f"{states.shape[-1]}, got shape {tuple(head.shape)}")


def fused_linear_dpo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          mask: torch.Tensor | None = None, *,
                          ref_logps: torch.Tensor | None = None,
                          ref_hidden: torch.Tensor | None = None,
                          ref_weight: torch.Tensor | None = None, beta: float = 0.1,
                          loss_type: str | Sequence[str] = "sigmoid",
                          label_smoothing: float = 0.0, average_log_prob: bool = False,
                          reduction: str = "mean", logit_scale: float = 1.0,
                          loss_weights: Sequence[float] | None = None, smoothing: str = "trl",
                          f_divergence_type: str = "reverse_kl",
                          f_alpha_divergence_coef: float = 0.5,
                          discopop_tau: float = 0.05) -> DPOOutput:
    """DPO straight from hidden states: ``hidden (2B, T, H)`` holds the B chosen sequences, then the B
    rejected ones; ``targets``, ``mask (2B, T)`` (the completion tokens, as TRL's shifted completion
    mask). Sequence log-likelihoods come from ``sequence_logprobs`` (no logits materialised); the
    reference side is ``ref_logps (2B,)`` or computed from ``ref_hidden`` and ``ref_weight`` (no
    gradient). Gradients flow to ``hidden`` and ``weight``. Every loss option is ``dpo_loss``'s,
    with the completion lengths counted by ``completion_lengths`` (``mask`` and the targets that are
    not -100), so the defaults equal TRL 1.16's ``DPOTrainer`` for every loss type.
    ``average_log_prob`` (a bool) uses the mean over tokens instead of the sum, with lengths 1 (the
    log-likelihoods are already per token: ``ipo`` and ``sigmoid_norm`` then equal TRL's loss, but
    the rewards and ``sft`` are per-token, unlike TRL's). ``logit_scale`` (positive, finite)
    multiplies the logits of both the policy and the ``ref_hidden``/``ref_weight`` side, as in
    ``linear_logprobs``. The scalar arguments are checked as ``dpo_loss`` checks them, before any
    work."""
    name = "fused_linear_dpo_loss"
    _checks.tensor(name, "hidden", hidden, floating=True)
    _checks.optional_tensor(name, "ref_logps", ref_logps, floating=True)
    _checks.optional_tensor(name, "ref_hidden", ref_hidden, floating=True)
    _checks.same_device(name, hidden=hidden, ref_logps=ref_logps, ref_hidden=ref_hidden)
    options = _dpo_options(name, beta, loss_type, label_smoothing, reduction, smoothing,
                           loss_weights, f_divergence_type, f_alpha_divergence_coef, discopop_tau)
    average_log_prob, logit_scale = check_fused_dpo_arguments(
        name, hidden, ref_logps, ref_hidden, ref_weight, average_log_prob, logit_scale)
    _check_heads(name, hidden, weight, targets, mask, ref_hidden, ref_weight)
    reduction_kind = "mean" if average_log_prob else "sum"
    policy = sequence_logprobs(hidden, weight, targets, mask, reduction=reduction_kind,
                               logit_scale=logit_scale)
    if ref_logps is None:
        with torch.no_grad():
            ref_logps = sequence_logprobs(ref_hidden, ref_weight, targets, mask,
                                          reduction=reduction_kind, logit_scale=logit_scale)
    lengths = completion_lengths(targets, mask, average_log_prob).to(policy.dtype)
    half = hidden.shape[0] // 2
    ref_logps = ref_logps.to(policy.dtype)
    return _dpo(policy[:half], policy[half:], ref_logps[:half], ref_logps[half:], options,
                lengths[:half], lengths[half:])


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
    _check_inputs(name, integral_ok=("rewards", "mask"), optional=("mask",), scores=scores,
                  rewards=rewards, mask=mask)
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
