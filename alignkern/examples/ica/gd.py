"""Gradient descent two ways: the official GD baseline (Adam on a linear map, cosine scores), and
the constructed transformer whose hand-set layers are plain gradient descent on the
Plackett–Luce loss, with the explicit gradient descent it must equal."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...losses import plackett_luce_loss
from ...ops.reward_attention import reward_attention
from .data import DIM, Sequences

# ----------------------------------------------------------------------------- the GD baseline


def gd_steps(p: float) -> int:
    """The official baseline's number of Adam steps at reward noise ``p``: int(50 - 25 p)."""
    return int(50 - p * 25)


def gd_baseline(seqs: Sequences, ks: Sequence[int], *, steps: int, lr: float = 0.1,
                generator: torch.Generator | None = None,
                init: torch.Tensor | None = None) -> torch.Tensor:
    """The official GD baseline: for each sequence and each k, a fresh linear map W (initialised
    as ``nn.Linear(d, d, bias=False)`` is, U(-1/sqrt(d), 1/sqrt(d))) trained by Adam for ``steps``
    steps on the Plackett–Luce loss of the scores cos(x W, y_j) over the first k examples, ranked
    by their observed rewards; the prediction is x W. All the (sequence, k) problems run as one
    batch: Adam is elementwise, so this is the same as one optimizer per problem.

    ``init (B, len(ks), d, d)``: the starting maps, instead of drawing them from ``generator``.
    Returns ``(B, len(ks), d)``."""
    batch, n, dim = seqs.responses.shape
    ks_t = torch.as_tensor(list(ks))
    if init is None:
        init = torch.rand(batch, len(ks), dim, dim, generator=generator, dtype=seqs.x.dtype)
        init = (2 * init - 1) * dim ** -0.5
    w = nn.Parameter(init.clone())
    optimizer = torch.optim.Adam([w], lr=lr)
    mask = (torch.arange(n) < ks_t[:, None]).expand(batch, -1, -1).flatten(0, 1)
    ranked_by = seqs.observed[:, None].expand(-1, len(ks), -1).flatten(0, 1)

    def predict():
        return torch.einsum("bi,bkij->bkj", seqs.x, w)

    for _ in range(steps):
        scores = F.cosine_similarity(predict()[:, :, None], seqs.responses[:, None], dim=-1)
        loss = plackett_luce_loss(scores.flatten(0, 1), ranked_by, mask, reduction="sum")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return predict()


# ----------------------------------------------------------------------------- the construction


def _copy(width: int, src: int, dst: int, dim: int, scale: float = 1.0) -> torch.Tensor:
    """A ``(width, width)`` matrix that adds ``scale`` times coordinates src..src+dim of a state
    into coordinates dst..dst+dim."""
    m = torch.zeros(width, width, dtype=torch.float64)
    m[src:src + dim, dst:dst + dim] = scale * torch.eye(dim, dtype=torch.float64)
    return m


