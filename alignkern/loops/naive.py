"""The naive ways the demo and the loop benchmark compare against: what RAIN's code and a plain
PyTorch implementation do, on full ``[.., V]`` logits. Not for use in loops."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from . import _common
from .score import SCoReRollout


def _orders(evaluator) -> list[list[int]]:
    k = len(evaluator.options)
    orders = [list(range(k))]
    return orders + [list(reversed(range(k)))] if evaluator.swap_options else orders


def rain_reference_scores(model: nn.Module, evaluator, prompts: Sequence[str],
                          responses: Sequence[str], *, hard: bool = False) -> torch.Tensor:
    """RAIN's scoring, one candidate at a time: for each candidate and each option order, an
    unbatched ``model(input_ids).logits`` over the whole text (every position through the LM head,
    no prefix reuse) and a full-vocabulary softmax of the last row. ``hard=False``: the
    ``SelfEvaluator``'s continuous score from those logits (``sum_k p_k values_k`` with ``p``
    renormalised over the options, averaged over the orders) — the same numbers the evaluator
    computes; ``hard=True``: RAIN's own, each order's comparison thresholded, in {-1, 0, 1} (two
    options only). Returns ``(N,)`` float32 on the CPU."""
    device = _common.model_device(model)
    option_ids = evaluator.option_ids.to(device)
    passes = []
    with torch.no_grad():
        for texts, order in zip(evaluator.texts(list(prompts), list(responses)), _orders(evaluator)):
            values = (evaluator.values[order] if evaluator.descriptions is not None
                      else evaluator.values).to(device)
            row = []
            for text in texts:
                ids = torch.tensor([_common.encode(evaluator.tokenizer, [text])[0]], device=device)
                probs = torch.softmax(model(input_ids=ids).logits[0, -1].float(), -1)[option_ids]
                if hard:
                    row.append(values[probs.argmax()])  # the option the model prefers, +1 or -1
                else:
                    row.append((probs / probs.sum() * values).sum())
            passes.append(torch.stack(row))
    return torch.stack(passes).mean(0).float().cpu()


def full_logits_likelihood(model: nn.Module, sequences: torch.Tensor, prompt_length: int,
                           prompt_mask: torch.Tensor, eos: Sequence[int]) -> torch.Tensor:
    """Best-of-N likelihood the plain way: ``model(sequences).logits`` (``[R, T, V]``), a float32
    ``log_softmax`` of the generated positions, gathered at the generated tokens, summed up to
    and including each row's first EOS. ``prompt_mask (R, P)``. Returns ``(R,)`` float32."""
    generated = sequences[:, prompt_length:]
    counted = torch.stack([torch.tensor([i < len(_common.until_eos(row, eos)[0])
                                         for i in range(generated.shape[1])])
                           for row in generated.tolist()]).to(sequences.device)
    mask = torch.cat([prompt_mask.long(), torch.ones_like(generated)], 1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=sequences, attention_mask=mask, position_ids=positions).logits
        logp = torch.log_softmax(logits[:, prompt_length - 1:-1].float(), -1)
        token = logp.gather(-1, generated[..., None])[..., 0]
    return (token * counted).sum(-1).cpu()


def stage2_loss_with_logits(model: nn.Module, ref_model: nn.Module, rollout: SCoReRollout, *,
                            beta_kl: float = 0.1) -> torch.Tensor:
    """``score_stage2_loss`` the plain way: full logits of policy and reference, float32
    ``log_softmax`` over the vocabulary at every position, KL from both full distributions."""
    device = _common.model_device(model)
    policy_term, kl_sum, kl_count = 0.0, 0.0, 0
    for attempt, reward in ((rollout.first_attempt, rollout.r1),
                            (rollout.second_attempt, rollout.shaped)):
        ids, mask = attempt.input_ids, attempt.attention_mask
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        counted = attempt.completion_mask[:, 1:] & mask[:, :-1].bool()
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask,
                                       position_ids=positions).logits[:, :-1].float(), -1)
        with torch.no_grad():
            ref_logp = torch.log_softmax(ref_model(input_ids=ids, attention_mask=mask,
                                                   position_ids=positions).logits[:, :-1].float(), -1)
        token = logp.gather(-1, ids[:, 1:, None])[..., 0]
        per_row = (token * counted).sum(-1)
        policy_term = policy_term + ((reward - reward.mean()).to(device) * per_row).mean()
        kl = (logp.exp() * (logp - ref_logp)).sum(-1)
        kl_sum = kl_sum + kl[counted].sum()
        kl_count += int(counted.sum())
    return -policy_term + beta_kl * kl_sum / max(kl_count, 1)
