"""The synthetic task's data (the official sampler's), reward noise, the error metric, and the
official training objective."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ...losses import plackett_luce_loss

DIM = 5
EXAMPLES = 20


class Sequences(NamedTuple):
    """A batch of B sequences of n examples in dimension d.

    ``x (B, d)`` the query; ``target (B, d)`` y* = x W; ``responses (B, n, d)``;
    ``rewards (B, n)`` the true rewards the responses were made from; ``observed (B, n)`` the
    rewards the methods read (``rewards`` with noise, see ``with_reward_noise``)."""

    x: torch.Tensor
    target: torch.Tensor
    responses: torch.Tensor
    rewards: torch.Tensor
    observed: torch.Tensor


def sample_sequences(batch: int, *, examples: int = EXAMPLES, dim: int = DIM,
                     generator: torch.Generator | None = None,
                     dtype: torch.dtype = torch.float32) -> Sequences:
    """``batch`` sequences as the official sampler makes them (x, W, W_eps ~ N(0, I); r ~ U(0, 1);
    y_i = r_i x W + (1 - r_i) x W_eps), observed rewards noise-free."""
    def normal(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype)

    x = normal(batch, dim)
    target = torch.einsum("bi,bij->bj", x, normal(batch, dim, dim))
    distractor = torch.einsum("bi,bij->bj", x, normal(batch, dim, dim))
    rewards = torch.rand(batch, examples, generator=generator, dtype=dtype)
    r = rewards[..., None]
    responses = r * target[:, None] + (1 - r) * distractor[:, None]
    return Sequences(x, target, responses, rewards, rewards)


def with_reward_noise(seqs: Sequences, p: float,
                      generator: torch.Generator | None = None) -> Sequences:
    """``seqs`` whose observed rewards are each, with probability ``p``, replaced by an independent
    U(0, 1) draw (the official ``random_replace``); responses and true rewards unchanged."""
    shape, dtype = seqs.rewards.shape, seqs.rewards.dtype
    fresh = torch.rand(shape, generator=generator, dtype=dtype)
    replaced = torch.rand(shape, generator=generator, dtype=dtype) < p
    return seqs._replace(observed=torch.where(replaced, fresh, seqs.rewards))


def cosine_error(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean of 1 - cos(pred, target) over the leading dimension; ``pred, target (B, d)``."""
    return float((1 - F.cosine_similarity(pred, target, dim=-1)).mean())


# ----------------------------------------------------------------------------- the objective


def prefix_objective(preds: torch.Tensor, responses: torch.Tensor, rewards: torch.Tensor,
                     *, min_k: int = 2) -> torch.Tensor:
    """The official training loss: for each prefix of k >= ``min_k`` examples, the Plackett–Luce
    loss of the prediction made from it, scored by cosine similarity against those k responses
    and ranked by their rewards; averaged over prefixes and sequences.

    ``preds (B, n, d)``: row t is predicted from examples 0..t (k = t + 1); ``responses
    (B, n, d)``; ``rewards (B, n)``. Returns a scalar."""
    batch, n, _ = responses.shape
    ks = torch.arange(min_k, n + 1, device=responses.device)
    rows = preds[:, min_k - 1:]  # (B, K, d)
    scores = F.cosine_similarity(rows[:, :, None], responses[:, None], dim=-1)  # (B, K, n)
    mask = (torch.arange(n, device=ks.device) < ks[:, None]).expand(batch, -1, -1)
    ranked_by = rewards[:, None].expand(-1, len(ks), -1)
    return plackett_luce_loss(scores.flatten(0, 1), ranked_by.flatten(0, 1), mask.flatten(0, 1))
