"""The trained model: a small causal transformer whose attention layers are
``alignkern.reward_attention``, and its training loop (Adam on the official objective)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ...ops.reward_attention import reward_attention
from .data import DIM, prefix_objective, sample_sequences

ROUTES = ("bias", "rank", "both", "none")


class RewardSelfAttention(nn.Module):
    """Causal multi-head self-attention through ``reward_attention``; the rewards reach it as a
    key bias ``beta_h * r_j`` (one learnt beta per head, ``route`` "bias" or "both") and/or as the
    reward-ordering mask on half of the heads (each example reads only the examples whose reward
    is at or below its own; ``route`` "rank" or "both")."""

    def __init__(self, width: int, heads: int, route: str = "bias"):
        super().__init__()
        if route not in ROUTES:
            raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
        if width % heads or heads < (2 if route in ("rank", "both") else 1):
            raise ValueError(f"width {width} must split into heads {heads} (at least 2 with ranks)")
        self.heads, self.route = heads, route
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.beta = (nn.Parameter(torch.linspace(-4.0, 4.0, heads))
                     if route in ("bias", "both") else None)

    def forward(self, h: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
        """``h (B, L, width)``, ``rewards (B, L)`` -> ``(B, L, width)``."""
        batch, length, width = h.shape
        q, k, v = self.qkv(h).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        bias = None if self.beta is None else self.beta[None, :, None] * rewards[:, None]
        if self.route in ("rank", "both"):
            half = self.heads // 2
            parts = [slice(0, half), slice(half, self.heads)]
            ranks = [dict(key_rank=rewards, query_rank=rewards), {}]
            o = torch.cat([
                reward_attention(q[:, s], k[:, s], v[:, s], causal=True, **rank,
                                 key_bias=None if bias is None else bias[:, s])
                for s, rank in zip(parts, ranks)], dim=1)
        else:
            o = reward_attention(q, k, v, key_bias=bias, causal=True)
        return self.out(o.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: reward attention, then a GELU MLP, each with a residual."""

    def __init__(self, width: int, heads: int, route: str):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = RewardSelfAttention(width, heads, route)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, h: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(self.norm1(h), rewards)
        return h + self.mlp(self.norm2(h))


class ICATransformer(nn.Module):
    """Reads one token [x, y_i, r_i] per example and predicts, at token t, a response from examples
    0..t (causal)."""

    def __init__(self, dim: int = DIM, width: int = 64, layers: int = 4, heads: int = 4,
                 route: str = "bias"):
        super().__init__()
        self.read_in = nn.Linear(2 * dim + 1, width)
        self.blocks = nn.ModuleList(Block(width, heads, route) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.read_out = nn.Linear(width, dim)

    def forward(self, x: torch.Tensor, responses: torch.Tensor,
                rewards: torch.Tensor) -> torch.Tensor:
        """``x (B, d)``, ``responses (B, n, d)``, ``rewards (B, n)`` -> ``(B, n, d)``, row t
        predicted from examples 0..t."""
        tokens = torch.cat([x[:, None].expand_as(responses), responses, rewards[..., None]], -1)
        h = self.read_in(tokens)
        for block in self.blocks:
            h = block(h, rewards)
        return self.read_out(self.norm(h))


def train_model(model: ICATransformer, *, steps: int, batch: int, lr: float,
                generator: torch.Generator, log: Callable[[str], None] | None = None,
                log_every: int = 100) -> list[float]:
    """Adam on ``prefix_objective`` over fresh noise-free sequences each step (as the official
    training does), the learning rate decayed to 0 along a cosine. Returns the losses."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    losses = []
    model.train()
    for step in range(steps):
        seqs = sample_sequences(batch, generator=generator)
        loss = prefix_objective(model(seqs.x, seqs.responses, seqs.observed), seqs.responses,
                                seqs.observed)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if log is not None and (step + 1) % log_every == 0:
            recent = losses[-log_every:]
            log(f"  step {step + 1}/{steps}: objective {sum(recent) / len(recent):.4f}")
    model.eval()
    return losses
