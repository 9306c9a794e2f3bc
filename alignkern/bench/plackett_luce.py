"""Benchmark cases for plackett_luce_loss: the listwise loss over B lists of N candidates.

Providers (each ``(scores, rewards, mask) -> losses (B,)``):
  alignkern       ``alignkern.losses.plackett_luce_loss``: one sort and a reverse
                  log-cumsum-exp, O(N log N) time and O(B·N) memory
  torch-pairwise  ``alignkern.reference.plackett_luce_loss``: the definition written as a masked
                  (B, N, N) log-sum-exp over "still available" candidates, O(N²) — what one writes
                  without the sort
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import losses, reference

KERNEL = "plackett_luce_loss"
PROVIDERS = ("alignkern", "torch-pairwise")
GPU_ONLY = ()
SWEPT = ("N", "candidates per list N")


def alignkern_plackett_luce(scores, rewards, mask):
    return losses.plackett_luce_loss(scores, rewards, mask, reduction="none")


def providers(device: torch.device) -> dict:
    return {"alignkern": alignkern_plackett_luce, "torch-pairwise": reference.plackett_luce_loss}


@dataclass(frozen=True)
class Case:
    lists: int
    candidates: int
    dtype: torch.dtype = torch.float32

    @property
    def x(self) -> int:
        return self.candidates

    @property
    def label(self) -> str:
        return f"B={self.lists} N={self.candidates} {str(self.dtype).removeprefix('torch.')}"

    def make_inputs(self, device: torch.device):
        shape = (self.lists, self.candidates)
        scores = torch.randn(shape, device=device, dtype=self.dtype)
        rewards = torch.randint(0, 10, shape, device=device).float()  # graded rewards: ties
        mask = torch.rand(shape, device=device) > 0.1
        return scores, rewards, mask

    def flops(self, mode: str) -> int:
        return 0

    def bytes_moved(self, mode: str) -> int:
        """Compulsory traffic: read scores, rewards and mask (4 + 4 + 1 bytes a candidate); the
        backward writes the scores' gradient (4 bytes)."""
        per_candidate = 9 if mode == "fwd" else 13
        return per_candidate * self.lists * self.candidates

    def items(self, mode: str) -> tuple[int, str]:
        """A loss's throughput: candidates (over all lists) per second."""
        return self.lists * self.candidates, "candidates"


def cases(device: torch.device, quick: bool) -> list[Case]:
    if device.type == "cuda":
        return [Case(64, n) for n in ((1024,) if quick else (256, 1024, 4096))]
    return [Case(8, n) for n in ((512,) if quick else (64, 512, 4096))]


def default_cases(device: torch.device) -> list[Case]:
    """The CPU default run's representative case (from the full sweep)."""
    return [Case(8, 512)]


def runs(found: dict) -> list[tuple[str, str]]:
    return [(mode, name) for mode in ("fwd", "fwd+bwd") for name in found]


def forward_fn(provider, *inputs):
    return lambda: provider(*inputs)


def forward_backward_fn(provider, scores, rewards, mask):
    leaf = scores.detach().requires_grad_(True)
    grad_out = torch.randn(scores.shape[0], device=scores.device)

    def step():
        return torch.autograd.grad(provider(leaf, rewards, mask), leaf, grad_out)

    return step
