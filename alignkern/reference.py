"""Plain-PyTorch definitions of every alignkern op.

These are the specifications the kernels are tested against (evaluated in float64 by the tests) and
the ``reference`` backend. They materialise whatever they need and are not meant to be fast.
"""

from __future__ import annotations

import torch


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of chosen tokens and the log-sum-exp of each row.

    Args:
        logits: ``(..., V)`` floating point.
        targets: ``(...)`` or ``(..., K)`` integer token ids; ``ignore_index`` marks ids to skip.
    Returns:
        ``out`` shaped like ``targets`` with ``z[t] - logsumexp(z)``, ``z = logits / temperature``
        (0 where ``t == ignore_index``, NaN where ``t`` is outside ``[0, V)``), and ``lse`` of shape
        ``(...)``. Both are float32, or float64 for float64 logits.
    """
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(out_dtype) / temperature
    lse = torch.logsumexp(z, dim=-1)
    single = targets.dim() == logits.dim() - 1
    ids = (targets.unsqueeze(-1) if single else targets).long()
    vocab = logits.shape[-1]
    ignored = ids == ignore_index
    out_of_range = ~ignored & ((ids < 0) | (ids >= vocab))
    picked = torch.gather(z, -1, ids.clamp(0, vocab - 1)) - lse.unsqueeze(-1)
    picked = picked.masked_fill(ignored, 0.0).masked_fill(out_of_range, float("nan"))
    return (picked.squeeze(-1) if single else picked), lse


def token_logprobs_backward(
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Gradient of ``token_logprobs`` (DESIGN.md's closed form) in the logits' dtype.

    ``dlogits_v = (sum_k g_k [t_k = v] - (sum_{k valid} g_k - g_lse) softmax(z)_v) / temperature``;
    a row with an out-of-range id gets NaN.
    """
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    single = targets.dim() == logits.dim() - 1
    ids = (targets.unsqueeze(-1) if single else targets).long()
    g = (grad_out.unsqueeze(-1) if single else grad_out).to(acc)
    vocab = logits.shape[-1]
    ignored = ids == ignore_index
    out_of_range = ~ignored & ((ids < 0) | (ids >= vocab))
    g_valid = g.masked_fill(ignored, 0.0).masked_fill(out_of_range, float("nan"))
    coef = g_valid.sum(-1, keepdim=True)
    if grad_lse is not None:
        coef = coef - grad_lse.to(acc).unsqueeze(-1)
    softmax = torch.exp(logits.to(acc) / temperature - lse.to(acc).unsqueeze(-1))
    picked = torch.zeros_like(softmax).scatter_add_(
        -1, ids.clamp(0, vocab - 1), g.masked_fill(ignored | out_of_range, 0.0)
    )
    return ((picked - coef * softmax) / temperature).to(logits.dtype)


def linear_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """``hidden @ weight.T + bias``, then ``softcap * tanh(logits / softcap)`` if given, computed in
    float32 (float64 for float64 inputs). ``hidden (..., H)``, ``weight (V, H)`` → ``(..., V)``."""
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = hidden.to(acc) @ weight.to(acc).T
    if bias is not None:
        logits = logits + bias.to(acc)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``token_logprobs`` of ``linear_logits(hidden, weight, bias, softcap)``: log-probabilities of
    ``targets`` (``(...)`` or ``(..., K)``) and the LSE ``(...)``, float32 (float64 for float64)."""
    return token_logprobs(linear_logits(hidden, weight, bias, softcap), targets, temperature,
                          ignore_index)


def option_logprobs(hidden, weight, options, **kwargs) -> torch.Tensor:
    """Log-probabilities ``(..., K)`` of the same ``options (K,)`` token ids at every row."""
    targets = options.expand(*hidden.shape[:-1], options.shape[0])
    return linear_logprobs(hidden, weight, targets, **kwargs)[0]


def self_eval_scores(hidden, weight, options, values=None, **kwargs):
    """``(score, mass)``: the expected value of the options under the model's probabilities
    renormalised over the options, and the total probability the options received."""
    logprobs = option_logprobs(hidden, weight, options, **kwargs)
    if values is None:
        values = torch.tensor([1.0, -1.0])
    p = torch.softmax(logprobs, dim=-1)
    score = (p * values.to(p)).sum(-1)
    mass = torch.exp(logprobs).sum(-1)
    return score, mass


def sequence_logprobs(hidden, weight, targets, mask=None, reduction="sum", **kwargs):
    """Per-sequence log-likelihood ``(B,)``: the sum (or mean over counted tokens) of
    ``linear_logprobs`` over ``T``, counting positions where ``mask`` is true and the target is not
    ``ignore_index``."""
    ignore_index = kwargs.get("ignore_index", -100)
    counted = targets != ignore_index
    if mask is not None:
        counted = counted & mask.bool()
    targets = targets.masked_fill(~counted, ignore_index)
    logprobs = linear_logprobs(hidden, weight, targets, **kwargs)[0]
    total = torch.where(counted, logprobs, 0.0).sum(-1)
    if reduction == "mean":
        return total / counted.sum(-1).clamp(min=1)
    return total
