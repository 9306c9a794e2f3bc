"""SCoRe (Kumar et al. 2024, "Training Language Models to Self-Correct via Reinforcement
Learning"): two-attempt rollouts and the stage-II objective, computed from hidden states through
alignkern's fused LM-head ops (no ``[B, T, V]`` logits, for the policy or the reference)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn

import alignkern
from alignkern import losses

from .. import _checks
from ..integrations import transformers as ak_hf
from ..integrations.transformers.scoring import decoder_hidden_states
from . import _common

# SCoRe's self-correction instruction (its MATH experiments), placed after the first attempt.
DEFAULT_CORRECTION = ("\nThere might be an error in the solution above because of lack of "
                      "understanding of the question. Please correct the error, if any, and "
                      "rewrite the solution.\n")
DEFAULT_GENERATION = {"do_sample": True, "max_new_tokens": 32}


class Attempt(NamedTuple):
    """One attempt's token batch, left-padded: ``input_ids (B, T)`` = context + generated tokens
    (through the first EOS), ``attention_mask (B, T)``, ``completion_mask (B, T)`` True at the
    generated tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor


class SCoReRollout(NamedTuple):
    """What ``two_attempt_rollout`` returns: the decoded attempts, their rewards ``r1, r2 (B,)``
    float32, ``shaped = r2 + alpha (r2 - r1)``, SCoRe's ``metrics`` (``self_correction_metrics``;
    None unless every reward is 0 or 1), and the token batches the loss trains on."""

    first: list[str]
    second: list[str]
    r1: torch.Tensor
    r2: torch.Tensor
    shaped: torch.Tensor
    metrics: losses.SelfCorrectionMetrics | None
    first_attempt: Attempt
    second_attempt: Attempt


def two_attempt_rollout(
    model: nn.Module,
    tokenizer,
    prompts: str | Sequence[str],
    reward_fn: Callable[[list[str], list[str]], object],
    *,
    correction_instruction: str = DEFAULT_CORRECTION,
    alpha: float = 10.0,
    generation_kwargs: dict | None = None,
) -> SCoReRollout:
    """Two attempts per prompt: answer, then answer again after ``correction_instruction``.

    The second attempt's context is the prompt's tokens, the first attempt's generated tokens
    (its EOS dropped) and the instruction's tokens (no special tokens): exactly what the model
    produced, not a re-tokenization of its text. Both attempts are one batched ``generate`` each
    (``generation_kwargs`` over ``do_sample=True, max_new_tokens=32``), rewarded by
    ``reward_fn(prompts, responses) -> (B,)`` and shaped with ``losses.score_shaping``.

    Args:
        model: a transformers causal LM.
        tokenizer: its tokenizer.
        prompts: a str or a non-empty sequence of B str.
        reward_fn: ``(prompts, responses) -> B`` numbers (e.g. 1.0 if correct).
        correction_instruction: text between the first attempt and the second.
        alpha: the shaping bonus, a finite number.
        generation_kwargs: passed to both ``generate`` calls.

    Returns:
        ``SCoReRollout(first, second, r1, r2, shaped, metrics, first_attempt, second_attempt)``.

    Raises:
        TypeError: an argument of the wrong type (a ``reward_fn`` that is not callable, prompts
            that are not text, ...); the message names the argument.
        ValueError: an argument of the right type with a bad value (no prompts, a non-finite
            ``alpha``, reserved ``generation_kwargs``, ...); the message names the argument.
    """
    fn = "two_attempt_rollout"
    prompts = _common.text_list(fn, "prompts", prompts)
    if not callable(reward_fn):
        raise TypeError(f"{fn}: reward_fn must be a callable (prompts, responses) -> rewards, got "
                        f"{_checks.describe(reward_fn)}")
    _common.text(fn, "correction_instruction", correction_instruction)
    alpha = _checks.real(fn, "alpha", alpha)
    kwargs = _common.generation_kwargs(
        fn, generation_kwargs, defaults=DEFAULT_GENERATION,
        reserved=("input_ids", "attention_mask", "return_dict_in_generate",
                  "num_return_sequences"))
    contexts = _common.encode(tokenizer, prompts)
    first_tokens, first = _attempt(model, tokenizer, contexts, kwargs)
    instruction = tokenizer(correction_instruction, add_special_tokens=False)["input_ids"]
    eos = _common.eos_ids(model, tokenizer, kwargs)
    second_contexts = [c + [t for t in g if t not in eos] + list(instruction)
                       for c, g in zip(contexts, first_tokens)]
    second_tokens, second = _attempt(model, tokenizer, second_contexts, kwargs)
    r1 = _common.scores_of(fn, reward_fn(prompts, first), len(prompts))
    r2 = _common.scores_of(fn, reward_fn(prompts, second), len(prompts))
    binary = bool(((r1 == 0) | (r1 == 1)).all() and ((r2 == 0) | (r2 == 1)).all())
    metrics = losses.self_correction_metrics(r1, r2) if binary else None
    device = _common.model_device(model)
    return SCoReRollout(first, second, r1, r2, losses.score_shaping(r1, r2, alpha=alpha), metrics,
                        _batch(contexts, first_tokens, device),
                        _batch(second_contexts, second_tokens, device))


def _attempt(model, tokenizer, contexts: list[list[int]], kwargs: dict):
    """One batched ``generate``: each row's generated tokens (through the first EOS) and text."""
    device = _common.model_device(model)
    pad = _common.pad_id(tokenizer, model)
    eos = _common.eos_ids(model, tokenizer, kwargs)
    ids, mask = _common.left_pad(contexts, pad, device)
    out = _common.generate(model, ids, mask, kwargs, pad=pad)
    tokens = [_common.until_eos(row, eos)[0] for row in out.sequences[:, ids.shape[1]:].tolist()]
    return tokens, [_common.decode(tokenizer, t) for t in tokens]


