"""Best-of-N: sample N answers per prompt in one batched ``generate``, score them with the model
itself (no ``[B·N, T, V]`` logits), keep the best."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn

from ..integrations import transformers as ak_hf
from . import _common

SCORES = ("self_eval", "likelihood")
DEFAULT_GENERATION = {"do_sample": True, "max_new_tokens": 32}


class BestOfN(NamedTuple):
    """What ``best_of_n`` returns.

    ``best (B,)`` int64: the index of the best candidate of each prompt (the argmax of its row of
    ``scores``; ties: the lowest index; NaN scores count as -inf). ``scores (B, n)`` float32 on the
    CPU. ``candidates``: B lists of n decoded answers (up to the first EOS, special tokens
    skipped).
    """

    best: torch.Tensor
    scores: torch.Tensor
    candidates: list[list[str]]

    @property
    def best_candidates(self) -> list[str]:
        """The best answer of each prompt."""
        return [row[int(i)] for row, i in zip(self.candidates, self.best)]


def best_of_n(
    model: nn.Module,
    tokenizer,
    prompts: str | Sequence[str],
    *,
    n: int = 8,
    score: str | Callable = "self_eval",
    evaluator=None,
    generation_kwargs: dict | None = None,
) -> BestOfN:
    """Sample ``n`` answers to each prompt and pick the best by the model's own scores.

    One ``model.generate(num_return_sequences=n)`` runs all prompts at once (left-padded), then
    the ``B·n`` candidates are scored in one batch:

    * ``score="self_eval"``: ``evaluator.score(prompt, candidate)`` (an alignkern
      ``SelfEvaluator``: ``p(A) - p(B)`` read from the last hidden state through the fused head,
      both option orders averaged, the template's shared prefix run once);
    * ``score="likelihood"``: ``score_generations``: the sum of the log-probabilities of the
      generated tokens (up to and including the first EOS) under the model's own distribution,
      from one decoder forward over the sequences, projecting only the generated positions
      through the LM head (no ``[B·n, T, V]`` logits). Not length-normalised: pass a callable for
      that;
    * a callable ``score(prompts, candidates) -> (B·n,)`` numbers, called once with the flat lists
      (prompt ``b`` repeated ``n`` times, candidates in order).

    Args:
        model: a transformers causal LM (``model_head`` must read it for ``"likelihood"``).
        tokenizer: its tokenizer; prompts are tokenized whole with special tokens.
        prompts: a str or a non-empty sequence of B str, the full text given to the model.
        n: candidates per prompt, >= 1.
        score: ``"self_eval"``, ``"likelihood"`` or a callable, as above.
        evaluator: the ``SelfEvaluator`` for ``"self_eval"``; its options must be single tokens.
        generation_kwargs: passed to ``generate`` over the defaults ``do_sample=True,
            max_new_tokens=32`` (``num_return_sequences`` is ``n``; ``input_ids``,
            ``attention_mask``, ``return_dict_in_generate`` and the cache are the loop's).

    Returns:
        ``BestOfN(best (B,), scores (B, n), candidates)``.

    Raises:
        TypeError / ValueError naming the argument: ``n`` not an int >= 1, empty or non-str
        prompts, an unknown ``score``, ``"self_eval"`` without an evaluator, an evaluator whose
        options are not single tokens, generation arguments that collide with the loop's, a
        scorer that returns the wrong number of scores.
    """
    fn = "best_of_n"
    prompts = _common.text_list(fn, "prompts", prompts)
    n = _common.positive_int(fn, "n", n)
    scorer = _scorer(fn, score, evaluator, tokenizer)
    kwargs = _common.generation_kwargs(
        fn, generation_kwargs, defaults=DEFAULT_GENERATION,
        reserved=("num_return_sequences", "input_ids", "attention_mask", "return_dict_in_generate",
                  "cache", "past_key_values"))
    device = _common.model_device(model)
    pad = _common.pad_id(tokenizer, model)
    ids, mask = _common.left_pad(_common.encode(tokenizer, prompts), pad, device)
    output = _sample(model, ids, mask, n, kwargs, pad)
    eos = _common.eos_ids(model, tokenizer, kwargs)
    candidates = _common.decode_generated(tokenizer, output.sequences[:, ids.shape[1]:], eos)
    flat_prompts = [p for p in prompts for _ in range(n)]
    if scorer == "likelihood":
        with torch.no_grad():
            values = ak_hf.score_generations(model, output, ids.shape[1], eos_token_id=eos or None,
                                             pad_token_id=pad, attention_mask=mask)
        values = _common.scores_of(fn, values, len(candidates))
    else:
        values = _common.scores_of(fn, scorer(flat_prompts, candidates), len(candidates))
    scores = values.view(len(prompts), n)
    return BestOfN(_argmax(scores), scores,
                   [candidates[b * n:(b + 1) * n] for b in range(len(prompts))])


def _sample(model, ids: torch.Tensor, mask: torch.Tensor, n: int, kwargs: dict, pad: int):
    """``n`` samples of each prompt ``ids (B, P)``: ``generate(num_return_sequences=n)``'s rows
    and random draws, with the prompts' KV cache computed once and held once for their ``n``
    rows (``SharedPrefixCache``) where the model allows it."""
    from alignkern.integrations.transformers import shared_prefix

    sharable = (n > 1 and ids.shape[1] > 1 and kwargs.get("use_cache", True)
                and kwargs.get("num_beams", 1) in (None, 1)
                and shared_prefix.model_can_share(model))
    if sharable:
        with shared_prefix.alignkern_attention(model) as switched:
            prefix = shared_prefix.prefix_cache(model, ids[:, :-1], mask[:, :-1]) \
                if switched else None
            if shared_prefix.can_share(prefix):
                return _common.generate(
                    model, ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0), kwargs,
                    pad=pad, cache=shared_prefix.SharedPrefixCache(prefix, len(ids) * n))
    return _common.generate(model, ids, mask, kwargs, pad=pad, num_return_sequences=n)


def _scorer(fn: str, score, evaluator, tokenizer):
    """``"likelihood"``, or a callable ``(prompts, candidates) -> scores``."""
    if callable(score):
        return score
    _common.text(fn, "score", score)
    if score not in SCORES:
        raise ValueError(f"{fn}: score must be 'self_eval', 'likelihood' or a callable, got "
                         f"{score!r}")
    if score == "likelihood":
        return score
    if evaluator is None:
        raise ValueError(f"{fn}: score='self_eval' needs an evaluator (an alignkern SelfEvaluator "
                         "built on the model)")
    _common.check_evaluator(fn, evaluator, tokenizer)
    return evaluator.score


def _argmax(scores: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax, ties to the lowest index, NaN as -inf."""
    return torch.nan_to_num(scores, nan=float("-inf")).argmax(-1)
