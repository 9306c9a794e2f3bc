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
