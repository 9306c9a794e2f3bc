"""What the log-probability ops must compute, written in plain float64 PyTorch.

These are the numbers the tests hold every backend to. They use ``torch.log_softmax`` and
``torch.logsumexp`` on float64 copies of the inputs and share no code with ``alignkern`` (in
particular not with ``alignkern/reference.py``, which is itself a backend and can share a kernel's
flaw, as it once shared ``z - lse`` in float32).
"""

from __future__ import annotations

import torch


def _ids(targets: torch.Tensor, logits_dim: int) -> tuple[torch.Tensor, bool]:
    single = targets.dim() == logits_dim - 1
    return (targets.unsqueeze(-1) if single else targets).long(), single


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logprobs, lse)`` in float64: ``log_softmax(logits / T)`` at each target (0 for
    ``ignore_index``, NaN for an id outside ``[0, V)``) and ``logsumexp(logits / T)``.
    Differentiable in ``logits``."""
    z = logits.double() / temperature
    ids, single = _ids(targets, logits.dim())
    vocab = logits.shape[-1]
    ignored = ids == ignore_index
    out_of_range = ~ignored & ((ids < 0) | (ids >= vocab))
    picked = torch.log_softmax(z, dim=-1).gather(-1, ids.clamp(0, vocab - 1))
    picked = picked.masked_fill(ignored, 0.0).masked_fill(out_of_range, float("nan"))
    return (picked.squeeze(-1) if single else picked), torch.logsumexp(z, dim=-1)


def linear_logits(hidden, weight, bias=None, softcap=None, logit_scale=1.0) -> torch.Tensor:
    """``softcap * tanh(logit_scale * (hidden @ weight.T + bias) / softcap)`` in float64."""
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    logits = logit_scale * logits
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def linear_logprobs(hidden, weight, targets, bias=None, temperature=1.0, softcap=None,
                    ignore_index=-100, logit_scale=1.0):
    """``token_logprobs`` of ``linear_logits``."""
    return token_logprobs(linear_logits(hidden, weight, bias, softcap, logit_scale), targets,
                          temperature, ignore_index)


def entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``-sum p log p`` of ``softmax(logits / T)`` in float64."""
    log_p = torch.log_softmax(logits.double() / temperature, dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


def kl(logits: torch.Tensor, ref_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``KL(softmax(logits / T) || softmax(ref_logits / T))`` per row in float64."""
    log_p = torch.log_softmax(logits.double() / temperature, dim=-1)
    log_q = torch.log_softmax(ref_logits.double() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def logit_stats(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                ignore_index: int = -100) -> dict[str, torch.Tensor]:
    """The statistics ``linear_logprobs(..., stats=...)`` returns, of ``z = logits / T`` in
    float64: entropy, log sum p^2, mean z, max z, and whether each target is the first maximum
    (False for ignored and out-of-range ids)."""
    z = logits.double() / temperature
    log_p = torch.log_softmax(z, dim=-1)
    ids, single = _ids(targets, logits.dim())
    vocab = logits.shape[-1]
    valid = (ids != ignore_index) & (ids >= 0) & (ids < vocab)
    is_top1 = (ids == z.argmax(-1, keepdim=True)) & valid  # argmax: the first maximum
    return {
        "entropy": -(log_p.exp() * log_p).sum(-1),
        "log_sum_sq_probs": torch.logsumexp(2 * log_p, dim=-1),
        "mean_logits": z.mean(-1),
        "is_top1": is_top1.squeeze(-1) if single else is_top1,
        "max_logits": z.amax(-1),
    }


def linear_logprobs_stats(hidden, weight, targets, bias=None, temperature=1.0, softcap=None,
                          ignore_index=-100, logit_scale=1.0):
    """``(logprobs, lse, stats)`` of the materialised float64 logits."""
    logits = linear_logits(hidden, weight, bias, softcap, logit_scale)
    out, lse = token_logprobs(logits, targets, temperature, ignore_index)
    return out, lse, logit_stats(logits, targets, temperature, ignore_index)
