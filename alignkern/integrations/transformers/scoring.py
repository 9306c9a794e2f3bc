"""Scoring with a transformers causal LM without ``[B, T, V]`` logits.

The decoder (``model.get_decoder()``) runs as usual; its final, post-norm hidden states go
through alignkern's fused LM-head ops (``alignkern.linear_logprobs``,
``alignkern.self_eval_scores``) with the head read by ``model_head``, and only the rows that
are scored are ever projected.

Positions follow ``generate``: unless ``position_ids`` are given, they are counted over the real
tokens of ``attention_mask`` (``cumsum - 1``), so a left-padded row scores as it would unpadded
(a plain ``model(input_ids, attention_mask)`` forward counts positions from the first column,
padding included).
"""

from __future__ import annotations

import inspect
import operator
import os
from collections.abc import Sequence

import torch
from torch import nn

import alignkern

from .head import LMHead, model_head

_REDUCTIONS = ("sum", "mean", "none")


# ----------------------------------------------------------------------------- helpers


def _check_ids(fn: str, name: str, ids: torch.Tensor) -> None:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dim() != 2:
        raise ValueError(f"{fn}: {name} must have shape (B, T), got {tuple(ids.shape)}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"{fn}: {name} must hold integer token ids, got {ids.dtype}")


def _check_mask(fn: str, name: str, mask: torch.Tensor | None, shape) -> torch.Tensor | None:
    """``mask`` as a bool tensor of ``shape`` (any integer or bool dtype accepted)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{fn}: {name} must have shape (B, T) = {tuple(shape)} like input_ids, "
                         f"got {tuple(mask.shape)}")
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"{fn}: {name} must be a bool or integer 0/1 mask, got {mask.dtype}")
    return mask.to(torch.bool)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``position_ids (B, T)`` as ``generate`` makes them: the index of each real token among the
    real tokens of its row; 0 at padding."""
    mask = attention_mask.to(torch.long)
    return (mask.cumsum(-1) - 1).masked_fill_(mask == 0, 0)


def _accepts(module: nn.Module, name: str) -> bool:
    return name in inspect.signature(module.forward).parameters


def decoder_hidden_states(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The final (post-norm) hidden states ``(B, T, H)`` of the model's decoder: what its LM head
    reads. ``position_ids`` default to ``positions_from_mask(attention_mask)``."""
    decoder = model.get_decoder()
    kwargs = {"input_ids": input_ids, "use_cache": False}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask.to(torch.long)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)
    if position_ids is not None and _accepts(decoder, "position_ids"):
        kwargs["position_ids"] = position_ids
    out = decoder(**kwargs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _token_logprobs(head: LMHead, hidden, targets, temperature) -> torch.Tensor:
    """``log p(targets)`` ``(N,)`` fp32 from hidden rows ``(N, H)`` through the model's head."""
    return head.linear_logprobs(hidden.to(head.weight.dtype), targets, temperature)


def _no_hidden_rows(head: LMHead) -> torch.Tensor:
    """``(0, H)`` hidden rows for ``head``: scoring nothing still goes through the head, so that
    an empty result is connected to its parameters like any other (a zero gradient)."""
    width = getattr(head.weight, "ds_shape", head.weight.shape)[-1]  # ZeRO-3: the full shape
    return torch.zeros(0, width, dtype=head.weight.dtype, device=head.weight.device)


def _validating() -> bool:
    """Whether checks that cost a device sync run (``ALIGNKERN_VALIDATE=0`` turns them off)."""
    return os.environ.get("ALIGNKERN_VALIDATE", "1") != "0" and not torch.compiler.is_compiling()


def _reduce(logprobs: torch.Tensor, counted: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-token ``logprobs (N,)`` at the true entries of ``counted (B, L)`` → ``(B, L)`` (zeros
    elsewhere) for ``"none"``, else their sum or mean per row ``(B,)``."""
    per_token = logprobs.new_zeros(counted.shape).masked_scatter(counted, logprobs)
    if reduction == "none":
        return per_token
    total = per_token.sum(-1)
    if reduction == "mean":
        return total / counted.sum(-1).clamp(min=1).to(total.dtype)
    return total


# ----------------------------------------------------------------------------- sequence_logprobs


def _scored_positions(input_ids, attention_mask, completion_mask) -> torch.Tensor:
    """``(B, T-1)`` bool: position ``t`` (predicting token ``t + 1``) is scored iff token ``t + 1``
    is real and selected, and token ``t`` is real (the first real token has no context)."""
    counted = torch.ones_like(input_ids[:, 1:], dtype=torch.bool)
    if attention_mask is not None:
        counted = counted & attention_mask[:, 1:] & attention_mask[:, :-1]
    if completion_mask is not None:
        counted = counted & completion_mask[:, 1:]
    return counted


def sequence_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    completion_mask: torch.Tensor | None = None,
    *,
    reduction: str = "sum",
    temperature: float = 1.0,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log-likelihood of (parts of) sequences under a causal LM, without ``[B, T, V]`` logits.

    Runs the decoder once, shifts, and projects through the LM head only the positions that are
    scored: a 2,000-token prompt with a 50-token completion projects 50 rows.

    Args:
        model: a causal LM that ``model_head`` can read.
        input_ids: ``(B, T)`` token ids, left or right padded.
        attention_mask: ``(B, T)`` 1/True at real tokens (default: all real).
        completion_mask: ``(B, T)`` 1/True at the tokens to score (e.g. the response of a DPO
            pair); default: every real token after the first. Padding and each row's first real
            token (nothing predicts it) are never scored.
        reduction: ``"sum"`` or ``"mean"`` over the scored tokens → ``(B,)`` (0 for a row with
            none: all padding, a single token, or ``T = 0``); ``"none"`` → ``(B, T-1)`` (``(B, 0)``
            when ``T = 0``), entry ``t`` the log-probability of token ``t + 1``, 0 where not
            scored.
        temperature: divides the logits (after the model's own scale and soft-cap).
        position_ids: ``(B, T)``; default ``positions_from_mask(attention_mask)`` (as ``generate``).

    Returns:
        float32 ``(B,)`` or ``(B, T-1)``, differentiable into every parameter of the model.

    Raises:
        TypeError / ValueError: bad ids, masks or shapes; ``reduction`` not one of
            ``"sum"``, ``"mean"``, ``"none"``.
        NotImplementedError: a model whose head ``model_head`` cannot read.
    """
    fn = "sequence_logprobs"
    _check_ids(fn, "input_ids", input_ids)
    attention_mask = _check_mask(fn, "attention_mask", attention_mask, input_ids.shape)
    completion_mask = _check_mask(fn, "completion_mask", completion_mask, input_ids.shape)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    head = model_head(model)  # refuse an unreadable head before running the decoder
    counted = _scored_positions(input_ids, attention_mask, completion_mask)
    if input_ids.numel() == 0:  # no token (T = 0) or no row: no decoder run, nothing scored
        rows = _no_hidden_rows(head)
    else:
        rows = decoder_hidden_states(model, input_ids, attention_mask, position_ids)[:, :-1][counted]
    logprobs = _token_logprobs(head, rows, input_ids[:, 1:][counted], temperature)
    return _reduce(logprobs, counted, reduction)


# ----------------------------------------------------------------------------- score_generations


def _token_ids(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.reshape(-1).tolist()]
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _until_first_eos(generated: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """``(B, G)`` bool: the generated tokens up to and including each row's first EOS."""
    if not eos_ids:
        return torch.ones_like(generated, dtype=torch.bool)
    is_eos = torch.isin(generated, torch.tensor(eos_ids, device=generated.device))
    eos_before = is_eos.long().cumsum(-1) - is_eos.long()
    return eos_before == 0


def _generated_hidden_from_output(model, output, n_generated: int) -> torch.Tensor | None:
    """``(B·n, G, H)`` hidden states that predicted each generated token, from
    ``output.hidden_states`` when ``generate`` kept usable ones, else ``None``."""
    steps = getattr(output, "hidden_states", None)
    if not steps or len(steps) != n_generated or getattr(output, "beam_indices", None) is not None:
        return None  # not returned, or beam search (hidden states are per beam, not per sequence)
    if getattr(model.config, "tie_last_hidden_states", None) is False:
        return None  # hidden_states[-1] would be the pre-norm state
    last = [step[-1] if step else None for step in steps]
    if any(h is None or h.dim() != 3 for h in last):
        return None
    return torch.stack([h[:, -1] for h in last], dim=1)


def _prompt_mask(fn, sequences, prompt_length, attention_mask, pad_token_id) -> torch.Tensor:
    """``(B·n, P)`` bool: the prompt's real tokens."""
    rows = sequences.shape[0]
    if attention_mask is None:
        prompt = sequences[:, :prompt_length]
        return prompt != pad_token_id if pad_token_id is not None else torch.ones_like(
            prompt, dtype=torch.bool)
    if attention_mask.dim() != 2 or attention_mask.shape[1] != prompt_length or \
            rows % attention_mask.shape[0] != 0:
        raise ValueError(f"{fn}: attention_mask must be the prompt's (B, P) mask with P = "
                         f"prompt_length = {prompt_length} and B dividing the {rows} generated "
                         f"sequences, got {tuple(attention_mask.shape)}")
    return attention_mask.to(torch.bool).repeat_interleave(rows // attention_mask.shape[0], dim=0)


def score_generations(
    model: nn.Module,
    output,
    prompt_length: int,
    *,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Log-likelihood under ``model`` of what ``model.generate`` produced.

    Each sequence's generated tokens are scored up to and including its first EOS; what follows
    (padding) is not. With ``generate(..., return_dict_in_generate=True,
    output_hidden_states=True)`` the hidden states ``generate`` already computed are used (no
    extra forward, no gradient); otherwise the sequences run through the decoder once, with the
    attention mask and positions ``generate`` used (differentiable).

    The result is the sum of ``model.compute_transition_scores(output.sequences, output.scores,
    normalize_logits=True)`` over the same tokens when ``generate`` applied no logits processors
    (greedy, or sampling at temperature 1 without top-k/top-p/penalties): it is the model's own
    distribution, divided by ``temperature`` if given, not the processed one ``generate`` sampled.

    Args:
        model: the causal LM (``model_head`` must read it).
        output: a ``GenerateOutput`` (``.sequences`` ``(B·n, P + G)``) or the sequences tensor.
        prompt_length: ``P``, the padded prompt length (``input_ids.shape[1]``).
        eos_token_id: id or ids that end a sequence; default ``model.generation_config``'s.
        pad_token_id: marks prompt padding when ``attention_mask`` is not given; default
            ``model.generation_config``'s (``None``: the prompt has no padding).
        attention_mask: the prompt's ``(B, P)`` mask as passed to ``generate`` (rows repeated for
            ``num_return_sequences``); only needed by the forward path.
        temperature: divides the logits after the model's own scale and soft-cap.

    Returns:
        ``(B·n,)`` float32; 0 for a sequence with nothing generated (``prompt_length`` = its
        length), empty for no sequences.

    Raises:
        TypeError / ValueError: no sequences, sequences of no token (``T = 0``: not even a
            prompt), a ``prompt_length`` outside ``[1, length]``, a bad mask.
        NotImplementedError: a model whose head ``model_head`` cannot read.
    """
    fn = "score_generations"
    sequences = output if isinstance(output, torch.Tensor) else getattr(output, "sequences", None)
    if sequences is None:
        raise TypeError(f"{fn}: output must be what generate(..., return_dict_in_generate=True) "
                        f"returns (with .sequences) or a sequences tensor, got "
                        f"{type(output).__name__}")
    _check_ids(fn, "output.sequences", sequences)
    if sequences.shape[1] == 0:
        raise ValueError(f"{fn}: output.sequences must hold at least one token (the prompt, then "
                         f"what was generated), got shape {tuple(sequences.shape)}")
    try:
        prompt_length = operator.index(prompt_length)
    except TypeError:
        raise TypeError(f"{fn}: prompt_length must be an int, got "
                        f"{type(prompt_length).__name__}") from None
    if not 1 <= prompt_length <= sequences.shape[1]:
        raise ValueError(f"{fn}: prompt_length must be in [1, {sequences.shape[1]}] (the "
                         f"sequences' length), got {prompt_length}")
    head = model_head(model)
    generation_config = getattr(model, "generation_config", None)
    if eos_token_id is None and generation_config is not None:
        eos_token_id = generation_config.eos_token_id
    if pad_token_id is None and generation_config is not None:
        pad_token_id = generation_config.pad_token_id
    generated = sequences[:, prompt_length:]
    counted = _until_first_eos(generated, _token_ids(eos_token_id))
    if sequences.shape[0] == 0:
        logprobs = _token_logprobs(head, _no_hidden_rows(head), generated[counted], temperature)
        return _reduce(logprobs, counted, "sum")
    hidden = None if isinstance(output, torch.Tensor) else \
        _generated_hidden_from_output(model, output, generated.shape[1])
    if hidden is None:
        prompt_mask = _prompt_mask(fn, sequences, prompt_length, attention_mask, pad_token_id)
        mask = torch.cat([prompt_mask, torch.ones_like(generated, dtype=torch.bool)], dim=1)
        hidden = decoder_hidden_states(model, sequences, mask)[:, prompt_length - 1:-1]
    logprobs = _token_logprobs(head, hidden[counted], generated[counted], temperature)
    return _reduce(logprobs, counted, "sum")


# ----------------------------------------------------------------------------- option_scores


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B,)`` index of each row's last real token (left or right padding); ``T - 1``, a padding
    position, for a row with no real token (see ``_rows_without_tokens``)."""
    width = attention_mask.shape[-1]
    return width - 1 - attention_mask.to(torch.long).flip(-1).argmax(-1)


def _rows_without_tokens(fn: str, attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B,)`` bool, the rows of ``attention_mask (B, T)`` with no real token; raises
    ``ValueError`` naming them unless validation is off (``ALIGNKERN_VALIDATE=0``: a device sync
    saved, and the caller must give those rows NaN)."""
    empty = ~attention_mask.any(-1)
    if _validating() and bool(empty.any()):
        rows = empty.nonzero().flatten().tolist()
        named = f"row {rows[0]} has" if len(rows) == 1 else \
            f"rows {rows[:10]}{' ...' if len(rows) > 10 else ''} have"
        raise ValueError(f"{fn}: attention_mask {named} no real token (all padding): the scores "
                         "are read at each row's last real token, so there is none to read; drop "
                         f"such rows (attention_mask of shape {tuple(attention_mask.shape)})")
    return empty


def option_scores(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    options: torch.Tensor | Sequence[int],
    values: torch.Tensor | Sequence[float] | None = None,
    *,
    temperature: float = 1.0,
) -> alignkern.SelfEvalScores:
    """RAIN / P(True) / G-Eval scores read at each row's last real token, without logits.

    Args:
        model: a causal LM that ``model_head`` can read.
        input_ids: ``(B, T)`` prompts, left or right padded.
        attention_mask: ``(B, T)`` or ``None`` (no padding).
        options: ``(K,)`` token ids of the answers (e.g. the ids of "A" and "B").
        values: ``(K,)`` the value of each answer; default ``(+1, -1)`` for K = 2.
        temperature: divides the logits after the model's own scale and soft-cap.

    Returns:
        ``alignkern.SelfEvalScores(score (B,), mass (B,))`` float32, as
        ``alignkern.self_eval_scores``: ``score = sum_k p_k values_k`` with ``p`` renormalised
        over the options, ``mass`` the probability the model puts on the options at all.
        Differentiable into the model's parameters. Empty for ``B = 0``. A row with no real
        token has no last token to read: with ``ALIGNKERN_VALIDATE=0`` its score and mass are
        NaN (never a number read at a padding position).

    Raises:
        TypeError / ValueError: bad ids, mask or options; ``input_ids`` with rows of no token
            (``T = 0``); an ``attention_mask`` row with no real token, named (a device sync;
            ``ALIGNKERN_VALIDATE=0`` turns the check off).
        NotImplementedError: a model whose head ``model_head`` cannot read.
    """
    fn = "option_scores"
    _check_ids(fn, "input_ids", input_ids)
    attention_mask = _check_mask(fn, "attention_mask", attention_mask, input_ids.shape)
    head = model_head(model)
    device = head.weight.device
    options = torch.as_tensor(options, device=device)
    if values is not None:
        values = torch.as_tensor(values, dtype=torch.float32, device=device)
    if input_ids.shape[0] == 0:
        return head.self_eval_scores(_no_hidden_rows(head), options, values, temperature)
    if input_ids.shape[1] == 0:
        raise ValueError(f"{fn}: input_ids must hold at least one token per row (the scores are "
                         f"read at each row's last real token), got shape {tuple(input_ids.shape)}")
    empty = None if attention_mask is None else _rows_without_tokens(fn, attention_mask)
    hidden = decoder_hidden_states(model, input_ids, attention_mask)
    if attention_mask is None:
        last = hidden[:, -1]
    else:
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device),
                      last_token_index(attention_mask)]
    scores = head.self_eval_scores(last.to(head.weight.dtype), options, values, temperature)
    if empty is None:
        return scores
    return alignkern.SelfEvalScores(*(x.masked_fill(empty.to(x.device), float("nan"))
                                      for x in scores))