class ConstructedGD(nn.Module):
    """A transformer whose weights are set by hand so that layer l performs step l of plain
    gradient descent, from y_hat = 0 with step ``lr``, on the mean Plackett–Luce loss
    (1/k) sum_i [-s_(i) + log sum_{j ranked at or below i} exp s_(j)] of the theorem's scores
    s_j = -|y_hat - y_j|^2 / tau over k in-context examples (Wang et al. 2024, Theorem 3.2 with
    one query shared by the examples, as in the synthetic task; ``temperature`` tau = 1 is the
    theorem's own score: the responses' squared norms are ~d^2 = 25, so at tau = 1 the softmax
    over them is nearly one-hot and the default tau = 50 keeps it soft).

    Token j's state is ``[y_j | y_hat | ybar_j | -|y_j|^2 | r_j]`` (width 3d + 2). One layer:

    1. reward attention, queries y_hat, keys and values y_j, key bias -|y_j|^2 / tau, scale
       2 / tau, key and
       query ranks r_j (each token reads the examples ranked at or below it): the softmax weights
       are exp(s_j) over token i's Plackett–Luce suffix, so the output is the suffix average
       ybar_i, written into its slot;
    2. uniform attention (zero queries and keys), values y_j - ybar_j, output scaled by
       2 lr / tau into y_hat's slot: the gradient of the mean loss is
       -2 / (tau k) sum_i (y_i - ybar_i), so this is y_hat <- y_hat - lr * grad;
    3. a ReLU MLP that subtracts ybar_j (relu(a) - relu(-a) = a) to leave its slot empty.

    The weights are float64 buffers; ``forward`` runs in the inputs' dtype."""

    def __init__(self, dim: int = DIM, layers: int = 4, lr: float = 10.0,
                 temperature: float = 50.0):
        super().__init__()
        self.dim, self.layers, self.lr, self.temperature = dim, layers, lr, temperature
        width = 3 * dim + 2
        y, pred, avg, norm, rank = 0, dim, 2 * dim, 3 * dim, 3 * dim + 1
        select = torch.eye(width, dtype=torch.float64)
        self.register_buffer("w_query", select[:, pred:pred + dim])
        self.register_buffer("w_key", select[:, y:y + dim])
        self.register_buffer("w_bias", select[:, norm] / temperature)
        self.register_buffer("w_rank", select[:, rank])
        self.register_buffer("w_avg_out", _copy(width, 0, avg, dim)[:dim])
        self.register_buffer("w_step_value", select[:, y:y + dim] - select[:, avg:avg + dim])
        self.register_buffer("w_step_out", _copy(width, 0, pred, dim, 2 * lr / temperature)[:dim])
        self.register_buffer("w_mlp_in", torch.cat([select[:, avg:avg + dim],
                                                    -select[:, avg:avg + dim]], 1))
        self.register_buffer("w_mlp_out", torch.cat([-select[avg:avg + dim],
                                                     select[avg:avg + dim]], 0))

    def embed(self, responses: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
        """``responses (B, k, d)``, ``rewards (B, k)`` -> the states ``(B, k, 3d + 2)``."""
        empty = torch.zeros_like(responses)
        return torch.cat([responses, empty, empty, -(responses ** 2).sum(-1, keepdim=True),
                          rewards[..., None]], -1)

    def layer(self, h: torch.Tensor) -> torch.Tensor:
        """One gradient step: ``h (B, k, 3d + 2)`` -> the same shape."""
        w = {name: buf.to(h.dtype) for name, buf in self.named_buffers()}
        rank = h @ w["w_rank"]
        avg = reward_attention((h @ w["w_query"])[:, None], (h @ w["w_key"])[:, None],
                               (h @ w["w_key"])[:, None], key_bias=h @ w["w_bias"],
                               key_rank=rank, query_rank=rank, scale=2.0 / self.temperature)[:, 0]
        h = h + avg @ w["w_avg_out"]
        zeros = h.new_zeros(h.shape[0], 1, h.shape[1], self.dim)
        step = reward_attention(zeros, zeros, (h @ w["w_step_value"])[:, None])[:, 0]
        h = h + step @ w["w_step_out"]
        return h + torch.relu(h @ w["w_mlp_in"]) @ w["w_mlp_out"]

    def forward(self, responses: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
        """``responses (B, k, d)``, ``rewards (B, k)`` -> y_hat after ``layers`` steps ``(B, d)``
        (every token holds the same y_hat; the last one's is read)."""
        h = self.embed(responses, rewards)
        for _ in range(self.layers):
            h = self.layer(h)
        return h[:, -1, self.dim:2 * self.dim]


def explicit_gd(responses: torch.Tensor, rewards: torch.Tensor, *, steps: int = 4,
                lr: float = 10.0, temperature: float = 50.0) -> torch.Tensor:
    """``steps`` steps of plain gradient descent on y_hat (from 0, step ``lr``) on the mean
    Plackett–Luce loss (``alignkern.losses.plackett_luce_loss`` / k) of the scores
    -|y_hat - y_j|^2 / temperature; what ``ConstructedGD`` must compute. ``responses (B, k, d)``, ``rewards
    (B, k)`` -> ``(B, d)``."""
    k = responses.shape[1]
    y_hat = responses.new_zeros(responses.shape[0], responses.shape[2])
    for _ in range(steps):
        y_hat = y_hat.detach().requires_grad_(True)
        scores = -((y_hat[:, None] - responses) ** 2).sum(-1) / temperature
        loss = plackett_luce_loss(scores, rewards, reduction="sum") / k
        (grad,) = torch.autograd.grad(loss, y_hat)
        y_hat = y_hat - lr * grad
    return y_hat.detach()