def _batch(contexts: list[list[int]], generated: list[list[int]], device) -> Attempt:
    rows = [c + g for c, g in zip(contexts, generated)]
    ids, mask = _common.left_pad(rows, 0, device)
    completion = torch.zeros_like(mask, dtype=torch.bool)
    width = ids.shape[1]
    for i, g in enumerate(generated):
        completion[i, width - len(g):] = True  # an empty slice when nothing was generated
    return Attempt(ids, mask, completion)


# ----------------------------------------------------------------------------- the loss


class _Tokens(NamedTuple):
    hidden: torch.Tensor   # (N, H) the hidden states that predict the generated tokens
    targets: torch.Tensor  # (N,) those tokens
    rows: torch.Tensor     # (N,) the batch row of each


def _generated_positions(model: nn.Module, attempt: Attempt) -> _Tokens:
    """The final hidden states at the positions that predict each generated token (one decoder
    forward, positions as ``generate`` counts them)."""
    ids, mask = attempt.input_ids, attempt.attention_mask
    hidden = decoder_hidden_states(model, ids, mask)[:, :-1]
    counted = attempt.completion_mask[:, 1:] & mask[:, :-1].bool()
    rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(counted)[counted]
    return _Tokens(hidden[counted], ids[:, 1:][counted], rows)


def _check_heads(fn: str, head: ak_hf.LMHead, ref_head: ak_hf.LMHead) -> None:
    if head.bias is not None or head.softcap is not None or ref_head.bias is not None or \
            ref_head.softcap is not None:
        raise NotImplementedError(f"{fn}: alignkern.linear_kl takes no LM-head bias or soft-cap; "
                                  "this model (or the reference) has one")
    if head.logit_scale != ref_head.logit_scale:
        raise ValueError(f"{fn}: the model and ref_model scale their logits differently "
                         f"({head.logit_scale} vs {ref_head.logit_scale}); linear_kl takes one "
                         "logit_scale")


def score_stage2_loss(model: nn.Module, ref_model: nn.Module, rollout: SCoReRollout, *,
                      beta_kl: float = 0.1) -> torch.Tensor:
    """SCoRe's stage-II objective on a rollout, as a loss to minimise (a float32 scalar).

    ``loss = -mean_b[(r1_b - mean r1) log pi(y1_b | x_b) + (s_b - mean s) log pi(y2_b | x2_b)]
    + beta_kl * mean_t KL(pi || pi_ref)_t``, where ``s`` is the shaped reward, ``log pi(y | x)``
    the summed log-probability of an attempt's generated tokens (through its EOS), the baseline
    the batch mean (REINFORCE), and the KL is averaged over the generated tokens of both attempts.
    Each attempt is credited with its own reward (``r1`` for the first, the shaped reward for the
    second), as in SCoRe's objective ``r(y1) + r^(y2) - beta KL``.

    Log-probabilities come from ``alignkern.linear_logprobs`` and the KL from
    ``alignkern.losses.linear_kl``, both on the decoder's hidden states: no logits are built,
    only the generated positions are projected. Differentiable into every parameter of
    ``model``; ``ref_model`` runs without gradients.

    Args:
        model: the policy, a transformers causal LM (the one that generated ``rollout``).
        ref_model: the reference model of the KL term, with the policy's vocabulary.
        rollout: what ``two_attempt_rollout`` returned.
        beta_kl: the weight of the KL term, a finite number >= 0.

    Returns:
        The loss, a 0-d float32 tensor.

    Raises:
        TypeError: a rollout that is not an ``SCoReRollout``, a ``beta_kl`` that is not a
            number.
        ValueError: a ``beta_kl`` that is not finite or is negative.
        NotImplementedError: an LM head with a bias or a soft-cap (``linear_kl`` has neither).
    """
    fn = "score_stage2_loss"
    if not isinstance(rollout, SCoReRollout):
        raise TypeError(f"{fn}: rollout must be what two_attempt_rollout returns, got "
                        f"{_checks.describe(rollout)}")
    beta_kl = _checks.real(fn, "beta_kl", beta_kl, low=0.0)
    head, ref_head = ak_hf.model_head(model), ak_hf.model_head(ref_model)
    _check_heads(fn, head, ref_head)
    device = head.weight.device
    advantages = [(r - r.mean()).to(device) for r in (rollout.r1, rollout.shaped)]
    policy_term, kl_sum, kl_count = 0.0, 0.0, 0
    for attempt, advantage in zip((rollout.first_attempt, rollout.second_attempt), advantages):
        tokens = _generated_positions(model, attempt)
        hidden = tokens.hidden.to(head.weight.dtype)
        logp = alignkern.linear_logprobs(hidden, head.weight, tokens.targets,
                                         **head.scoring_kwargs())
        per_row = logp.new_zeros(attempt.input_ids.shape[0]).index_add(0, tokens.rows, logp)
        policy_term = policy_term + (advantage * per_row).mean()
        with torch.no_grad():
            ref = _generated_positions(ref_model, attempt).hidden.to(ref_head.weight.dtype)
        kl = losses.linear_kl(hidden, head.weight, ref, ref_head.weight,
                              logit_scale=head.logit_scale)
        kl_sum = kl_sum + kl.sum()
        kl_count += kl.numel()
    return -policy_term + beta_kl * kl_sum / max(kl_count, 1)
